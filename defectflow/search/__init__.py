"""Step 5a: surrogate ground-state search.

For one (defect, q), :func:`search_ground_state` relaxes every ShakeNBreak start plus extra rattled starts with a
surrogate ASE calculator (the trained MACE model's HF head, a Δ-model, or a foundation model for the baseline),
groups identical minima (energy within a tolerance and pymatgen ``StructureMatcher`` match), ranks them and keeps
the energy-vs-distortion landscape. :func:`rmsd` compares two structures with the same atom order under periodic
boundary conditions (the paper's ground-state RMSD).

Unphysical minima: a surrogate trained on few HF frames can have holes, regions it never saw where two atoms
collapse onto each other at a very low predicted energy (the issue-#7 benchmark found Si–Si pairs at 1.04 Å,
55–60 eV above the reference in HF). A minimum whose shortest interatomic distance is below ``min_distance_factor``
× (sum of the two atoms' covalent radii, ASE's Cordero et al. values) is therefore *rejected*: it is kept in
:attr:`SearchResult.rejected` (label → shortest distance in Å) and never becomes the ground state, so the HF
verification is spent on the lowest physical minimum instead.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from defectflow.engines import CalculatorEngine
from defectflow.plotting import save_figure
from defectflow.schemas import Minimum, SearchResult, SearchStart

logger = logging.getLogger(__name__)

__all__ = ["SearchStart", "Minimum", "SearchResult", "search_ground_state", "rattled_starts", "rmsd", "group_minima",
           "shortest_contact"]


def rmsd(a, b) -> float:
    """Root-mean-square displacement in Å between two structures with the same atoms in the same order,
    using the minimum-image convention in ``a``'s lattice."""
    if len(a) != len(b):
        raise ValueError(f"rmsd: structures have {len(a)} and {len(b)} sites")
    d = np.asarray(b.frac_coords) - np.asarray(a.frac_coords)
    d -= np.round(d)
    cart = a.lattice.get_cartesian_coords(d)
    return float(np.sqrt(np.mean(np.sum(cart**2, axis=1))))


def rattled_starts(starts: list[SearchStart], n_extra: int, stdev: float, seed: int) -> list[SearchStart]:
    """``n_extra`` Gaussian-rattled copies (stdev in Å) of every start, deterministic for ``seed``."""
    from pymatgen.core import Structure as PmgStructure

    out = []
    rng = np.random.default_rng(seed)
    for s in starts:
        for k in range(n_extra):
            st = s.structure
            cart = st.cart_coords + rng.normal(0.0, stdev, (len(st), 3))
            new = PmgStructure(st.lattice, st.species, cart, coords_are_cartesian=True, charge=st.charge)
            out.append(SearchStart(label=f"{s.label}+rattle{k + 1}", bond_distortion=s.bond_distortion, structure=new))
    return out


def shortest_contact(structure) -> tuple[float, float]:
    """(shortest interatomic distance in Å, that distance / the pair's covalent-radius sum) under periodic
    boundary conditions; the ratio is the smallest over all pairs (ASE's covalent radii, Cordero et al. 2008)."""
    from ase.data import covalent_radii

    if len(structure) < 2:
        return float("inf"), float("inf")
    dist = np.array(structure.distance_matrix, dtype=float)
    np.fill_diagonal(dist, np.inf)
    z = np.array([site.specie.Z for site in structure])
    radii = covalent_radii[z]
    ratio = dist / (radii[:, None] + radii[None, :])
    return float(dist.min()), float(ratio.min())


def group_minima(results: list[tuple[str, float, Any]], energy_tolerance: float = 0.01,
                 matcher_kwargs: dict | None = None) -> list[Minimum]:
    """Group (label, energy, structure) into distinct minima: same group when |ΔE| ≤ tol (eV) and the structures
    match under pymatgen's StructureMatcher (defaults: ltol 0.2, stol 0.3, angle_tol 5)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher(**{"ltol": 0.2, "stol": 0.3, "angle_tol": 5, "primitive_cell": False,
                                  "scale": False, "attempt_supercell": False, **(matcher_kwargs or {})})
    minima: list[Minimum] = []
    for label, energy, structure in sorted(results, key=lambda r: r[1]):
        for m in minima:
            if abs(m.energy - energy) <= energy_tolerance:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    same = matcher.fit(m.structure, structure)
                if same:
                    m.labels.append(label)
                    break
        else:
            minima.append(Minimum(energy=energy, structure=structure, labels=[label]))
    if minima:
        e0 = minima[0].energy
        for m in minima:
            m.relative_energy = m.energy - e0
    return minima


def search_ground_state(
    defect: str,
    charge: int,
    starts: list[SearchStart],
    calculator_factory: Callable[[], Any] | None = None,
    model: str = "surrogate",
    fmax: float = 0.02,
    max_steps: int = 300,
    energy_tolerance: float = 0.01,
    plot_dir: str | Path | None = None,
    min_distance_factor: float = 0.6,
    relax_batch: Callable[[list], list] | None = None,
) -> SearchResult:
    """Relax every start with the surrogate at charge ``charge`` and return the ranked distinct minima.

    The starts are relaxed one at a time with ASE's FIRE on ``calculator_factory()``'s calculator, or all together
    by ``relax_batch`` (structures → :class:`~defectflow.search.batched.BatchRelaxation` in the same order: the
    batched torch-sim FIRE of :func:`~defectflow.search.batched.batched_relax`). ``fmax`` in eV/Å,
    ``energy_tolerance`` in eV. A minimum with an interatomic distance below ``min_distance_factor`` × the pair's
    covalent-radius sum is rejected as unphysical (0 disables the check)."""
    if (calculator_factory is None) == (relax_batch is None):
        raise ValueError("search_ground_state: give exactly one of calculator_factory and relax_batch")
    t0 = time.perf_counter()
    finals, landscape, unconverged, failed, rejected = [], {}, [], 0, {}
    for s, status, energy, final, error in _relaxed(starts, charge, calculator_factory, relax_batch, model, fmax,
                                                    max_steps):
        if status == "failed" or final is None or not np.isfinite(energy):
            logger.warning("surrogate relaxation of %s q=%+d %s failed: %s", defect, charge, s.label, error)
            failed += 1
            continue
        if status == "unconverged":
            unconverged.append(s.label)
        if min_distance_factor > 0:
            shortest, ratio = shortest_contact(final)
            if ratio < min_distance_factor:
                logger.warning("%s q=%+d %s: surrogate minimum rejected, atoms %.2f Å apart (%.2f × covalent-radius "
                               "sum < %.2f)", defect, charge, s.label, shortest, ratio, min_distance_factor)
                rejected[s.label] = shortest
                continue
        landscape[s.label] = energy
        finals.append((s.label, energy, final))
    wall = time.perf_counter() - t0
    minima = group_minima(finals, energy_tolerance)
    gs = minima[0] if minima else None
    result = SearchResult(
        defect=defect, charge=charge, model=model, n_starts=len(starts), n_failed=failed, landscape=landscape,
        unconverged=unconverged, rejected=rejected, minima=minima, ground_state=gs,
        ground_state_label=min(landscape, key=landscape.get) if landscape else None,
        wall_seconds=wall, structures_per_second=len(finals) / wall if wall > 0 else 0.0,
    )
    if plot_dir is not None and landscape:
        result.plot = plot_landscape(result, starts, Path(plot_dir))
    return result


def _relaxed(starts, charge, calculator_factory, relax_batch, model, fmax, max_steps):
    """(start, status, energy eV, final structure, error) per start, one at a time or batched."""
    if relax_batch is not None:
        try:
            out = relax_batch([s.structure for s in starts])
        except Exception as exc:  # a failed batch fails every start of it, reported per start
            logger.exception("batched surrogate relaxation failed")
            yield from ((s, "failed", float("nan"), None, f"{type(exc).__name__}: {exc}") for s in starts)
            return
        for s, r in zip(starts, out, strict=True):
            yield s, "converged" if r.converged else "unconverged", r.energy, r.structure, None
        return
    engine = CalculatorEngine(calculator_factory(), xc=model, optimizer="FIRE")
    for s in starts:
        # the one relaxation driver (engines.base.AseDrivenEngine.relax): FIRE, final frame only
        traj = engine.relax(s.structure, charge, workdir=None, fmax=fmax, max_steps=max_steps, keep="last")
        last = traj.final
        if last is None:
            yield s, "failed", float("nan"), None, traj.error
        else:
            yield s, traj.status, float(last.energy), last.structure, traj.error


def plot_landscape(result: SearchResult, starts: list[SearchStart] | dict[str, float | None], plot_dir: Path) -> str:
    """Energy (relative to the ground state) vs bond distortion of every start, extra rattles as small dots.

    ``starts``: the search's starts, or start label → bond distortion fraction (None: Unperturbed, Dimer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e0 = min(result.landscape.values())
    fig, ax = plt.subplots(figsize=(5, 4))
    distortion = starts if isinstance(starts, dict) else {s.label: s.bond_distortion for s in starts}
    special = {"Unperturbed": 0.0}
    for label, e in result.landscape.items():
        bd = distortion.get(label)
        x = bd if bd is not None else special.get(label.split("+")[0], 0.7)
        extra = "+rattle" in label
        ax.scatter(100 * x, e - e0, s=12 if extra else 40, c="0.6" if extra else "C0",
                   marker="o" if bd is not None or extra else "D", zorder=3 if not extra else 2)
    ax.set_xlabel("Bond distortion (%)  [Dimer at 70 %]")
    ax.set_ylabel("Surrogate energy − ground state (eV)")
    ax.set_title(f"{result.defect} q={result.charge:+d} ({result.model})")
    ax.axhline(0, color="k", lw=0.5)
    fig.tight_layout()

    return save_figure(fig, plot_dir / f"{result.defect}_{result.charge:+d}_{result.model.replace(':', '-')}.png", dpi=150)
