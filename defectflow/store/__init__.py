"""Job stores: the embedded default (persistent, serverless, inside the campaign work directory) and MongoDB.

Documents go to the docs store; big data (trajectories, datasets, model files) to the additional store ``data``
(a second sqlite collection when embedded, GridFS under MongoDB). Every defectflow job that produces big data
declares it with ``@job(data=...)``, so the store passed to ``run_locally`` must come from :func:`make_store`.
"""

from __future__ import annotations

from pathlib import Path

from jobflow import JobStore

__all__ = ["make_store", "embedded_store", "mongo_store"]


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
    """A JobStore on a MongoDB server: documents in ``outputs``, big data in GridFS (``outputs_data``)."""
    from maggma.stores import MongoURIStore
    from maggma.stores.gridfs import GridFSURIStore

    db = database or (uri.rsplit("/", 1)[-1].split("?")[0] if uri.count("/") >= 3 else "") or "defectflow"
    docs = MongoURIStore(uri, "outputs", database=db)
    data = GridFSURIStore(uri, "outputs_data", database=db)
    return JobStore(docs, additional_stores={"data": data})


def make_store(store: str, work_dir: str | Path) -> JobStore:
    """Build the JobStore named by a campaign's ``execution.store`` ('embedded' or a MongoDB URI)."""
    if store == "embedded":
        return embedded_store(Path(work_dir) / "store")
    return mongo_store(store)
