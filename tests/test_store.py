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
