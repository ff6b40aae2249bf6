"""One engine single point as a jobflow job (the bulk single points and the selected HF single points: one job
per structure, so an executor can spread them)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jobflow import job

from defectflow.engines import get_engine
from defectflow.engines.base import safe_name
from defectflow.schemas import Frame, as_structure
from defectflow.store.tracking import tracked

__all__ = ["single_point"]


@job
@tracked("single_point", engines=("settings",), ignore=("tag",))
def single_point(structure, charge: int, settings: dict[str, Any], fidelity: str = "high", tag: str = "") -> Frame:
    """Energy and forces of ``structure`` at charge ``charge`` (e) with the engine ``settings`` describe; ``fidelity``
    is the fidelity's name (low / high), ``tag`` the job folder's name.

    ``structure`` may be a Structure, its dict or JSON string. Never raises for a calculation failure: the Frame
    carries ``error`` and ``energy=None``.
    """
    structure = as_structure(structure)
    engine = get_engine(settings, fidelity=fidelity)
    workdir = Path.cwd() / (safe_name(tag) or "single_point")
    t0 = time.perf_counter()
    try:
        return engine.single_point(structure, charge, workdir=workdir)
    except Exception as exc:  # noqa: BLE001 - recorded, the campaign goes on
        return engine.failed_frame(structure, charge, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
