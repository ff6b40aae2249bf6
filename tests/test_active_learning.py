"""Active learning of step 5 (issue #14): which minima are verified, the ground-state rule, the stopping rule, the
HF budget and the round records; with real GFN2-xTB single points where an engine runs."""

from __future__ import annotations

import pytest
from conftest import GFN1, GFN2, si_vac15

from defectflow.campaign import MlipSpec, SearchSpec, VerifySpec
from defectflow.schemas import (
    GroupVerification,
    Minimum,
    PathFrame,
    RoundRecord,
    SearchResult,
    Verification,
)
from defectflow.search.jobs import (
    SearchContext,
    SearchGroup,
    known_hf_lowest,
    minima_to_verify,
    plan_topup,
    round_record,
    verify_minima,
)


def search_with(energies: list[float], stds: list[float | None], q: int = 0) -> SearchResult:
    minima = [Minimum(energy=e, structure=si_vac15(0.05, 10 + i), labels=[f"m{i}"], energy_std=s)
              for i, (e, s) in enumerate(zip(energies, stds))]
    return SearchResult(defect="v_Si", charge=q, model="mace:hf", n_starts=len(minima),
                        landscape={m.labels[0]: m.energy for m in minima}, minima=minima,
                        ground_state=minima[0] if minima else None)


def test_the_k_lowest_minima_and_the_most_uncertain_low_energy_one_are_verified():
    s = search_with([-10.0, -9.9, -9.8, -9.7, -9.6, -8.0], [0.01, 0.02, 0.01, 0.05, 0.30, 0.9])
    # top 3, then among the others within 0.5 eV of the lowest the largest σ (index 4; index 5 is 2 eV up)
    assert minima_to_verify(s, VerifySpec(top_k=3, uncertain_window=0.5)) == [
        (0, "rank 1"), (1, "rank 2"), (2, "rank 3"), (4, "most uncertain")]
    assert minima_to_verify(s, VerifySpec(top_k=2, uncertain_window=0)) == [(0, "rank 1"), (1, "rank 2")]
    assert minima_to_verify(search_with([-1.0], [None]), VerifySpec(top_k=3)) == [(0, "rank 1")]


def context(round_no: int = 0, history=(), **verify) -> SearchContext:
    return SearchContext(
        campaign="t", round=round_no, search=SearchSpec(), verify=VerifySpec(**verify), mlip=MlipSpec(),
        levels={}, fidelities={"low": GFN1, "high": GFN2}, seed=0,
        groups=[SearchGroup(defect="v_Si", charge=0, starts=[])], bulk_structure=si_vac15(),
        plot_dir=".", model_plot_dir=".", hf_calls=10, history=list(history))


def group(hf: float, error: float | None, q: int = 0, label: str = "m0") -> GroupVerification:
    v = Verification(defect="v_Si", charge=q, mode="single_point", ground_state_label=label, hf_energy=hf,
                     surrogate_energy=hf, error_mev_per_atom=error, agrees=error is not None and error <= 5.0,
                     role="rank 1", hf_seconds=2.0, cpu_seconds=3.0)
    return GroupVerification(defect="v_Si", charge=q, checks=[v], ground_state=v)


def candidates(n: int) -> SearchResult:
    s = search_with([-10.0], [0.01])
    # energy spread falling, force spread rising with i: candidates rank by the force spread (no member offsets)
    s.candidates = [PathFrame(label=f"s{i}", step=10, structure=si_vac15(0.1, i), energy=-9.0, energy_std=0.1 * (n - i),
                              force_std=0.2 * (i + 1)) for i in range(n)]
    return s


def test_round_record_counts_the_rounds_hf_calls_and_spots_a_changed_ground_state():
    prev = RoundRecord(round=0, errors_mev_per_atom={}, disagreeing=[], retrained=True,
                       ground_states={"v_Si +0": {"label": "m0", "hf_energy": -10.0, "source": "verified minimum"}})
    same = round_record(1, [group(-10.0005, 1.0)], context(1, [prev]), None)
    assert same.changed == [] and same.hf_calls == 1 and same.hf_calls_total == 11
    assert same.hf_cpu_seconds == pytest.approx(3.0) and same.verified["v_Si +0"][0]["role"] == "rank 1"
    moved = round_record(1, [group(-10.3, 1.0)], context(1, [prev]), None)
    assert moved.changed == ["v_Si +0"]


def test_the_loop_stops_once_ground_states_are_stable_and_errors_small():
    prev = RoundRecord(round=0, errors_mev_per_atom={}, disagreeing=[], retrained=True,
                       ground_states={"v_Si +0": {"label": "m0", "hf_energy": -10.0, "source": "verified minimum"}})
    ctx = context(1, [prev], max_rounds=5, energy_threshold=5.0)
    gv = [group(-10.0, 1.0)]
    rec = round_record(1, gv, ctx, None)
    added, minima, paths, stop = plan_topup(rec, gv, [candidates(3)], ctx)
    assert stop and stop.startswith("converged") and not added
    # a verified minimum whose HF single point failed (SCF not converged) is no agreement: the loop goes on
    failed = [group(-10.0, 1.0)]
    failed[0].checks.append(Verification(defect="v_Si", charge=0, mode="single_point", ground_state_label="m1",
                                         role="rank 2", error="CalculationFailed: SCF not converged"))
    rec = round_record(1, failed, ctx, None)
    assert rec.changed == [] and plan_topup(rec, failed, [candidates(3)], ctx)[3] is None
    # the same errors in round 0 (nothing to compare with yet): another round, with the uncertain path frames
    ctx0 = context(0, max_rounds=5, round_budget=2)
    rec0 = round_record(0, gv, ctx0, None)
    added, minima, paths, stop = plan_topup(rec0, gv, [candidates(3)], ctx0)
    assert stop is None and [p.label for p, _ in paths] == ["s2", "s1"]  # largest force spread first, in budget
    assert all(t.reason == "uncertain path frame" for t in added)
    # an error above the threshold keeps the loop going, and that minimum is added at no extra HF call
    bad = [group(-10.0, 40.0)]
    bad[0].checks[0].hf_frame = _frame()
    rec = round_record(1, bad, ctx, None)
    added, minima, paths, stop = plan_topup(rec, bad, [candidates(0)], ctx)
    assert stop is None and len(minima) == 1 and minima[0][1].reason.startswith("verified minimum")
    # no rounds left
    ctx_last = context(1, [prev], max_rounds=1)
    assert plan_topup(round_record(1, bad, ctx_last, None), bad, [candidates(3)], ctx_last)[3].startswith(
        "verify.max_rounds")


def _frame():
    from defectflow.engines import get_engine

    return get_engine(GFN2, fidelity="high").single_point(si_vac15(0.05, 10), 0)



def test_a_verified_minimum_far_above_its_group_is_not_trained_on():
    """The top-up adds verified minima whose HF energy disagrees with the surrogate; one that sits 5 eV/atom above
    the group's lowest HF frame (a collapsed surrogate minimum, as in an xTB-restrained test run) is left out with
    its reason, by the LF harvest's thresholds (1 eV/atom), and the loop still goes on."""
    frame = _frame()
    n = len(frame.structure)
    gv = group(frame.energy, 40.0)
    gv.checks[0].hf_frame = frame
    high = frame.model_copy(update={"energy": frame.energy + 5.0 * n})
    gv.checks.append(gv.checks[0].model_copy(update={"hf_frame": high, "hf_energy": high.energy,
                                                     "ground_state_label": "collapsed", "role": "rank 2"}))
    ctx = context(0, max_rounds=3, round_budget=0)
    rec = round_record(0, [gv], ctx, None)
    added, minima, paths, stop = plan_topup(rec, [gv], [candidates(0)], ctx)
    assert stop is None and [c.ground_state_label for c, _ in minima] == ["m0"]
    assert len(rec.not_trained) == 1 and rec.not_trained[0]["label"] == "collapsed"
    assert "5.00 eV/atom above" in rec.not_trained[0]["reason"]

def test_the_hf_budget_caps_the_next_round():
    # 10 spent before, 1 in this round; the next round's verifications may take 1 group × (top_k 2 + 2) = 4: with
    # a cap of 16 there is room for 16 − 11 − 4 = 1 top-up frame, not the round_budget of 3
    ctx = context(0, top_k=2, round_budget=3, max_hf_calls=16)
    gv = [group(-10.0, 1.0)]
    rec = round_record(0, gv, ctx, None)
    _, _, paths, stop = plan_topup(rec, gv, [candidates(5)], ctx)
    assert stop is None and len(paths) == 1
    assert rec.hf_calls_total + len(paths) + 4 <= 16
    ctx = context(0, top_k=2, round_budget=3, max_hf_calls=14)
    _, _, paths, stop = plan_topup(round_record(0, gv, ctx, None), gv, [candidates(5)], ctx)
    assert paths == [] and stop.startswith("verify.max_hf_calls")


def test_a_known_hf_frame_lower_than_every_verified_minimum_becomes_the_ground_state(tmp_path, monkeypatch):
    """verify_minima with real GFN2-xTB single points: the surrogate's minima are rattled structures; the HF
    training set holds the unrattled cell, lower in HF energy: it is the ground state, with its own fresh HF
    single point, and the result says why."""
    from defectflow.engines import get_engine
    from defectflow.train.data import hf_extxyz

    monkeypatch.chdir(tmp_path)
    engine = get_engine(GFN2, fidelity="high")
    known = engine.single_point(si_vac15(), 0)
    text = hf_extxyz([(known, None, {"defect": "v_Si", "distortion": "Unperturbed", "step": 0})])
    assert known_hf_lowest(text, "v_Si", 0)[0] == "Unperturbed step 0"
    assert known_hf_lowest(text, "v_Si", 1) is None
    s = search_with([-10.0, -9.9], [0.01, 0.02])
    gv = verify_minima.original(s, GFN2, GFN1, VerifySpec(top_k=2, uncertain_window=0), known_extxyz=text)
    assert [c.role for c in gv.checks] == ["rank 1", "rank 2", "known HF frame"] and gv.hf_calls == 3
    assert gv.source == "known HF frame" and "Unperturbed step 0" in gv.reason
    assert gv.ground_state.hf_energy == pytest.approx(known.energy, abs=1e-6)
    assert gv.ground_state.hf_energy < min(c.hf_energy for c in gv.checks[:2])
    # without it, the lowest verified minimum
    gv = verify_minima.original(s, GFN2, GFN1, VerifySpec(top_k=2, uncertain_window=0))
    assert gv.source == "verified minimum" and gv.ground_state.hf_energy == min(c.hf_energy for c in gv.checks)



def test_the_energy_spread_that_ranking_feels_ignores_a_members_constant_offset():
    """Two members that agree on every energy difference but sit 2 eV apart: no ranking uncertainty, though the
    plain energy spread is 1 eV everywhere. A member that reorders two structures does carry one."""
    import numpy as np

    from defectflow.search.uncertainty import CommitteePrediction

    forces = [np.zeros((2, 1, 3))] * 3
    offset = CommitteePrediction(np.array([[-10.0, -9.5, -9.0], [-8.0, -7.5, -7.0]]), forces)
    assert np.allclose(offset.energy_std, 1.0) and np.allclose(offset.relative_energy_std, 0.0)
    swapped = CommitteePrediction(np.array([[-10.0, -9.5, -9.0], [-9.5, -10.0, -9.0]]), forces)
    assert swapped.relative_energy_std[0] > 0.2 and swapped.relative_energy_std[1] > 0.2


def test_defectflow_results_shows_what_a_round_left_out_of_training():
    from rich.console import Console

    from defectflow.cli.main import _rounds_table

    rounds = [RoundRecord(round=0, errors_mev_per_atom={}, disagreeing=["v_Si +1"], retrained=True, hf_calls=4,
                          not_trained=[{"group": "v_Si +1", "label": "Bond_Distortion_-45.0%+rattle1",
                                        "reason": "8.40 eV/atom above the lowest known frame"}]).model_dump(),
              RoundRecord(round=1, errors_mev_per_atom={}, disagreeing=[], retrained=False).model_dump()]
    console = Console(record=True, width=400)
    console.print(_rounds_table(rounds))
    text = console.export_text()
    assert "left out of training" in text and "8.40 eV/atom above" in text
    assert text.count("none") >= 2  # round 1 left nothing out and changed no ground state


def test_refine_leftover_is_one_job_between_the_rounds_verifications_and_finalize():
    """verify.refine_leftover (refine mode, with an HF cap): one 'refine round N' job takes every verification of
    the round and finalize reads the verifications from it; without the option or the cap the round has none."""
    from jobflow import OutputReference

    from defectflow.search.jobs import build_search_round

    def round_jobs(**verify):
        ctx = context(0, **verify)
        ctx.groups = [SearchGroup(defect="v_Si", charge=q, starts=[]) for q in (0, 1)]
        return build_search_round(ctx, [], training=OutputReference("training")).jobs

    jobs = round_jobs(mode="refine", refine_leftover=True, max_hf_calls=40)
    verify = {j.uuid for j in jobs if j.name.startswith("verify")}
    (refine,) = [j for j in jobs if j.name == "refine round 0"]
    (fin,) = [j for j in jobs if j.name.startswith("finalize")]
    assert len(verify) == 2 and verify <= {r.uuid for r in refine.input_references}
    fin_inputs = {r.uuid for r in fin.input_references}
    assert refine.uuid in fin_inputs and not verify & fin_inputs
    for verify_spec in ({"mode": "refine", "max_hf_calls": 40}, {"mode": "refine", "refine_leftover": True},
                        {"mode": "single_point", "refine_leftover": True, "max_hf_calls": 40}):
        assert not [j for j in round_jobs(**verify_spec) if j.name.startswith("refine")], verify_spec


def test_the_landscape_plot_shows_the_committees_force_uncertainty_in_a_panel_of_its_own(tmp_path, monkeypatch):
    """σ_E as error bars on the energies; σ_F (eV/Å) of each distinct minimum in a lower panel at every start that
    relaxed into it; a search without a committee keeps the single panel."""
    import defectflow.search as search_mod

    figures = []
    monkeypatch.setattr(search_mod, "save_figure", lambda fig, path, dpi=None: figures.append(fig) or str(path))
    s = search_with([-10.0, -9.7], [0.01, 0.05])
    s.minima[0].force_std, s.minima[1].force_std = 0.08, 0.21
    s.minima[1].labels = ["m1", "m2"]
    s.landscape["m2"] = -9.7
    s.landscape_std = {"m0": 0.01, "m1": 0.05, "m2": 0.05}
    s.committee_size = 3
    starts = {"m0": -0.2, "m1": 0.2, "m2": 0.4}
    search_mod.plot_landscape(s, starts, tmp_path)
    top, bottom = figures[-1].axes[:2]
    points = sorted(tuple(p) for c in bottom.collections for p in c.get_offsets())
    assert points == [(-20.0, 0.08), (20.0, 0.21), (40.0, 0.21)]
    assert "sigma_F" in bottom.get_ylabel() and "eV/Å" in bottom.get_ylabel()
    assert "eV" in top.get_ylabel() and bottom.get_xlabel() == "Starting bond distortion (%)"
    for m in s.minima:
        m.force_std = None
    search_mod.plot_landscape(s, starts, tmp_path)
    assert len(figures[-1].axes) == 1
