"""Job stores: the embedded default (persistent, serverless, inside the campaign work directory) and MongoDB.

Documents go to the docs store; big data (trajectories, datasets, model files) to the additional store ``data``
(a second collection of the same SQLite file when embedded, GridFS under MongoDB). Every defectflow job that
produces big data declares it with ``@job(data=...)``, so the store passed to ``run_locally`` must come from
:func:`make_store`.

Errors a user must fix (no URI configured, a MongoDB server that does not answer, a work directory that cannot be
created, no run yet) raise :class:`StoreError`, a ``ValueError`` whose message is one line naming the setting and,
for MongoDB, the URI with its password masked (:func:`mask_uri`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from jobflow import JobStore

logger = logging.getLogger(__name__)

__all__ = ["make_store", "open_store", "embedded_store", "mongo_store", "resolve_uri", "config_path", "mask_uri",
           "check_mongo", "StoreError", "NoStoreYet", "EMBEDDED_FILE"]

#: the embedded store's SQLite file inside ``<work_dir>/store/``
EMBEDDED_FILE = "defectflow.sqlite"
#: environment variable choosing the embedded backend: ``sqlite`` (default) or ``montydb`` (the store before
#: defectflow 0.2, kept for benchmarks/store_scale.py)
BACKEND_ENV = "DEFECTFLOW_EMBEDDED_BACKEND"
#: seconds to wait for a MongoDB server before giving up (:func:`check_mongo`)
MONGO_TIMEOUT_S = 3.0


class StoreError(ValueError):
    """A store that cannot be used as configured; the message is one line for the user."""


class NoStoreYet(StoreError):
    """A read-only command found no embedded store: the campaign never ran in that work directory."""


def mask_uri(uri: str) -> str:
    """``mongodb://user:secret@host/db`` → ``mongodb://user:***@host/db`` (URIs without a password unchanged)."""
    return re.sub(r"^([a-z0-9+.-]+://)([^:@/]*):([^@/]*)@", r"\1\2:***@", uri)


# ---------------------------------------------------------------------------------------------------------------
# embedded
# ---------------------------------------------------------------------------------------------------------------
def _montydb_files(directory: Path) -> bool:
    return (directory / "monty.storage.cfg").is_file() or (directory / "defectflow" / "outputs.collection").is_file()


def _monty_store(directory: Path) -> JobStore:
    from maggma.stores import MontyStore

    docs = MontyStore("outputs", database_path=str(directory), database_name="defectflow", storage="sqlite")
    data = MontyStore("outputs_data", database_path=str(directory), database_name="defectflow", storage="sqlite")
    return JobStore(docs, additional_stores={"data": data})


def _sqlite_store(directory: Path) -> JobStore:
    from defectflow.store.sqlite import DATA_INDEXES, DOCS_INDEXES, SqliteStore

    path = str(directory / EMBEDDED_FILE)
    docs = SqliteStore(path, "outputs", indexes=list(DOCS_INDEXES))
    data = SqliteStore(path, "outputs_data", indexes=list(DATA_INDEXES))
    return JobStore(docs, additional_stores={"data": data})


def _migrate(old: JobStore, new: JobStore) -> int:
    """Copy every document (and big-data blob) of a MontyDB store into the SQLite store; returns the count."""
    old.connect()
    new.connect()
    n = 0
    for src, dst, key in ((old.docs_store, new.docs_store, ["uuid", "index"]),
                          (old.additional_stores["data"], new.additional_stores["data"], "blob_uuid")):
        batch = []
        for doc in src.query():
            doc.pop("_id", None)
            batch.append(doc)
            if len(batch) == 200:
                dst.update(batch, key=key)
                n, batch = n + len(batch), []
        if batch:
            dst.update(batch, key=key)
            n += len(batch)
    return n


def embedded_store(directory: str | Path, create: bool = True) -> JobStore:
    """A persistent JobStore in ``directory`` (one SQLite file with indexes, :mod:`defectflow.store.sqlite`; no
    server needed).

    ``create=False`` (read-only commands): nothing is created; :class:`StoreError` when there is no store there.
    A store written by an older defectflow (maggma MontyStore) is copied into the SQLite file the first time it is
    opened with ``create=True`` (the old files are left in place); read-only, it is read as it is.
    """
    directory = Path(directory)
    new_file = directory / EMBEDDED_FILE
    old = _montydb_files(directory)
    if os.environ.get(BACKEND_ENV, "sqlite").lower() == "montydb":
        if not create and not old:
            raise NoStoreYet(f"no run yet: no embedded store in {directory}")
        if create:
            _mkdir(directory, "the embedded store")
        return _monty_store(directory)
    if not create:
        if new_file.is_file():
            return _sqlite_store(directory)
        if old:
            return _monty_store(directory)
        raise NoStoreYet(f"no run yet: no embedded store in {directory}")
    _mkdir(directory, "the embedded store")
    if old and not new_file.is_file():
        tmp = directory / (EMBEDDED_FILE + ".migrating")
        tmp.unlink(missing_ok=True)
        store = _sqlite_store(directory)
        for s in (store.docs_store, *store.additional_stores.values()):
            s.database_path = str(tmp)
        n = _migrate(_monty_store(directory), store)
        store.close()
        tmp.replace(new_file)
        logger.warning("copied %d documents of the MontyDB store in %s into %s", n, directory, new_file)
    return _sqlite_store(directory)


def _mkdir(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StoreError(f"cannot create {directory} for {what}: a file of that name is in the way") from None
    except OSError as exc:
        raise StoreError(f"cannot create {directory} for {what}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# MongoDB
# ---------------------------------------------------------------------------------------------------------------
def mongo_store(uri: str, database: str | None = None) -> JobStore:
    """A JobStore on a MongoDB server: documents in ``outputs``, big data in GridFS (``outputs_data``).

    Built with ``MongoStore.from_uri`` / ``GridFSStore.from_uri``, not maggma's ``MongoURIStore`` /
    ``GridFSURIStore``: those carry monty's ``@deprecated`` class decorator (maggma 0.77.1, monty 2026.10), which
    hides their constructor from ``MSONable.as_dict``, so they serialise without the URI and a FireWorks task or
    jobflow-remote job built with them cannot reconnect."""
    from maggma.stores import MongoStore
    from maggma.stores.gridfs import GridFSStore

    db = database or (uri.rsplit("/", 1)[-1].split("?")[0] if uri.count("/") >= 3 else "") or "defectflow"
    docs = MongoStore.from_uri(uri, "outputs", database=db)
    data = GridFSStore.from_uri(uri, "outputs_data", database=db)
    return JobStore(docs, additional_stores={"data": data})


def check_mongo(uri: str, timeout_s: float = MONGO_TIMEOUT_S) -> None:
    """Ping the MongoDB server of ``uri`` once; :class:`StoreError` naming the (masked) URI when it does not answer
    within ``timeout_s`` seconds, refuses the credentials, or the URI is malformed."""
    import pymongo
    from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError

    ms = int(timeout_s * 1000)
    try:
        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms) as client:
            client.admin.command("ping")
    except OperationFailure as exc:
        raise StoreError(f"execution.store: MongoDB at {mask_uri(uri)} refused the connection "
                         f"({exc.details.get('errmsg') if exc.details else exc})") from None
    except ConfigurationError as exc:
        raise StoreError(f"execution.store: invalid MongoDB URI {mask_uri(uri)} ({exc})") from None
    except (PyMongoError, ValueError) as exc:
        if isinstance(exc, ValueError) and not isinstance(exc, PyMongoError):
            raise StoreError(f"execution.store: invalid MongoDB URI {mask_uri(uri)} ({exc})") from None
        raise StoreError(f"execution.store: cannot reach MongoDB at {mask_uri(uri)} within {timeout_s:g} s "
                         f"(is the server running and reachable from here?)") from None


#: environment variable holding the MongoDB URI for ``execution.store: mongodb``
URI_ENV = "DEFECTFLOW_MONGODB_URI"
#: environment variable naming the config file (default ``~/.config/defectflow/config.yaml``)
CONFIG_ENV = "DEFECTFLOW_CONFIG"


def config_path() -> Path:
    """The user config file: ``$DEFECTFLOW_CONFIG`` or ``~/.config/defectflow/config.yaml``."""
    return Path(os.environ.get(CONFIG_ENV) or Path.home() / ".config" / "defectflow" / "config.yaml")


def resolve_uri(store: str) -> str:
    """The MongoDB URI for ``execution.store``: the value itself when it is a URI; for ``mongodb``, the
    environment variable ``DEFECTFLOW_MONGODB_URI``, else ``mongodb_uri:`` in the config file (so credentials stay
    out of campaign files). Raises :class:`StoreError` (a ValueError) naming both places when neither is set."""
    if store.startswith(("mongodb://", "mongodb+srv://")):
        return store
    if store != "mongodb":
        raise StoreError(f"execution.store: expected 'embedded', 'mongodb' or a mongodb:// URI, got {store!r}")
    uri = os.environ.get(URI_ENV)
    if not uri:
        path = config_path()
        if path.is_file():
            import yaml

            try:
                uri = (yaml.safe_load(path.read_text()) or {}).get("mongodb_uri")
            except (yaml.YAMLError, AttributeError, OSError) as exc:
                raise StoreError(f"execution.store: cannot read mongodb_uri from {path} ({exc})") from None
    if not uri:
        raise StoreError(f"execution.store: 'mongodb' needs a URI in ${URI_ENV} or as mongodb_uri: in {config_path()}")
    return uri


def make_store(store: str, work_dir: str | Path, check: bool = False) -> JobStore:
    """Build the JobStore named by a campaign's ``execution.store``: 'embedded' (in ``work_dir/store``),
    'mongodb' (URI from the environment or config file, see :func:`resolve_uri`) or a MongoDB URI.

    ``check=True``: ping a MongoDB server once (:func:`check_mongo`, a few seconds at most) so that an unreachable
    server is one clear error before anything runs."""
    if store == "embedded":
        return embedded_store(Path(work_dir) / "store")
    uri = resolve_uri(store)
    if check:
        check_mongo(uri)
    return mongo_store(uri)


def open_store(store: str, work_dir: str | Path | None = None) -> JobStore:
    """The existing JobStore for read-only commands (results, query, status, plot): creates nothing; checks a MongoDB
    server is reachable. :class:`StoreError` when there is no embedded store in ``work_dir`` yet."""
    if store == "embedded":
        if work_dir is None:
            raise StoreError("an embedded store needs a work directory")
        work_dir = Path(work_dir)
        if not (work_dir / "store").is_dir():
            raise NoStoreYet(f"no run yet: {work_dir} has no store (start one with `defectflow run`)"
                             if work_dir.is_dir() else f"no run yet: the work directory {work_dir} does not exist")
        return embedded_store(work_dir / "store", create=False)
    return make_store(store, work_dir or ".", check=True)
