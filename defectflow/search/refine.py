"""HF-force-corrected surrogate relaxation: ``verify.mode: refine``.

A verified surrogate minimum is not the HF minimum: the surrogate's force error moves it. On the benchmark's Si
vacancy a structure 0.05 Å (RMSD) from its HF minimum lies a median 19 meV above it in HF energy, one 0.1 Å away
89 meV (``benchmarks/reference.py near-minimum``), so a CTL good to 0.02 eV needs the HF minimum itself. An HF
relaxation from the surrogate minimum (``verify.mode: relax``) still takes 11–17 HF ionic steps from there.

``refine`` gets there with a few HF single points instead. At the current point x_n (an HF single point, with
forces), the surrogate is corrected to agree with HF to first order::

    E_n(x) = E_sur(x) + [E_HF(x_n) − E_sur(x_n)] − ΔF_n · (x − x_n),    ΔF_n = F_HF(x_n) − F_sur(x_n)

so that E_n and its forces equal the HF ones at x_n. Relaxing E_n from x_n (the search's relaxation driver, no atom
moving more than ``trust`` Å) gives x_{n+1}, where the next HF single point is made. The fixed point is where the HF
forces vanish; each step is a Newton step with the surrogate's curvature, so the error shrinks by the surrogate's
relative Hessian error per step. It stops when the HF max force is at most ``fmax`` (eV/Å), or after ``max_points``
single points. Every point is an ordinary HF single point: it counts as an HF call, and it is HF training data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.mixing import SumCalculator
from ase.geometry import find_mic

from defectflow.engines import CalculatorEngine
from defectflow.engines.base import atoms_to_structure, structure_to_atoms
from defectflow.schemas import Frame

logger = logging.getLogger(__name__)

__all__ = ["LinearCorrection", "RefinePoint", "max_force", "refine_minimum"]


class LinearCorrection(Calculator):
    """E(x) = e0 − Σ_i f_i · (x_i − x0_i) (minimum-image displacements), forces f_i: a constant force field. Added to
    a surrogate (:class:`ase.calculators.mixing.SumCalculator`) it makes the sum agree with another method's energy
    and forces at x0. The net force Σ_i f_i is removed first: it would only translate the cell, without end (a
    DFT code's forces need not sum to exactly zero)."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, positions: np.ndarray, forces: np.ndarray, energy: float, **kwargs):
        super().__init__(**kwargs)
        self.x0 = np.array(positions, dtype=float)
        self.f = np.array(forces, dtype=float)
        self.f -= self.f.mean(axis=0)
        self.e0 = float(energy)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = find_mic(self.atoms.positions - self.x0, self.atoms.cell, pbc=self.atoms.pbc)[0]
        e = self.e0 - float(np.sum(self.f * d))
        self.results = {"energy": e, "free_energy": e, "forces": self.f.copy()}


@dataclass
class RefinePoint:
    """One HF single point of the refinement: where, what HF said, what the (uncorrected) surrogate said."""

    structure: object  # pymatgen Structure
    hf: Frame
    surrogate_energy: float | None
    displacement: float  # largest atomic move from the previous point, Å


def max_force(frame: Frame | None) -> float | None:
    """Largest atomic force of a frame, eV/Å (None without forces)."""
    if frame is None or frame.forces is None:
        return None
    return float(np.max(np.linalg.norm(np.asarray(frame.forces, dtype=float), axis=1)))


def refine_minimum(structure, charge: int, hf: Frame, surrogate_factory: Callable[[], object],
                   hf_single_point: Callable[[object, int, float | None], Frame], *, fmax: float = 0.05, max_points: int = 6,
                   trust: float = 0.2, relax_fmax: float | None = None, max_steps: int = 300) -> Iterator[RefinePoint]:
    """Yield the HF single points of the refinement of ``structure`` (whose HF single point ``hf`` is known), until
    the HF max force is ≤ ``fmax`` eV/Å, ``max_points`` new single points are made, or an HF single point fails.

    ``surrogate_factory()``: the surrogate's ASE calculator (charge from ``atoms.info["charge"]``);
    ``hf_single_point(structure, n, surrogate_energy)``: the n-th HF single point (an engine call in its own
    folder; the uncorrected surrogate's energy there is passed along, for the error). ``trust``: the
    largest atomic move per step, Å (the linear correction holds near x_n only); ``relax_fmax``: force threshold of
    the corrected surrogate relaxation, eV/Å (default ``fmax``/10: the HF forces cannot fall below it). It also
    stops when a step moves no atom by more than 1 mÅ (nothing left to gain)."""
    relax_fmax = fmax / 10 if relax_fmax is None else relax_fmax
    surrogate = surrogate_factory()
    sur_engine = CalculatorEngine(surrogate, xc="mace:hf")
    current, current_hf = structure, hf
    for n in range(1, max_points + 1):
        f_now = max_force(current_hf)
        if f_now is None or current_hf.energy is None or f_now <= fmax:
            return
        sur = sur_engine.single_point(current, charge, workdir=".")
        atoms0 = structure_to_atoms(current, charge)
        correction = LinearCorrection(atoms0.positions, np.asarray(current_hf.forces) - np.asarray(sur.forces),
                                      current_hf.energy - sur.energy)
        corrected = CalculatorEngine(SumCalculator([surrogate, correction]), xc="mace:hf+HF force correction")
        traj = corrected.relax(current, charge, workdir=None, fmax=relax_fmax, max_steps=max_steps, keep="last")
        if traj.final is None:
            logger.warning("refine step %d: corrected surrogate relaxation failed: %s", n, traj.error)
            return
        new = structure_to_atoms(traj.final.structure, charge)
        d = find_mic(new.positions - atoms0.positions, atoms0.cell, pbc=True)[0]
        move = float(np.max(np.linalg.norm(d, axis=1)))
        if move < 1e-3:
            return
        if move > trust:  # outside the correction's reach: a step of length trust along the same direction
            d *= trust / move
            move = trust
        new.positions = atoms0.positions + d
        nxt = atoms_to_structure(new, charge)
        e_sur = sur_engine.single_point(nxt, charge, workdir=".").energy
        frame = hf_single_point(nxt, n, e_sur)
        yield RefinePoint(structure=nxt, hf=frame, surrogate_energy=e_sur, displacement=move)
        if frame.energy is None:
            return
        logger.info("refine step %d: moved %.3f Å, HF max force %.3f -> %s eV/Å", n, move, f_now,
                    f"{max_force(frame):.3f}" if frame.forces is not None else "?")
        current, current_hf = nxt, frame
