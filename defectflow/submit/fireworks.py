"""Submit a campaign's graph to FireWorks.

>>> from defectflow.submit.fireworks import submit_fireworks, status_of_submission
>>> record = submit_fireworks("campaign.yaml", launchpad="my_launchpad.yaml")     # doctest: +SKIP
>>> # on the cluster: rlaunch rapidfire / qlaunch -r rapidfire (jobs write to execution.store)
>>> status_of_submission(record.work_dir)        # {'relax_lf': {'COMPLETED': 6}, ...}   # doctest: +SKIP

Each job becomes a Firework (jobflow's ``flow_to_workflow``) whose task carries the campaign's JobStore, so
outputs land in ``execution.store`` whichever machine runs them (a MongoDB URI for a cluster; the embedded store
works only where every worker sees the work directory). Per-step ``execution.resources`` become each step's
Firework spec, also for the jobs created at run time (HF single points, search/verify rounds):

* ``_category = resources[step].worker`` (when set): a FireWorker with ``category: <worker>`` runs that step;
  a FireWorker without a category runs anything, one with ``category: __none__`` only the uncategorised jobs;
* ``_queueadapter = {ntasks: cores, walltime: "HH:MM:SS", queue, gpus: 1}``: keys of FireWorks' SLURM template,
  applied by ``qlaunch -r`` (reservation mode) on top of the queue adapter file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from defectflow.campaign import Campaign, ResourceSpec
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

__all__ = ["apply_fireworks_resources", "fireworks_manager_config", "status_of_submission", "submit_fireworks"]


def fireworks_manager_config(res: ResourceSpec) -> dict[str, Any]:
    """FireWorks spec entries for one step: ``_category`` (the worker name, when set) and ``_queueadapter``
    (``ntasks`` = cores, ``walltime`` "HH:MM:SS" from minutes, ``queue`` and ``gpus: 1`` when set)."""
    qa: dict[str, Any] = {"ntasks": res.cores, "walltime": f"{res.walltime // 60:02d}:{res.walltime % 60:02d}:00"}
    if res.queue:
        qa["queue"] = res.queue
    if res.gpu:
        qa["gpus"] = 1
    config: dict[str, Any] = {"_queueadapter": qa}
    if res.worker:
        config["_category"] = res.worker
    return config


def apply_fireworks_resources(flow, resources: dict[str, ResourceSpec]) -> dict[str, dict[str, Any]]:
    """Set each step's FireWorks spec entries as the ``manager_config`` of its jobs, now and for the jobs the graph
    creates at run time (jobflow ``update_config(..., dynamic=True)``). Returns ``{step: manager_config}``."""
    applied = {}
    for step, res in resources.items():
        config = fireworks_manager_config(res)
        flow.update_config({"manager_config": config}, name_filter=STEP_NAME_FILTERS[step], dynamic=True)
        applied[step] = config
    return applied


def _open_launchpad(launchpad) -> tuple[Any, dict[str, Any]]:
    """A LaunchPad from an object, a YAML file or FireWorks' auto-load, and how to reopen it (no password)."""
    from fireworks import LaunchPad

    if launchpad is None:
        return LaunchPad.auto_load(), {"auto_load": True}
    if isinstance(launchpad, (str, Path)):
        path = Path(launchpad).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"launchpad: file not found: {path}")
        return LaunchPad.from_file(str(path)), {"file": str(path)}
    conn = {k: v for k, v in launchpad.to_dict().items() if k != "password"}
    if isinstance(conn.get("host"), str):  # a URI may carry user:password@
        conn["host"] = re.sub(r"^(mongodb(\+srv)?://)[^@/]*@", r"\1", conn["host"])
    return launchpad, conn


def submit_fireworks(campaign: Campaign | str | Path, launchpad=None, steps: str = "all") -> SubmitRecord:
    """Build the campaign graph and add it to a FireWorks LaunchPad as one workflow.

    Parameters
    ----------
    campaign
        A Campaign or a campaign YAML file.
    launchpad
        A ``fireworks.LaunchPad``, a LaunchPad YAML file, or None for ``LaunchPad.auto_load()``
        (``my_launchpad.yaml`` / ``$FW_CONFIG_FILE``).
    steps
        "all" or "lf" (stop after the low-fidelity harvest).

    Returns the :class:`~defectflow.submit.common.SubmitRecord` (also written to ``<work_dir>/submission.json``):
    flow uuid, fw ids, submission time and the spec entries given to each step.
    """
    from jobflow.managers.fireworks import flow_to_workflow
    from pymongo.errors import PyMongoError

    campaign, flow, store = build_flow(campaign, steps)
    if campaign.execution.store == "embedded":
        logger.warning("execution.store is 'embedded': every FireWorker must see %s", campaign.work_dir())
    applied = apply_fireworks_resources(flow, campaign.execution.resources)
    lpad, connection = _open_launchpad(launchpad)
    wf = flow_to_workflow(flow, store=store)
    try:
        id_map = lpad.add_wf(wf)
    except PyMongoError as exc:  # one line for the CLI instead of a driver traceback
        where = connection.get("file") or connection.get("host") or "auto-loaded"
        raise ValueError(f"FireWorks LaunchPad ({where}): {str(exc).splitlines()[0]}") from None
    record = SubmitRecord(manager="fireworks", campaign=campaign.name, flow_uuid=flow.uuid, flow_name=flow.name,
                          steps=steps, submitted=now_iso(), n_jobs=len(flow.jobs),
                          job_ids=sorted(id_map.values()), resources=applied, connection=connection,
                          store=campaign.execution.store, work_dir=str(campaign.work_dir()))
    write_record(record, campaign.work_dir())
    return record


def status_of_submission(work_dir: str | Path, launchpad=None) -> dict[str, dict[str, int]]:
    """``{step: {FireWorks state: count}}`` for the workflow submitted from ``work_dir``, dynamic jobs included
    (FireWorks appends them to the same workflow). ``launchpad``: a LaunchPad or YAML file; default: reopen the one
    recorded at submission (a file, auto-load, or the recorded host/port/name without password)."""
    from fireworks import LaunchPad

    record = read_record(work_dir, "fireworks")
    if launchpad is None:
        conn = record.get("connection") or {}
        if conn.get("file"):
            launchpad = conn["file"]
        elif conn.get("auto_load"):
            launchpad = LaunchPad.auto_load()
        else:
            launchpad = LaunchPad.from_dict(conn)
    lpad, _ = _open_launchpad(launchpad)
    wf = lpad.workflows.find_one({"nodes": record["job_ids"][0]}, {"nodes": 1})
    if wf is None:
        raise LookupError(f"workflow of fw_id {record['job_ids'][0]} not found on the LaunchPad (reset?)")
    docs = lpad.fireworks.find({"fw_id": {"$in": wf["nodes"]}}, {"name": 1, "state": 1})
    return count_states((d.get("name", ""), d.get("state", "?")) for d in docs)
