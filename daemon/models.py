"""The daemon's tables (SQLAlchemy 2 models). The schema is created and changed only by the Alembic
migrations in optd.migrations; times are UTC epoch seconds as floats (see optd.daemon.store)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# What became of a decision (optd.policies.decision): applied, refused by the engine, rolled back after a
# fault; or not actuated because automation is paused, the policy only observes, the knob is pinned, or
# a guardrail or damping held it (the last four added by revision 0003).
OUTCOMES = ("applied", "rejected", "rolled_back", "paused", "observe", "pinned", "held")
# How a request recorded in `requests` ended (see optd.daemon.request_log for which requests are recorded).
REQUEST_STATUSES = ("ok", "error", "aborted", "rejected")

# Deterministic constraint and index names: SQLite batch migrations recreate tables and must be able
# to name what they drop, and PostgreSQL must end up with the same names as SQLite.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# 64-bit ids on servers (a busy daemon writes many request rows); on SQLite only INTEGER PRIMARY KEY
# is the autoincrementing rowid, and it is 64-bit anyway.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# None is stored as SQL NULL, not as the JSON text 'null', so IS NULL queries mean what they say.
Json = JSON(none_as_null=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Sample(Base):
    """One telemetry sample. The field set grows release by release, so the fields are one JSON object."""

    __tablename__ = "samples"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    data: Mapped[dict[str, Any]] = mapped_column(Json)


class SampleMinute(Base):
    """Roll-up of the raw samples of one minute, one row per numeric field.

    `minute` is the epoch second the minute starts at (a multiple of 60). `n` is how many samples
    carried the field in that minute; it lets a later prune fold more samples of the same minute in
    (late or out-of-order rows) with an exact weighted mean.
    """

    __tablename__ = "samples_1m"
    minute: Mapped[float] = mapped_column(Float, primary_key=True)
    field: Mapped[str] = mapped_column(String(64), primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    mean: Mapped[float] = mapped_column(Float)
    min: Mapped[float] = mapped_column(Float)
    max: Mapped[float] = mapped_column(Float)


class Decision(Base):
    """Every knob decision, applied or not, with what the policy saw when it made it."""

    __tablename__ = "decisions"
    __table_args__ = (
        CheckConstraint("outcome IN ('applied', 'rejected', 'rolled_back', 'paused', 'observe', 'pinned', "
                        "'held')", name="outcome"),
        Index("ix_decisions_knob_ts", "knob", "ts"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    knob: Mapped[str] = mapped_column(String(32))
    # JSON keeps the knob's own type: spec_length 4 stays an int, kv_compression 0.5 a float.
    old_value: Mapped[Any] = mapped_column(Json, nullable=True)
    new_value: Mapped[Any] = mapped_column(Json, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    inputs: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    policy: Mapped[str | None] = mapped_column(String(128), nullable=True)
    mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    cost_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Added by revision 0003: what decided it: "policy:<name>/<controller or rule>", "guardrail:<name>",
    # "api" (an operator), "config" (a reload).
    source: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Pin(Base):
    """An operator override: the policy leaves this knob at `value` until unpinned or expired."""

    __tablename__ = "pins"
    knob: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[Any] = mapped_column(Json)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    source: Mapped[str] = mapped_column(String(16))


class State(Base):
    """Small durable key/value state: `paused`, the current policy name, and the like."""

    __tablename__ = "state"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(Json, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class PolicyVersion(Base):
    """Every policy document the daemon ran, verbatim; at most one row is active."""

    __tablename__ = "policy_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    yaml: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(Boolean, default=False)


class RequestRecord(Base):
    """One request the OpenAI API accepted for this model, however it ended (optd.daemon.request_log).

    Latencies are seconds as the HTTP layer saw them; `itl_mean_s`/`itl_max_s` summarize the gaps between
    consecutive tokens (None with fewer than two). The knob columns hold the values in force when the
    request finished."""

    __tablename__ = "requests"
    __table_args__ = (
        CheckConstraint("status IN ('ok', 'error', 'aborted', 'rejected')", name="status"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # Not unique: a duplicate id from a client must not make a whole batch of telemetry fail.
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    arrival: Mapped[float] = mapped_column(Float, index=True)
    ttft_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    e2e_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Added by revision 0002.
    finished_at: Mapped[float] = mapped_column(Float)
    endpoint: Mapped[str] = mapped_column(String(32))            # "completions" | "chat"
    streamed: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))              # one of REQUEST_STATUSES
    itl_mean_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    itl_max_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    spec_length: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kv_compression: Mapped[float | None] = mapped_column(Float, nullable=True)
    weight_bits: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
