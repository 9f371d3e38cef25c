"""Decisions of the policy engine: the outcomes paused, observe, pinned and held, and a `source` column
(what decided: "policy:<name>/<controller or rule>", "guardrail:<name>", "api", "config").

Downgrading deletes the decisions whose outcome revision 0002 cannot hold (they would violate its
check constraint); the others keep everything but their source.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the constraint: a migration must not change when the models do.
OLD_OUTCOMES = ("applied", "rejected", "rolled_back")
NEW_OUTCOMES = (*OLD_OUTCOMES, "paused", "observe", "pinned", "held")


def _check(outcomes: tuple[str, ...]) -> str:
    return "outcome IN (" + ", ".join(f"'{o}'" for o in outcomes) + ")"


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("source", sa.String(length=128), nullable=True))
        batch.drop_constraint(op.f("ck_decisions_outcome"), type_="check")
        batch.create_check_constraint(op.f("ck_decisions_outcome"), _check(NEW_OUTCOMES))


def downgrade() -> None:
    decisions = sa.table("decisions", sa.column("outcome", sa.String))
    op.execute(decisions.delete().where(decisions.c.outcome.not_in(OLD_OUTCOMES)))
    with op.batch_alter_table("decisions") as batch:
        batch.drop_constraint(op.f("ck_decisions_outcome"), type_="check")
        batch.create_check_constraint(op.f("ck_decisions_outcome"), _check(OLD_OUTCOMES))
        batch.drop_column("source")
