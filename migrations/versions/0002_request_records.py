"""Per-request records get what the OpenAI API now writes into them: finish time, endpoint, streamed,
status, inter-token latency summary, the knobs in force at finish, and the error message.

Rows written before this revision (there should be none: nothing wrote them) are filled in from what
they have: finished_at = arrival + e2e, endpoint from the request id's prefix, status from the finish
reason. The new NOT NULL columns get a server default only while the old rows are filled in, so the
schema ends up equal to the models (no server defaults), which `alembic check` verifies.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the constraint: a migration must not change when the models do.
STATUS_CHECK = "status IN ('ok', 'error', 'aborted', 'rejected')"


def _required(defaults: bool) -> list[sa.Column]:
    """The new NOT NULL columns; with `defaults`, each has the server default that fills old rows."""
    def default(value):
        return {"server_default": value} if defaults else {}
    return [
        sa.Column("finished_at", sa.Float(), nullable=False, **default("0")),
        sa.Column("endpoint", sa.String(length=32), nullable=False, **default("completions")),
        sa.Column("streamed", sa.Boolean(), nullable=False, **default(sa.false())),
        sa.Column("status", sa.String(length=16), nullable=False, **default("ok")),
    ]


def _optional() -> list[sa.Column]:
    return [
        sa.Column("itl_mean_s", sa.Float(), nullable=True),
        sa.Column("itl_max_s", sa.Float(), nullable=True),
        sa.Column("spec_length", sa.Integer(), nullable=True),
        sa.Column("max_batch_size", sa.Integer(), nullable=True),
        sa.Column("kv_compression", sa.Float(), nullable=True),
        sa.Column("weight_bits", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        for column in [*_required(defaults=True), *_optional()]:
            batch.add_column(column)
        batch.create_check_constraint(op.f("ck_requests_status"), STATUS_CHECK)

    requests = sa.table("requests", sa.column("arrival", sa.Float), sa.column("e2e_s", sa.Float),
                        sa.column("request_id", sa.String), sa.column("finish_reason", sa.String),
                        sa.column("finished_at", sa.Float), sa.column("endpoint", sa.String),
                        sa.column("status", sa.String))
    op.execute(requests.update().values(
        finished_at=requests.c.arrival + sa.func.coalesce(requests.c.e2e_s, 0.0),
        endpoint=sa.case((requests.c.request_id.like("chatcmpl-%"), "chat"), else_="completions"),
        status=sa.case((requests.c.finish_reason == "abort", "aborted"),
                       (requests.c.finish_reason == "error", "error"), else_="ok"),
    ))

    with op.batch_alter_table("requests") as batch:
        for column in _required(defaults=False):
            batch.alter_column(column.name, existing_type=column.type, existing_nullable=False,
                               server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_constraint(op.f("ck_requests_status"), type_="check")
        for column in [*_required(defaults=False), *_optional()]:
            batch.drop_column(column.name)
