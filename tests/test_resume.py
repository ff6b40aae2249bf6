"""Resume: a run killed with SIGKILL, then re-run, reuses every job that had finished and recomputes the rest;
a changed setting invalidates only the jobs whose inputs it changes. Real GFN1-xTB relaxations, GFN2-xTB HF single
points and a tiny MACE training, embedded store. A reused job is recognised by ``metadata.reused_from`` (the uuid of
the job whose output it took) and by costing a small fraction of that job's CPU time, whatever the machine's speed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MLIP, si_vacancy_campaign

from defectflow.campaign import Campaign
from defectflow.store import make_store
from defectflow.submit import run_campaign


def campaign_dict(work: Path, **relax) -> dict:
    return si_vacancy_campaign("resume", work, relax={"fmax": 0.3, "max_steps": 5, **relax})


KILLER = textwrap.dedent("""
    import os, signal, sys
    from defectflow.submit import run_campaign
    finished = []
    def progress(event, name, done, total):
        if event == "finished" and name.startswith("relax_lf"):
            finished.append(name)
            print("FINISHED", name, flush=True)
            if len(finished) == 3:
                os.kill(os.getpid(), signal.SIGKILL)   # no clean-up, no flush of anything else: a real kill
    run_campaign(sys.argv[1], progress=progress, steps="lf")
    print("NOT KILLED", flush=True)
""")


def _run_docs(campaign: Campaign, run) -> list[dict]:
    store = make_store("embedded", campaign.work_dir())
    store.connect()
    flow_uuid = run.flow_uuid
    return list(store.query({"hosts": flow_uuid}, properties=["name", "metadata"]))


def test_killed_run_resumes_without_recomputing(tmp_path):
    work = tmp_path / "work"
    spec = campaign_dict(work)
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(path)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == -9, proc.stdout + proc.stderr[-3000:]
    killed_done = {ln.split(" ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("FINISHED ")}
    assert len(killed_done) == 3

    campaign = Campaign.from_dict(spec)
    run = run_campaign(campaign, steps="lf")
    docs = _run_docs(campaign, run)
    relax = {d["name"]: d["metadata"] for d in docs if d["name"].startswith("relax_lf")}
    assert len(relax) == 6 and not run.failed_jobs
    reused = {name for name, sd in relax.items() if sd.get("reused_from")}
    assert reused == killed_done  # exactly the relaxations finished before the kill
    store = make_store("embedded", campaign.work_dir())
    store.connect()
    for name in reused:  # a reused job costs a small part of the relaxation it reused (same machine, same run)
        source = store.query_one({"uuid": relax[name]["reused_from"]}, properties=["name", "metadata"])
        assert source["name"] == name and not source["metadata"].get("reused_from")
        assert relax[name]["cost"]["cpu_s"] < 0.5 * source["metadata"]["cost"]["cpu_s"]
        # the reused output points to the trajectory the first job stored: nothing is copied into the data store
        new = store.query_one({"name": name, "hosts": run.flow_uuid}, load=False, properties=["output"])
        old = store.query_one({"uuid": relax[name]["reused_from"]}, load=False, properties=["output"])
        assert new["output"]["trajectory"]["blob_uuid"] == old["output"]["trajectory"]["blob_uuid"]
        loaded = store.query_one({"name": name, "hosts": run.flow_uuid}, load=True, properties=["output"])
        assert loaded["output"]["trajectory"]["frames"]
        reuser = store.query_one({"name": name, "hosts": run.flow_uuid}, properties=["uuid"])["uuid"]
        assert store.additional_stores["data"].count({"job_uuid": reuser}) == 0  # it stored no big data of its own
    assert all(relax[n]["cost"]["wall_s"] > 0 for n in relax)
    assert len(run.summaries) == 2 and all(s.ground_state for s in run.summaries.values())

    # a setting read only by the harvest: every relaxation is reused
    spec2 = campaign_dict(work, keep_every=2)
    run2 = run_campaign(Campaign.from_dict(spec2), steps="lf")
    relax2 = [d for d in _run_docs(Campaign.from_dict(spec2), run2) if d["name"].startswith("relax_lf")]
    assert len(relax2) == 6 and all(d["metadata"].get("reused_from") for d in relax2)
    assert run2.training_set["n_frames"] <= run.training_set["n_frames"]
    for key, s in run.summaries.items():  # same relaxations, same ground states
        assert run2.summaries[key].ground_state == s.ground_state
        assert run2.summaries[key].energies == s.energies

    # a setting of the relaxation itself: every relaxation is recomputed
    spec3 = campaign_dict(work, fmax=0.25)
    run3 = run_campaign(Campaign.from_dict(spec3), steps="lf")
    relax3 = [d for d in _run_docs(Campaign.from_dict(spec3), run3) if d["name"].startswith("relax_lf")]
    assert len(relax3) == 6 and not any(d["metadata"].get("reused_from") for d in relax3)


# ---------------------------------------------------------------------------------------------------------------
# past step 2: HF single points and training
# ---------------------------------------------------------------------------------------------------------------
def full_campaign(work: Path) -> dict:
    return si_vacancy_campaign(
        "resume-full", work, relax={"fmax": 0.3, "max_steps": 4},
        selection={"strategy": "minima", "budget": 4}, mlip={**TINY_MLIP, "max_epochs": 4},
        search={"extra_starts": 0, "fmax": 0.2, "max_steps": 30}, verify={"max_rounds": 0})


STOPPER = textwrap.dedent("""
    import os, signal, sys
    from defectflow.submit import run_campaign
    event_wanted, name_wanted = sys.argv[2], sys.argv[3]
    def progress(event, name, done, total):
        if event == "finished":
            print("FINISHED", name, flush=True)
        if event == event_wanted and name == name_wanted:
            os.kill(os.getpid(), signal.SIGKILL)
    run_campaign(sys.argv[1], progress=progress)
    print("NOT KILLED", flush=True)
""")


def _kill_at(path: Path, cwd: Path, event: str, name: str) -> set[str]:
    """Run the campaign in a subprocess and SIGKILL it when job ``name`` reports ``event``; the finished jobs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", STOPPER, str(path), event, name], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=1800, check=False)
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {ln.split(" ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("FINISHED ")}


def _by_name(res, step: str, load: bool = False) -> dict[str, dict]:
    docs = res.query(step=step, load=load, properties=None if load else ["name", "uuid", "metadata", "output"])
    return {d["name"]: d for d in docs}


def _total_cpu(doc) -> float:
    cost = doc["metadata"]["cost"]
    return cost["cpu_s"] + cost["cpu_children_s"]


@pytest.mark.slow
def test_killed_after_hf_and_after_training_resumes_from_there(tmp_path):
    """Kill 1: when every HF single point has finished (collect_hf about to start). Kill 2 (the re-run): when the
    training has finished. The final re-run then reuses every relaxation, every successful HF single point and the
    training (``reused_from`` names the killed runs' jobs; Results.cost counts them; no HF call is made again for
    them) and computes only step 5. A failed HF single point (GFN2-xTB loses SCF convergence on a distorted q = +1
    frame) is never reused: each run retries it."""
    from defectflow.results import Results, list_runs
    from defectflow.train.surrogate import TrainedModel

    def ok(doc) -> bool:
        return doc["output"]["energy"] is not None

    work = tmp_path / "work"
    spec = full_campaign(work)
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(spec))
    campaign = Campaign.from_dict(spec)
    store = make_store("embedded", campaign.work_dir())

    # run 1: killed as collect_hf starts, i.e. after the last HF single point was stored
    done1 = _kill_at(path, tmp_path, "starting", "collect_hf")
    (run1,) = list_runs(store, campaign.name)
    r1 = Results(store, campaign.name, run=run1["run"])
    hf1 = _by_name(r1, "single_hf")
    assert hf1 and set(hf1) <= done1 and not r1.query(step="collect_hf") and not r1.query(step="train")
    assert all(not d["metadata"].get("reused_from") for d in hf1.values())
    assert any(ok(d) for d in hf1.values())

    # run 2: the re-run reuses run 1's relaxations and HF single points, trains, and is killed when training finished
    done2 = _kill_at(path, tmp_path, "finished", "train round 0")
    runs = list_runs(store, campaign.name)
    assert [r["run"] for r in runs][1:] == [run1["run"]] and not any(r["finished"] for r in runs)
    r2 = Results(store, campaign.name, run=runs[0]["run"])
    assert all(d["metadata"].get("reused_from") for d in _by_name(r2, "relax_lf").values())
    hf2 = _by_name(r2, "single_hf")
    assert set(hf2) == set(hf1) and "train round 0" in done2
    for name, d in hf2.items():
        assert d["metadata"].get("reused_from") == (hf1[name]["uuid"] if ok(hf1[name]) else None), name
    (train2,) = r2.query(step="train", properties=["name", "uuid", "metadata"])
    assert not train2["metadata"].get("reused_from") and not r2.query(step="search")

    # run 3, in this process: everything up to the training is reused; step 5 is computed
    run3 = run_campaign(campaign)
    assert not run3.failed_jobs and run3.result is not None
    r3 = Results(store, campaign.name, run=run3.flow_uuid)
    cost = {row["step"]: row for row in r3.cost()}
    relax3 = _by_name(r3, "relax_lf")
    assert len(relax3) == 6 and cost["relax_lf"]["reused"] == 6
    hf3 = _by_name(r3, "single_hf", load=True)
    n_ok = sum(ok(d) for d in hf2.values())
    assert set(hf3) == set(hf1) and cost["single_hf"]["reused"] == n_ok
    assert cost["single_hf"]["hf_calls"] == len(hf2) - n_ok  # only the failed ones were run again
    # counted as if run from scratch: every single point is an HF call, with the CPU time of the job that ran it
    fresh = {row["step"]: row for row in r3.cost(as_fresh=True)}
    assert fresh["single_hf"]["hf_calls"] == len(hf3) and fresh["single_hf"]["reused"] == n_ok
    assert fresh["single_hf"]["cpu_s"] > cost["single_hf"]["cpu_s"]
    for name, d in hf3.items():
        if not ok(hf2[name]):
            assert not d["metadata"].get("reused_from")
            continue
        # run 3 found the successful result (run 1's, or run 2's copy of it, or run 2's retry)
        assert d["metadata"]["reused_from"] in {hf1[name]["uuid"], hf2[name]["uuid"]}
        assert d["output"]["energy"] == hf2[name]["output"]["energy"]
        original = hf1[name] if ok(hf1[name]) else hf2[name]
        source = store.query_one({"uuid": original["uuid"]}, properties=["metadata"])
        assert _total_cpu(d) < 0.5 * _total_cpu(source)
    (train3,) = r3.query(step="train", load=True)
    # the training's inputs are the same when the HF single points came out the same (a failed one fails again)
    assert [ok(hf3[n]) for n in sorted(hf3)] == [ok(hf2[n]) for n in sorted(hf2)]
    assert cost["train"]["reused"] == 1 and train3["metadata"]["reused_from"] == train2["uuid"]
    assert _total_cpu(train3) < 0.5 * _total_cpu(train2)
    (train2_full,) = r2.query(step="train", load=True)
    m2 = TrainedModel.model_validate(train2_full["output"]["models"]["main"])
    m3 = TrainedModel.model_validate(train3["output"]["models"]["main"])
    assert m3.model_bytes() == m2.model_bytes()  # the very model trained by the killed run
    # what had never finished is computed: the search and verification of round 0
    assert cost["search"]["jobs"] == 2 and cost["search"]["reused"] == 0
    checks = sum(len(d["output"]["checks"]) for d in r3.query(step="verify", load=True))
    assert cost["verify"]["jobs"] == 2 and cost["verify"]["reused"] == 0 and cost["verify"]["hf_calls"] == checks >= 2
    # the campaign's HF count still covers every HF result it used
    assert run3.result.hf_calls == 1 + len(hf1) + checks
