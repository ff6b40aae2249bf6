"""Running campaigns: locally (``run_campaign``), or submitted to FireWorks and jobflow-remote (``submit``).

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
from defectflow.search.jobs import CampaignResult
from defectflow.steps import STEPS

logger = logging.getLogger(__name__)

__all__ = ["run_campaign", "CampaignRun", "BUILT_STEPS", "steps_of_run"]

#: Pipeline steps a local run executes (:data:`defectflow.steps.STEPS` without jobflow's bookkeeping job).
BUILT_STEPS = tuple(name for name in STEPS if name != "store_inputs")


def steps_of_run(steps: str = "all", baseline: bool = False) -> tuple[str, ...]:
    """The steps a run executes, in pipeline order: ``steps="lf"`` stops after part 2 (the LF harvest);
    ``baseline``: the campaign runs the foundation-model baseline (``search.foundation_baseline``)."""
    parts = ("1", "bulk", "2") if steps == "lf" else ("1", "bulk", "2", "3", "4", "5")
    return tuple(name for name in BUILT_STEPS if STEPS[name].part in parts and (baseline or name != "baseline"))

_JOB_RE = re.compile(r"^(Starting|Finished) job - (.+) \(([0-9a-f-]+)")
_FAIL_RE = re.compile(r"^(.+) failed with exception:\s*(.*)", re.S)


class _JobProgress(logging.Handler):
    """Turns jobflow's 'Starting/Finished job' log lines into progress callbacks."""

    def __init__(self, callback: Callable[[str, str], None]):
        super().__init__(logging.INFO)
        self.callback = callback
        self.failures: dict[str, str] = {}
        self.tracebacks: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = _JOB_RE.match(msg)
        if m:
            self.callback(m.group(1).lower(), m.group(2))
            return
        m = _FAIL_RE.match(msg)
        if m:  # keep the last line of the traceback: the exception itself
            text = m.group(2).strip()
            lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("    For further")]
            self.failures[m.group(1)] = lines[-1] if lines else "unknown error"
            self.tracebacks[m.group(1)] = text


@dataclass
class CampaignRun:
    """What a local run produced."""

    campaign: Campaign
    work_dir: Path
    n_jobs: int
    wall_seconds: float
    summaries: dict[str, DistortionSummary] = field(default_factory=dict)
    training_set: dict[str, Any] | None = None
    result: CampaignResult | None = None
    failed_jobs: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict, metadata={"doc": "job name → exception"})
    flow_uuid: str = field(default="", metadata={"doc": "uuid of this run's flow (every job lists it in hosts)"})

    @property
    def plots(self) -> list[str]:
        out = [s.plot for s in self.summaries.values() if s.plot]
        if self.result:
            out += [p for p in self.result.plots.values() if p]
        return out


def run_campaign(
    campaign: Campaign | str | Path,
    progress: Callable[[str, str, int, int], None] | None = None,
    steps: str = "all",
    generation=None,
) -> CampaignRun:
    """Build the campaign graph and run it locally into the embedded (or configured) store.

    ``progress(event, job_name, done, total)`` is called when a job starts or finishes; ``total`` grows when
    dynamic steps (HF fan-out, search rounds) add jobs. ``steps="lf"`` stops after step 2. ``generation``: an
    earlier :func:`~defectflow.generate.generate` result of this campaign (``defectflow run`` passes the one its
    preflight made).

    One run per work directory: the run holds ``<work_dir>/run.lock`` (:class:`~defectflow.store.lock.RunLock`)
    while it runs; a second one raises :class:`~defectflow.store.lock.WorkDirLocked` at once. A MongoDB store is
    pinged before anything is built (:class:`~defectflow.store.StoreError` within seconds when unreachable).
    """
    from defectflow.campaign import CampaignError
    from defectflow.preflight import check_work_dir
    from defectflow.store.lock import RunLock

    if not isinstance(campaign, Campaign):
        campaign = Campaign.from_yaml(campaign)
    work = campaign.work_dir()
    problems = check_work_dir(work, create=True)
    if problems:
        raise CampaignError(problems, campaign.source)
    with RunLock(work):
        return _run_locked(campaign, work, progress, steps, generation)


def _run_locked(campaign: Campaign, work: Path, progress, steps: str, generation) -> CampaignRun:
    from jobflow import run_locally

    from defectflow.flows import DefectCampaignMaker
    from defectflow.results import Results
    from defectflow.store import make_store

    t0 = time.perf_counter()
    store = make_store(campaign.execution.store, work, check=True)
    flow = DefectCampaignMaker(steps=steps).make(campaign, generation=generation)
    total = {"n": len(flow.jobs)}

    done = {"n": 0}

    seen: set[str] = set()

    def on_job(event: str, name: str) -> None:
        if event == "starting" and name not in known and name not in seen:
            total["n"] += 1  # a job added by a dynamic step
        seen.add(name)
        if event == "finished":
            done["n"] += 1
        total["n"] = max(total["n"], done["n"])  # replaced jobs run under their old names too
        if progress:
            progress(event, name, done["n"], total["n"])

    known = {j.name for j in flow.jobs}

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

    if handler.tracebacks:
        (work / "failures.log").write_text(
            "".join(f"=== {name}\n{tb}\n\n" for name, tb in handler.tracebacks.items()))
    store.connect()
    uuids = {j.uuid: j.name for j in flow.jobs}
    failed = [name for uuid, name in uuids.items() if uuid not in responses]
    results = Results(store, campaign.name, run=flow.uuid)  # every job of this run lists the flow in its hosts
    final = results.result()
    result = CampaignResult.model_validate(final) if final else None
    summaries = {}
    for doc in results.query(step="summary", properties=["name", "output", "completed_at"]):
        summaries[doc["name"].removeprefix("summary ")] = DistortionSummary.model_validate(doc["output"])
    mine = {"hosts": flow.uuid}
    harvest = store.query_one({**mine, "name": "harvest_lf"}, load=True)
    ts = None
    if harvest:
        ts = {k: v for k, v in harvest["output"].items() if k != "extxyz"}
        path = work / "training_lf.xyz"
        path.write_text(harvest["output"]["extxyz"])
        ts["path"] = str(path)
    ordered = dict(sorted(summaries.items(), key=lambda kv: (kv[1].defect, kv[1].charge)))
    return CampaignRun(campaign=campaign, work_dir=work, n_jobs=total["n"], wall_seconds=time.perf_counter() - t0,
                       summaries=ordered, training_set=ts, result=result, failed_jobs=failed,
                       failures=dict(handler.failures), flow_uuid=flow.uuid)


def submission_status(work_dir: str | Path) -> dict[str, Any] | None:
    """What the workflow manager reports for the campaign submitted from ``work_dir`` (``submission.json``
    written by ``defectflow submit``): ``{"manager", "submitted", "steps": {step: {state: count}}}``; None when
    the campaign was never submitted (local runs)."""
    import json

    path = Path(work_dir) / "submission.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("manager") == "fireworks":
        from defectflow.submit.fireworks import status_of_submission
    else:
        from defectflow.submit.remote import status_of_submission
    try:
        steps = status_of_submission(work_dir)
    except Exception as exc:  # noqa: BLE001 - the manager's database may be unreachable from here
        return {**record, "steps": {}, "error": f"{type(exc).__name__}: {exc}"}
    return {**record, "steps": steps}
