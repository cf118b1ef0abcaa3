"""SQLite backend: the embedded default store (WAL, durable, zero set-up).

All writes go through one writer thread that groups concurrent commits into a single SQLite transaction
(group commit): each ``commit`` runs inside its own SAVEPOINT, so one caller's failure rolls back only its
writes, and one fsync covers the whole group. Reads use a small pool of reader connections (WAL lets them
run beside the writer). Search translates ``fhir.search`` clauses into SQL over the ``idx`` table of
entries extracted at write time. sqlite3 errors are translated into ``errors.*`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ..errors import Conflict, FhirError, PreconditionFailed, StoreUnavailable
from ..fhir.search import Clause, Pred, Query
from .base import (
    MUST_NOT_EXIST,
    CommitResult,
    HistoryPage,
    Method,
    Record,
    SearchPage,
    StoredResource,
    Write,
    check_planned_condition,
    prepare,
    stamp,
    utcnow,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, last_updated REAL NOT NULL,
    deleted INTEGER NOT NULL, body BLOB, PRIMARY KEY (type, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS resources_lu ON resources (type, last_updated);
CREATE TABLE IF NOT EXISTS history (
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, last_updated REAL NOT NULL,
    method TEXT NOT NULL, body BLOB, PRIMARY KEY (type, id, version)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_lu ON history (type, last_updated);
CREATE TABLE IF NOT EXISTS idx (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, sys TEXT, val TEXT, lo REAL, hi REAL);
CREATE INDEX IF NOT EXISTS idx_val ON idx (type, param, val, sys);
CREATE INDEX IF NOT EXISTS idx_sys ON idx (type, param, sys) WHERE sys IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_lo ON idx (type, param, lo) WHERE lo IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_res ON idx (type, id, param);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL, grp TEXT NOT NULL, due REAL NOT NULL,
    attempts INTEGER NOT NULL, lease_owner TEXT, lease_until REAL NOT NULL, created REAL NOT NULL,
    updated REAL NOT NULL, rev INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_claim ON records (kind, state, due);
CREATE INDEX IF NOT EXISTS records_recent ON records (kind, created);
CREATE INDEX IF NOT EXISTS records_group ON records (kind, grp, state);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '1');
"""

# Which kinds of clause drive a search (looked up first through an index) before the others are
# checked per candidate: references and identifiers are usually the most selective.
_DRIVER_RANK = {"ref": 0, "ref_id": 0, "id": 0, "str_exact": 1, "uri": 1, "token": 2, "str_prefix": 3, "date": 4}
_MAX_GROUP = 128
_ESTIMATE_CAP = 10000


def path_from_url(url: str) -> Path:
    """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` → Path."""
    if not url.startswith("sqlite:///"):
        raise ValueError("a SQLite store URL looks like sqlite:///data/fhir-outreach.db")
    return Path(url[len("sqlite:///") :])


@contextlib.contextmanager
def _translate() -> Iterator[None]:
    """The one edge where sqlite3 errors become errors.* (busy/locked/IO are transient)."""
    try:
        yield
    except FhirError:
        raise
    except sqlite3.IntegrityError as exc:
        raise Conflict(f"store integrity error: {exc}") from exc
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(f"SQLite store unavailable: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreUnavailable(f"SQLite store error: {exc}") from exc


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class _Job:
    __slots__ = ("error", "fn", "future", "loop", "result", "row", "single")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any] | None, loop: asyncio.AbstractEventLoop,
                 future: asyncio.Future[Any], single: bool, row: tuple[Any, ...] | None = None) -> None:
        self.fn, self.loop, self.future, self.single, self.row = fn, loop, future, single, row
        self.result: Any = None
        self.error: BaseException | None = None


_INSERT_RECORD = "INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)"


def _insert_records(conn: sqlite3.Connection, jobs: list[_Job]) -> None:
    """All record inserts of a group in two statements (each statement costs a GIL hand-off, and the
    writer competes with the event loop for it). Inside the group's transaction no other writer runs, so
    "which keys exist" is exact; the first job for a key wins, like one INSERT OR IGNORE after another."""
    wanted: dict[tuple[str, str], _Job] = {}
    for job in jobs:
        assert job.row is not None
        wanted.setdefault((job.row[0], job.row[1]), job)
    existing: set[tuple[str, str]] = set()
    for kind in {k for k, _ in wanted}:
        keys = [key for k, key in wanted if k == kind]
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ", ".join("?" * len(part))
            existing.update((kind, key) for (key,) in conn.execute(
                f"SELECT key FROM records WHERE kind = ? AND key IN ({marks})", [kind, *part]))
    fresh = [job for k, job in wanted.items() if k not in existing]
    conn.executemany(_INSERT_RECORD, [job.row for job in fresh if job.row is not None])
    for job in jobs:
        job.result = False
    for job in fresh:
        job.result = True


def _settle(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)


class SqliteStore:
    """The embedded store. ``synchronous`` is SQLite's PRAGMA (FULL: every group commit is fsynced)."""

    def __init__(self, url: str, *, base_url: str | None = None, synchronous: str = "FULL",
                 readers: int = 2) -> None:
        self.path = path_from_url(url)
        self.base_url = base_url
        self.synchronous = synchronous
        self._readers = readers
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    async def open(self) -> None:
        with _translate():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(SCHEMA)
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="sqlite-writer",
                                        daemon=True)
        self._writer.start()

        self._pool = ThreadPoolExecutor(max_workers=self._readers, thread_name_prefix="sqlite-reader")

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    # --- threads ----------------------------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                group = [job]
                stop = False
                while len(group) < _MAX_GROUP:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    group.append(nxt)
                self._run_group(conn, group)
                if stop:
                    return
        finally:
            conn.close()

    def _run_group(self, conn: sqlite3.Connection, group: list[_Job]) -> None:
        try:
            with _translate():
                conn.execute("BEGIN IMMEDIATE")
                inserts = [job for job in group if job.row is not None]
                if inserts:
                    try:
                        with _translate():
                            _insert_records(conn, inserts)
                    except BaseException as exc:
                        for job in inserts:
                            job.error = exc
                for job in group:
                    if job.row is not None:
                        continue
                    if job.single:  # one statement: atomic by itself, no savepoint needed
                        try:
                            with _translate():
                                job.result = job.fn(conn)  # type: ignore[misc]
                        except BaseException as exc:
                            job.error = exc
                        continue
                    conn.execute("SAVEPOINT job")
                    try:
                        with _translate():
                            job.result = job.fn(conn)  # type: ignore[misc]
                    except BaseException as exc:
                        job.error = exc
                        conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for job in group:
                if job.error is None:
                    job.error = exc if isinstance(exc, FhirError) else StoreUnavailable(f"commit failed: {exc}")
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in group:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():  # one wake-up per event loop, not one per job
            loop.call_soon_threadsafe(_settle, jobs)

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, single: bool = False) -> T:
        """Run ``fn`` in the writer thread inside the next group commit (``single``: it is one statement)."""
        if self._writer is None:
            raise StoreUnavailable("store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, loop, future, single))
        return await future

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._pool is None:
            raise StoreUnavailable("store is not open")

        def run() -> T:
            with _translate():
                return fn(self._reader())

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    # --- writes -----------------------------------------------------------------------------------

    async def commit(self, writes: Sequence[Write], *, now: datetime | None = None) -> list[CommitResult]:
        moment = now or utcnow()
        prepared = [prepare(w, self.base_url) for w in writes]
        # Index rows are built here, on the caller's thread, so the writer thread mostly runs SQL.
        rows = [[(w.type, w.id, e.param, e.sys, e.val, e.lo, e.hi) for e in w.index] for w in prepared]
        return await self._write(lambda conn: [self._apply(conn, w, r, moment) for w, r in zip(prepared, rows,
                                                                                                strict=True)])

    def _apply(self, conn: sqlite3.Connection, w: Write, idx_rows: list[tuple[Any, ...]],
               now: datetime) -> CommitResult:
        if w.if_none_exist is not None:
            found = check_planned_condition(w, _search(conn, w.if_none_exist, limit=2).resources)
            if found is not None:
                return CommitResult(found, created=False, existed=True)
        row = conn.execute("SELECT version, deleted FROM resources WHERE type = ? AND id = ?",
                           (w.type, w.id)).fetchone()
        current, live = (row[0], not row[1]) if row else (0, False)
        if w.expect == MUST_NOT_EXIST and live:
            raise Conflict(f"{w.type}/{w.id} already exists")
        if w.expect is not None and w.expect > 0 and (not live or current != w.expect):
            have = f"version {current}" if live else "no live version"
            raise PreconditionFailed(f"{w.type}/{w.id}: If-Match expects version {w.expect}, the server has {have}")
        ts = _ts(now)
        if w.resource is None:
            if not live:
                return CommitResult(StoredResource(w.type, w.id, current, now, True, None, "delete"),
                                    created=False, noop=True)
            version = current + 1
            conn.execute("UPDATE resources SET version = ?, last_updated = ?, deleted = 1, body = NULL "
                         "WHERE type = ? AND id = ?", (version, ts, w.type, w.id))
            conn.execute("INSERT INTO history VALUES (?, ?, ?, ?, 'delete', NULL)", (w.type, w.id, version, ts))
            conn.execute("DELETE FROM idx WHERE type = ? AND id = ?", (w.type, w.id))
            return CommitResult(StoredResource(w.type, w.id, version, now, True, None, "delete"), created=False)
        version = current + 1
        body = stamp(w.resource, w.id, version, now)
        blob = orjson.dumps(body)
        method: Method = "update" if live else "create"
        if row is None:
            conn.execute("INSERT INTO resources VALUES (?, ?, ?, ?, 0, ?)", (w.type, w.id, version, ts, blob))
        else:
            conn.execute("UPDATE resources SET version = ?, last_updated = ?, deleted = 0, body = ? "
                         "WHERE type = ? AND id = ?", (version, ts, blob, w.type, w.id))
        conn.execute("INSERT INTO history VALUES (?, ?, ?, ?, ?, ?)", (w.type, w.id, version, ts, method, blob))
        if live:
            conn.execute("DELETE FROM idx WHERE type = ? AND id = ?", (w.type, w.id))
        conn.executemany("INSERT INTO idx VALUES (?, ?, ?, ?, ?, ?, ?)", idx_rows)
        return CommitResult(StoredResource(w.type, w.id, version, now, False, body, method), created=not live)

    # --- reads ------------------------------------------------------------------------------------

    async def read(self, type_: str, id_: str) -> StoredResource | None:
        def run(conn: sqlite3.Connection) -> StoredResource | None:
            row = conn.execute("SELECT version, last_updated, deleted, body FROM resources "
                               "WHERE type = ? AND id = ?", (type_, id_)).fetchone()
            if row is None:
                return None
            return StoredResource(type_, id_, row[0], _dt(row[1]), bool(row[2]),
                                  orjson.loads(row[3]) if row[3] is not None else None,
                                  "delete" if row[2] else "update")

        return await self._read(run)

    async def vread(self, type_: str, id_: str, version: int) -> StoredResource | None:
        def run(conn: sqlite3.Connection) -> StoredResource | None:
            row = conn.execute("SELECT type, id, version, last_updated, method, body FROM history "
                               "WHERE type = ? AND id = ? AND version = ?", (type_, id_, version)).fetchone()
            return _history_row(row) if row else None

        return await self._read(run)

    async def history(self, type_: str, id_: str | None, *, since: datetime | None, offset: int,
                      count: int) -> HistoryPage:
        where: list[str] = ["type = ?"]
        args: list[Any] = [type_]
        if id_ is not None:
            where.append("id = ?")
            args.append(id_)
        if since is not None:
            where.append("last_updated >= ?")
            args.append(_ts(since))
        cond = " AND ".join(where)

        def run(conn: sqlite3.Connection) -> HistoryPage:
            total = conn.execute(f"SELECT COUNT(*) FROM history WHERE {cond}", args).fetchone()[0]
            rows = conn.execute(
                f"SELECT type, id, version, last_updated, method, body FROM history WHERE {cond} "
                "ORDER BY last_updated DESC, version DESC LIMIT ? OFFSET ?", [*args, count, offset]).fetchall()
            return HistoryPage([_history_row(r) for r in rows], total)

        return await self._read(run)

    async def search(self, query: Query) -> SearchPage:
        return await self._read(lambda conn: _search(conn, query))

    async def read_many(self, refs: Sequence[tuple[str, str]]) -> list[StoredResource]:
        def run(conn: sqlite3.Connection) -> list[StoredResource]:
            out = []
            for type_, id_ in dict.fromkeys(refs):
                row = conn.execute("SELECT version, last_updated, body FROM resources "
                                   "WHERE type = ? AND id = ? AND deleted = 0", (type_, id_)).fetchone()
                if row:
                    out.append(StoredResource(type_, id_, row[0], _dt(row[1]), False, orjson.loads(row[2])))
            return out

        return await self._read(run)


    # --- records ----------------------------------------------------------------------------------

    async def add_record(self, record: Record, *, now: float | None = None) -> bool:
        moment = time.time() if now is None else now

        row = (record.kind, record.key, record.state, record.group, record.due, record.attempts,
               record.lease_owner, record.lease_until, moment, moment, orjson.dumps(record.data))
        if self._writer is None:
            raise StoreUnavailable("store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.put(_Job(None, loop, future, True, row))
        inserted = await future
        if inserted:
            record.created = record.updated = moment
            record.rev = 1
        return inserted

    async def get_record(self, kind: str, key: str) -> Record | None:
        def run(conn: sqlite3.Connection) -> Record | None:
            row = conn.execute(f"SELECT {_RECORD_COLS} FROM records WHERE kind = ? AND key = ?",
                               (kind, key)).fetchone()
            return _record(row) if row else None

        return await self._read(run)

    async def save_record(self, record: Record, *, now: float | None = None) -> bool:
        moment = time.time() if now is None else now

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE records SET state = ?, grp = ?, due = ?, attempts = ?, lease_owner = ?, lease_until = ?, "
                "updated = ?, rev = rev + 1, data = ? WHERE kind = ? AND key = ? AND rev = ?",
                (record.state, record.group, record.due, record.attempts, record.lease_owner, record.lease_until,
                 moment, orjson.dumps(record.data), record.kind, record.key, record.rev))
            return cur.rowcount == 1

        saved = await self._write(run, single=True)
        if saved:
            record.rev += 1
            record.updated = moment
        return saved

    async def claim_records(self, kind: str, *, owner: str, now: float, lease_seconds: float, limit: int,
                            states: Sequence[str] = ("pending",)) -> list[Record]:
        marks = ", ".join("?" * len(states))

        def run(conn: sqlite3.Connection) -> list[Record]:
            rows = conn.execute(
                f"SELECT {_RECORD_COLS} FROM records WHERE kind = ? AND state IN ({marks}) AND due <= ? "
                "AND lease_until <= ? ORDER BY due, created LIMIT ?", (kind, *states, now, now, limit)).fetchall()
            claimed = []
            for row in rows:
                rec = _record(row)
                conn.execute("UPDATE records SET lease_owner = ?, lease_until = ?, rev = rev + 1, updated = ? "
                             "WHERE kind = ? AND key = ?", (owner, now + lease_seconds, now, kind, rec.key))
                rec.lease_owner, rec.lease_until, rec.rev, rec.updated = owner, now + lease_seconds, rec.rev + 1, now
                claimed.append(rec)
            return claimed

        return await self._write(run)

    async def list_records(self, kind: str, *, state: str | None = None, group: str | None = None,
                           limit: int = 50, offset: int = 0) -> list[Record]:
        where, args = ["kind = ?"], [kind]
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if group is not None:
            where.append("grp = ?")
            args.append(group)
        # With a group, the unary + keeps SQLite off the (kind, created) index, whose full scan grows with every
        # record of the kind; (kind, grp, state) narrows to the group's few rows, sorted afterwards.
        order = "+created DESC, key" if group is not None else "created DESC, key"
        sql = (f"SELECT {_RECORD_COLS} FROM records WHERE {' AND '.join(where)} "
               f"ORDER BY {order} LIMIT ? OFFSET ?")
        return await self._read(lambda conn: [_record(r) for r in conn.execute(sql, [*args, limit, offset])])

    async def count_records(self, kind: str) -> dict[tuple[str, str], int]:
        sql = "SELECT grp, state, COUNT(*) FROM records WHERE kind = ? GROUP BY grp, state"
        return await self._read(lambda conn: {(g, st): n for g, st, n in conn.execute(sql, (kind,))})


_RECORD_COLS = "kind, key, state, grp, due, attempts, lease_owner, lease_until, created, updated, rev, data"


def _record(row: Sequence[Any]) -> Record:
    kind, key, state, grp, due, attempts, owner, until, created, updated, rev, data = row
    return Record(kind, key, state, orjson.loads(data), grp, due, attempts, owner, until, created, updated, rev)


def _history_row(row: Sequence[Any]) -> StoredResource:
    type_, id_, version, ts, method, body = row
    return StoredResource(type_, id_, version, _dt(ts), method == "delete",
                          orjson.loads(body) if body is not None else None, method)


# --- search translation ---------------------------------------------------------------------------

def _pred_sql(p: Pred, col: Callable[[str], str]) -> tuple[str, list[Any]]:
    """SQL condition for one predicate on an index row (``col('val')`` names the column)."""
    op = p.op
    if op == "token":
        if p.val is None:
            return f"{col('sys')} = ?", [p.sys]
        if p.sys is None:
            return f"{col('val')} = ?", [p.val]
        if p.sys == "":
            return f"{col('val')} = ? AND {col('sys')} IS NULL", [p.val]
        return f"{col('sys')} = ? AND {col('val')} = ?", [p.sys, p.val]
    if op in ("ref", "uri"):
        return f"{col('val')} = ?", [p.val]
    if op == "ref_id":
        return f"{col('sys')} = ?", [p.sys]
    if op == "str_prefix":
        return f"{col('val')} >= ? AND {col('val')} < ?", [p.val, (p.val or "") + "\U0010ffff"]
    if op == "str_contains":
        return f"instr({col('val')}, ?) > 0", [p.val]
    if op == "str_exact":
        return f"{col('sys')} = ?", [p.sys]
    if op == "date":
        return " AND ".join(f"{col(f)} {o} ?" for f, o, _ in p.date), [v for _, _, v in p.date]
    raise ValueError(f"unexpected predicate {op}")


def _idx_col(name: str) -> str:
    return f"i.{name}"


def _lu_col(name: str) -> str:
    return "r.last_updated" if name == "lo" else "(r.last_updated + 0.001)"


def _clause_sql(c: Clause, driver: bool, type_: str = "") -> tuple[str, list[Any]]:
    if c.param == "_id":
        vals = [p.val for p in c.preds]
        return f"r.id IN ({', '.join('?' * len(vals))})", vals
    if c.param == "_lastUpdated":
        parts, args = [], []
        for p in c.preds:
            sql, a = _pred_sql(p, _lu_col)
            parts.append(f"NOT ({sql})" if p.date_negate else f"({sql})")
            args += a
        return "(" + " OR ".join(parts) + ")", args
    base = "SELECT 1 FROM idx i WHERE i.type = r.type AND i.id = r.id AND i.param = ?"
    if len(c.preds) == 1 and c.preds[0].op == "missing":
        return ("NOT " if c.preds[0].missing else "") + f"EXISTS ({base})", [c.param]
    if driver:  # uncorrelated (type bound as a value), so SQLite runs it once and probes resources by key
        parts, args = [], [type_, c.param]
        for p in c.preds:
            sql, a = _pred_sql(p, _idx_col)
            parts.append(f"({sql})")
            args += a
        return (f"r.id IN (SELECT i.id FROM idx i WHERE i.type = ? AND i.param = ? AND "
                f"({' OR '.join(parts)}))"), args
    positive = [p for p in c.preds if not p.date_negate]
    negative = [p for p in c.preds if p.date_negate]
    terms, args = [], []
    if positive:
        inner, a = [], []
        for p in positive:
            sql, pa = _pred_sql(p, _idx_col)
            inner.append(f"({sql})")
            a += pa
        terms.append(("NOT " if c.negate else "") + f"EXISTS ({base} AND ({' OR '.join(inner)}))")
        args += [c.param, *a]
    for p in negative:
        sql, pa = _pred_sql(p, _idx_col)
        terms.append(f"NOT EXISTS ({base} AND {sql})")
        args += [c.param, *pa]
    return "(" + " OR ".join(terms) + ")", args


def _is_driver(c: Clause) -> bool:
    return (not c.negate and c.param not in ("_lastUpdated",)
            and all(p.op in _DRIVER_RANK and not p.date_negate for p in c.preds))


def _estimate(conn: sqlite3.Connection, type_: str, c: Clause, cap: int = 10000) -> int:
    """How many index rows a driver candidate touches (counted up to ``cap``): the most selective
    clause drives the search."""
    if c.param == "_id":
        return len(c.preds)
    parts, args = [], [type_, c.param]
    for p in c.preds:
        sql, a = _pred_sql(p, _idx_col)
        parts.append(f"({sql})")
        args += a
    row = conn.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM idx i WHERE i.type = ? AND i.param = ? AND "
                       f"({' OR '.join(parts)}) LIMIT {int(cap)})", args).fetchone()
    return int(row[0])


def _where(query: Query, conn: sqlite3.Connection | None = None) -> tuple[str, list[Any]]:
    clauses = list(query.clauses)
    drivers = [c for c in clauses if _is_driver(c)]
    driver = min(drivers, key=lambda c: max(_DRIVER_RANK[p.op] for p in c.preds)) if drivers else None
    if conn is not None and len(drivers) > 1:
        # Most promising first; each later count stops as soon as it cannot beat the best so far.
        ranked = sorted(drivers, key=lambda c: max(_DRIVER_RANK[p.op] for p in c.preds))
        best, best_n = ranked[0], _estimate(conn, query.resource_type, ranked[0], _ESTIMATE_CAP)
        for c in ranked[1:]:
            n = _estimate(conn, query.resource_type, c, best_n)
            if n < best_n:
                best, best_n = c, n
        driver = best
    parts, args = ["r.type = ?", "r.deleted = 0"], [query.resource_type]
    if driver is not None:
        sql, a = _clause_sql(driver, driver=True, type_=query.resource_type)
        parts.append(sql)
        args += a
    for c in clauses:
        if c is driver:
            continue
        sql, a = _clause_sql(c, driver=False)
        parts.append(sql)
        args += a
    return " AND ".join(parts), args


def _order(query: Query) -> tuple[str, list[Any]]:
    if not query.sort:
        if query.clauses:  # unary +: fetch the (few) matches by index, then sort them, rather than
            return "+r.last_updated DESC, r.id", []  # walking the whole type in date order
        return "r.last_updated DESC, r.id", []
    terms, args = [], []
    for name, desc in query.sort:
        direction = "DESC" if desc else "ASC"
        if name == "_id":
            terms.append(f"r.id {direction}")
        elif name == "_lastUpdated":
            terms.append(f"r.last_updated {direction}")
        else:
            agg = "MAX" if desc else "MIN"
            expr = (f"(SELECT {agg}(COALESCE(i.val, i.lo)) FROM idx i "
                    "WHERE i.type = r.type AND i.id = r.id AND i.param = ?)")
            terms.append(f"{expr} IS NULL, {expr} {direction}")
            args += [name, name]
    terms.append("r.id")
    return ", ".join(terms), args


def _search(conn: sqlite3.Connection, query: Query, limit: int | None = None) -> SearchPage:
    where, args = _where(query, conn)
    total = conn.execute(f"SELECT COUNT(*) FROM resources r WHERE {where}", args).fetchone()[0]
    count = query.count if limit is None else limit
    if query.summary_count or count == 0 or total == 0:
        return SearchPage([], total)
    order, order_args = _order(query)
    rows = conn.execute(
        f"SELECT r.id, r.version, r.last_updated, r.body FROM resources r WHERE {where} "
        f"ORDER BY {order} LIMIT ? OFFSET ?", [*args, *order_args, count, query.offset]).fetchall()
    t = query.resource_type
    return SearchPage([StoredResource(t, rid, v, _dt(ts), False, orjson.loads(body))
                       for rid, v, ts, body in rows], total)
