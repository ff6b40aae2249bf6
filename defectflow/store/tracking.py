"""Cost accounting and resume for defectflow jobs.

:func:`tracked` wraps the function under ``@job`` and, when it runs as a job, records in the job document's
``metadata`` (next to ``campaign``, ``defect``, ``charge`` set when the graph is built):

* ``step``      the pipeline step (:data:`defectflow.steps.STEPS`): the decorator's own ``step`` argument; a job
                used by several steps (the generic ``single_point``: ``bulk_lf``, ``bulk_hf``, ``single_hf``) is
                given its step when the graph is built (:func:`defectflow.steps.name_job`), and keeps it,
* ``cost``      ``wall_s`` (s), ``cpu_s`` (s, this process: every thread), ``cpu_children_s`` (s, finished child
                processes, e.g. ``mpirun pw.x``), so CPU-seconds per step can be queried from any store,
* ``cache_key`` (jobs that can reuse a result) a digest of everything that determines the result: the inputs
                as JSON, with engine settings replaced by their settings digest (which leaves out parallelisation:
                ``mpi_procs``, ``command``),
* ``reused_from`` the uuid of the job whose output was reused, when it was.

Folders: jobflow's ``run_locally`` names a job's folder ``job_<time>-<random>``. A job that runs (not one whose
output is reused) links ``<jobs folder>/by_name/<step>/<details>`` to its folder, e.g.
``by_name/relax_lf/v_Si_-1/Bond_Distortion_-30.0%``, so that a user finds a calculation's files by its job name
(:func:`link_job_folder`; the newest run of a job name wins). FireWorks and jobflow-remote name their launch
folders themselves; nothing is linked there.

Resume: with ``cache=True`` a job first looks in its own JobStore (``CURRENT_JOB.store``; the job needs
``expose_store``) for a finished job with the same ``cache_key`` and returns that output instead of computing.
So re-running a campaign after a crash or kill, locally or through FireWorks / jobflow-remote, recomputes only what
is missing, and a changed setting invalidates exactly the jobs whose inputs it changes (and, through their changed
outputs, what depends on them). Failed results (``status == "failed"``; without a status, an ``error``) are never reused: they are
retried. A reused output is stored again under the new job, but its big data (trajectories, model files) is not
copied: the new document points to the data the first job stored (the same ``blob_uuid`` in the data store).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from defectflow.engines import get_engine
from defectflow.steps import STEPS

logger = logging.getLogger(__name__)

__all__ = ["tracked", "cache_key", "cpu_clock", "link_job_folder"]


def _engine_digest(spec: Any) -> Any:
    try:
        return {"engine_digest": get_engine(spec).digest}
    except Exception:  # noqa: BLE001 - not a valid engine spec: key on the raw value
        return spec


def cache_key(step: str, arguments: dict[str, Any], engines: Iterable[str] = (), ignore: Iterable[str] = ()) -> str:
    """SHA-256 digest (hex, 24 chars) of a step's inputs.

    ``engines`` names arguments holding engine settings (keyed by their settings digest); ``ignore`` names arguments
    that do not change the result (plot folders, work directories).
    """
    from monty.json import jsanitize

    engines, ignore = set(engines), set(ignore)
    data = {k: (_engine_digest(v) if k in engines else v) for k, v in arguments.items() if k not in ignore}
    text = json.dumps(jsanitize({"step": step, "args": data}, strict=True, enum_values=True), sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _reusable(output: Any) -> bool:
    if not isinstance(output, dict):
        return output is not None
    if "status" in output:  # relaxations: 'unconverged' (step cap reached) is a result, 'failed' is not
        return output["status"] != "failed"
    return not output.get("error")


_INDEXED: set[int] = set()


def _ensure_index(store) -> None:
    """An index on ``metadata.cache_key`` where the docs store supports one (MongoDB; the embedded SQLite store
    indexes it itself); once per store object."""
    if id(store) in _INDEXED:
        return
    _INDEXED.add(id(store))
    try:
        store.docs_store.ensure_index("metadata.cache_key")
    except Exception:  # noqa: BLE001 - a store without index support still answers the lookup
        logger.debug("no index on metadata.cache_key in %s", type(store.docs_store).__name__)


def _lookup(store, key: str) -> tuple[Any, str] | None:
    """A finished, successful output with ``key`` in ``store`` (newest first) as stored: its big data stays a
    reference into the data store (``load=False``), so reusing it copies nothing; or None."""
    _ensure_index(store)
    try:
        docs = store.query({"metadata.cache_key": key}, sort={"completed_at": -1}, load=False,
                           properties=["uuid", "output"])
        for doc in docs:
            if _reusable(doc.get("output")):
                return doc["output"], doc["uuid"]
    except Exception as exc:  # noqa: BLE001 - a store that cannot be searched means: compute
        logger.warning("cache lookup failed (%s); computing", exc)
    return None


def cpu_clock() -> float:
    """CPU seconds (user + system) of this process and its reaped children (engine subprocesses) so far."""
    me, children = _cpu()
    return me + children


def _cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, ch.ru_utime + ch.ru_stime


def link_job_folder(job_name: str, folder: Path | None = None) -> Path | None:
    """Link ``<parent>/by_name/<step>/<details...>`` to ``folder`` (default: the working directory) when it is a
    ``run_locally`` job folder (``job_*``); the words of the job name become folders (``"/"`` in a word becomes
    ``_``), a name of one word links ``<step>/job``. Returns the link, or None (not a run_locally folder, or the
    link could not be made: a warning-free debug line, since a missing link loses nothing)."""
    folder = Path.cwd() if folder is None else Path(folder)
    if not folder.name.startswith("job_"):
        return None
    words = [w.replace("/", "_") for w in job_name.split() if w not in (".", "..")]
    if not words:
        return None
    link = folder.parent.joinpath("by_name", *words, *(["job"] if len(words) == 1 else []))
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(folder, link.parent))
        os.replace(tmp, link)
    except OSError as exc:
        logger.debug("no by_name link for %r: %s", job_name, exc)
        return None
    return link


def tracked(step: str, cache: bool = True, engines: Iterable[str] = (), ignore: Iterable[str] = ()) -> Callable:
    """Decorator (under ``@job``) adding cost, step and resume to a job function; see the module docstring.

    Called outside a running job (``job.original(...)`` in scripts and tests) the function runs unchanged.
    """
    engines, ignore = tuple(engines), tuple(ignore)

    def wrap(func: Callable) -> Callable:
        import inspect

        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            from jobflow import CURRENT_JOB

            if CURRENT_JOB.job is None:
                return func(*args, **kwargs)
            t0, (c0, k0) = time.perf_counter(), _cpu()
            key = None
            if cache:  # the key serialises every input: only for the jobs that can reuse a result
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                key = cache_key(step, dict(bound.arguments), engines, ignore)
            store = getattr(CURRENT_JOB, "store", None)
            hit = _lookup(store, key) if (key is not None and store is not None) else None
            if hit is not None:
                out, source = hit
                # stored as it is: its big-data fields are already references into the data store
                CURRENT_JOB.job._kwargs = {k: v for k, v in CURRENT_JOB.job._kwargs.items() if k != "data"}
                logger.info("%s: reusing the output of job %s (same inputs)", CURRENT_JOB.job.name, source)
            else:
                link_job_folder(CURRENT_JOB.job.name)
                out, source = func(*args, **kwargs), None
            c1, k1 = _cpu()
            meta = {"step": step if step in STEPS else CURRENT_JOB.job.metadata.get("step"),
                    "cost": {"wall_s": round(time.perf_counter() - t0, 4), "cpu_s": round(c1 - c0, 4),
                             "cpu_children_s": round(k1 - k0, 4)}}
            calls = getattr(out, "hf_calls", None) if source is None else None
            if isinstance(calls, int):  # jobs making several HF calls (verify, topup) say how many
                meta["hf_calls"] = calls
            if key is not None:
                meta["cache_key"] = key
            if source:
                meta["reused_from"] = source
            # jobflow writes the job document (with this metadata) after the function returns, under every
            # executor; Response.stored_data would not reach the JobStore (run_locally drops it)
            CURRENT_JOB.job.metadata.update(meta)
            return out

        return wrapper

    return wrap
