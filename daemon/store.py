"""The daemon's database: SQLAlchemy models and `Store`, the single writer that batches telemetry.

Time is always UTC epoch seconds as a float (what `time.time()` returns and what samples carry), never
a datetime: one representation everywhere, cheap to compare, identical on SQLite and PostgreSQL.

The schema itself is created and changed only by the Alembic migrations in optd.migrations (see
optd.daemon.db); `Store` assumes it is at head and never calls `create_all`.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Engine,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool, StaticPool

from optd.daemon.models import (
    OUTCOMES,
    REQUEST_STATUSES,
    Base,
    Decision,
    Pin,
    PolicyVersion,
    RequestRecord,
    Sample,
    SampleMinute,
    State,
)

log = logging.getLogger(__name__)


# --- the SQLite library -------------------------------------------------------------------------------

# The WAL-reset bug (https://sqlite.org/wal.html#walresetbug): a race between two connections
# checkpointing and writing can corrupt a WAL-mode database. Affected: 3.7.0 through 3.51.2; fixed in
# 3.51.3 (2026-03-13; the withdrawn 3.52.0 also had the fix). Secondary sources citing SQLite's page
# also name backports in 3.44.6 and 3.50.7; we could not confirm those on sqlite.org, so they still
# warn, and the message says so.
_WAL_RESET_FIRST, _WAL_RESET_LAST = (3, 7, 0), (3, 51, 2)


def sqlite_wal_reset_warning(version: str = sqlite3.sqlite_version) -> str | None:
    """The warning to log for this SQLite library version, or None when it lacks the WAL-reset bug."""
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    if not _WAL_RESET_FIRST <= parts <= _WAL_RESET_LAST:
        return None
    return (f"SQLite {version} has the WAL-reset corruption bug (3.7.0 through 3.51.2, fixed in 3.51.3; "
            "3.44.6 and 3.50.7 reportedly carry a backport). optd writes through one connection, which "
            "keeps the risk low, but avoid running `optd db prune` against a live daemon's database; "
            "upgrade the SQLite library (or use PostgreSQL) to be safe")


def _is_memory(url: URL) -> bool:
    db = url.database or ""
    return db in ("", ":memory:") or "mode=memory" in db


def _sqlite_engine(url: URL, busy_timeout_s: float) -> Engine:
    if not _is_memory(url) and not url.database.startswith("file:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    if _is_memory(url):
        # One shared connection, or each checkout would see its own empty database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        # One connection: the single writer. check_same_thread is off because the daemon may call the
        # store from more than one thread; Store's lock serializes every use.
        engine = create_engine(url, poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=60,
                               connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Take transaction control away from pysqlite (it would BEGIN lazily before the first write,
        # after reads) and issue BEGIN ourselves in "begin" below.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")        # readers never block the writer
        cur.execute("PRAGMA synchronous=NORMAL")      # WAL + NORMAL: durable across process crashes
        # Wait out another process's write (`optd db prune`, a migration) rather than fail at once.
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # IMMEDIATE takes the write lock up front. A deferred transaction that reads and then writes
        # fails at once with SQLITE_BUSY (busy_timeout cannot help) when another connection wrote in
        # between; prune and the upserts below read before they write.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_engine(url: str | URL, *, busy_timeout_s: float = 10.0) -> Engine:
    """An engine for any SQLAlchemy URL, configured for optd (SQLite: WAL, one connection)."""
    url = make_url(url)
    if url.drivername == "postgresql":
        # Plain postgresql:// means psycopg2 to SQLAlchemy; optd depends on psycopg 3.
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, busy_timeout_s)
    return create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True)


# --- values ------------------------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    """`value` as plain JSON data: numpy scalars become Python numbers, NaN and ±inf become None
    (JSON has no NaN and PostgreSQL rejects it)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [_jsonable(v) for v in value]
    return str(value)


def _clip(text: str | None, length: int) -> str | None:
    # Longer text than the column allows fails the whole batch on PostgreSQL (SQLite would keep it).
    return None if text is None else str(text)[:length]


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _row(obj: Base) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class _Agg:
    n: int
    mean: float
    min: float
    max: float


def rollup(samples: Iterable[tuple[float, Mapping[str, Any]]]) -> dict[tuple[float, str], _Agg]:
    """Per (minute start, field): count, mean, min and max of the numeric fields of `samples`
    ((ts, fields) pairs). Booleans, strings, lists and missing values are left out."""
    values: dict[tuple[float, str], list[float]] = defaultdict(list)
    for ts, data in samples:
        minute = math.floor(ts / 60) * 60.0
        for field, value in data.items():
            if _is_number(value):
                values[minute, field].append(float(value))
    return {key: _Agg(len(v), math.fsum(v) / len(v), min(v), max(v)) for key, v in values.items()}


@dataclass(frozen=True)
class PruneResult:
    samples_rolled_up: int
    minutes: int            # distinct minutes that received roll-ups
    cutoff: float           # raw samples before this epoch second were rolled up
    requests_deleted: int = 0
    requests_cutoff: float | None = None    # request records that arrived before this were deleted


# --- the store ---------------------------------------------------------------------------------------

class Store:
    """The daemon's one writer. Telemetry (`add_sample`, `add_decision`, `add_request`) is batched in
    memory and committed by `flush` in one transaction; operator state (pins, state, policies) is
    written at once, because the caller acknowledges it to a human. Thread-safe: one lock serializes
    every use of the database, so the daemon may call it from its scheduler thread and its API.

    Queueing a row takes only a second lock that no database work ever holds, so the event loop may
    queue telemetry and request records while a flush, a prune or a read is in progress elsewhere."""

    PRUNE_CHUNK = 5000   # raw samples per prune transaction: bounded memory and lock time

    def __init__(self, url: str | URL, *, max_pending: int = 100_000, busy_timeout_s: float = 10.0) -> None:
        self.engine = make_engine(url, busy_timeout_s=busy_timeout_s)
        # Checked here, once per daemon start, rather than in make_engine (which migrations call too).
        if self.engine.dialect.name == "sqlite" and (warning := sqlite_wal_reset_warning()):
            log.warning(warning)
        self.max_pending = max_pending
        self.dropped = 0            # rows discarded because the batch overflowed or could never be written
        self._lock = threading.RLock()      # the database connection
        self._queue_lock = threading.Lock()  # the batch only; never held while talking to the database
        self._batch: dict[type[Base], list[dict[str, Any]]] = {Sample: [], Decision: [], RequestRecord: []}

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, *, flush: bool = True) -> None:
        """Flush what is pending (unless told not to) and release the connection."""
        try:
            if flush:
                self.flush()
        finally:
            self.engine.dispose()

    # -- batched writes --

    def _append(self, model: type[Base], row: dict[str, Any]) -> None:
        with self._queue_lock:
            rows = self._batch[model]
            rows.append(row)
            if len(rows) > self.max_pending:     # the database is unreachable: keep the newest
                overflow = len(rows) - self.max_pending
                del rows[:overflow]
                self.dropped += overflow

    def add_sample(self, sample: Mapping[str, Any], ts: float | None = None) -> None:
        """Queue one sample. Its time is `ts`, else its own "ts" field, else now."""
        data = _jsonable(sample)
        stamp = ts if ts is not None else data.pop("ts", None)
        data.pop("ts", None)
        self._append(Sample, {"ts": float(stamp if stamp is not None else time.time()), "data": data})

    def add_decision(self, *, knob: str, old_value: Any, new_value: Any, outcome: str, reason: str = "",
                     inputs: Mapping[str, Any] | None = None, policy: str | None = None,
                     mode: str | None = None, cost_s: float | None = None, ts: float | None = None,
                     source: str | None = None) -> None:
        # Checked here, not by the database: one bad row would fail the whole batch's transaction.
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        self._append(Decision, {
            "ts": time.time() if ts is None else float(ts), "knob": _clip(knob, 32),
            "old_value": _jsonable(old_value), "new_value": _jsonable(new_value), "outcome": outcome,
            "reason": reason, "inputs": None if inputs is None else _jsonable(inputs),
            "policy": _clip(policy, 128), "mode": _clip(mode, 16), "cost_s": _finite(cost_s),
            "source": _clip(source, 128),
        })

    def add_request(self, *, request_id: str, arrival: float, ttft_s: float | None, e2e_s: float | None,
                    prompt_tokens: int, completion_tokens: int, finish_reason: str | None,
                    endpoint: str, status: str = "ok", streamed: bool = False,
                    finished_at: float | None = None, itl_mean_s: float | None = None,
                    itl_max_s: float | None = None, knobs: Mapping[str, Any] | None = None,
                    error: str | None = None) -> None:
        """Queue one request record. `finished_at` defaults to arrival + e2e_s (else now); `knobs` maps
        knob names to the values in force at finish (spec_length, max_batch_size, kv_compression,
        weight_bits; others are ignored)."""
        if status not in REQUEST_STATUSES:   # checked here: one bad row would fail the whole batch
            raise ValueError(f"status must be one of {', '.join(REQUEST_STATUSES)}, got {status!r}")
        if finished_at is None:
            finished_at = arrival + e2e_s if e2e_s is not None and math.isfinite(e2e_s) else time.time()
        knobs = knobs or {}

        def knob(name: str, kind: type) -> Any:
            value = knobs.get(name)
            return None if value is None or not math.isfinite(value) else kind(value)

        self._append(RequestRecord, {
            "request_id": _clip(request_id, 64), "arrival": float(arrival), "ttft_s": _finite(ttft_s),
            "e2e_s": _finite(e2e_s), "prompt_tokens": int(prompt_tokens),
            "completion_tokens": int(completion_tokens), "finish_reason": _clip(finish_reason, 16),
            "finished_at": float(finished_at), "endpoint": _clip(endpoint, 32), "streamed": bool(streamed),
            "status": status, "itl_mean_s": _finite(itl_mean_s), "itl_max_s": _finite(itl_max_s),
            "spec_length": knob("spec_length", int), "max_batch_size": knob("max_batch_size", int),
            "kv_compression": knob("kv_compression", float), "weight_bits": knob("weight_bits", float),
            "error": _clip(error, 1000),
        })

    @property
    def pending(self) -> int:
        with self._queue_lock:
            return sum(len(rows) for rows in self._batch.values())

    def flush(self) -> int:
        """Commit everything queued in one transaction; return the rows written.

        When the commit fails for a reason that may pass (database locked, connection lost) the rows
        go back to the front of the queue for the next flush; otherwise they are dropped (and counted
        in `dropped`) so that one bad batch cannot block telemetry forever. Either way it raises."""
        with self._lock:
            with self._queue_lock:
                batch = {model: rows for model, rows in self._batch.items() if rows}
                if not batch:
                    return 0
                self._batch = {model: [] for model in self._batch}
            try:
                with self.engine.begin() as conn:
                    for model, rows in batch.items():
                        conn.execute(insert(model), rows)
            except DBAPIError as exc:
                n = sum(map(len, batch.values()))
                if isinstance(exc, OperationalError) or exc.connection_invalidated:
                    with self._queue_lock:  # rows queued meanwhile are newer: these go in front
                        for model, rows in batch.items():
                            self._batch[model][:0] = rows
                    log.warning("store flush failed, %d rows kept for the next flush: %s", n, exc)
                else:
                    self.dropped += n
                    log.error("store flush failed, %d rows dropped: %s", n, exc)
                raise
            return sum(map(len, batch.values()))

    # -- telemetry reads (committed rows only; call flush first to include the queue) --

    def recent_samples(self, since: float, until: float | None = None,
                       limit: int | None = None) -> list[dict[str, Any]]:
        """Samples with since <= ts (< until), oldest first, each as its fields plus "ts"."""
        q = select(Sample.ts, Sample.data).where(Sample.ts >= since).order_by(Sample.ts, Sample.id)
        if until is not None:
            q = q.where(Sample.ts < until)
        if limit is not None:
            q = q.limit(limit)
        with self._lock, self.engine.connect() as conn:
            return [{"ts": ts, **data} for ts, data in conn.execute(q)]

    def rollups(self, since: float, until: float | None = None,
                field: str | None = None) -> list[dict[str, Any]]:
        """One-minute roll-ups with since <= minute (< until), oldest first."""
        q = select(SampleMinute).where(SampleMinute.minute >= since)
        if until is not None:
            q = q.where(SampleMinute.minute < until)
        if field is not None:
            q = q.where(SampleMinute.field == field)
        with self._lock, Session(self.engine) as s:
            return [_row(r) for r in s.scalars(q.order_by(SampleMinute.minute, SampleMinute.field))]

    def decisions(self, limit: int = 100, knob: str | None = None, outcome: str | None = None,
                  since: float | None = None) -> list[dict[str, Any]]:
        """The latest decisions, newest first."""
        q = select(Decision).order_by(Decision.ts.desc(), Decision.id.desc()).limit(limit)
        if knob is not None:
            q = q.where(Decision.knob == knob)
        if outcome is not None:
            q = q.where(Decision.outcome == outcome)
        if since is not None:
            q = q.where(Decision.ts >= since)
        with self._lock, Session(self.engine) as s:
            return [_row(r) for r in s.scalars(q)]

    def requests(self, since: float, limit: int = 1000) -> list[dict[str, Any]]:
        """Request records that arrived at or after `since`, oldest first."""
        q = select(RequestRecord).where(RequestRecord.arrival >= since)
        q = q.order_by(RequestRecord.arrival, RequestRecord.id).limit(limit)
        with self._lock, Session(self.engine) as s:
            return [_row(r) for r in s.scalars(q)]

    # -- pins --

    def pins(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Pins in force at `now` (default: the current time), by knob."""
        now = time.time() if now is None else now
        q = select(Pin).where((Pin.expires_at.is_(None)) | (Pin.expires_at > now)).order_by(Pin.knob)
        with self._lock, Session(self.engine) as s:
            return {p.knob: _row(p) for p in s.scalars(q)}

    def set_pin(self, knob: str, value: Any, *, reason: str = "", ttl_s: float | None = None,
                source: str = "api", now: float | None = None) -> dict[str, Any]:
        """Pin `knob` to `value` (replacing any pin on it), for `ttl_s` seconds or until unpinned."""
        if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
        now = time.time() if now is None else now
        pin = Pin(knob=knob, value=_jsonable(value), reason=reason, created_at=now,
                  expires_at=None if ttl_s is None else now + ttl_s, source=source)
        with self._lock, Session(self.engine) as s, s.begin():
            row = _row(s.merge(pin))
        return row

    def delete_pin(self, knob: str) -> bool:
        """Unpin `knob`; False when it was not pinned."""
        with self._lock, self.engine.begin() as conn:
            return conn.execute(delete(Pin).where(Pin.knob == knob)).rowcount > 0

    def expire_pins(self, now: float | None = None) -> list[str]:
        """Delete the pins whose time is up; return their knobs."""
        now = time.time() if now is None else now
        with self._lock, self.engine.begin() as conn:
            knobs = list(conn.scalars(select(Pin.knob).where(Pin.expires_at <= now).order_by(Pin.knob)))
            if knobs:
                conn.execute(delete(Pin).where(Pin.knob.in_(knobs)))
        return knobs

    # -- state --

    def get_state(self, key: str, default: Any = None) -> Any:
        with self._lock, Session(self.engine) as s:
            row = s.get(State, key)
            return default if row is None else row.value

    def set_state(self, key: str, value: Any) -> None:
        with self._lock, Session(self.engine) as s, s.begin():
            s.merge(State(key=key, value=_jsonable(value), updated_at=time.time()))

    # -- policy versions --

    def add_policy_version(self, name: str, yaml_text: str, *, activate: bool = True,
                           now: float | None = None) -> int:
        """Record a policy document; when `activate`, it becomes the only active one. Returns its id."""
        now = time.time() if now is None else now
        with self._lock, Session(self.engine) as s, s.begin():
            if activate:
                s.execute(update(PolicyVersion).where(PolicyVersion.active).values(active=False))
            version = PolicyVersion(name=name, yaml=yaml_text, created_at=now, active=activate)
            s.add(version)
            s.flush()
            return version.id

    def deactivate_policies(self) -> None:
        """No policy runs now (the daemon started without one, or it was unset)."""
        with self._lock, Session(self.engine) as s, s.begin():
            s.execute(update(PolicyVersion).where(PolicyVersion.active).values(active=False))

    def active_policy(self) -> dict[str, Any] | None:
        with self._lock, Session(self.engine) as s:
            row = s.scalars(select(PolicyVersion).where(PolicyVersion.active)
                            .order_by(PolicyVersion.id.desc()).limit(1)).first()
            return None if row is None else _row(row)

    def policy_versions(self, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Recorded policy versions, newest first."""
        q = select(PolicyVersion).order_by(PolicyVersion.id.desc()).limit(limit)
        if name is not None:
            q = q.where(PolicyVersion.name == name)
        with self._lock, Session(self.engine) as s:
            return [_row(r) for r in s.scalars(q)]

    # -- retention --

    def prune(self, raw_retention_s: float, now: float | None = None, *,
              requests_retention_s: float | None = None) -> PruneResult:
        """Roll raw samples older than `raw_retention_s` into `samples_1m` and delete them; delete request
        records that arrived more than `requests_retention_s` (default: `raw_retention_s`) ago.

        Only whole minutes are rolled up (the cutoff is rounded down to a minute boundary), so a minute
        is normally summarized once, from all its samples. Each chunk is one transaction that both
        writes the roll-ups and deletes the raw rows, so a crash or a second run never counts a sample
        twice: pruning is idempotent. Request records are raw data with no roll-up (the samples already
        carry their rates and percentiles), so they are simply deleted, also in bounded chunks."""
        requests_retention_s = raw_retention_s if requests_retention_s is None else requests_retention_s
        for name, value in (("raw_retention_s", raw_retention_s),
                            ("requests_retention_s", requests_retention_s)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        now = time.time() if now is None else now
        requests_cutoff = now - requests_retention_s
        deleted = self._prune_requests(requests_cutoff)
        cutoff = math.floor((now - raw_retention_s) / 60) * 60.0
        rolled, minutes = 0, set()
        while True:
            with self._lock, Session(self.engine) as s, s.begin():
                rows = s.execute(select(Sample.id, Sample.ts, Sample.data).where(Sample.ts < cutoff)
                                 .order_by(Sample.ts, Sample.id).limit(self.PRUNE_CHUNK)).all()
                if not rows:
                    break
                last_minute = math.floor(rows[-1].ts / 60)
                if len(rows) == self.PRUNE_CHUNK and math.floor(rows[0].ts / 60) != last_minute:
                    # Leave the last, possibly partial minute for the next chunk, so it is summed whole.
                    rows = [r for r in rows if math.floor(r.ts / 60) != last_minute]
                for (minute, field), agg in rollup((r.ts, r.data) for r in rows).items():
                    self._merge_rollup(s, minute, field, agg)
                    minutes.add(minute)
                ids = [r.id for r in rows]
                for i in range(0, len(ids), 500):        # stay under old SQLite's 999-variable limit
                    s.execute(delete(Sample).where(Sample.id.in_(ids[i:i + 500])))
                rolled += len(ids)
        return PruneResult(samples_rolled_up=rolled, minutes=len(minutes), cutoff=cutoff,
                           requests_deleted=deleted, requests_cutoff=requests_cutoff)

    def _prune_requests(self, cutoff: float) -> int:
        deleted = 0
        while True:
            with self._lock, self.engine.begin() as conn:
                ids = list(conn.scalars(select(RequestRecord.id).where(RequestRecord.arrival < cutoff)
                                        .order_by(RequestRecord.id).limit(self.PRUNE_CHUNK)))
                for i in range(0, len(ids), 500):        # stay under old SQLite's 999-variable limit
                    conn.execute(delete(RequestRecord).where(RequestRecord.id.in_(ids[i:i + 500])))
            deleted += len(ids)
            if len(ids) < self.PRUNE_CHUNK:
                return deleted

    @staticmethod
    def _merge_rollup(s: Session, minute: float, field: str, agg: _Agg) -> None:
        row = s.get(SampleMinute, (minute, field))
        if row is None:
            s.add(SampleMinute(minute=minute, field=field, n=agg.n, mean=agg.mean, min=agg.min, max=agg.max))
            return
        # Samples of a minute already rolled up (they arrived late): fold them in, weighted by count.
        n = row.n + agg.n
        row.mean = (row.mean * row.n + agg.mean * agg.n) / n
        row.n, row.min, row.max = n, min(row.min, agg.min), max(row.max, agg.max)
