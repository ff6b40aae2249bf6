"""verify.mode refine (defectflow.search.refine): HF single points along the surrogate relaxation corrected by the
last point's HF forces converge on the HF minimum, not the surrogate's."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.mixing import SumCalculator

from defectflow.engines import CalculatorEngine
from defectflow.engines.base import atoms_to_structure, structure_to_atoms
from defectflow.search import rmsd
from defectflow.search.refine import ForceCorrection, psb_update, refine_minimum


def cu_vacancy(rattle: float = 0.05):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    del atoms[0]
    atoms.rattle(rattle, seed=1)
    return atoms_to_structure(atoms, 0)


def test_the_linear_correction_matches_energy_and_forces_at_its_point_and_is_conservative():
    s = cu_vacancy()
    atoms = structure_to_atoms(s, 0)
    f = np.random.default_rng(0).normal(0, 0.3, (len(atoms), 3))
    f -= f.mean(axis=0)  # a net force is removed (it would translate the cell): see the last assertion
    corr = ForceCorrection(atoms.positions, f, 1.5)
    atoms.calc = corr
    assert atoms.get_potential_energy() == pytest.approx(1.5) and np.allclose(atoms.get_forces(), f)
    step = np.random.default_rng(1).normal(0, 0.01, atoms.positions.shape)
    atoms.positions += step  # E changes by −F·Δx, exactly
    assert atoms.get_potential_energy() == pytest.approx(1.5 - np.sum(f * step))
    shifted = ForceCorrection(atoms.positions, f + [1.0, -2.0, 0.5], 0.0)
    assert np.allclose(shifted.get_forces(atoms), f)


def test_refine_converges_on_the_hf_minimum_when_the_surrogate_misses_it(tmp_path, monkeypatch):
    """HF = EMT. Surrogate = twice EMT (wrong curvature) plus a constant force error of 0.3 eV/Å rms (a displaced
    minimum). From the surrogate's own minimum, refine reaches the HF minimum (max force ≤ fmax) in a few HF
    single points, each a Newton step with twice the true curvature; the secant option learns the missing curvature
    and needs fewer. An HF relaxation from the same start is the reference."""
    monkeypatch.chdir(tmp_path)
    start = cu_vacancy()
    f_err = np.random.default_rng(2).normal(0, 0.3, (len(start), 3))

    def surrogate():
        return SumCalculator([EMT(), EMT(), ForceCorrection(structure_to_atoms(start, 0).positions, f_err, 0.0)])

    sur_min = CalculatorEngine(surrogate(), optimizer="BFGS").relax(start, 0, workdir=None, fmax=1e-3,
                                                                    max_steps=500, keep="last").final.structure
    hf = CalculatorEngine(EMT(), xc="EMT", optimizer="BFGS")
    hf_min = hf.relax(sur_min, 0, workdir=None, fmax=1e-3, max_steps=500, keep="last").final.structure
    first = hf.single_point(sur_min, 0, workdir=".")
    assert first.fmax > 0.1 and rmsd(sur_min, hf_min) > 0.02  # the surrogate minimum is not the HF one
    calls = []

    def hf_point(structure, n, e_sur):
        calls.append((n, e_sur))
        return hf.single_point(structure, 0, workdir=".")

    points = list(refine_minimum(sur_min, 0, first, surrogate, hf_point, fmax=0.01, max_points=10, trust=0.2))
    forces = [first.fmax] + [p.hf.fmax for p in points]
    assert forces[-1] <= 0.01 and len(points) <= 8, forces
    # Newton steps with twice the true curvature: each one halves the force
    assert all(b == pytest.approx(a / 2, rel=0.15) for a, b in zip(forces, forces[1:])), forces
    # the secant option learns the missing curvature along the steps: fewer single points
    fast = list(refine_minimum(sur_min, 0, first, surrogate, hf_point, fmax=0.01, max_points=10, secant=True))
    assert fast[-1].hf.fmax <= 0.01 and len(fast) < len(points) and len(fast) <= 3
    assert rmsd(points[-1].structure, hf_min) < 0.01 < rmsd(sur_min, hf_min)
    assert [n for n, _ in calls][:len(points)] == list(range(1, len(points) + 1))
    assert all(e is not None for _, e in calls)
    # an HF minimum already: nothing to do
    assert list(refine_minimum(hf_min, 0, hf.single_point(hf_min, 0, workdir="."), surrogate, hf_point,
                               fmax=0.01)) == []


def test_refine_moves_no_atom_further_than_the_trust_radius(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = cu_vacancy(0.2)
    hf = CalculatorEngine(EMT(), xc="EMT")
    f_err = np.random.default_rng(3).normal(0, 2.0, (len(start), 3))  # a far-off surrogate

    def surrogate():
        return SumCalculator([EMT(), ForceCorrection(structure_to_atoms(start, 0).positions, f_err, 0.0)])

    pts = list(refine_minimum(start, 0, hf.single_point(start, 0, workdir="."), surrogate,
                              lambda s, n, e: hf.single_point(s, 0, workdir="."), fmax=1e-4, max_points=3,
                              trust=0.05))
    assert len(pts) == 3 and all(p.displacement <= 0.05 + 1e-9 for p in pts)
    # measured from the structures, not the self-report: every point lies within the trust radius of the start or
    # of an earlier point (each step starts from the best point so far)
    from ase.geometry import find_mic

    visited = [structure_to_atoms(start, 0)]
    for p in pts:
        a = structure_to_atoms(p.structure, 0)
        moves = [np.linalg.norm(find_mic(a.positions - b.positions, b.cell, pbc=True)[0], axis=1).max()
                 for b in visited]
        assert min(moves) <= 0.05 + 1e-6, moves
        visited.append(a)


def test_a_continuation_with_the_last_radius_goes_on_where_the_refinement_stopped(tmp_path, monkeypatch):
    """verify.refine_leftover continues a refinement from its best point. A surrogate five times too soft (0.2 ×
    EMT) overshoots: every step raises the HF energy and is rejected, halving the trust radius. Continued with the
    last point's radius, the refinement makes the very point an uninterrupted one makes next; from the full radius it
    would repeat the first, rejected, step (seen on the benchmark's `close` preset: 4 HF calls spent twice)."""
    from ase.calculators.mixing import LinearCombinationCalculator

    monkeypatch.chdir(tmp_path)
    start = cu_vacancy(0.1)
    hf = CalculatorEngine(EMT(), xc="EMT")
    first = hf.single_point(start, 0, workdir=".")

    def run(n, radius=None):
        return list(refine_minimum(start, 0, first, lambda: LinearCombinationCalculator([EMT()], [0.2]),
                                   lambda s, k, e: hf.single_point(s, 0, workdir="."), fmax=1e-3, max_points=n,
                                   trust=0.2, radius=radius))

    whole, stopped = run(3), run(2)
    assert [p.accepted for p in whole] == [False, False, False]
    assert [p.radius for p in stopped] == pytest.approx([0.1, 0.05]) and stopped[-1].hf.energy > first.energy
    (next_point,) = run(1, radius=stopped[-1].radius)
    assert next_point.displacement == pytest.approx(0.05)
    assert next_point.hf.energy == pytest.approx(whole[2].hf.energy)
    assert rmsd(next_point.structure, whole[2].structure) < 1e-8
    (repeat,) = run(1)  # what the continuation did before: the first step again
    assert repeat.hf.energy == pytest.approx(whole[0].hf.energy)


def test_the_secant_update_meets_the_secant_condition_and_stays_symmetric():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(6, 6))
    a = a + a.T
    s, y = rng.normal(size=6), rng.normal(size=6)
    b = psb_update(a, s, y)
    assert np.allclose(b @ s, y) and np.allclose(b, b.T)
    assert np.allclose(psb_update(a, np.zeros(6), y), a)  # no step, nothing learnt
    # a correction with curvature: forces f − A d, energy consistent with them
    atoms = structure_to_atoms(cu_vacancy(), 0)
    n = 3 * len(atoms)
    h = np.diag(np.full(n, 2.0))
    corr = ForceCorrection(atoms.positions, np.zeros((len(atoms), 3)), 0.0, h)
    atoms.calc = corr
    d = rng.normal(0, 0.01, atoms.positions.shape)
    atoms.positions += d
    assert np.allclose(atoms.get_forces(), -2.0 * d) and atoms.get_potential_energy() == pytest.approx(np.sum(d * d))


def test_a_step_that_raises_the_hf_energy_is_rejected_and_the_next_one_is_shorter(tmp_path, monkeypatch):
    """An HF whose energy is 10 eV higher at every new point (EMT + 10 eV away from the start): every step is
    rejected, each next one starts from the same best point and is half as long."""
    monkeypatch.chdir(tmp_path)
    start = cu_vacancy(0.1)
    hf = CalculatorEngine(EMT(), xc="EMT")
    first = hf.single_point(start, 0, workdir=".")

    def uphill(structure, n, e_sur):
        frame = hf.single_point(structure, 0, workdir=".")
        return frame.model_copy(update={"energy": frame.energy + 10.0})

    pts = list(refine_minimum(start, 0, first, EMT, uphill, fmax=1e-3, max_points=3, trust=0.1))
    assert len(pts) == 3 and pts[0].displacement == pytest.approx(0.1)
    assert pts[1].displacement == pytest.approx(0.05) and pts[2].displacement == pytest.approx(0.025)
    # every step left from the start: the moves are along the same corrected-surrogate direction, shorter
    a0 = structure_to_atoms(start, 0).positions
    d = [structure_to_atoms(p.structure, 0).positions - a0 for p in pts]
    assert np.allclose(d[1], d[0] / 2, atol=1e-6) and np.allclose(d[2], d[0] / 4, atol=1e-6)


def test_after_a_rejected_step_the_descent_option_goes_down_the_hf_force(tmp_path, monkeypatch):
    """A surrogate with a spurious soft mode: EMT plus a negative curvature along a direction v perpendicular to
    the HF force at the start. The corrected relaxation slides along v, where HF (EMT) rises, so the Newton step and
    every shortened retry along it raise the HF energy: without ``descent`` the refinement never moves. With it, the
    step after the first rejection goes along the HF force, is accepted, and the full radius and Newton steps
    come back."""
    monkeypatch.chdir(tmp_path)
    start = cu_vacancy(0.1)
    x0 = structure_to_atoms(start, 0).positions
    hf = CalculatorEngine(EMT(), xc="EMT")
    first = hf.single_point(start, 0, workdir=".")
    f = np.asarray(first.forces) - np.mean(first.forces, axis=0)
    v = np.random.default_rng(5).normal(size=f.shape)
    v -= v.mean(axis=0)
    v -= np.sum(v * f) / np.sum(f * f) * f  # ⟂ the HF force: no first-order gain along it
    v = v.ravel() / np.linalg.norm(v)
    soft = -30.0 * np.outer(v, v)  # eV/Å²: the corrected surrogate runs downhill along ±v

    def surrogate():
        return SumCalculator([EMT(), ForceCorrection(x0, np.zeros_like(x0), 0.0, soft)])

    def run(descent):
        return list(refine_minimum(start, 0, first, surrogate, lambda s, k, e: hf.single_point(s, 0, workdir="."),
                                   fmax=1e-3, max_points=4, trust=0.2, descent=descent))

    newton = run(False)
    assert newton and not any(p.accepted for p in newton) and not any(p.descent for p in newton)
    steep = run(True)
    assert steep[0].hf.energy == pytest.approx(newton[0].hf.energy)  # the same first (Newton) step, rejected
    assert not steep[0].accepted and steep[1].descent and steep[1].displacement <= 0.1 + 1e-9
    assert steep[1].accepted and steep[1].hf.energy < first.energy and steep[1].radius == pytest.approx(0.2)
    # the step is along the HF force of the start, and the corrected surrogate's model of it is exact to first order
    d = structure_to_atoms(steep[1].structure, 0).positions - x0
    cos = np.sum(d * f) / np.linalg.norm(d) / np.linalg.norm(f)
    assert cos > 0.999
    assert steep[2].descent is False  # after an accepted step: Newton again
