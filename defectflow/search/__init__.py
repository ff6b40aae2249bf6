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
    committee: Callable[[list], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    n_candidates: int = 0,
    path_every: int = 0,
) -> SearchResult:
    """Relax every start with the surrogate at charge ``charge`` and return the ranked distinct minima.

    The starts are relaxed one at a time with ASE's FIRE on ``calculator_factory()``'s calculator, or all together
    by ``relax_batch`` (structures → :class:`~defectflow.search.batched.BatchRelaxation` in the same order: the
    batched torch-sim FIRE of :func:`~defectflow.search.batched.batched_relax`). ``fmax`` in eV/Å,
    ``energy_tolerance`` in eV. A minimum with an interatomic distance below ``min_distance_factor`` × the pair's
    covalent-radius sum is rejected as unphysical (0 disables the check).

    ``committee``: structures → (energy, energy std in eV, force std in eV/Å) per structure (a
    :func:`~defectflow.search.uncertainty.committee_predict` of the committee; the search's job passes the energy
    spread relative to the other structures of the call); it gives the uncertainty at every minimum and, with
    ``n_candidates`` > 0 and relaxation paths kept, the ``n_candidates`` path frames of largest force spread (at
    most one per start) as top-up candidates. The paths are kept by ``relax_batch`` (its
    own setting) or, one start at a time, every ``path_every`` FIRE steps (0: none)."""
    if (calculator_factory is None) == (relax_batch is None):
        raise ValueError("search_ground_state: give exactly one of calculator_factory and relax_batch")
    t0 = time.perf_counter()
    finals, landscape, unconverged, failed, rejected, paths = [], {}, [], 0, {}, {}
    for s, status, energy, final, error, path in _relaxed(starts, charge, calculator_factory, relax_batch, model,
                                                          fmax, max_steps, path_every):
        if path:
            paths[s.label] = path
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
    if committee is not None and finals:
        _add_uncertainty(result, finals, paths, committee, n_candidates)
        result.wall_seconds = time.perf_counter() - t0
    if plot_dir is not None and landscape:
        result.plot = plot_landscape(result, starts, Path(plot_dir))
    return result


def _add_uncertainty(result: SearchResult, finals, paths, committee, n_candidates: int) -> None:
    """Committee spread at every final structure and minimum; the most uncertain path frames as candidates."""
    from defectflow.schemas import PathFrame

    _, e_std, f_std = committee([f[2] for f in finals])
    result.committee_size = max(result.committee_size, 2)
    std = {label: (float(e), float(f)) for (label, _, _), e, f in zip(finals, e_std, f_std, strict=True)}
    result.landscape_std = {label: v[0] for label, v in std.items()}
    for m in result.minima:
        m.energy_std, m.force_std = std[m.labels[0]]  # the minimum's structure is its first (lowest) start's
    if n_candidates <= 0 or not paths:
        return
    flat = [(label, step, st) for label, path in paths.items() for step, st in path]
    energy, e_std, f_std = committee([st for _, _, st in flat])
    best: dict[str, PathFrame] = {}
    for (label, step, st), e, es, fs in zip(flat, energy, e_std, f_std, strict=True):
        if label not in best or fs > best[label].force_std:
            best[label] = PathFrame(label=label, step=step, structure=st, energy=float(e), energy_std=float(es),
                                    force_std=float(fs))
    result.candidates = sorted(best.values(), key=lambda p: -p.force_std)[:n_candidates]


def _relaxed(starts, charge, calculator_factory, relax_batch, model, fmax, max_steps, path_every=0):
    """(start, status, energy eV, final structure, error, path) per start, one at a time or batched; ``path``:
    (step, structure) along the relaxation (batched relaxations that keep it, or every ``path_every`` steps of one
    at a time; else empty)."""
    if relax_batch is not None:
        try:
            out = relax_batch([s.structure for s in starts])
        except Exception as exc:  # a failed batch fails every start of it, reported per start
            logger.exception("batched surrogate relaxation failed")
            yield from ((s, "failed", float("nan"), None, f"{type(exc).__name__}: {exc}", []) for s in starts)
            return
        for s, r in zip(starts, out, strict=True):
            yield s, "converged" if r.converged else "unconverged", r.energy, r.structure, None, r.path
        return
    engine = CalculatorEngine(calculator_factory(), xc=model, optimizer="FIRE")
    for s in starts:
        # the one relaxation driver (engines.base.AseDrivenEngine.relax): FIRE, final frame only
        traj = engine.relax(s.structure, charge, workdir=None, fmax=fmax, max_steps=max_steps,
                            keep=path_every if path_every > 0 else "last")
        last = traj.final
        path = [(f.step, f.structure) for f in traj.frames[:-1]] if path_every > 0 else []
        if last is None:
            yield s, "failed", float("nan"), None, traj.error, path
        else:
            yield s, traj.status, float(last.energy), last.structure, traj.error, path


def plot_landscape(result: SearchResult, starts: list[SearchStart] | dict[str, float | None], plot_dir: Path,
                   verification=None, suffix: str = "") -> str:
    """Energy vs starting bond distortion of every start's surrogate minimum (relative to the lowest), with the
    committee's ±1σ, the rejected minima and, after verification, the HF energies of the verified minima; with a
    committee, a lower panel shows the committee's force uncertainty σ_F (eV/Å, largest per-atom standard
    deviation) at each distinct minimum, plotted at every start that relaxed into it.

    ``starts``: the search's starts, or start label → bond distortion fraction (None: Unperturbed, Dimer).
    ``verification``: the group's :class:`~defectflow.schemas.GroupVerification` (or None). ``suffix`` is added to
    the file name (e.g. ``_round1``). Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    e0 = min(result.landscape.values())
    with_force = any(m.force_std is not None for m in result.minima)
    if with_force:
        fig, (ax, ax_f) = plt.subplots(2, 1, figsize=(8.6, 5.8), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=(8.6, 4.4))
    distortion = starts if isinstance(starts, dict) else {s.label: s.bond_distortion for s in starts}
    special = {"Unperturbed": 0.0}

    def x_of(label: str) -> float:
        bd = distortion.get(label, distortion.get(label.split("+")[0]))
        return 100 * (bd if bd is not None else special.get(label.split("+")[0], 0.7))

    handles = []
    kinds = {"snb": ("o", "C0", 40, "ShakeNBreak start (bond distortion)"),
             "special": ("D", "C0", 40, "ShakeNBreak start (Unperturbed at 0 %, Dimer at 70 %)"),
             "rattled": ("o", "0.6", 14, "extra rattled start")}
    seen = set()
    for label, e in result.landscape.items():
        base = label.split("+")[0]
        kind = "rattled" if "+rattle" in label else ("snb" if distortion.get(base) is not None else "special")
        marker, color, size, name = kinds[kind]
        std = result.landscape_std.get(label)
        if std:
            ax.errorbar(x_of(label), e - e0, yerr=std, fmt="none", ecolor=color, elinewidth=0.8, capsize=2,
                        zorder=1)
        ax.scatter(x_of(label), e - e0, s=size, c=color, marker=marker, zorder=3 if kind != "rattled" else 2)
        seen.add(kind)
    for kind in ("snb", "special", "rattled"):
        if kind in seen:
            marker, color, size, name = kinds[kind]
            handles.append(Line2D([], [], ls="", marker=marker, color=color, markersize=6 if size > 20 else 4,
                                  label=name))
    if result.landscape_std:
        handles.append(Line2D([], [], color="0.3", lw=0.8,
                              label=rf"committee $\pm1\sigma_E$ ({result.committee_size} models)"))
    checks = [c for c in (verification.checks if verification is not None else [])
              if c.hf_energy is not None and c.ground_state_label in result.landscape]
    for c in checks:
        x = x_of(c.ground_state_label)
        ax.plot([x, x], [c.surrogate_energy - e0, c.hf_energy - e0], color="C3", lw=0.8, zorder=2)
        ax.scatter(x, c.hf_energy - e0, s=90, marker="*", c="C3", edgecolors="k", linewidths=0.4, zorder=4)
    if checks:
        handles.append(Line2D([], [], ls="", marker="*", color="C3", markeredgecolor="k", markersize=9,
                              label="HF single point at a verified minimum"))
        gs = verification.ground_state
        if gs is not None and gs.ground_state_label in result.landscape and verification.source == "verified minimum":
            ax.scatter(x_of(gs.ground_state_label), gs.hf_energy - e0, s=260, facecolors="none", edgecolors="k",
                       linewidths=1.2, zorder=5)
            handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", color="k", markersize=11,
                                  label="HF-verified ground state"))
    if result.rejected:
        bottom = ax.get_ylim()[0]
        for label in result.rejected:
            ax.scatter(x_of(label), bottom, marker="v", s=40, c="C1", zorder=4, clip_on=False)
        handles.append(Line2D([], [], ls="", marker="v", color="C1",
                              label="rejected minimum (atoms too close; energy off the axis)"))
    if with_force:
        for m in result.minima:
            if m.force_std is None:
                continue
            xs = [x_of(label) for label in m.labels if label in result.landscape]
            ax_f.scatter(xs, [m.force_std] * len(xs), s=18, c="C2", marker="s", zorder=3)
        ax_f.set_ylabel(r"$\sigma_F$ (eV/Å)")
        ax_f.set_ylim(bottom=0)
        ax_f.grid(axis="y", lw=0.3, color="0.8")
        ax_f.legend(handles=[Line2D([], [], ls="", marker="s", color="C2", markersize=5,
                                    label="committee force uncertainty at the minimum (largest per atom)")],
                    fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax_f.set_xlabel("Starting bond distortion (%)")
    else:
        ax.set_xlabel("Starting bond distortion (%)")
    ax.set_ylabel("Energy − lowest surrogate minimum (eV)")
    title = f"{result.defect} q = {result.charge:+d}, surrogate {result.model}"
    if verification is not None and verification.ground_state is not None and verification.source != \
            "verified minimum":
        title += "\n(ground state: a known HF frame, not a verified minimum)"
    ax.set_title(title, fontsize=10)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    name = f"{result.defect}_{result.charge:+d}_{result.model.replace(':', '-')}{suffix}.png"
    return save_figure(fig, plot_dir / name, dpi=150)
