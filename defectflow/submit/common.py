"""What the FireWorks and jobflow-remote submitters share: which jobs belong to which resource step, the graph
and store of a campaign, and the submission record (``<work_dir>/submission.json``) that ``defectflow status``
reads back.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from defectflow.campaign import Campaign
from defectflow.flows import DefectCampaignMaker
from defectflow.steps import RESOURCE_STEPS, step_of
from defectflow.store import make_store

logger = logging.getLogger(__name__)

__all__ = [
    "RECORD_FILE",
    "STEP_NAME_FILTERS",
    "SubmitRecord",
    "build_flow",
    "count_states",
    "read_record",
    "write_record",
]

#: File in the campaign's work directory recording the last submission.
RECORD_FILE = "submission.json"

#: jobflow ``name_filter`` (a substring match) selecting the jobs of each step of ``execution.resources``
#: (:data:`defectflow.steps.RESOURCE_STEPS`). Job names start with their step ("relax_lf v_Si_0 Unperturbed",
#: "single_hf v_Si_+0_…", "train round 0", "search v_Si +0 round 0"); the trailing space keeps out the jobs that
#: only fan out or join ("label_hf", "start_search"), so those run with the defaults and do not pass a step's
#: resources on to everything they create.
STEP_NAME_FILTERS: dict[str, str] = {step: f"{step} " for step in RESOURCE_STEPS}


@dataclass
class SubmitRecord:
    """One submission of a campaign graph to a workflow manager (written to ``<work_dir>/submission.json``)."""

    manager: str = field(metadata={"doc": "'fireworks' or 'jobflow-remote'"})
    campaign: str
    flow_uuid: str = field(metadata={"doc": "uuid of the submitted Flow: every job, dynamic ones included, "
                                            "lists it in its 'hosts' (the run id of defectflow.results)"})
    flow_name: str
    steps: str = field(metadata={"doc": "'all' or 'lf'"})
    submitted: str = field(metadata={"doc": "ISO 8601 time (UTC)"})
    n_jobs: int = field(metadata={"doc": "jobs in the static graph (dynamic steps add more at run time)"})
    job_ids: list = field(metadata={"doc": "FireWorks fw_ids or jobflow-remote db_ids of the submitted jobs"})
    resources: dict[str, Any] = field(default_factory=dict, metadata={"doc": "step → manager settings applied"})
    connection: dict[str, Any] = field(default_factory=dict,
                                       metadata={"doc": "how to reach the manager's database again (no passwords)"})
    store: str = field(default="", metadata={"doc": "the campaign's execution.store"})
    work_dir: str = field(default="", metadata={"doc": "the campaign's work directory (holds submission.json)"})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_flow(campaign: Campaign | str | Path, steps: str = "all"):
    """``(campaign, flow, store)``: the campaign (read from YAML when a path), its graph
    (:class:`~defectflow.flows.DefectCampaignMaker`) and its JobStore (:func:`~defectflow.store.make_store`)."""
    if not isinstance(campaign, Campaign):
        campaign = Campaign.from_yaml(campaign)
    work = campaign.work_dir()
    work.mkdir(parents=True, exist_ok=True)
    flow = DefectCampaignMaker(steps=steps).make(campaign)
    return campaign, flow, make_store(campaign.execution.store, work)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_record(record: SubmitRecord, work_dir: str | Path) -> Path:
    """Write ``record`` to ``<work_dir>/submission.json`` (replacing an earlier one) and return the path."""
    path = Path(work_dir) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.as_dict(), indent=1, default=str))
    logger.info("%s: %d jobs of flow %s submitted; record in %s", record.manager, record.n_jobs,
                record.flow_uuid, path)
    return path


def read_record(work_dir: str | Path, manager: str | None = None) -> dict[str, Any]:
    """The submission record of a work directory; FileNotFoundError when there is none, ValueError when it was
    written by another manager than ``manager``."""
    path = Path(work_dir) / RECORD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no submission record (was the campaign submitted from here?)")
    record = json.loads(path.read_text())
    if manager and record.get("manager") != manager:
        raise ValueError(f"{path}: submitted with {record.get('manager')!r}, not {manager!r}")
    return record


def count_states(rows: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """``{step: {state: count}}`` from ``(job name, state)`` pairs (:func:`defectflow.steps.step_of`; a name of no
    step counts under its first word)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for name, state in rows:
        counts[step_of(name) or (name or "?").split(" ", 1)[0]][str(state)] += 1
    return {step: dict(c) for step, c in sorted(counts.items())}
