"""Running campaigns: locally (``run_campaign``); FireWorks and jobflow-remote submission come with issue #6.

>>> from defectflow.submit import run_campaign
>>> result = run_campaign("workflows/quickstart.yaml")          # doctest: +SKIP
>>> result.summaries["v_Si_0"].ground_state                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectflow.campaign import Campaign
from defectflow.relax import DistortionSummary

logger = logging.getLogger(__name__)

__all__ = ["run_campaign", "CampaignRun", "BUILT_STEPS"]

#: Pipeline steps the local run executes today (the rest are planned in issues #4 and #5).
BUILT_STEPS = ("generate", "bulk", "relax_lf", "summary", "harvest_lf")

_JOB_RE = re.compile(r"^(Starting|Finished) job - (.+) \(([0-9a-f-]+)")


class _JobProgress(logging.Handler):
    """Turns jobflow's 'Starting/Finished job' log lines into progress callbacks."""

    def __init__(self, callback: Callable[[str, str], None]):
        super().__init__(logging.INFO)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        m = _JOB_RE.match(record.getMessage())
        if m:
            self.callback(m.group(1).lower(), m.group(2))


@dataclass
class CampaignRun:
    """What a local run produced."""

    campaign: Campaign
    work_dir: Path
    n_jobs: int
    wall_seconds: float
    summaries: dict[str, DistortionSummary] = field(default_factory=dict)
    training_set: dict[str, Any] | None = None
    failed_jobs: list[str] = field(default_factory=list)

    @property
    def plots(self) -> list[str]:
        return [s.plot for s in self.summaries.values() if s.plot]


def run_campaign(
    campaign: Campaign | str | Path,
    progress: Callable[[str, str, int, int], None] | None = None,
) -> CampaignRun:
    """Build the campaign graph and run it locally into the embedded (or configured) store.

    ``progress(event, job_name, done, total)`` is called when a job starts or finishes.
    """
    from jobflow import run_locally

    from defectflow.flows import DefectCampaignMaker
    from defectflow.store import make_store

    if not isinstance(campaign, Campaign):
        campaign = Campaign.from_yaml(campaign)
    work = campaign.work_dir()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    flow = DefectCampaignMaker().make(campaign)
    total = len(flow.jobs)
    store = make_store(campaign.execution.store, work)

    done = {"n": 0}

    def on_job(event: str, name: str) -> None:
        if event == "finished":
            done["n"] += 1
        if progress:
            progress(event, name, done["n"], total)

    handler = _JobProgress(on_job)
    jf_logger = logging.getLogger("jobflow")
    old_level, old_propagate = jf_logger.level, jf_logger.propagate
    jf_logger.addHandler(handler)
    jf_logger.setLevel(logging.INFO)
    jf_logger.propagate = False  # jobflow's per-job INFO lines feed the progress callback, not the terminal
    try:
        with warnings.catch_warnings():
            # bulk jobs and relaxations are independent on purpose (executors may run them in parallel)
            warnings.filterwarnings("ignore", message="Some jobs are not connected")
            responses = run_locally(flow, store=store, create_folders=True, root_dir=str(work / "jobs"),
                                    log=False, ensure_success=False)
    finally:
        jf_logger.removeHandler(handler)
        jf_logger.setLevel(old_level)
        jf_logger.propagate = old_propagate

    store.connect()
    uuids = {j.uuid: j.name for j in flow.jobs}
    failed = [name for uuid, name in uuids.items() if uuid not in responses]
    summaries = {}
    for doc in store.query({"uuid": {"$in": list(uuids)}, "name": {"$regex": "^summary "}}):
        s = DistortionSummary.model_validate(doc["output"])
        summaries[doc["name"].removeprefix("summary ")] = s
    harvest = store.query_one({"uuid": {"$in": list(uuids)}, "name": "harvest_lf"}, load=True)
    ts = None
    if harvest:
        ts = {k: v for k, v in harvest["output"].items() if k != "extxyz"}
        path = work / "training_lf.xyz"
        path.write_text(harvest["output"]["extxyz"])
        ts["path"] = str(path)
    ordered = dict(sorted(summaries.items(), key=lambda kv: (kv[1].defect, kv[1].charge)))
    return CampaignRun(campaign=campaign, work_dir=work, n_jobs=total, wall_seconds=time.perf_counter() - t0,
                       summaries=ordered, training_set=ts, failed_jobs=failed)
