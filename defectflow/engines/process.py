"""Child processes of the engines (``mpirun`` + ``pw.x``, ``cp2k_shell``, ``mace_run_train``, ...): each one runs in
its own session and ends with the Python call that started it, together with everything it started.

Why: a DFT run is ``mpirun`` plus one rank per core. If the Python process is interrupted (Ctrl-C, ``kill``, a
batch system's SIGTERM) or a run exceeds its time limit, the ranks must not keep running for hours on their own.

* :func:`start` / :func:`popen` start a child with ``start_new_session=True``: its own session and process group,
  so a terminal's Ctrl-C does not reach it directly and it can be ended as a whole.
* Ending a child (:func:`terminate`): SIGTERM to its process group (``mpirun`` forwards it to its ranks), up to
  ``grace`` seconds (default :data:`GRACE_S`) for everything in the session to exit, then SIGKILL to whatever is
  left. OpenMPI puts every rank in a process group of its own, inside the child's session, so the leftovers are
  found by session id in ``/proc`` (Linux; elsewhere only the process group is signalled).
* :func:`run_process` runs a command to completion (optional ``timeout`` in seconds) and always ends the session,
  also when the call is interrupted (``KeyboardInterrupt``, ``SystemExit``) or times out.
* Every live child is registered while it runs, so a top-level signal handler can end them all with
  :func:`terminate_all` (:func:`install_signal_handlers` installs such handlers for SIGINT and SIGTERM).

>>> from defectflow.engines.process import run_process
>>> result = run_process(["mpirun", "-np", "2", "pw.x", "-in", "pw.in"], cwd="run", timeout=3600,
...                      stdout="run/pw.out", stderr="run/pw.err")          # doctest: +SKIP
>>> result.returncode, result.timed_out, result.wall_seconds                 # doctest: +SKIP
(0, False, 12.3)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

__all__ = [
    "GRACE_S",
    "ProcessResult",
    "install_signal_handlers",
    "live_pids",
    "managed",
    "popen",
    "register",
    "run_process",
    "session_members",
    "start",
    "terminate",
    "terminate_all",
    "terminate_session",
    "unregister",
]

#: Seconds between SIGTERM and SIGKILL when a child is ended (mpirun needs a moment to stop its ranks).
GRACE_S = 10.0
_POLL_S = 0.05

#: pid → Popen (or None when only the pid is known) of every child started here that has not been ended yet.
_LIVE: dict[int, subprocess.Popen | None] = {}


@dataclass(frozen=True)
class ProcessResult:
    """What :func:`run_process` reports: the command, its exit status (negative: killed by that signal, as in
    :mod:`subprocess`), whether ``timeout`` ended it, and the wall time of the call in seconds."""

    args: Sequence[str] | str
    returncode: int | None
    timed_out: bool
    wall_seconds: float


# ---------------------------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------------------------
def session_members(sid: int) -> list[int] | None:
    """Live (not zombie) processes whose session id is ``sid``; None where ``/proc`` is unavailable."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # exited meanwhile
            continue
        # fields: state ppid pgrp session ...
        if fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            out.append(int(entry.name))
    return out


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _alive(sid: int) -> bool:
    members = session_members(sid)
    if members is None:  # not Linux: the process group stands for the session
        try:
            os.killpg(sid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    return bool(members)


def terminate_session(sid: int, grace: float = GRACE_S) -> None:
    """End the session ``sid`` (the pid of a child started by :func:`start`): SIGTERM to its process group, up to
    ``grace`` s for every process in the session to exit, then SIGKILL to the group and to every process left in
    the session. The child itself is not reaped (see :func:`terminate`)."""
    members = session_members(sid)
    if members == []:
        return
    _signal_group(sid, signal.SIGTERM)  # the leader (mpirun, the shell) forwards it to its ranks
    orphans_told = False
    deadline = time.monotonic() + max(grace, 0.0)
    while time.monotonic() < deadline:
        members = session_members(sid)
        if members is not None and not orphans_told and sid not in members:
            # the leader is gone but not everything it started (e.g. ranks of a crashed mpirun): tell them too
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            orphans_told = True
        if not _alive(sid):
            return
        time.sleep(_POLL_S)
    _signal_group(sid, signal.SIGKILL)
    for pid in session_members(sid) or []:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    logger.warning("process session %d did not end within %.1f s of SIGTERM: killed", sid, grace)


# ---------------------------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------------------------
def register(proc: subprocess.Popen | int) -> None:
    """Record a live child (a Popen, or a pid) that :func:`terminate_all` must end."""
    if isinstance(proc, int):
        _LIVE.setdefault(proc, None)
    else:
        _LIVE[proc.pid] = proc


def unregister(proc: subprocess.Popen | int) -> None:
    _LIVE.pop(proc if isinstance(proc, int) else proc.pid, None)


def live_pids() -> list[int]:
    """Pids of the registered children (session leaders) that have not been ended yet."""
    return list(_LIVE)


def _exited(proc: subprocess.Popen) -> bool:
    """True once ``proc`` has exited, without reaping it (its pid, hence its session id, stays reserved)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped elsewhere
        return True
    except AttributeError:  # no waitid (not POSIX): this reaps, which is fine there
        return proc.poll() is not None


def _wait_exit(proc: subprocess.Popen, timeout: float | None) -> bool:
    """Wait until ``proc`` exits (True) or ``timeout`` seconds pass (False), without reaping it."""
    if timeout is None and hasattr(os, "waitid"):
        try:  # blocks; a signal handler that raises (KeyboardInterrupt) interrupts it
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
        return True
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while not _exited(proc):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, _POLL_S)
    return True


def start(cmd: Sequence[str] | str, **popen_kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)``, registered for :func:`terminate_all`."""
    popen_kwargs["start_new_session"] = True
    proc = subprocess.Popen(cmd, **popen_kwargs)
    register(proc)
    return proc


def terminate(proc: subprocess.Popen, grace: float = GRACE_S) -> int | None:
    """End ``proc`` and its session (:func:`terminate_session`), reap it and unregister it; return its exit status.

    Harmless for a child that has already exited (only leftovers of its session, if any, are ended)."""
    try:
        if proc.returncode is None:
            if session_members(proc.pid) == [] and not _exited(proc):  # running but no session of its own
                proc.terminate()
            else:
                terminate_session(proc.pid, grace)
            try:
                proc.wait(timeout=max(grace, 1.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode
    finally:
        unregister(proc)


@contextlib.contextmanager
def managed(proc: subprocess.Popen, grace: float = GRACE_S) -> Iterator[subprocess.Popen]:
    """Register ``proc`` while the block runs and end it with its session when the block exits for any reason
    (normal exit, exception, ``KeyboardInterrupt``, ``SystemExit``)."""
    register(proc)
    try:
        yield proc
    finally:
        terminate(proc, grace)


@contextlib.contextmanager
def popen(cmd: Sequence[str] | str, grace: float = GRACE_S, **popen_kwargs: Any) -> Iterator[subprocess.Popen]:
    """:func:`start` a child and end it with its session when the block exits (see :func:`managed`)."""
    proc = start(cmd, **popen_kwargs)
    with managed(proc, grace) as p:
        yield p


def _open(target: str | os.PathLike | IO | int | None, stack: contextlib.ExitStack):
    if target == subprocess.PIPE:
        raise ValueError("run_process: write output to a file (a pipe that nobody reads fills up and blocks)")
    if isinstance(target, str | os.PathLike):
        return stack.enter_context(open(target, "w"))  # closed by the stack
    return target


def run_process(
    cmd: Sequence[str] | str,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    stdout: str | os.PathLike | IO | int | None = None,
    stderr: str | os.PathLike | IO | int | None = None,
    grace: float = GRACE_S,
) -> ProcessResult:
    """Run ``cmd`` in its own session until it exits or ``timeout`` seconds pass, then end the session.

    ``stdout``/``stderr``: a file path (written), an open file, ``subprocess.DEVNULL``/``STDOUT`` or None
    (inherit). On timeout the session is ended (SIGTERM, SIGKILL after ``grace`` s) and ``timed_out`` is True.
    An interrupt of this call (``KeyboardInterrupt``, ``SystemExit`` from a SIGTERM handler) ends the session too
    and is re-raised. A missing executable raises ``FileNotFoundError`` as :class:`subprocess.Popen` does.
    """
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        out, err = _open(stdout, stack), _open(stderr, stack)
        with popen(cmd, grace=grace, cwd=cwd, env=env, stdout=out, stderr=err) as proc:
            timed_out = not _wait_exit(proc, timeout)
            if timed_out:
                logger.warning("%s: killed after timeout %s s", cmd if isinstance(cmd, str) else cmd[0], timeout)
    return ProcessResult(args=cmd, returncode=proc.returncode, timed_out=timed_out,
                         wall_seconds=time.perf_counter() - t0)


def terminate_all(grace: float = GRACE_S) -> int:
    """End every registered child with its session (SIGTERM to all first, SIGKILL after ``grace`` s); return how
    many there were. Meant for a SIGINT/SIGTERM handler of the top-level program."""
    entries = list(_LIVE.items())
    for pid, _ in entries:  # everyone gets SIGTERM at once: the grace periods overlap
        _signal_group(pid, signal.SIGTERM)
    for pid, proc in entries:
        if proc is not None:
            terminate(proc, grace)
        else:
            terminate_session(pid, grace)
            unregister(pid)
    return len(entries)


def install_signal_handlers(grace: float = GRACE_S) -> dict[int, Any]:
    """Install SIGINT and SIGTERM handlers (main thread only) that end every registered child
    (:func:`terminate_all`) and then raise ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(128 + signum)``
    (SIGTERM), so ``finally`` blocks run. Returns the previous handlers ({signum: handler})."""

    def handler(signum, frame):
        terminate_all(grace)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous
