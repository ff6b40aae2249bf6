"""An embedded maggma Store on SQLite with real indexes: defectflow's default store (no server to set up).

Why not maggma's MontyStore (MontyDB), the embedded store before: MontyDB's ``create_index`` does nothing, so every
lookup (jobflow resolving a job's inputs by ``uuid``, writing a document by ``uuid`` + ``index``, the resume
lookup by ``metadata.cache_key``) decodes every document of the collection; a local run is then quadratic in its
number of jobs (``benchmarks/store_scale.py``: 0.5 s of bookkeeping per job at 60 jobs, growing with the run).

Layout (one SQLite file, any number of collections): per collection a table ``<name>`` (``id``, ``doc``: the
document as BSON) and a table ``<name>__idx`` (``field``, ``value``, ``doc_id``) with one row per indexed field and
value (one per element for arrays, e.g. ``hosts``), primary-keyed on ``(field, value, doc_id)``. A query first
narrows the candidates with its indexable conditions (equality or ``$in`` on an indexed field, also inside
``$and``), then applies the whole MongoDB filter to those candidates in Python (mongomock's matcher, which maggma
already depends on), so every filter MongoDB takes works, only faster where an index applies. Sorting, skip, limit
and projections are done in Python on the matching documents.

Several processes may use one file (FireWorks workers sharing the work directory): SQLite's locking serialises the
writes (rollback journal, no WAL, so network file systems work too).
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from itertools import groupby as _groupby
from pathlib import Path
from typing import Any

from maggma.core import Sort, Store
from monty.json import jsanitize

__all__ = ["SqliteStore", "DOCS_INDEXES", "DATA_INDEXES"]

#: fields indexed in a JobStore's documents: jobflow's keys, the run (hosts), and what defectflow queries by
DOCS_INDEXES = ("uuid", "index", "hosts", "name", "metadata.cache_key", "metadata.step", "metadata.defect",
                "metadata.charge")
#: fields indexed in the big-data (additional) store
DATA_INDEXES = ("blob_uuid", "job_uuid", "job_index")

_CHUNK = 500  # SQLite host parameters per statement (the limit is 999 in old builds)


def _matcher():
    try:
        from mongomock_ng.filtering import filter_applies
    except ImportError:  # pragma: no cover - mongomock(-ng) comes with maggma
        from montydb.engine.queries import QueryFilter

        return lambda criteria, doc: QueryFilter(criteria)(doc)
    return filter_applies


def _values(doc: Any, path: list[str]) -> list[Any]:
    """Every value at a dotted path, descending into arrays as MongoDB does (``hosts`` → each host)."""
    if not path:
        if isinstance(doc, list):
            return [v for v in doc if not isinstance(v, (dict, list))] + [doc]
        return [doc]
    if isinstance(doc, dict):
        return _values(doc[path[0]], path[1:]) if path[0] in doc else []
    if isinstance(doc, list):
        out = []
        if path[0].isdigit() and int(path[0]) < len(doc):
            out += _values(doc[int(path[0])], path[1:])
        for item in doc:
            if isinstance(item, dict):
                out += _values(item, path)
        return out
    return []


def _indexable(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not (isinstance(value, float) and math.isnan(value))


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, dict):
            doc = doc.get(part)
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


def _has(doc: Any, path: str) -> bool:
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return False
    return True


def _set(doc: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        doc = doc.setdefault(part, {})
    doc[parts[-1]] = value


def _project(doc: dict, properties: dict[str, Any] | None) -> dict:
    """MongoDB-style projection: inclusion (``{"a.b": 1}``) or exclusion (``{"a": 0}``); ``_id`` is not stored."""
    if not properties:
        return doc
    include = {k for k, v in properties.items() if v and k != "_id"}
    exclude = {k for k, v in properties.items() if not v and k != "_id"}
    if include:
        out: dict = {}
        for path in sorted(include, key=lambda p: p.count(".")):
            if _has(doc, path):
                value = _get(doc, path)
                if "." in path and isinstance(_get(out, path.rsplit(".", 1)[0]), (str, int, float)):
                    continue
                _set(out, path, value)
        return out
    for path in exclude:
        parts = path.split(".")
        parent = _get(doc, ".".join(parts[:-1])) if len(parts) > 1 else doc
        if isinstance(parent, dict):
            parent.pop(parts[-1], None)
    return doc


_TYPE_ORDER = {type(None): 0, int: 1, float: 1, bool: 5, str: 2, dict: 3, list: 4}


def _sort_key(value: Any) -> tuple:
    rank = _TYPE_ORDER.get(type(value), 6)
    if rank in (3, 4, 6):
        return (rank, str(value))
    return (rank, value if value is not None else 0)


class SqliteStore(Store):
    """A maggma Store in one collection (table) of an SQLite file, with indexes; see the module docstring.

    Parameters
    ----------
    database_path
        The SQLite file (created with its folder on ``connect``).
    collection_name
        Table name (letters, digits and ``_``).
    indexes
        Dotted fields to index besides ``key`` (more can be added with :meth:`ensure_index`).
    """

    def __init__(self, database_path: str, collection_name: str, indexes: list[str] | None = None,
                 timeout: float = 600.0, **kwargs):
        if not collection_name.replace("_", "").isalnum():
            raise ValueError(f"collection_name: expected letters, digits and '_', got {collection_name!r}")
        self.database_path = str(database_path)
        self.collection_name = collection_name
        self.indexes = list(indexes or [])
        self.timeout = timeout
        self.kwargs = kwargs
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._indexed: set[str] = set()
        super().__init__(**kwargs)

    # -- connection ---------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"sqlite://{self.database_path}/{self.collection_name}"

    @property
    def _collection(self):
        if self._conn is None:
            self.connect()
        return self._conn

    def connect(self, force_reset: bool = False) -> None:
        with self._lock:
            if self._conn is not None and not force_reset:
                return
            if self._conn is not None:
                self._conn.close()
            Path(self.database_path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.database_path, timeout=self.timeout, check_same_thread=False,
                                   isolation_level=None)
            if _local_filesystem(self.database_path):
                # WAL: a commit appends to the log without waiting for the disk (a run's thousands of small
                # commits); readers (defectflow status) never wait for the writer. Needs shared memory between the
                # processes, which network file systems do not give: there the rollback journal stays.
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            t = self.collection_name
            with _transaction(conn):
                conn.execute(f'CREATE TABLE IF NOT EXISTS "{t}" (id INTEGER PRIMARY KEY, doc BLOB NOT NULL)')
                conn.execute(f'CREATE TABLE IF NOT EXISTS "{t}__idx" (field TEXT NOT NULL, value, '
                             f"doc_id INTEGER NOT NULL, PRIMARY KEY (field, value, doc_id)) WITHOUT ROWID")
                conn.execute(f'CREATE INDEX IF NOT EXISTS "{t}__idx_doc" ON "{t}__idx" (doc_id)')
                conn.execute('CREATE TABLE IF NOT EXISTS "_indexes" (collection TEXT NOT NULL, field TEXT NOT NULL, '
                             "PRIMARY KEY (collection, field))")
            self._conn = conn
            self._indexed = {r[0] for r in conn.execute('SELECT field FROM "_indexes" WHERE collection = ?', (t,))}
            for field in [self.key, *self.indexes]:
                if field not in self._indexed:
                    self.ensure_index(field)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SqliteStore):
            return False
        return (self.database_path, self.collection_name) == (other.database_path, other.collection_name)

    def __hash__(self) -> int:
        return hash((self.database_path, self.collection_name))

    # -- indexes ------------------------------------------------------------------------------------------------
    def ensure_index(self, key: str, unique: bool | None = False) -> bool:
        """Index the dotted field ``key`` (existing documents included). ``unique`` is not enforced: False then."""
        conn = self._collection
        with self._lock:
            if key not in self._indexed:
                t = self.collection_name
                with _transaction(conn):
                    conn.execute('INSERT OR IGNORE INTO "_indexes" VALUES (?, ?)', (t, key))
                    rows = []
                    for doc_id, blob in conn.execute(f'SELECT id, doc FROM "{t}"'):
                        rows += self._index_rows(doc_id, _decode(blob), [key])
                    conn.executemany(f'INSERT OR IGNORE INTO "{t}__idx" VALUES (?, ?, ?)', rows)
                self._indexed.add(key)
        return not unique

    def _index_rows(self, doc_id: int, doc: dict, fields: Iterable[str]) -> list[tuple]:
        rows = []
        for field in fields:
            for v in _values(doc, field.split(".")):
                if _indexable(v):
                    rows.append((field, v, doc_id))
        return rows

    def _candidates(self, criteria: dict | None) -> set[int] | None:
        """Ids of the documents that may match (a superset), from the indexed conditions; None: no index applies."""
        if not criteria:
            return None
        sets: list[set[int]] = []
        for field, cond in criteria.items():
            if field == "$and" and isinstance(cond, list):
                sets += [s for s in (self._candidates(c) for c in cond if isinstance(c, dict)) if s is not None]
                continue
            if field not in self._indexed:
                continue
            if isinstance(cond, dict):
                if set(cond) == {"$in"} and isinstance(cond["$in"], (list, tuple)) and all(
                        _indexable(v) for v in cond["$in"]):
                    sets.append(self._ids(field, list(cond["$in"])))
                elif set(cond) == {"$eq"} and _indexable(cond["$eq"]):
                    sets.append(self._ids(field, [cond["$eq"]]))
            elif _indexable(cond) and not isinstance(cond, bool):
                sets.append(self._ids(field, [cond]))
            if sets and not sets[-1]:
                return set()
        if not sets:
            return None
        out = sets[0]
        for s in sets[1:]:
            out &= s
        return out

    def _ids(self, field: str, values: list) -> set[int]:
        conn = self._collection
        t = self.collection_name
        out: set[int] = set()
        for i in range(0, len(values), _CHUNK):
            chunk = values[i: i + _CHUNK]
            q = f'SELECT doc_id FROM "{t}__idx" WHERE field = ? AND value IN ({",".join("?" * len(chunk))})'
            out.update(r[0] for r in conn.execute(q, (field, *chunk)))
        return out

    # -- reading ------------------------------------------------------------------------------------------------
    def _scan(self, criteria: dict | None) -> Iterator[tuple[int, dict]]:
        """(id, document) of every document matching ``criteria``, in insertion order."""
        conn = self._collection
        t = self.collection_name
        match = _matcher() if criteria else None
        ids = self._candidates(criteria)
        if ids is None:
            rows: Iterable = conn.execute(f'SELECT id, doc FROM "{t}" ORDER BY id').fetchall()
        else:
            ordered = sorted(ids)
            rows = []
            for i in range(0, len(ordered), _CHUNK):
                chunk = ordered[i: i + _CHUNK]
                rows += conn.execute(f'SELECT id, doc FROM "{t}" WHERE id IN ({",".join("?" * len(chunk))}) '
                                     "ORDER BY id", chunk).fetchall()
        for doc_id, blob in rows:
            doc = _decode(blob)
            if match is None or match(criteria, doc):
                yield doc_id, doc

    def count(self, criteria: dict | None = None, hint: dict | None = None) -> int:
        if not criteria:
            return self._collection.execute(f'SELECT COUNT(*) FROM "{self.collection_name}"').fetchone()[0]
        return sum(1 for _ in self._scan(criteria))

    def query(self, criteria: dict | None = None, properties: dict | list | None = None,
              sort: dict[str, Sort | int] | None = None, hint: dict | None = None, skip: int = 0, limit: int = 0,
              **kwargs) -> Iterator[dict]:
        if isinstance(properties, (list, tuple)):
            properties = {p: 1 for p in properties}
        with self._lock:
            docs = [d for _, d in self._scan(criteria)]
        if sort:
            for field, direction in reversed(list(sort.items())):
                value = direction.value if isinstance(direction, Sort) else int(direction)
                docs.sort(key=lambda d, f=field: _sort_key(_get(d, f)), reverse=value < 0)
        if skip:
            docs = docs[skip:]
        if limit:
            docs = docs[:limit]
        for d in docs:
            yield _project(d, properties)

    def distinct(self, field: str, criteria: dict | None = None, all_exist: bool = False) -> list:
        out: list = []
        for d in self.query(criteria, properties=[field]):
            for v in (_get(d, field) if isinstance(_get(d, field), list) else [_get(d, field)]):
                if v is not None and v not in out:
                    out.append(v)
        return out

    def groupby(self, keys: list[str] | str, criteria: dict | None = None, properties: dict | list | None = None,
                sort: dict[str, Sort | int] | None = None, skip: int = 0, limit: int = 0
                ) -> Iterator[tuple[dict, list[dict]]]:
        keys = [keys] if isinstance(keys, str) else list(keys)
        if isinstance(properties, dict):
            properties = [k for k, v in properties.items() if v]
        if properties is not None:
            properties = list(properties) + [k for k in keys if k not in properties]
        docs = list(self.query(criteria, properties=properties, sort=sort, skip=skip, limit=limit))

        def group_key(d):
            return tuple(_sort_key(_get(d, k)) for k in keys)

        for _, group in _groupby(sorted(docs, key=group_key), key=group_key):
            group = list(group)
            head: dict = {}
            for k in keys:
                _set(head, k, _get(group[0], k))
            yield head, group

    # -- writing ------------------------------------------------------------------------------------------------
    def update(self, docs: list[dict] | dict, key: list | str | None = None) -> None:
        """Insert or replace documents, matched on ``key`` (a field or a list of fields; default: the store's)."""
        if not isinstance(docs, list):
            docs = [docs]
        key = key or self.key
        keys = key if isinstance(key, list) else [key]
        conn = self._collection
        t = self.collection_name
        with self._lock, _transaction(conn):
            for d in docs:
                try:
                    blob = _encode(d)  # JobStore hands over documents it has already sanitised
                except Exception:  # noqa: BLE001 - numpy values, tuples, MSONable objects...
                    d = jsanitize(d, allow_bson=True)
                    blob = None
                if self.validator and not self.validator.is_valid(d):
                    if self.validator.strict:
                        raise ValueError(self.validator.validation_errors(d))
                    self.logger.error(self.validator.validation_errors(d))
                    continue
                blob = blob if blob is not None else _encode(d)
                existing = [i for i, _ in self._scan({k: d.get(k) for k in keys})]
                if existing:
                    doc_id = existing[0]
                    conn.execute(f'UPDATE "{t}" SET doc = ? WHERE id = ?', (blob, doc_id))
                    self._delete(existing[1:])
                    conn.execute(f'DELETE FROM "{t}__idx" WHERE doc_id = ?', (doc_id,))
                else:
                    doc_id = conn.execute(f'INSERT INTO "{t}" (doc) VALUES (?)', (blob,)).lastrowid
                conn.executemany(f'INSERT OR IGNORE INTO "{t}__idx" VALUES (?, ?, ?)',
                                 self._index_rows(doc_id, d, self._indexed))

    def _delete(self, ids: list[int]) -> None:
        conn = self._collection
        t = self.collection_name
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i: i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            conn.execute(f'DELETE FROM "{t}" WHERE id IN ({marks})', chunk)
            conn.execute(f'DELETE FROM "{t}__idx" WHERE doc_id IN ({marks})', chunk)

    def remove_docs(self, criteria: dict) -> None:
        conn = self._collection
        with self._lock, _transaction(conn):
            self._delete([i for i, _ in self._scan(criteria)])


#: file systems on which SQLite's WAL mode is not safe (no shared memory across hosts)
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
               "fuse.sshfs", "afs", "9p", "panfs", "wekafs")


def _local_filesystem(path: str) -> bool:
    """True unless ``path`` lies on a network file system (Linux: the longest matching mount in /proc/mounts)."""
    try:
        target = str(Path(path).resolve().parent)
        best, fstype = "", None
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        return False  # unknown: the safe choice
    return fstype is not None and fstype not in _NETWORK_FS and fstype.split(".")[0] not in _NETWORK_FS


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (rollback on error) on an autocommit connection; nests as a no-op."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.outer = False

    def __enter__(self):
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if self.outer:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def _encode(doc: dict) -> bytes:
    import bson

    return bson.encode(doc)


def _decode(blob: bytes) -> dict:
    import bson

    return bson.decode(blob)
