"""Store selection: embedded, a MongoDB URI, or 'mongodb' with the URI from the environment or the config file."""

from __future__ import annotations

import pytest
from jobflow import JobStore

from defectflow.store import URI_ENV, make_store, resolve_uri


def test_mongodb_uri_comes_from_the_environment_first(monkeypatch, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("mongodb_uri: mongodb://from-config:27017/cfgdb\n")
    monkeypatch.setenv("DEFECTFLOW_CONFIG", str(config))
    monkeypatch.setenv(URI_ENV, "mongodb://from-env:27017/envdb")
    assert resolve_uri("mongodb") == "mongodb://from-env:27017/envdb"
    monkeypatch.delenv(URI_ENV)
    assert resolve_uri("mongodb") == "mongodb://from-config:27017/cfgdb"
    store = make_store("mongodb", tmp_path)
    # documents and GridFS data in the URI's database; the store serialises with its URI (FireWorks, jobflow-remote)
    assert store.docs_store.database == "cfgdb" and store.docs_store.collection_name == "outputs"
    assert store.additional_stores["data"].collection_name == "outputs_data"
    again = JobStore.from_dict(store.as_dict())
    assert again.docs_store.uri == "mongodb://from-config:27017/cfgdb"


def test_mongodb_without_a_uri_names_both_places(monkeypatch, tmp_path):
    monkeypatch.delenv(URI_ENV, raising=False)
    monkeypatch.setenv("DEFECTFLOW_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match=rf"execution.store: 'mongodb' needs a URI in \${URI_ENV} or as mongodb_uri: "
                                         rf"in {tmp_path / 'absent.yaml'}"):
        make_store("mongodb", tmp_path)


def test_explicit_uri_and_embedded(tmp_path):
    assert resolve_uri("mongodb://h:1/db") == "mongodb://h:1/db"
    store = make_store("embedded", tmp_path)
    store.connect()
    assert (tmp_path / "store").is_dir() and store.docs_store.count() == 0


# ---------------------------------------------------------------------------------------------------------------
# the embedded store: SQLite with indexes (defectflow.store.sqlite)
# ---------------------------------------------------------------------------------------------------------------
def _docs():
    return [{"uuid": f"u{i}", "index": 1, "name": f"relax_lf v_Si_{q:+d} d{i}" if i % 3 else "summary v_Si",
             "hosts": [f"job{i}", "flowA" if i < 6 else "flowB"],
             "metadata": {"charge": q, "defect": "v_Si", "cache_key": f"k{i % 4}", "cost": {"wall_s": i}},
             "output": {"energy": -float(i), "status": "failed" if i == 2 else "converged"},
             "completed_at": f"2026-01-01T00:00:{i:02d}"}
            for i, q in zip(range(10), [-1, 0, 1] * 4)]


def test_sqlite_store_answers_mongo_queries_like_mongomock(tmp_path):
    """Every filter, sort, projection and update the pipeline uses gives what MongoDB (mongomock) gives."""
    from maggma.stores import MemoryStore

    from defectflow.store.sqlite import DOCS_INDEXES, SqliteStore

    sql = SqliteStore(str(tmp_path / "s.sqlite"), "outputs", indexes=list(DOCS_INDEXES), key="uuid")
    mem = MemoryStore("outputs", key="uuid")
    for s in (sql, mem):
        s.connect()
        s.update(_docs(), key=["uuid", "index"])
        s.update({**_docs()[4], "output": {"energy": 99.0}}, key=["uuid", "index"])  # replaced, not added
    cases = [
        ({}, None, None),
        ({"uuid": "u4"}, ["output"], None),
        ({"hosts": "flowA", "name": {"$regex": "^relax_lf( |$)"}}, ["name", "metadata.charge"], {"completed_at": -1}),
        ({"metadata.charge": {"$in": [-1, 1]}, "output.status": {"$ne": "failed"}}, ["uuid"], {"uuid": 1}),
        ({"metadata.cache_key": "k1"}, None, {"completed_at": -1}),
        ({"$and": [{"hosts": "flowB"}, {"metadata.charge": 0}]}, ["uuid", "metadata"], None),
        ({"name": "nothing"}, None, None),
        ({"metadata.cost.wall_s": {"$gte": 5}}, ["uuid"], {"metadata.cost.wall_s": -1}),
    ]
    for criteria, props, sort in cases:
        got = [{k: v for k, v in d.items() if k != "_id"} for d in sql.query(criteria, properties=props, sort=sort)]
        want = [{k: v for k, v in d.items() if k != "_id"} for d in mem.query(criteria, properties=props, sort=sort)]
        if sort is None:
            got, want = sorted(got, key=str), sorted(want, key=str)
        assert got == want, criteria
        assert sql.count(criteria) == mem.count(criteria)
    assert sql.count() == 10
    assert sorted(sql.distinct("metadata.charge")) == [-1, 0, 1]
    assert [k["metadata"]["charge"] for k, _ in sql.groupby("metadata.charge")] == [-1, 0, 1]
    sql.remove_docs({"hosts": "flowB"})
    assert sql.count() == 6 and sql.count({"hosts": "flowB"}) == 0


def test_sqlite_store_lookups_use_the_indexes(tmp_path):
    """An indexed lookup reads only the matching documents (MontyDB decoded every document for every lookup)."""
    import defectflow.store.sqlite as sq

    store = sq.SqliteStore(str(tmp_path / "s.sqlite"), "outputs", indexes=list(sq.DOCS_INDEXES), key="uuid")
    store.connect()
    store.update(_docs(), key=["uuid", "index"])
    decoded = []
    real = sq._decode
    sq._decode = lambda blob: decoded.append(1) or real(blob)
    try:
        assert [d["uuid"] for d in store.query({"uuid": "u7"}, sort={"index": -1}, limit=1)] == ["u7"]
        assert len(decoded) == 1
        decoded.clear()
        assert len(list(store.query({"metadata.cache_key": "k3"}))) == 2 and len(decoded) == 2
        decoded.clear()
        store.update({**_docs()[5], "output": None}, key=["uuid", "index"])  # an upsert finds its row by index
        assert len(decoded) == 1
    finally:
        sq._decode = real
    # the index survives reopening, and a new index covers the documents already there
    again = sq.SqliteStore(str(tmp_path / "s.sqlite"), "outputs", key="uuid")
    again.connect()
    assert again.ensure_index("output.status") and again.count({"output.status": "failed"}) == 1


def test_jobstore_round_trip_with_big_data_and_serialisation(tmp_path):
    """A JobStore on the embedded store: big data in the data collection, as_dict / from_dict (FireWorks tasks)."""
    from jobflow import Job, JobStore, Response, job, run_locally

    @job(data="trajectory")
    def make(n):
        return {"trajectory": list(range(n)), "n": n}

    @job
    def add(a, b):
        return a["n"] + b

    j1 = make(5)
    j2 = add(j1.output, 2)
    store = make_store("embedded", tmp_path)
    responses = run_locally([j1, j2], store=store, create_folders=False, root_dir=tmp_path, log=False)
    assert responses[j2.uuid][1].output == 7
    store2 = JobStore.from_dict(store.as_dict())
    store2.connect()
    doc = store2.query_one({"uuid": j1.uuid}, load=True)
    assert doc["output"]["trajectory"] == [0, 1, 2, 3, 4]
    assert store2.additional_stores["data"].count() == 1
    assert isinstance(Job, type) and Response is not None


def test_montydb_store_is_read_in_place_and_copied_on_first_write(tmp_path, monkeypatch):
    """A work directory written by an older defectflow (maggma MontyStore): read-only commands read it as it is
    (nothing written); a run copies it into the SQLite file once and goes on from there."""
    from defectflow.store import BACKEND_ENV, EMBEDDED_FILE, NoStoreYet, embedded_store

    monkeypatch.setenv(BACKEND_ENV, "montydb")
    old = embedded_store(tmp_path / "store")
    old.connect()
    old.update([{"uuid": f"u{i}", "index": 1, "name": "relax_lf x", "output": {"x": i}, "metadata": {}}
                for i in range(3)])
    old.close()
    monkeypatch.delenv(BACKEND_ENV)
    before = sorted(p.name for p in (tmp_path / "store").rglob("*"))
    ro = embedded_store(tmp_path / "store", create=False)
    ro.connect()
    assert ro.count() == 3 and sorted(p.name for p in (tmp_path / "store").rglob("*")) == before
    rw = embedded_store(tmp_path / "store")
    rw.connect()
    assert (tmp_path / "store" / EMBEDDED_FILE).is_file() and rw.count() == 3
    assert type(rw.docs_store).__name__ == "SqliteStore"
    assert rw.query_one({"uuid": "u2"})["output"] == {"x": 2}
    with pytest.raises(NoStoreYet):
        embedded_store(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()


def test_mongodb_uri_is_masked_and_an_unreachable_server_fails_fast():
    import time

    from defectflow.store import StoreError, check_mongo, mask_uri

    assert mask_uri("mongodb://u:p%40ss@h:27017/db") == "mongodb://u:***@h:27017/db"
    assert mask_uri("mongodb+srv://user:pw@cluster.example.org/db?x=1") == "mongodb+srv://user:***@cluster.example.org/db?x=1"
    assert mask_uri("mongodb://h:1/db") == "mongodb://h:1/db"
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"^execution.store: cannot reach MongoDB at mongodb://u:\*\*\*@127.0.0.1:1/d "
                                         r"within 1 s"):
        check_mongo("mongodb://u:secret@127.0.0.1:1/d", timeout_s=1)
    assert time.monotonic() - t0 < 5


def test_run_lock_is_exclusive_and_a_stale_one_is_taken_over(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from defectflow.store.lock import RunLock, WorkDirLocked, lock_holder

    with RunLock(tmp_path):
        assert lock_holder(tmp_path)["pid"] == os.getpid()
        other = subprocess.run([sys.executable, "-c", "from defectflow.store.lock import RunLock; "
                                f"RunLock({str(tmp_path)!r}).acquire()"], capture_output=True, text=True)
        assert other.returncode != 0 and "WorkDirLocked" in other.stderr and f"PID {os.getpid()}" in other.stderr
    assert not (tmp_path / "run.lock").exists() and lock_holder(tmp_path) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()}))
    assert lock_holder(tmp_path) is None  # stale
    with RunLock(tmp_path):
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "started": "x"}))
    with pytest.raises(WorkDirLocked, match="on elsewhere"):
        RunLock(tmp_path).acquire()
