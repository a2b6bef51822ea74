"""restem jobs: a kind and parameters on adaptation jobs

Revision ID: 0004_restem_jobs
Revises: 0003_pipeline
Create Date: 2026-11-25 19:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_restem_jobs"
down_revision: str | None = "0003_pipeline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot add a NOT NULL column with constraints in place otherwise.
    with op.batch_alter_table("adaptation_job") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="adapt")
        )
        batch.add_column(sa.Column("params", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adaptation_job") as batch:
        batch.drop_column("params")
        batch.drop_column("kind")
