"""The `ase` engine with real calculators: tblite GFN1-xTB on a charged Si vacancy cell, EMT for mechanics."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from conftest import GFN1, si_conventional, si_vac15

from defectflow.engines import EngineError, get_engine
from defectflow.engines.base import structure_to_atoms

pytest.importorskip("tblite")




@pytest.fixture(scope="module")
def energies():
    engine = get_engine(GFN1, fidelity="low")
    s = si_vac15()
    return {q: engine.single_point(s, q) for q in (-1, 0, 1)}


def test_charged_single_points_record_q_and_differ(energies):
    for q, frame in energies.items():
        assert frame.error is None and frame.scf_converged
        assert frame.charge == q and frame.structure.charge == q
        assert frame.engine == "ase" and frame.xc == "GFN1-xTB" and frame.fidelity == "low"
        assert np.isfinite(frame.energy)
        assert frame.forces_array.shape == (15, 3)
        assert frame.wall_seconds > 0
    e = {q: f.energy for q, f in energies.items()}
    assert len({round(v, 6) for v in e.values()}) == 3


def test_charge_energies_are_convex_at_fixed_geometry(energies):
    """E(q+1) + E(q-1) - 2 E(q) = I - A > 0: removing an electron costs more than adding one gains.

    This fails if the charge were ignored (all equal → 0) or passed with the wrong sign pattern."""
    e = {q: f.energy for q, f in energies.items()}
    gap_like = e[1] + e[-1] - 2 * e[0]
    assert 0.05 < gap_like < 5.0, gap_like
    # GFN1 energies are vacuum-referenced: ionising the cell costs energy, adding an electron releases it
    assert e[1] > e[0] > e[-1]


def test_relaxation_keeps_every_step_and_lowers_the_energy(tmp_path):
    engine = get_engine(GFN1)
    traj = engine.relax(si_vac15(rattle=0.05), -1, tmp_path, fmax=0.3, max_steps=6)
    assert traj.status in ("converged", "unconverged"), traj.error
    assert traj.n_steps >= 2
    assert [f.step for f in traj.frames] == list(range(traj.n_steps))
    assert all(f.charge == -1 for f in traj.frames)
    assert traj.frames[-1].energy < traj.frames[0].energy
    if traj.status == "converged":
        assert traj.final.fmax < 0.3


def test_a_relaxation_can_keep_every_nth_step_and_the_last(tmp_path):
    """``keep=n`` (the surrogate search's paths): the frames of ``keep='all'`` at steps 0, n, 2n … and the final
    one, each with its optimizer step."""
    engine = get_engine(GFN1)
    start = si_vac15(rattle=0.08)
    full = engine.relax(start, 0, None, fmax=0.2, max_steps=9, keep="all")
    thin = engine.relax(start, 0, None, fmax=0.2, max_steps=9, keep=4)
    last = full.frames[-1].step
    assert [f.step for f in thin.frames] == sorted({*range(0, last + 1, 4), last})
    by_step = {f.step: f.energy for f in full.frames}
    assert all(f.energy == pytest.approx(by_step[f.step], abs=1e-8) for f in thin.frames)
    assert thin.status == full.status


def test_step_limit_is_recorded_as_unconverged(tmp_path):
    traj = get_engine(GFN1).relax(si_vac15(rattle=0.05), 0, tmp_path, fmax=1e-4, max_steps=2)
    assert traj.status == "unconverged"
    assert "within 2 steps" in traj.error
    assert 1 <= traj.n_steps <= 3


class Exploding(Calculator):
    """A calculator that fails on its second call, like an SCF that stops converging mid-relaxation."""

    implemented_properties = ["energy", "forces"]
    calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        type(self).calls += 1
        if type(self).calls > 1:
            raise RuntimeError("SCF not converged")
        self.results = {"energy": 1.0, "forces": np.full((len(atoms), 3), 0.3)}


def test_failed_calculation_is_recorded_not_raised(tmp_path):
    Exploding.calls = 0
    engine = get_engine({"engine": "ase", "calculator": f"{__name__}.Exploding"})
    traj = engine.relax(si_vac15(), 0, tmp_path, fmax=0.01, max_steps=5)
    assert traj.status == "failed" and "SCF not converged" in traj.error
    assert traj.n_steps == 1  # the frame computed before the failure is kept
    frame = engine.single_point(si_vac15(), 0)
    assert frame.energy is None and frame.scf_converged is False and "SCF not converged" in frame.error


class ChargeEcho(Calculator):
    """Energy = the total charge it sees in atoms.info (how MACE reads q)."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": float(atoms.info["charge"]), "forces": np.zeros((len(atoms), 3))}


def test_charge_reaches_calculators_that_read_atoms_info():
    engine = get_engine({"engine": "ase", "calculator": f"{__name__}.ChargeEcho", "charge_kwarg": None})
    assert engine.single_point(si_vac15(), -2).energy == -2.0


def test_structure_to_atoms_sets_info_charge():
    s = si_vac15()
    assert structure_to_atoms(s, -1).info["charge"] == -1


def test_bad_calculator_path_is_one_clear_error():
    engine = get_engine({"engine": "ase", "calculator": "no_such_pkg.Calc"})
    with pytest.raises(EngineError, match="calculator: cannot import module 'no_such_pkg'"):
        engine.single_point(si_vac15(), 0)


def test_tblite_reports_band_edges_for_bulk_si(tmp_path):

    bulk = si_conventional()
    bulk.make_supercell(2)
    f = get_engine({**GFN1, "kwargs": {"method": "GFN2-xTB", "verbosity": 0}}).single_point(bulk, 0, tmp_path)
    assert f.vbm is not None and f.cbm is not None
    # GFN2-xTB, 64-atom Si at Γ: a gap of ~1.7 eV (xTB is not DFT; this checks the edges are real levels)
    assert 0.5 < f.band_gap < 3.0
    assert -12.0 < f.vbm < -3.0  # vacuum-referenced xTB levels


def test_band_edges_one_definition_for_every_engine():
    """defectflow.engines.outputs.band_edges: what QE's, CP2K's and the ASE engine's parsers all decide with."""
    from defectflow.engines.outputs import band_edges

    levels = [-5.0, 1.0, 2.0, 3.0]
    assert band_edges(levels, [2, 2, 0.1, 0], 2.0) == (1.0, 2.0)  # restricted: half = 1
    assert band_edges(levels, [1, 1, 0.6, 0], 1.0) == (2.0, 3.0)  # a level more than half filled is occupied
    assert band_edges(levels, [2, 1, 1, 0], [2, 2, 1, 1]) == (2.0, 3.0)  # a full occupation per level
    nan = float("nan")
    assert band_edges(levels, [nan] * 4, 1.0, reference=1.5) == (1.0, 2.0)  # unprinted: below the Fermi level
    assert band_edges(levels, [1, nan, nan, 0], 1.0) == (None, None)  # unprinted, no reference
    assert band_edges(levels, [1, 1, 1, 1], 1.0) == (3.0, None)  # no empty level computed
    assert band_edges([], [], 1.0) == (None, None)


class Interrupted(Calculator):
    """Ctrl-C arriving during the calculation."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        raise KeyboardInterrupt


def test_close_calculator_runs_when_interrupted(tmp_path, monkeypatch):
    """close_calculator (which ends e.g. cp2k_shell and its MPI ranks) runs in a finally block: also for a
    KeyboardInterrupt, which is not recorded as a failure but re-raised."""
    from defectflow.engines.ase import AseEngine

    closed = []
    monkeypatch.setattr(AseEngine, "close_calculator", lambda self, calc: closed.append(type(calc).__name__))
    engine = get_engine({"engine": "ase", "calculator": f"{__name__}.Interrupted"})
    with pytest.raises(KeyboardInterrupt):
        engine.single_point(si_vac15(), 0, tmp_path / "sp")
    with pytest.raises(KeyboardInterrupt):
        engine.relax(si_vac15(), 0, tmp_path / "relax", max_steps=3)
    assert closed == ["Interrupted", "Interrupted"]
