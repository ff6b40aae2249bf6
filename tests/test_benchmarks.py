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


def test_contended_steps_flags_hf_jobs_that_shared_their_cores():
    # the benchmark's own figures: session 9's far selection (446 CPU-s in 328 s on 2 ranks) against session 11's
    # close selection (220 CPU-s in 115 s)
    rows = [{"step": "single_hf", "cpu_s": 446.1, "wall_s": 328.4}, {"step": "bulk_hf", "cpu_s": 4.7, "wall_s": 3.0},
            {"step": "train", "cpu_s": 100.0, "wall_s": 100.0}]
    assert bu.core_share(220.3, 115.0, 2) == pytest.approx(0.958, abs=1e-3)
    assert bu.contended_steps(rows, ["single_hf", "bulk_hf"], 2) == {"single_hf": pytest.approx(0.679, abs=1e-3)}
    rows[0]["cpu_s"] = 220.3
    rows[0]["wall_s"] = 115.0
    assert bu.contended_steps(rows, ["single_hf", "bulk_hf"], 2) == {}  # clean; bulk_hf too short to judge
    assert bu.contended_steps(rows, ["train"], 2) == {"train": 0.5}  # only the steps asked for are checked
    assert bu.core_share(1.0, 0.0, 2) is None and bu.core_share(None, 1.0, 2) is None


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


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/training.py (issue #13): strategy names and the HF frames of a cell
# ---------------------------------------------------------------------------------------------------------------
def test_training_strategy_names_are_library_options():
    tr = _load("training")
    assert tr.strategy_spec("multihead+refs+w10+ew0.05") == {
        "kind": "multihead", "charge_references": True, "hf_weight": 10.0, "energy_weight_scale": 0.05}
    from defectflow.campaign import MlipSpec

    spec = tr.make_spec("delta+ew0.1", tr.BASE)
    # the kind is train_kind's argument, not the spec's: the spec keeps the library default
    assert spec.multi_fidelity == MlipSpec().multi_fidelity != "delta"
    assert spec.energy_weight_scale == 0.1 and spec.hf_test_fraction == 0.0 and spec.default_dtype == "float32"
    assert tr.uses_refs("finetune") and tr.uses_refs("delta+refs") and not tr.uses_refs("delta")
    assert tr.needs_lf_model("replay") and not tr.needs_lf_model("multihead+refs")
    assert tr.strategy_spec("delta+all")["selection"] == {"max_energy_above_min": None, "max_force": None}
    for bad in ("transformer", "multihead+bogus"):
        with pytest.raises(SystemExit, match="--strategies"):
            tr.strategy_spec(bad)
    # +ke<n>: a harvest setting, not an MlipSpec field; its LF model is its own
    assert tr.keep_every("finetune+ke12") == 12 and tr.keep_every("finetune") is None
    assert tr.make_spec("multihead+ke12", tr.BASE).max_epochs == tr.BASE["max_epochs"]
    assert tr.lf_model_dir("far", True, 12) != tr.lf_model_dir("far", True)
    # +ep<n> / +p<n>: train up to n epochs, stop on the validation loss (mlip.patience)
    spec = tr.make_spec("multihead+ke12+ep120+p10", tr.BASE)
    assert (spec.max_epochs, spec.finetune_epochs, spec.patience) == (120, 120, 10)
    # +ewt<x>: the loss's energy weight; +lep<n>: the shared LF model's epochs, a model (and folder) of its own
    assert tr.make_spec("multihead+ewt1000", tr.BASE).energy_weight == 1000.0
    assert tr.lf_epochs("replay+ke12+lep60") == 60 and tr.lf_epochs("replay+ke12") is None
    assert tr.make_spec("replay+ke12+lep60", tr.BASE).max_epochs == tr.BASE["max_epochs"]  # the cell's own: BASE
    assert tr.lf_model_dir("far", True, 12, 60) != tr.lf_model_dir("far", True, 12)


def test_the_default_recipe_needs_every_preset():
    tr = _load("training")
    row = {"kind": "multihead", "n_hf": 16, "e_rmse_mev_atom": 5.0, "f_rmse_mev_a": 100.0, "train_seconds": 100.0}
    far_only = [{**row, "strategy": "multihead", "preset": "far"}]
    assert tr.choose_default(far_only) is None
    every = [{**row, "strategy": s, "preset": p, "e_rmse_mev_atom": e} for p in ("far", "close", "functional")
             for s, e in (("multihead", 5.0), ("replay", 4.0))]
    assert tr.choose_default(every)["strategy"] == "replay"
    # seed repeats are averaged before recipes compete: replay's lucky seed 1 does not beat multihead's mean
    seeds = every + [{**row, "strategy": f"replay+s{s}", "preset": p, "e_rmse_mev_atom": 8.0}
                     for p in ("far", "close", "functional") for s in (2, 3)]
    best = tr.choose_default(seeds)
    assert best["strategy"] == "multihead" and best["seeds"] == {"multihead": 1, "replay": 3}
    assert tr.without_seed("multihead+refs+s2+ke12") == "multihead+refs+ke12"
    # recipes compete at the budgets they share: replay's poor N = 4 cells (which multihead lacks) do not count,
    # and a recipe measured at N = 8 only is not a candidate
    curves = every + [{**row, "strategy": "replay", "preset": p, "n_hf": 4, "e_rmse_mev_atom": 50.0}
                      for p in ("far", "close", "functional")]
    curves += [{**row, "strategy": "delta", "preset": p, "n_hf": 8, "e_rmse_mev_atom": 1.0}
               for p in ("far", "close", "functional")]
    best = tr.choose_default(curves)
    assert best["strategy"] == "replay" and best["budgets"] == [16] and set(best["scores"]) == {"multihead", "replay"}
    # once both have N = 4 too, it counts for both
    both = curves + [{**row, "strategy": "multihead", "preset": p, "n_hf": 4, "e_rmse_mev_atom": 5.0}
                     for p in ("far", "close", "functional")]
    best = tr.choose_default(both)
    assert best["strategy"] == "multihead" and best["budgets"] == [4, 16]
    # a recipe over the training-time goal on one preset is scored but not chosen
    slow = [{**r, "train_seconds": 700.0} if r["strategy"] == "replay" and r["preset"] == "far" else r
            for r in every]
    best = tr.choose_default(slow)
    assert best["strategy"] == "multihead" and best["over_time"] == ["replay"] and "replay" in best["scores"]


def test_training_hf_frames_come_from_the_frozen_pool_within_the_harvest_window():
    tr = _load("training")
    if not tr.frozen.pool_frames("far"):
        pytest.fail("benchmarks/data: the far preset's HF pool is not frozen")
    records = tr.lf_records("far")
    atoms, keys = tr.hf_training_frames("far", records, 6)
    assert 1 <= len(atoms) <= 6 and len(set(keys)) == len(keys)
    pool = {(a.info["lf_relaxation"], int(a.info["lf_step"])) for a in tr.frozen.pool_frames("far")}
    lowest = {}  # the candidates are the pool's frames: the window counts from the lowest of them
    for name, r in records.items():
        for f in r.trajectory.frames:
            if (name, f.step) in pool:
                lowest[r.charge] = min(lowest.get(r.charge, 1e9), f.energy / len(f.structure))
    for a in atoms:
        assert (a.info["lf_relaxation"], int(a.info["lf_step"])) in pool
        q = int(a.info["total_charge"])
        assert a.info["LF_energy"] / len(a) - lowest[q] <= 1.0 + 1e-9  # HF_SELECTION's window, eV/atom
        assert abs(a.arrays["LF_forces"]).max() <= 20.0 * 1.0001  # ... and force cap, eV/Å (|F| ≥ any component)


def test_projection_counts_starts_for_the_direct_side_and_groups_for_defectflow():
    """The direct search relaxes every start; defectflow pays per (defect, q). Two groups of 15 and 3 starts."""
    proj = _load("projection")
    starts = {"v_A 0": 15, "v_A 1": 3}
    r = proj.project(starts, steps_per_relaxation=40, calls_per_group=6, sp_over_step=1.5, lf_step_cost=0.05)
    assert r["direct_hf_steps"] == 18 * 40
    assert r["defectflow_hf_steps"] == 2 * 6 * 1.5
    assert r["hf_ratio"] == pytest.approx(720 / 18)
    assert r["total_ratio"] == pytest.approx(720 / (18 + 18 * 40 * 0.05))
    assert r["total_ratio"] < r["hf_ratio"]  # the LF relaxations are not free


def test_accuracy_cost_summary_lays_out_every_v2_result_and_its_wall_time(tmp_path):
    """``accuracy_cost.py --summary``: one row per v2 JSON (v1 reports skipped), q in increasing order, the
    defectflow wall time without the frozen LF relaxations and the baseline searches."""
    import json

    ac = _load("accuracy_cost")
    gs = {"v_Si +1": {"rmsd": 0.02, "dE_hf_meV": 3.0}, "v_Si +0": {"rmsd": 0.01, "dE_hf_meV": 1.0}}
    report = {
        "version": 2, "preset": "close", "variant": {"tag": "sp"},
        "reference": {"ground_states": {k: {"label": "Unperturbed"} for k in gs}},
        "methods": {"defectflow": {"ground_states": gs, "level_errors": [
            {"defect": "v_Si", "q_from": 1, "q_to": 0, "error": 0.012}]}},
        "defectflow": {"cost": {"hf_calls": 30, "hf_cpu_seconds": 500.0, "by_step": [
            {"step": "train", "wall_s": 600.0}, {"step": "search", "wall_s": 300.0},
            {"step": "relax_lf", "wall_s": 5000.0}, {"step": "baseline", "wall_s": 120.0}]}},
        "ratios": {"hf_cpu": 37.9},
        "goals": [{"goal": "CTL |error| ≤ 0.02 eV", "verdict": "met"},
                  {"goal": "ground-state RMSD ≤ 0.05 Å", "verdict": "met"},
                  {"goal": "≥ 30× fewer HF CPU-seconds", "verdict": "met"},
                  {"goal": "never less accurate than LF ShakeNBreak + 1 HF single point per q", "verdict": "MISSED"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(report))
    (tmp_path / "v1.json").write_text(json.dumps({"benchmark": "accuracy_cost", "methods": {}}))
    assert ac.defectflow_wall_minutes(report) == pytest.approx(15.0)
    out = ac.summary(sorted(tmp_path.glob("*.json")))
    rows = [line for line in out.splitlines() if line.startswith("| close")]
    assert len(rows) == 1 and "v1" not in out
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells == ["close (sp)", "0.010 / 0.020", "+1 / +3", "+0.012", "30 / 500", "37.9×", "15.0",
                     "met / met / met / MISSED"]
    # the preset's own run (no variant tag) brings its LF ShakeNBreak + 1 HF SP baseline along, on the next row
    report["variant"] = None
    report["methods"]["lf_snb"] = {"ground_states": {"v_Si +0": {"rmsd": 0.5, "dE_hf_meV": 900.0},
                                                     "v_Si +1": {"rmsd": None, "dE_hf_meV": None}},
                                   "level_errors": [{"defect": "v_Si", "q_from": 1, "q_to": 0, "error": None}]}
    (tmp_path / "a.json").write_text(json.dumps(report))
    lines = ac.summary(sorted(tmp_path.glob("*.json"))).splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("| close "))
    base = [c.strip() for c in lines[i + 1].strip("|").split("|")]
    assert base[:5] == ["close: LF SnB + 1 HF SP", "0.500 / —", "+900 / —", "—", "2 + the LF search"]


def test_reference_time_left_uses_each_charge_states_own_mean():
    """reference.py's progress line: q = +1 relaxations (spin-polarised) take about twice as long as q = 0, so
    what is left is estimated per q, from this run's own wall times; a q not seen yet takes the overall mean."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    ref = _load("reference")
    assert ref.time_left({0: [100.0, 200.0], 1: [600.0]}, [0, 1, 1, 2]).startswith("~28 min left (4 ")
    assert ref.time_left({}, [0, 0]) == "2 left" and ref.time_left({0: [5.0]}, []) == "done"


def test_refresh_reference_rescales_ratios_and_goals_but_not_a_changed_ground_state(tmp_path):
    """accuracy_cost.py --refresh-reference, after `reference.py compute --redo`: a report's reference cost, HF
    ratios and the cost goal follow the frozen data; a report whose reference ground state moved is left alone."""
    import json

    ac = _load("accuracy_cost")
    gs = {"v_Si +0": {"label": "Unperturbed", "hf_energy": -100.0, "energy_lowering": 0.0}}
    m = {"ground_states": {"v_Si +0": {"rmsd": 0.01, "dE_hf_meV": 1.0}}, "level_errors": [], "max_rmsd": 0.01,
         "max_ctl_error": 0.001}
    report = {"version": 2, "preset": "close",
              "reference": {"frozen": True, "manifest_sha256": "old", "hf_calls": 100, "hf_cpu_seconds": 3100.0,
                            "frames": 99, "ground_states": gs},
              "defectflow": {"cost": {"hf_calls": 10, "hf_cpu_seconds": 100.0}},
              "methods": {"defectflow": m, "lf_snb": {**m, "max_rmsd": 0.02}}, "ratios": {"hf_cpu": 31.0}}
    path = tmp_path / "accuracy_cost_close.json"
    path.write_text(json.dumps(report))
    states = {"v_Si +0": {"label": "Unperturbed", "hf_energy": -100.00001}}
    line = ac.refresh_reference(path, {"hf_calls": 100, "hf_cpu_seconds": 2900.0, "frames": 99}, "new", states)
    r = json.loads(path.read_text())
    assert "31.0x -> 29.0x" in line and r["ratios"]["hf_cpu"] == pytest.approx(29.0)
    assert r["reference"]["manifest_sha256"] == "new" and r["reference"]["hf_cpu_seconds"] == 2900.0
    cost_goal = next(g for g in r["goals"] if g["goal"].startswith("≥ 30×"))
    assert cost_goal["verdict"] == "MISSED" and cost_goal["value"] == pytest.approx(29.0)
    assert "unchanged" in ac.refresh_reference(path, {"hf_calls": 100, "hf_cpu_seconds": 2900.0, "frames": 99},
                                               "newer", states)
    moved = {"v_Si +0": {"label": "Bond_Distortion_-40.0%", "hf_energy": -100.1}}
    before = path.read_text()
    assert "run it again" in ac.refresh_reference(path, {"hf_calls": 100, "hf_cpu_seconds": 2000.0, "frames": 99},
                                                  "x", moved)
    assert path.read_text() == before
