"""Submit a campaign's graph to jobflow-remote.

>>> from defectflow.submit.remote import submit_jobflow_remote, status_of_submission
>>> record = submit_jobflow_remote("campaign.yaml", project="defects")          # doctest: +SKIP
>>> # jf runner start -p defects   (the runner moves the jobs through the workers)
>>> status_of_submission(record.work_dir)        # {'relax_lf': {'COMPLETED': 6}, ...}   # doctest: +SKIP

jobflow-remote writes every job's output to its *project's* jobstore, not to the store a job was built with. For
``defectflow results`` / ``status`` (which read ``execution.store``) to find the outputs, the project's jobstore
must be the same MongoDB database as ``execution.store``: documents in ``outputs`` and the GridFS collection
``outputs_data`` as the additional store named ``data``, e.g. in the project file::

    jobstore:
      docs_store: {type: MongoStore, host: db.example.org, port: 27017, database: defects,
                   collection_name: outputs}
      additional_stores:
        data: {type: GridFSStore, host: db.example.org, port: 27017, database: defects,
               collection_name: outputs_data}

:func:`submit_jobflow_remote` refuses (ValueError, one line) a campaign whose store is ``embedded`` or whose
MongoDB host, database or collections differ from the project's jobstore.

Per-step ``execution.resources`` are given to each step's jobs with jobflow-remote's ``set_run_config`` (also for
the jobs created at run time): ``worker`` (default: the ``worker`` argument, else the project's first worker) and,
as qtoolkit ``QResources``, ``processes`` = cores, ``time_limit`` = walltime (minutes → seconds), ``queue_name``
and ``gpus_per_job: 1``; entries the worker's scheduler does not support (all of them for a ``shell`` worker, GPUs
on PBS/SGE) are left out with a log message, so they never make a submission fail.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from defectflow.campaign import Campaign, ResourceSpec
from defectflow.store import make_store
from defectflow.submit.common import (
    STEP_NAME_FILTERS,
    SubmitRecord,
    build_flow,
    count_states,
    now_iso,
    read_record,
    write_record,
)

logger = logging.getLogger(__name__)

__all__ = [
    "apply_remote_resources",
    "check_jobstore",
    "remote_resources",
    "status_of_submission",
    "submit_jobflow_remote",
]

_LOCAL = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _project(project: str | None):
    """The jobflow-remote Project (``project`` or the default one); ValueError with jobflow-remote's reason."""
    from jobflow_remote import ConfigManager
    from jobflow_remote.config.base import ConfigError

    try:
        return ConfigManager().get_project(project)
    except ConfigError as exc:
        raise ValueError(f"jobflow-remote project {project or '(default)'}: {exc}") from None


def remote_resources(res: ResourceSpec, worker) -> Any:
    """qtoolkit ``QResources`` for one step on a jobflow-remote worker (a worker config of the project): processes
    = cores, time_limit = walltime in seconds, queue_name, gpus_per_job = 1 when ``gpu``; only the entries the
    worker's scheduler supports; None when none is left (e.g. a ``shell`` worker)."""
    from qtoolkit.core.data_objects import QResources

    wanted = {"processes": res.cores, "time_limit": res.walltime * 60, "queue_name": res.queue,
              "gpus_per_job": 1 if res.gpu else None}
    supported = set(worker.get_scheduler_io().supported_qresources_keys)
    kept = {k: v for k, v in wanted.items() if v is not None and k in supported}
    dropped = sorted(k for k, v in wanted.items() if v is not None and k not in supported)
    if dropped:
        level = logging.DEBUG if worker.scheduler_type == "shell" else logging.WARNING
        logger.log(level, "scheduler %s does not take %s: left out", worker.scheduler_type, ", ".join(dropped))
    return QResources(**kept) if kept else None


def apply_remote_resources(flow, resources: dict[str, ResourceSpec], project, default_worker: str
                           ) -> dict[str, dict[str, Any]]:
    """Send each step's jobs (now and those created at run time) to ``resources[step].worker`` (default
    ``default_worker``) with its QResources. Returns ``{step: {"worker", "resources"}}`` as plain dicts."""
    from jobflow_remote import set_run_config

    applied = {}
    for step, res in resources.items():
        name = res.worker or default_worker
        if name not in project.workers:
            raise ValueError(f"execution.resources.{step}.worker: {name!r} is not a worker of jobflow-remote project "
                             f"{project.name!r} (workers: {', '.join(project.workers) or 'none'})")
        qres = remote_resources(res, project.workers[name])
        set_run_config(flow, name_filter=STEP_NAME_FILTERS[step], worker=name, resources=qres, dynamic=True)
        applied[step] = {"worker": name, "resources": qres.as_dict() if qres is not None else None}
    return applied


def _location(store) -> tuple | None:
    """(hosts, database, collection) of a Mongo-backed maggma store, None for any other kind."""
    uri = getattr(store, "uri", None)
    host = getattr(store, "host", None)
    if uri is None and isinstance(host, str) and host.startswith("mongodb"):
        uri = host
    if uri:
        scheme, rest = uri.split("://", 1)
        netloc = rest.split("@")[-1].split("/")[0].split("?")[0]
        default_port = "" if scheme.endswith("+srv") else "27017"
        hosts = set()
        for h in netloc.split(","):  # host, host:port, [::1]:port
            name, port = h.rsplit(":", 1) if ":" in h and not h.endswith("]") else (h, default_port)
            hosts.add(f"{'localhost' if name in _LOCAL else name}:{port}")
    elif host is not None and hasattr(store, "database"):
        hosts = {f"{'localhost' if host in _LOCAL else host}:{getattr(store, 'port', 27017)}"}
    else:
        return None
    return frozenset(hosts), getattr(store, "database", None), getattr(store, "collection_name", None)


def _describe(loc) -> str:
    if loc is None:
        return "not MongoDB"
    hosts, db, coll = loc
    return f"{','.join(sorted(hosts))}/{db}.{coll}"


def check_jobstore(store, store_setting: str, project) -> None:
    """Raise ValueError (one line) when the campaign's JobStore (``store``, from ``execution.store`` =
    ``store_setting``) and the jobflow-remote project's jobstore are obviously different databases/collections."""
    fix = ("set the project's jobstore to execution.store (docs 'outputs', GridFS 'outputs_data' as additional "
           "store 'data'), or execution.store to the project's MongoDB")
    theirs = project.get_jobstore()
    their_stores = {"documents": theirs.docs_store if theirs else None,
                    "data": theirs.additional_stores.get("data") if theirs else None}
    if store_setting == "embedded":
        raise ValueError(f"execution.store is 'embedded' but jobflow-remote writes outputs to the jobstore of project "
                         f"{project.name!r} ({_describe(_location(their_stores['documents']))}): {fix}")
    for what, mine_s in (("documents", store.docs_store), ("data", store.additional_stores.get("data"))):
        their_s = their_stores[what]
        mine, other = _location(mine_s), (_location(their_s) if their_s is not None else None)
        if mine != other:
            raise ValueError(f"execution.store ({what}: {_describe(mine)}) differs from the jobstore of jobflow-remote "
                             f"project {project.name!r} ({what}: {_describe(other) if their_s is not None else 'none'})"
                             f"; results would not be found: {fix}")


def submit_jobflow_remote(campaign: Campaign | str | Path, project: str | None = None, worker: str | None = None,
                          steps: str = "all") -> SubmitRecord:
    """Build the campaign graph and add it to a jobflow-remote project's queue (``jobflow_remote.submit_flow``).

    Parameters
    ----------
    campaign
        A Campaign or a campaign YAML file.
    project
        jobflow-remote project name (default: ``$JFREMOTE_PROJECT`` / the only project).
    worker
        Worker for the jobs without a per-step worker (default: the project's first worker).
    steps
        "all" or "lf" (stop after the low-fidelity harvest).

    The project's jobstore must be ``execution.store`` (see the module docstring); checked before submitting.
    Returns the :class:`~defectflow.submit.common.SubmitRecord` (also in ``<work_dir>/submission.json``).
    """
    from jobflow_remote import submit_flow
    from jobflow_remote.config.base import ConfigError
    from pymongo.errors import PyMongoError

    if not isinstance(campaign, Campaign):
        campaign = Campaign.from_yaml(campaign)
    proj = _project(project)
    worker = worker or next(iter(proj.workers), None)
    if worker not in proj.workers:
        raise ValueError(f"worker {worker!r} is not a worker of jobflow-remote project {proj.name!r} "
                         f"(workers: {', '.join(proj.workers) or 'none'})")
    check_jobstore(make_store(campaign.execution.store, campaign.work_dir()), campaign.execution.store, proj)
    campaign, flow, _ = build_flow(campaign, steps)
    applied = apply_remote_resources(flow, campaign.execution.resources, proj, worker)
    try:
        db_ids = submit_flow(flow, worker=worker, project=proj.name)
    except (ConfigError, PyMongoError) as exc:  # one line for the CLI instead of a traceback
        raise ValueError(f"jobflow-remote project {proj.name!r}: {str(exc).splitlines()[0]}") from None
    record = SubmitRecord(manager="jobflow-remote", campaign=campaign.name, flow_uuid=flow.uuid, flow_name=flow.name,
                          steps=steps, submitted=now_iso(), n_jobs=len(flow.jobs), job_ids=list(db_ids),
                          resources=applied, connection={"project": proj.name, "worker": worker},
                          store=campaign.execution.store, work_dir=str(campaign.work_dir()))
    write_record(record, campaign.work_dir())
    return record


def status_of_submission(work_dir: str | Path) -> dict[str, dict[str, int]]:
    """``{step: {jobflow-remote state: count}}`` for the flow submitted from ``work_dir`` (dynamic jobs included),
    read from the recorded project's queue database."""
    from jobflow_remote import JobController

    record = read_record(work_dir, "jobflow-remote")
    jc = JobController.from_project(_project(record["connection"]["project"]))
    infos = jc.get_jobs_info(flow_ids=[record["flow_uuid"]])
    return count_states((i.name, i.state.value) for i in infos)
