"""The whole campaign, steps 1-5, run for real: GFN1-xTB (LF) → GFN2-xTB (HF) on a 15-atom Si vacancy cell, a tiny
charge-embedded multi-fidelity MACE, surrogate search, HF verification with one forced top-up round, doped CTLs.

xTB stands in for PBE/HSE06 so this fits CI time; the graph, engines, training and thermodynamics are the real ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest



@pytest.fixture(scope="module")
def run(pipeline_run):
    """The finished campaign (conftest's session fixture ``pipeline_run``, shared with test_report.py)."""
    return pipeline_run


def test_every_job_finished(run):
    _, r = run
    assert not r.failed_jobs and not r.failures, r.failures


def test_every_charge_state_has_a_verified_ground_state(run):
    _, r = run
    res = r.result
    assert res is not None
    assert {(g.defect, g.charge) for g in res.ground_states} == {("v_Si", 0), ("v_Si", 1)}
    for g in res.ground_states:
        assert g.structure is not None and len(g.structure) == 15
        assert g.ground_state_label is not None and g.n_minima >= 1
        assert g.hf_energy is not None and math.isfinite(g.hf_energy)
        if g.source == "verified minimum":  # one of the surrogate's minima (not necessarily its lowest)
            assert g.landscape and any(g.surrogate_energy == pytest.approx(e) for e in g.landscape.values())
            assert g.verification_error_mev_per_atom == pytest.approx(
                1000 * abs(g.hf_energy - g.surrogate_energy) / 15)
            assert g.energy_std is not None and g.energy_std >= 0  # a committee of 2 (TINY_MLIP)
        else:  # an HF training frame lower than every verified minimum, and why
            assert g.source == "known HF frame" and g.reason


def test_top_up_round_was_recorded_and_run(run):
    _, r = run
    rounds = r.result.rounds
    assert [x.round for x in rounds] == [0, 1]
    assert rounds[0].retrained is True and rounds[0].disagreeing and rounds[0].stop_reason is None
    assert rounds[1].retrained is False and rounds[1].stop_reason.startswith("verify.max_rounds")
    assert rounds[0].added == [] and rounds[1].added  # round 1's model trained on what round 0 added, and why
    assert {a.reason for a in rounds[1].added} <= {"uncertain path frame", "verified minimum, |ΔE| above threshold",
                                                   "refine point, |ΔE| above threshold"}
    paths = [a for a in rounds[1].added if a.reason == "uncertain path frame"]
    assert len(paths) <= 4 and all(a.energy_std is not None for a in paths)  # verify.round_budget default
    for rec in rounds:  # every verified minimum is recorded with its role and errors
        for group, checks in rec.verified.items():
            if checks:  # empty only when every minimum of the group was rejected
                assert checks[0]["role"] == "rank 1" and checks[0]["hf_energy"] is not None, group
                # an HF single point may fail (GFN2's SCF at a tiny model's odd minimum): then it says why
                assert all(c["hf_energy"] is not None or c["error"] for c in checks), group


def test_final_ground_state_is_the_lowest_verified_hf_energy_of_any_round(run):
    from defectflow.results import Results

    campaign, r = run
    q = Results.for_campaign(campaign)
    for g in r.result.ground_states:
        verified = [d["output"] for d in q.query(step="verify", defect=g.defect, charge=g.charge, load=True)]
        assert len(verified) == 2  # rounds 0 and 1 (the forced top-up)
        every = [c["hf_energy"] for v in verified for c in v["checks"] if c["hf_energy"] is not None]
        assert g.hf_energy == min(every)  # never above any structure whose HF energy the campaign knows
        assert g.round in (0, 1) and verified[g.round]["ground_state"]["hf_energy"] == g.hf_energy


def test_hf_budget_is_accounted(run):
    _, r = run
    res = r.result
    # bulk + selected frames + every verified minimum of every round + the top-up single points
    assert 2 <= res.n_hf_selected <= 6  # budget 6, every (defect, q) covered
    from defectflow.results import Results

    q = Results.for_campaign(r.campaign)
    checks = [c for d in q.query(step="verify", load=True) for c in d["output"]["checks"]]
    (topup,) = [d["output"] for d in q.query(step="topup", load=True)]
    assert 4 <= len(checks) and 1 <= topup["n_requested"] <= 4  # ≥ 1 minimum per (defect, q) and round
    assert res.hf_calls == 1 + res.n_hf_selected + len(checks) + topup["n_requested"]
    assert sum(rec.hf_calls for rec in res.rounds) == len(checks) + topup["n_requested"]
    assert res.rounds[-1].hf_calls_total == res.hf_calls
    # hf_seconds covers the same calls: bulk HF static + the selected single points + verifications + top-up
    walls = [d["output"]["wall_seconds"] for d in q.query(step="bulk_hf") + q.query(step="single_hf")]
    walls += [c["hf_seconds"] for c in checks] + [topup["hf_seconds"]]
    assert res.hf_seconds == pytest.approx(sum(walls), rel=1e-6) and res.hf_seconds > 0
    assert res.hf_cpu_seconds > 0


def test_ctls_are_physically_sensible(run):
    _, r = run
    lv = r.result.levels
    assert lv is not None, r.result.levels_error
    assert lv.correction_scheme == "image_charge" and lv.corrections["v_Si +1"] > 0
    assert lv.band_gap > 0.3  # GFN2-xTB bulk Si at Γ reports a real gap
    for t in lv.transition_levels:
        assert t.q_from > t.q_to  # higher charge states are stable at lower Fermi levels
        assert -1.0 - 1e-6 <= t.level <= lv.band_gap + 1.0 + 1e-6
        assert t.in_gap == (0.0 <= t.level <= lv.band_gap)
    assert Path(lv.plot).stat().st_size > 10_000


def test_model_metrics_and_plots_reported(run):
    _, r = run
    res = r.result
    assert res.model_comparison and res.model_comparison[0]["model"] == "main"
    for name in ("formation_energies",):
        assert Path(res.plots[name]).is_file()
    assert any(k.startswith("landscape ") for k in res.plots)


def test_results_api_answers_from_the_embedded_store(run):
    from results_checks import check_results

    from defectflow.results import Results

    campaign, r = run
    res = Results.for_campaign(campaign)
    assert res.run == r.flow_uuid  # the newest run with a final result
    check_results(res, {("v_Si", 0), ("v_Si", 1)})
    assert [g["hf_energy"] for g in res.ground_states()] == [
        g.hf_energy for g in sorted(r.result.ground_states, key=lambda g: (g.defect, g.charge))]
    assert res.transition_levels() == [t.model_dump() for t in r.result.levels.transition_levels]
    cost = {row["step"]: row for row in res.cost()}
    # HF calls by step add up to the campaign's own HF count: bulk + selected frames + verifications + top-up
    assert cost["bulk_hf"]["hf_calls"] + cost["single_hf"]["hf_calls"] + cost["verify"]["hf_calls"] + \
        cost["topup"]["hf_calls"] == r.result.hf_calls
    rounds = res.rounds()
    assert [x["round"] for x in rounds] == [0, 1] and rounds[-1]["stop_reason"]


def test_figures_are_drawn_again_from_the_store_alone(run, tmp_path):
    """`defectflow plot`'s engine: every figure of the finished run, from the store (no work-dir files)."""
    from defectflow.replot import replot
    from defectflow.results import Results

    campaign, _ = run
    written = replot(Results.for_campaign(campaign), tmp_path)
    assert sorted(Path(p).name for p in written["lf"]) == ["v_Si_+1.png", "v_Si_0.png"]
    # the landscape of the round each ground state comes from, with that round's verified minima
    rounds = {g.charge: g.round for g in run[1].result.ground_states}
    assert sorted(Path(p).name for p in written["landscapes"]) == [
        f"v_Si_{q:+d}_mace-hf_round{rounds[q]}.png" for q in (0, 1)]
    assert [Path(p).name for p in written["levels"]] == ["formation_energies.png"]
    for paths in written.values():
        assert all(Path(p).read_bytes()[:4] == b"\x89PNG" and Path(p).stat().st_size > 5000 for p in paths)


def test_the_charge_reaches_hf_single_points_search_and_verification(run):
    """q reaches every step after the LF relaxations: each HF single point, each surrogate search and each
    verification stored at q is the energy of its structure at q (recomputed here with GFN2-xTB / the trained
    surrogate), not at the other charge state (which gives a different energy for the same structure)."""
    from conftest import GFN2

    from defectflow.engines import get_engine
    from defectflow.engines.base import structure_to_atoms
    from defectflow.results import Results
    from defectflow.schemas import TrainedModel, as_structure
    from defectflow.train import load_calculator

    campaign, r = run
    res = Results.for_campaign(campaign, run=r.flow_uuid)
    hf = get_engine(GFN2, fidelity="high")

    def other(q):
        return 1 - q  # the campaign's other charge state (0 ↔ +1)

    compared = 0

    def differs_at_other_charge(energy, structure, q) -> bool:
        """GFN2-xTB at the other charge gives another energy (or no converged SCF at all: also not this result)."""
        nonlocal compared
        e = hf.single_point(structure, other(q)).energy
        compared += e is not None
        return e is None or abs(energy - e) > 0.1

    singles = res.query(step="single_hf", load=True)
    assert {d["metadata"]["charge"] for d in singles} == {0, 1}
    for d in singles:
        f, q = d["output"], d["metadata"]["charge"]
        s = as_structure(f["structure"])
        assert f["charge"] == q and s.charge == q and f["engine"] == "ase" and f["xc"] == "GFN2-xTB"
        if f["energy"] is None:  # a failed HF single point keeps its q and says why
            assert f["error"]
            continue
        assert f["energy"] == pytest.approx(hf.single_point(s, q).energy, abs=1e-6)
        assert differs_at_other_charge(f["energy"], s, q)

    trainings = {int(d["name"].rsplit(" ", 1)[-1]): d for d in res.query(step="train", load=True)}
    assert sorted(trainings) == [0, 1]
    for g in r.result.ground_states:
        q = g.charge
        verified = {d["metadata"]["round"]: d["output"] for d in res.query(step="verify", defect=g.defect, charge=q,
                                                                          load=True)}
        searches = {d["metadata"]["round"]: d["output"] for d in res.query(step="search", defect=g.defect, charge=q,
                                                                          load=True)}
        assert sorted(verified) == sorted(searches) == [0, 1]
        for rnd, s in searches.items():
            gv = verified[rnd]
            assert gv["charge"] == s["charge"] == q
            if s["ground_state"] is None:  # every minimum rejected: nothing was verified
                assert not gv["checks"] and gv["reason"]
                continue
            v = gv["checks"][0]  # rank 1: the search's lowest minimum
            assert v["role"] == "rank 1"
            gs = as_structure(s["ground_state"]["structure"])
            assert v["charge"] == s["charge"] == q and v["hf_frame"]["charge"] == q and gs.charge == q
            if v["hf_energy"] is None:  # the HF single point failed: recorded at q, with the reason
                assert v["hf_frame"]["error"]
            else:
                assert v["hf_energy"] == pytest.approx(hf.single_point(gs, q).energy, abs=1e-6)
                assert differs_at_other_charge(v["hf_energy"], gs, q)
            # the search's energies are the HF head of this round's surrogate at q
            model = TrainedModel.model_validate(trainings[rnd]["output"]["models"]["main"])
            calc = load_calculator(model, "hf")
            energies = {}
            for qq in (q, other(q)):
                atoms = structure_to_atoms(gs, qq)
                atoms.calc = calc
                energies[qq] = atoms.get_potential_energy()
            # the default surrogate is float32: the same energy to float32 rounding (~1e-7 of a −50 eV cell)
            assert s["ground_state"]["energy"] == pytest.approx(energies[q], abs=1e-4)
            assert abs(energies[q] - energies[other(q)]) > 1e-3
    assert compared >= 1  # at least one HF result was compared with a converged calculation at the other charge


def test_job_folders_are_found_by_job_name(run):
    """run_locally names folders job_<time>-<random>; jobs/by_name/<step>/<details> links each job that ran to
    its folder (issue #17: a user finds a calculation's files by its job)."""
    from defectflow.results import Results

    campaign, _ = run
    by_name = campaign.work_dir() / "jobs" / "by_name"
    q = Results.for_campaign(campaign)
    relax = q.query(step="relax_lf", properties=["name", "metadata"])
    assert relax
    targets = set()
    for doc in relax:
        link = by_name.joinpath(*doc["name"].split())
        assert link.is_symlink() and link.resolve().is_dir(), link
        assert link.resolve().name.startswith("job_") and link.resolve().parent == by_name.parent
        targets.add(link.resolve())
    assert len(targets) == len(relax)  # one folder per relaxation, none shared
    assert (by_name / "bulk_hf" / "job").resolve().is_dir()  # a one-word job name: <step>/job
    for n in (0, 1):  # the forced top-up round trains and verifies again
        assert (by_name / "train" / "round" / str(n)).resolve().joinpath("train").is_dir()
        assert (by_name / "verify" / "v_Si" / "+1" / "round" / str(n)).resolve().name.startswith("job_")


def test_the_top_up_round_fine_tunes_each_committee_member_from_its_round_0_weights(run):
    from defectflow.results import Results
    from defectflow.schemas import TrainedModel

    campaign, r = run
    res = Results.for_campaign(campaign, run=r.flow_uuid)
    trainings = {int(d["name"].rsplit(" ", 1)[-1]): d["output"] for d in res.query(step="train", load=True)}
    assert trainings[0]["committee"] == trainings[1]["committee"] == ["main", "committee1"]
    assert trainings[1]["warm_started"] and not trainings[0]["warm_started"]
    for name in trainings[0]["committee"]:
        before = TrainedModel.model_validate(trainings[0]["models"][name])
        after = TrainedModel.model_validate(trainings[1]["models"][name])
        component = (before.head_map or {"hf": [["main", "hf"]]})["hf"][-1][0]
        assert after.warm_started_from == before.model_sha256(component)
        assert "--foundation_model" in after.components[-1].command
        assert after.model_sha256(component) != before.model_sha256(component)  # it did train
    # the two members differ (seed and split): their spread is the uncertainty the search reports
    m = trainings[0]["models"]
    assert TrainedModel.model_validate(m["main"]).model_sha256() != TrainedModel.model_validate(
        m["committee1"]).model_sha256()
