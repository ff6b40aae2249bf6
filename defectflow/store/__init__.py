"""Job stores: the embedded default (persistent, serverless, inside the campaign work directory) and MongoDB.

Documents go to the docs store; big data (trajectories, datasets, model files) to the additional store ``data``
(a second sqlite collection when embedded, GridFS under MongoDB). Every defectflow job that produces big data
declares it with ``@job(data=...)``, so the store passed to ``run_locally`` must come from :func:`make_store`.
"""

from __future__ import annotations

import os
from pathlib import Path

from jobflow import JobStore

__all__ = ["make_store", "embedded_store", "mongo_store", "resolve_uri", "config_path"]


def embedded_store(directory: str | Path) -> JobStore:
    """A persistent JobStore in ``directory`` (maggma MontyStore on sqlite; no server needed).

    Note: MontyStore has no aggregation pipeline, no unique indexes and rejects dotted keys; defectflow's
    queries use plain ``find`` filters so they work here and on MongoDB alike.
    """
    from maggma.stores import MontyStore

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    docs = MontyStore("outputs", database_path=str(directory), database_name="defectflow", storage="sqlite")
    data = MontyStore("outputs_data", database_path=str(directory), database_name="defectflow", storage="sqlite")
    return JobStore(docs, additional_stores={"data": data})


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
    out of campaign files). Raises ValueError naming both places when neither is set."""
    if store.startswith(("mongodb://", "mongodb+srv://")):
        return store
    if store != "mongodb":
        raise ValueError(f"execution.store: expected 'embedded', 'mongodb' or a mongodb:// URI, got {store!r}")
    uri = os.environ.get(URI_ENV)
    if not uri:
        path = config_path()
        if path.is_file():
            import yaml

            uri = (yaml.safe_load(path.read_text()) or {}).get("mongodb_uri")
    if not uri:
        raise ValueError(f"execution.store: 'mongodb' needs a URI in ${URI_ENV} or as mongodb_uri: in {config_path()}")
    return uri


def make_store(store: str, work_dir: str | Path) -> JobStore:
    """Build the JobStore named by a campaign's ``execution.store``: 'embedded' (in ``work_dir/store``),
    'mongodb' (URI from the environment or config file, see :func:`resolve_uri`) or a MongoDB URI."""
    if store == "embedded":
        return embedded_store(Path(work_dir) / "store")
    return mongo_store(resolve_uri(store))
