"""Resume: a run killed with SIGKILL, then re-run, reuses every job that had finished and recomputes the rest;
a changed setting invalidates only the jobs whose inputs it changes. Real GFN1-xTB relaxations, embedded store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from conftest import si_vacancy_campaign

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
                          cwd=tmp_path, timeout=600)
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
    for name in reused:  # a reused job costs (almost) nothing
        assert relax[name]["cost"]["cpu_s"] < 1.0
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
