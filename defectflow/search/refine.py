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
forces vanish: each step is a Newton step with the surrogate's curvature. Each step starts from the point of
lowest HF energy so far: a step that raises the HF energy is rejected and the next one is half as long (a trust
region).

Where the surrogate's curvature is wrong (a soft mode it makes stiff), the steps are short and convergence is
slow. ``secant=True`` (``verify.refine_secant``) adds a curvature term ½ dᵀ A d to the correction, A learnt from the
steps so far (Powell-symmetric-Broyden updates to the HF − surrogate force change, skipped where the HF energy curves
down along the step, as in BFGS). Measured on the benchmark's `far` preset (docs/benchmarks.md, session 9): it
brings V_Si⁰ from 0.19 to 0.02 eV/Å in 2 single points where the plain correction needs more than 4, but it loses
V_Si²⁺'s escape from a saddle-like surrogate minimum (0.78 eV above the HF ground state) to the outward ground
state, which the plain correction reaches in 5 single points. Off by default: the ground state matters more.

A rejected step says the surrogate's curvature cannot be trusted at that point. The shortened retry is then
taken along the same direction, which need not go downhill in HF at all when the corrected relaxation ended in
another of the surrogate's basins (seen on the benchmark's `far` preset, V_Si²⁺: four halvings of one step, all
rejected, 20 meV above the HF minimum at 0.30 eV/Å). ``descent=True`` (``verify.refine_descent``) makes every step
from a point where the last one was rejected (trust radius below ``trust``) a steepest-descent step instead: along
the HF force of the best point, its length the corrected surrogate's minimum along that line, at most the halved
radius. The HF force direction goes downhill for a short enough step, so halving it ends in an accepted point; an
accepted step restores the full radius and the Newton steps (a dogleg-like trust region).

It stops when the HF max force at the best point is at most ``fmax`` (eV/Å), or after ``max_points`` single
points. Every point is an ordinary HF single point: it counts as an HF call, and it is HF training data.
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

__all__ = ["ForceCorrection", "RefinePoint", "descent_step", "psb_update", "refine_minimum"]


class ForceCorrection(Calculator):
    """A quadratic correction around x0: E(x) = e0 − f · d + ½ dᵀ A d, forces f − A d, with d = x − x0 (minimum-image,
    flattened to 3N) and A symmetric (eV/Å²; none: a constant force field). Added to a surrogate
    (:class:`ase.calculators.mixing.SumCalculator`) it makes the sum agree with another method's energy and forces
    at x0, and with A, its change of forces near x0. The net force Σ_i f_i is removed first: it would only translate
    the cell, without end (a DFT code's forces need not sum to exactly zero)."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, positions: np.ndarray, forces: np.ndarray, energy: float, hessian: np.ndarray | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.x0 = np.array(positions, dtype=float)
        self.f = net_free(forces)
        self.e0 = float(energy)
        self.a = None if hessian is None else np.asarray(hessian, dtype=float)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = find_mic(self.atoms.positions - self.x0, self.atoms.cell, pbc=self.atoms.pbc)[0]
        e = self.e0 - float(np.sum(self.f * d))
        forces = self.f.copy()
        if self.a is not None:
            ad = (self.a @ d.ravel()).reshape(d.shape)
            e += 0.5 * float(np.sum(d * ad))
            forces -= ad
        self.results = {"energy": e, "free_energy": e, "forces": forces}


def net_free(forces) -> np.ndarray:
    """Forces (N×3) with their mean removed."""
    f = np.array(forces, dtype=float)
    return f - f.mean(axis=0)


def psb_update(a: np.ndarray, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Powell-symmetric-Broyden update of a symmetric curvature estimate ``a`` (3N×3N) to the secant condition
    ``a_new @ s = y`` (step s, change of gradient y, both flattened), the least change of ``a`` that meets it."""
    ss = float(s @ s)
    if ss < 1e-12:
        return a
    u = y - a @ s
    return a + (np.outer(u, s) + np.outer(s, u)) / ss - float(u @ s) * np.outer(s, s) / ss ** 2


def descent_step(model, atoms0, forces, radius: float, samples: int = 12) -> np.ndarray:
    """A steepest-descent step from ``atoms0`` (N×3 displacement, Å): along ``forces`` (the HF forces there, net
    force removed), to the lowest energy of the ASE calculator ``model`` (the HF-corrected surrogate) among
    ``samples`` evenly spaced points of the line up to the largest atomic move ``radius``."""
    u = net_free(forces)
    umax = float(np.max(np.linalg.norm(u, axis=1)))
    if umax <= 0:
        return np.zeros_like(u)
    ts = np.linspace(radius / umax / samples, radius / umax, samples)
    trial = atoms0.copy()
    trial.calc = model
    energies = []
    for t in ts:
        trial.positions = atoms0.positions + t * u
        energies.append(trial.get_potential_energy())
    return ts[int(np.argmin(energies))] * u


@dataclass
class RefinePoint:
    """One HF single point of the refinement: where, what HF said, what the (uncorrected) surrogate said."""

    structure: object  # pymatgen Structure
    hf: Frame
    surrogate_energy: float | None
    displacement: float  # largest atomic move from the best point, where the step started, Å
    accepted: bool = False  # it lowered the HF energy: the next step starts here
    radius: float = 0.0  # the trust radius of the next step, Å (reset to ``trust`` after an accepted step)
    descent: bool = False  # a steepest-descent step along the HF force (``refine_minimum(descent=True)``)


def refine_minimum(structure, charge: int, hf: Frame, surrogate_factory: Callable[[], object],
                   hf_single_point: Callable[[object, int, float | None], Frame], *, fmax: float = 0.05,
                   max_points: int = 6, trust: float = 0.2, relax_fmax: float | None = None,
                   max_steps: int = 300, secant: bool = False, radius: float | None = None,
                   descent: bool = False) -> Iterator[RefinePoint]:
    """Yield the HF single points of the refinement of ``structure`` (whose HF single point ``hf`` is known), until
    the HF max force is ≤ ``fmax`` eV/Å, ``max_points`` new single points are made, or an HF single point fails.

    ``surrogate_factory()``: the surrogate's ASE calculator (charge from ``atoms.info["charge"]``);
    ``hf_single_point(structure, n, surrogate_energy)``: the n-th HF single point (an engine call in its own
    folder; the uncorrected surrogate's energy there is passed along, for the error). ``trust``: the
    largest atomic move per step, Å (the linear correction holds near x_n only); ``relax_fmax``: force threshold of
    the corrected surrogate relaxation, eV/Å (default ``fmax``/10: the HF forces cannot fall below it). It also
    stops when a step moves no atom by more than 1 mÅ (nothing left to gain). ``secant``: learn the curvature
    term (off by default: see the module docstring). ``radius``: the first step's trust radius, Å (default
    ``trust``); a continuation of an earlier refinement from the same best point passes the last
    :attr:`RefinePoint.radius`, or it would repeat the steps that refinement already rejected. ``descent``: after a
    rejected step (radius below ``trust``), step along the HF force (:func:`descent_step`) instead of shortening the
    rejected step (see the module docstring); the step type follows from the radius alone, so a continuation with
    the last radius goes on as an uninterrupted refinement would."""
    relax_fmax = fmax / 10 if relax_fmax is None else relax_fmax
    surrogate = surrogate_factory()
    sur_engine = CalculatorEngine(surrogate, xc="mace:hf")
    best, best_hf = structure, hf  # the lowest HF energy so far: every step starts there
    sur = sur_engine.single_point(best, charge, workdir=".")
    if sur.energy is None or sur.forces is None or best_hf.forces is None:
        logger.warning("refine: no surrogate or HF forces at the start (%s): not refined", sur.error)
        return
    residual = net_free(np.asarray(best_hf.forces) - np.asarray(sur.forces))
    curvature = None  # the HF − surrogate curvature along the steps so far (secant updates), eV/Å²
    radius = trust if radius is None else radius
    for n in range(1, max_points + 1):
        f_now = best_hf.fmax
        if f_now is None or best_hf.energy is None or f_now <= fmax:
            return
        atoms0 = structure_to_atoms(best, charge)
        correction = ForceCorrection(atoms0.positions, residual, best_hf.energy - sur.energy, curvature)
        model = SumCalculator([surrogate, correction])
        steepest = descent and radius < trust * (1 - 1e-9)
        if steepest:  # the last step from here was rejected: go down the HF force instead (module docstring)
            new = atoms0.copy()
            d = descent_step(model, atoms0, best_hf.forces, radius)
        else:
            corrected = CalculatorEngine(model, xc="mace:hf+HF force correction")
            traj = corrected.relax(best, charge, workdir=None, fmax=relax_fmax, max_steps=max_steps, keep="last")
            if traj.final is None:
                logger.warning("refine step %d: corrected surrogate relaxation failed: %s", n, traj.error)
                return
            new = structure_to_atoms(traj.final.structure, charge)
            d = find_mic(new.positions - atoms0.positions, atoms0.cell, pbc=True)[0]
        move = float(np.max(np.linalg.norm(d, axis=1)))
        if move < 1e-3 or radius < 1e-3:  # nothing left to gain, or steps below the SCF's noise
            return
        if move > radius:  # outside the correction's reach: a step of length radius along the same direction
            d *= radius / move
            move = radius
        new.positions = atoms0.positions + d
        nxt = atoms_to_structure(new, charge)
        sur_next = sur_engine.single_point(nxt, charge, workdir=".")
        if sur_next.energy is None or sur_next.forces is None:
            logger.warning("refine step %d: surrogate single point failed: %s", n, sur_next.error)
            return
        frame = hf_single_point(nxt, n, sur_next.energy)
        point = RefinePoint(structure=nxt, hf=frame, surrogate_energy=sur_next.energy, displacement=move,
                            radius=radius, descent=steepest)
        if frame.energy is None or frame.forces is None:
            yield point
            return
        # secant: the residual's change along the step is the curvature the surrogate lacks (gradient = −force);
        # learnt from a rejected step too. Skipped where the HF energy curves down along the step (sᵀy ≤ 0, as in
        # BFGS): near a saddle a Newton model would climb to the maximum, while the plain correction walks down
        res_next = net_free(np.asarray(frame.forces) - np.asarray(sur_next.forces))
        hf_curvature = -float(np.sum(d * (net_free(frame.forces) - net_free(best_hf.forces))))
        if secant and hf_curvature > 0:
            curvature = psb_update(np.zeros((d.size, d.size)) if curvature is None else curvature, d.ravel(),
                                   -(res_next - residual).ravel())
        accepted = frame.energy < best_hf.energy
        logger.info("refine step %d (%s): moved %.3f Å, HF energy %+.1f meV, HF max force %.3f -> %.3f eV/Å (%s)",
                    n, "HF-force descent" if steepest else "Newton", move, 1000 * (frame.energy - best_hf.energy),
                    f_now, frame.fmax,
                    "accepted" if accepted else "rejected: back to the best point, step halved")
        if accepted:  # trust region: a step that lowers the HF energy is taken, one that raises it is not
            best, best_hf, sur, residual, radius = nxt, frame, sur_next, res_next, trust
        else:
            radius = move / 2
        point.accepted, point.radius = accepted, radius
        yield point
