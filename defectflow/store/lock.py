"""One local run per work directory: a lock file holding the running process's PID.

``defectflow run`` (:func:`defectflow.submit.run_campaign`) takes ``<work_dir>/run.lock`` before it runs anything and
removes it when it ends, however it ends. A second run of the same work directory fails at once with
:class:`WorkDirLocked` naming the PID. A lock whose process is gone (``kill -9``, a crash, a reboot) is stale and
is taken over. A lock written on another host (a shared file system) cannot be checked from here and counts as
held; the message says which file to delete if that run is known to be dead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["RunLock", "WorkDirLocked", "lock_holder", "LOCK_FILE"]

LOCK_FILE = "run.lock"


class WorkDirLocked(RuntimeError):
    """Another live process runs a campaign in this work directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or garbage: treated as stale


def lock_holder(work_dir: str | Path) -> dict[str, Any] | None:
    """``{"pid", "host", "started", "command"}`` of the live run holding ``work_dir``'s lock, or None (no lock,
    or a stale one). Reads only; creates nothing."""
    info = _read(Path(work_dir) / LOCK_FILE)
    if not info:
        return None
    if info.get("host") not in (None, socket.gethostname()):
        return info
    pid = info.get("pid")
    return info if isinstance(pid, int) and _alive(pid) else None


class RunLock:
    """Context manager holding ``<work_dir>/run.lock`` (see the module docstring)."""

    def __init__(self, work_dir: str | Path):
        self.path = Path(work_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = _read(self.path)
                if info is None:
                    continue  # removed meanwhile: try again
                holder = lock_holder(self.path.parent)
                local = holder is not None and holder.get("host") in (None, socket.gethostname())
                if holder is not None and not (local and holder.get("pid") == os.getpid()):
                    where = "" if local else f" on {holder['host']}"
                    raise WorkDirLocked(
                        f"{self.path.parent} is in use by another run (PID {holder.get('pid')}{where}, started "
                        f"{holder.get('started', '?')}): wait for it to end or stop it; if it is known to be dead, "
                        f"delete {self.path}") from None
                # stale (its process is gone): take it over, unless another process just did
                stale = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
                try:
                    os.replace(self.path, stale)
                except FileNotFoundError:
                    continue
                moved = _read(stale)
                if moved and moved.get("pid") != info.get("pid"):
                    # another process took the stale lock over between our read and our rename: give it back
                    try:
                        os.link(stale, self.path)
                    except OSError:
                        pass
                stale.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WorkDirLocked(f"cannot take the lock {self.path}: other processes keep taking it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = _read(self.path)
        if info and info.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
