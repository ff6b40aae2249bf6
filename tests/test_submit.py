"""Submission to FireWorks and jobflow-remote, run for real against a MongoDB wire server (SecantusDB).

The campaign is test_pipeline's, smaller: GFN1-xTB (LF) → GFN2-xTB (HF) on a 15-atom Si vacancy cell, q = 0 and +1,
ShakeNBreak Unperturbed + one bond distortion, two HF single points, a tiny MACE. FireWorks runs the whole graph
(dynamic HF fan-out and search round included) with ``rapidfire``; jobflow-remote runs steps 1-2 (``steps="lf"``)
with its Runner and a local shell worker, each job in its own ``jf execution run`` process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pymongo
import pytest
from conftest import TINY_MLIP, si_vacancy_campaign

from defectflow.campaign import Campaign
from defectflow.flows import DefectCampaignMaker
from defectflow.submit.common import STEP_NAME_FILTERS

GROUPS = {("v_Si", 0), ("v_Si", 1)}

#: per-step resources: worker names double as FireWorks categories
RESOURCES = {
    "relax_lf": {"cores": 2, "walltime": 30, "worker": "lfw"},
    "single_hf": {"cores": 4, "walltime": 90, "worker": "hfw", "queue": "hf"},
    "train": {"cores": 1, "walltime": 120, "gpu": True, "worker": "gpuw"},
    "search": {"cores": 1, "walltime": 10},
    "verify": {"cores": 4, "walltime": 61, "worker": "hfw"},
}


def small_campaign(name: str, work: Path, store: str = "embedded", resources: dict | None = None) -> Campaign:
    """The tiny two-charge-state campaign (≈ 25 jobs, ~2 min on 2 busy cores run locally)."""
    return Campaign.from_dict(si_vacancy_campaign(
        name, work,
        distortions={"bond_distortions": [0.3], "dimer": False},
        selection={"strategy": "minima", "budget": 2},
        mlip=TINY_MLIP,
        search={"extra_starts": 0, "fmax": 0.2, "max_steps": 15},
        verify={"max_rounds": 0},
        levels={"dielectric": 11.7},
        execution={"work_dir": str(work), "store": store, "resources": resources or {}},
    ))


def _db_uri(mongo_uri: str, database: str) -> str:
    """The session server's URI with another database (tests must not share stores: tracked jobs reuse results
    with the same inputs from their store)."""
    return mongo_uri.rsplit("/", 1)[0] + "/" + database


def _gridfs_files(uri: str, database: str) -> int:
    with pymongo.MongoClient(uri) as client:
        return client[database]["outputs_data.files"].count_documents({})


# ---------------------------------------------------------------------------------------------------------------
# the per-step mapping, no server
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def static_flow(tmp_path_factory):
    campaign = small_campaign("mapping", tmp_path_factory.mktemp("mapping"), resources=RESOURCES)
    return campaign, DefectCampaignMaker(check_engines=False).make(campaign)


def _dynamic_jobs(parent, names):
    """Jobs created at run time by ``parent``, configured as jobflow does it (``Job.run`` applies the parent's
    ``config_updates`` to the replacement flow)."""
    from jobflow import Flow, job

    @job
    def noop():
        return None

    jobs = []
    for n in names:
        j = noop()
        j.name = n
        jobs.append(j)
    flow = Flow(jobs)
    for update in parent.config_updates:
        flow.update_config(**update, dynamic=True)
    return {j.name: j.config.manager_config for j in jobs}


def test_fireworks_resources_land_in_each_steps_jobs(static_flow):
    from defectflow.submit.fireworks import apply_fireworks_resources

    campaign, flow = static_flow
    flow = copy.deepcopy(flow)  # the module fixture is shared
    applied = apply_fireworks_resources(flow, campaign.execution.resources)
    assert applied["relax_lf"] == {"_category": "lfw", "_queueadapter": {"ntasks": 2, "walltime": "00:30:00"}}
    assert applied["train"] == {"_category": "gpuw", "_queueadapter": {"ntasks": 1, "walltime": "02:00:00", "gpus": 1}}
    assert applied["search"] == {"_queueadapter": {"ntasks": 1, "walltime": "00:10:00"}}  # no worker: no category
    by_name = {j.name: j.config.manager_config for j in flow.jobs}
    relax = [n for n in by_name if n.startswith("relax_lf ")]
    assert len(relax) == 4 and all(by_name[n] == applied["relax_lf"] for n in relax)
    assert by_name["train round 0"] == applied["train"]
    for other in ("generation", "bulk_lf", "bulk_hf", "harvest_lf", "select", "label_hf",
                  "start_search"):
        assert by_name[other] == {}, other
    # dynamic jobs: the HF single points created by label_hf, the search round created by start_search
    lab = next(j for j in flow.jobs if j.name == "label_hf")
    dyn = _dynamic_jobs(lab, ["single_hf v_Si_+0_Unperturbed_step2", "collect_hf"])
    assert dyn["single_hf v_Si_+0_Unperturbed_step2"] == {
        "_category": "hfw", "_queueadapter": {"ntasks": 4, "walltime": "01:30:00", "queue": "hf"}}
    assert dyn["collect_hf"] == {}
    start = next(j for j in flow.jobs if j.name == "start_search")
    dyn = _dynamic_jobs(start, ["search v_Si +0 round 0", "verify v_Si +0 round 0", "finalize round 0",
                                "train round 1"])
    assert dyn["search v_Si +0 round 0"] == applied["search"]
    assert dyn["verify v_Si +0 round 0"] == {"_category": "hfw", "_queueadapter": {"ntasks": 4, "walltime": "01:01:00"}}
    assert dyn["train round 1"] == applied["train"] and dyn["finalize round 0"] == {}


def test_jobflow_remote_resources_follow_each_workers_scheduler(static_flow, tmp_path):
    from jobflow_remote.config.base import Project

    from defectflow.submit.remote import apply_remote_resources

    campaign, flow = static_flow
    flow = copy.deepcopy(flow)
    worker = {"type": "local", "work_dir": str(tmp_path)}
    project = Project(name="unit", base_dir=str(tmp_path), workers={
        "main": {**worker, "scheduler_type": "shell"}, "lfw": {**worker, "scheduler_type": "slurm"},
        "hfw": {**worker, "scheduler_type": "pbs"}, "gpuw": {**worker, "scheduler_type": "slurm"}},
        queue={"store": {"type": "MongoStore", "database": "q", "collection_name": "jobs"}})
    applied = apply_remote_resources(flow, campaign.execution.resources, project, "main")
    assert {s: a["worker"] for s, a in applied.items()} == {
        "relax_lf": "lfw", "single_hf": "hfw", "train": "gpuw", "search": "main", "verify": "hfw"}
    by_name = {j.name: j.config.manager_config for j in flow.jobs}
    relax = by_name["relax_lf v_Si_0 Unperturbed"]
    assert relax["worker"] == "lfw"
    assert (relax["resources"].processes, relax["resources"].time_limit) == (2, 1800)
    train = by_name["train round 0"]
    assert train["worker"] == "gpuw" and train["resources"].gpus_per_job == 1
    assert by_name["label_hf"] == {} and by_name["generation"] == {}
    lab = next(j for j in flow.jobs if j.name == "label_hf")
    hf = _dynamic_jobs(lab, ["single_hf x"])["single_hf x"]
    # PBS takes processes, time limit and queue (no GPU key); a shell worker takes none of them
    assert hf["worker"] == "hfw" and (hf["resources"].processes, hf["resources"].queue_name) == (4, "hf")
    start = next(j for j in flow.jobs if j.name == "start_search")
    search = _dynamic_jobs(start, ["search v_Si +0 round 0"])["search v_Si +0 round 0"]
    assert search["worker"] == "main" and "resources" not in search


def test_jobflow_remote_refuses_a_jobstore_other_than_the_campaign_store(tmp_path):
    from jobflow_remote.config.base import Project
    from monty.json import jsanitize

    from defectflow.store import make_store
    from defectflow.submit.remote import check_jobstore

    uri = "mongodb://db.example.org:27017/defects"
    jobstore = jsanitize(make_store(uri, tmp_path).as_dict())
    project = Project(name="p", base_dir=str(tmp_path), jobstore=jobstore,
                      queue={"store": {"type": "MongoStore", "database": "q", "collection_name": "jobs"}})
    check_jobstore(make_store(uri, tmp_path), uri, project)  # the same: fine
    for store, words in ((uri.replace("defects", "other"), "differs"), ("embedded", "'embedded'"),
                         ("mongodb://elsewhere:27017/defects", "differs")):
        with pytest.raises(ValueError, match=words) as info:
            check_jobstore(make_store(store, tmp_path), store, project)
        assert "\n" not in str(info.value) and "outputs_data" in str(info.value)


def test_step_filters_cover_every_resource_step():
    from typing import get_args

    from defectflow.campaign import ExecutionSpec

    steps = get_args(get_args(ExecutionSpec.model_fields["resources"].annotation)[0])
    assert set(steps) == set(STEP_NAME_FILTERS)


# ---------------------------------------------------------------------------------------------------------------
# FireWorks: the whole graph
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fireworks_run(mongo_uri, tmp_path_factory):
    import time

    from fireworks import FWorker, LaunchPad
    from fireworks.core.rocket_launcher import rapidfire

    from defectflow.submit.fireworks import submit_fireworks

    work = tmp_path_factory.mktemp("fireworks")
    uri = _db_uri(mongo_uri, "df_fireworks")
    campaign = small_campaign("fwtest", work / "campaign", store=uri, resources=RESOURCES)
    lpad = LaunchPad(host=_db_uri(mongo_uri, "fw_launchpad"), uri_mode=True, name="fw_launchpad",
                     strm_lvl="WARNING")
    lpad.reset("", require_password=False)
    t0 = time.perf_counter()
    record = submit_fireworks(campaign, launchpad=lpad)
    # categories route steps to specialised FireWorkers; a FireWorker without a category takes everything
    by_category = {c: {lpad.get_fw_by_id(i).name.split()[0] for i in lpad.get_fw_ids(FWorker(category=c).query)}
                   for c in ("lfw", "gpuw")}
    rapidfire(lpad, FWorker(), m_dir=str(work), nlaunches=0, sleep_time=1, strm_lvl="WARNING", timeout=900)
    return campaign, record, lpad, uri, by_category, time.perf_counter() - t0


def test_fireworks_runs_the_whole_graph(fireworks_run):
    from defectflow.submit import submission_status
    from defectflow.submit.fireworks import status_of_submission

    campaign, record, lpad, _, by_category, seconds = fireworks_run
    print(f"FireWorks: submit + rapidfire {seconds:.0f} s")
    saved = json.loads((campaign.work_dir() / "submission.json").read_text())
    assert saved["manager"] == "fireworks" and saved["flow_uuid"] == record.flow_uuid
    assert saved["job_ids"] == record.job_ids and len(record.job_ids) == record.n_jobs
    assert by_category == {"lfw": {"relax_lf"}, "gpuw": {"train"}}
    status = status_of_submission(campaign.work_dir())  # reopens the recorded LaunchPad
    assert all(set(states) == {"COMPLETED"} for states in status.values()), status
    for step in ("generation", "bulk_lf", "bulk_hf", "relax_lf", "harvest_lf", "label_hf", "single_hf", "collect_hf",
                 "train", "start_search", "search", "verify", "finalize"):
        assert step in status, step
    assert status["relax_lf"]["COMPLETED"] == 4 and status["search"]["COMPLETED"] == 2
    assert submission_status(campaign.work_dir())["steps"] == status  # what `defectflow status` shows
    # the dynamic jobs got their step's spec too
    specs = {d["name"]: d["spec"] for d in lpad.fireworks.find({}, {"name": 1, "spec": 1})}
    hf = [s for n, s in specs.items() if n.startswith("single_hf ")]
    assert hf and all(s["_category"] == "hfw" and s["_queueadapter"]["queue"] == "hf" for s in hf)
    assert all(s["_category"] == "hfw" for n, s in specs.items() if n.startswith("verify "))
    assert "_category" not in specs["label_hf"] and "_category" not in specs["collect_hf"]


def test_fireworks_outputs_are_in_mongodb_and_gridfs(fireworks_run):
    from results_checks import check_results

    from defectflow.results import Results
    from defectflow.store import make_store

    campaign, record, _, uri, _, _ = fireworks_run
    store = make_store(campaign.execution.store, campaign.work_dir())
    res = Results(store, campaign.name)
    assert res.run == record.flow_uuid
    check_results(res, GROUPS, full=True)
    assert all(math.isfinite(g["hf_energy"]) for g in res.ground_states())
    # big data in GridFS: the LF trajectories and the trained model
    relax = res.query(step="relax_lf", properties=["output"])
    ref = relax[0]["output"]["trajectory"]
    assert ref["store"] == "data" and ref["blob_uuid"]
    model = res.query(step="train", properties=["output.models"])[0]["output"]["models"]["main"]
    assert model["model_files"]["store"] == "data"
    loaded = res.query(step="train", load=True)[0]["output"]["models"]["main"]["model_files"]  # from GridFS
    assert loaded and all(isinstance(v, str) and len(v) > 1000 for v in loaded.values())
    assert _gridfs_files(uri, "df_fireworks") >= len(relax) + 1


# ---------------------------------------------------------------------------------------------------------------
# jobflow-remote: steps 1-2 through the Runner and a local worker
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def jfremote_project(mongo_uri, tmp_path, monkeypatch):
    """A jobflow-remote project in ``tmp_path``: queue and jobstore on the SecantusDB server (the jobstore is the
    campaign's store: docs ``outputs``, GridFS ``outputs_data`` as ``data``), two local shell workers."""
    import jobflow_remote
    from jobflow_remote import JobController
    from monty.json import jsanitize

    from defectflow.store import make_store

    uri = _db_uri(mongo_uri, "df_jfremote")
    host, port = mongo_uri.split("://", 1)[1].split("/", 1)[0].split(":")
    folder = tmp_path / "projects"
    folder.mkdir()
    worker = {"type": "local", "scheduler_type": "shell", "timeout_execute": 120}
    project = {
        "name": "defectflow_test",
        "base_dir": str(tmp_path / "jfr"),
        "log_level": "warn",
        "runner": {"delay_checkout": 1, "delay_check_run_status": 1, "delay_advance_status": 1,
                   "delta_retry": [1, 2, 5]},
        "workers": {"main": {**worker, "work_dir": str(tmp_path / "run_main")},
                    "lfw": {**worker, "work_dir": str(tmp_path / "run_lf")}},
        "queue": {"store": {"type": "MongoStore", "host": host, "port": int(port), "database": "jfr_queue",
                            "collection_name": "jobs"}},
        "jobstore": jsanitize(make_store(uri, tmp_path).as_dict()),
    }
    (folder / "defectflow_test.json").write_text(json.dumps(project))
    monkeypatch.setenv("JFREMOTE_PROJECTS_FOLDER", str(folder))
    monkeypatch.setenv("JFREMOTE_PROJECT", "defectflow_test")
    monkeypatch.setattr(jobflow_remote.SETTINGS, "projects_folder", str(folder))  # read once at import
    monkeypatch.setattr(jobflow_remote.SETTINGS, "project", "defectflow_test")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # jf
    JobController.from_project(jobflow_remote.ConfigManager().get_project("defectflow_test")).reset()
    return uri


def test_jobflow_remote_runs_the_lf_steps(jfremote_project, tmp_path):
    import time

    from jobflow_remote import ConfigManager, JobController
    from jobflow_remote.jobs.runner import Runner
    from results_checks import check_results

    from defectflow.results import Results
    from defectflow.store import make_store
    from defectflow.submit import submission_status
    from defectflow.submit.remote import status_of_submission, submit_jobflow_remote

    uri = jfremote_project
    campaign = small_campaign("jfrtest", tmp_path / "campaign", store=uri,
                              resources={"relax_lf": {"cores": 2, "walltime": 30, "worker": "lfw"}})
    t0 = time.perf_counter()
    record = submit_jobflow_remote(campaign, steps="lf")
    assert record.connection == {"project": "defectflow_test", "worker": "main"}
    assert record.resources == {"relax_lf": {"worker": "lfw", "resources": None}}  # a shell worker takes none
    Runner(project_name="defectflow_test").run_all_jobs(max_seconds=600)
    print(f"jobflow-remote: submit + runner {time.perf_counter() - t0:.0f} s")

    status = status_of_submission(campaign.work_dir())
    assert all(set(states) == {"COMPLETED"} for states in status.values()), status
    assert status["relax_lf"] == {"COMPLETED": 4} and "harvest_lf" in status and "train" not in status
    assert submission_status(campaign.work_dir())["manager"] == "jobflow-remote"
    jc = JobController.from_project(ConfigManager().get_project("defectflow_test"))
    workers = {i.name: i.worker for i in jc.get_jobs_info(flow_ids=[record.flow_uuid])}
    assert {w for n, w in workers.items() if n.startswith("relax_lf ")} == {"lfw"}
    assert workers["harvest_lf"] == "main"

    res = Results(make_store(campaign.execution.store, campaign.work_dir()), campaign.name)
    assert res.run == record.flow_uuid
    check_results(res, GROUPS, full=False)
    traj = res.query(step="relax_lf", properties=["output"])[0]["output"]["trajectory"]
    assert traj["store"] == "data"
    assert _gridfs_files(uri, "df_jfremote") >= 4
