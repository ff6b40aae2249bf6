"""The pure helpers of the benchmark scripts (benchmarks/bench_utils.py) on small synthetic inputs. No timing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bu = _load("bench_utils")


def test_ratio_and_verdicts():
    assert bu.ratio(60, 2) == 30
    assert bu.ratio(None, 2) is None and bu.ratio(1, 0) is None and bu.ratio(1, None) is None
    assert bu.verdict(0.01, 0.02) == "met" and bu.verdict(0.03, 0.02) == "MISSED"
    assert bu.verdict(31, 30, higher_is_better=True) == "met" and bu.verdict(29.9, 30, True) == "MISSED"
    assert bu.verdict(None, 1) == "n/a"
    assert bu.max_abs([0.01, None, -0.05]) == 0.05 and bu.max_abs([None]) is None


def _cell():
    return Structure(Lattice.cubic(5.0), ["Si", "Si", "Si"], [[0, 0, 0], [0.5, 0.5, 0], [0.25, 0.25, 0.25]])


def test_aligned_rmsd_same_order_and_rigid_shift():
    a = _cell()
    b = a.copy()
    b.translate_sites([2], [0.02, 0, 0])  # one atom moved 0.1 Å of 3
    r = bu.aligned_rmsd(a, b)
    assert r["same_order"] == pytest.approx((0.1**2 / 3) ** 0.5)
    assert r["rmsd"] <= r["same_order"] + 1e-12
    shifted = a.copy()
    shifted.translate_sites(list(range(3)), [0.1, 0.1, 0.1])  # rigid shift by 0.87 Å: same structure
    r = bu.aligned_rmsd(a, shifted)
    assert r["same_order"] == pytest.approx(0.5 * 3**0.5, rel=1e-6)
    assert r["aligned"] == pytest.approx(0.0, abs=1e-6) and r["rmsd"] == pytest.approx(0.0, abs=1e-6)


def test_pair_level_adjacent_levels_and_errors():
    # E_f(+1, 0) = 1.0, E_f(0, 0) = 1.5, E_f(-1, 0) = 2.6: ε(+1/0) = 0.5, ε(0/-1) = 1.1
    ef = {"v_Si +1": 1.0, "v_Si +0": 1.5, "v_Si -1": 2.6}
    assert bu.pair_level(ef, "v_Si", 1, 0) == pytest.approx(0.5)
    assert bu.pair_level(ef, "v_Si", 0, -1) == pytest.approx(1.1)
    assert bu.pair_level(ef, "v_Si", 1, -1) == pytest.approx(0.8)
    assert bu.pair_level(ef, "v_Si", 2, 1) is None
    adj = bu.adjacent_levels({**ef, "v_O +2": 0.0, "v_O +0": 3.0})
    assert adj == {("v_Si", 1, 0): pytest.approx(0.5), ("v_Si", 0, -1): pytest.approx(1.1),
                   ("v_O", 2, 0): pytest.approx(1.5)}  # consecutive *computed* charge states
    # negative U in the reference (0 never stable: ε(0/-1) < ε(+1/0)); the crossings are still compared
    ref = {"v_Si +1": 1.0, "v_Si +0": 1.6, "v_Si -1": 2.0}
    errs = bu.level_errors(ref, ef)
    assert [(e["q_from"], e["q_to"]) for e in errs] == [(1, 0), (0, -1)]
    assert [e["reference"] for e in errs] == [pytest.approx(0.6), pytest.approx(0.4)]
    assert [e["error"] for e in errs] == [pytest.approx(-0.1), pytest.approx(0.7)]
    missing = bu.level_errors(ref, {"v_Si +1": 1.0, "v_Si +0": 1.5})
    assert missing[0]["error"] == pytest.approx(-0.1) and missing[1]["level"] is None and missing[1]["error"] is None
    assert bu.level_errors(ref, None)[0]["error"] is None


def test_table_and_rounding():
    t = bu.table(["a", "b"], [["x", 1.23456], [None, True]], digits=2)
    lines = t.splitlines()
    assert lines[0].startswith("| a") and set(lines[1]) <= {"|", "-"}
    assert "1.23" in lines[2] and "—" in lines[3] and "yes" in lines[3]
    assert len({len(ln) for ln in lines}) == 1  # aligned columns
    assert bu.rounded({"x": [1.234567, {"y": 2.0000001}], "s": "k"}, 3) == {"x": [1.235, {"y": 2.0}], "s": "k"}


def test_table_escapes_pipes_inside_cells():
    t = bu.table(["goal |x|"], [["CTL |error| ≤ 0.02 eV"]])
    assert all(ln.count("|") - ln.count("\\|") == 2 for ln in t.splitlines())
