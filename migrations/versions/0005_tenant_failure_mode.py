"""Tenants choose what happens when no provider can answer: fail, or decide degraded (review, block, allow).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 18:10:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('tenants') as batch:
        batch.add_column(sa.Column('failure_mode', sa.String(length=16), nullable=True))
        batch.create_check_constraint(
            op.f('ck_tenants_failure_mode_known'),
            "failure_mode IS NULL OR failure_mode IN ('fail', 'review', 'block', 'allow')",
        )


def downgrade() -> None:
    with op.batch_alter_table('tenants') as batch:
        batch.drop_constraint(op.f('ck_tenants_failure_mode_known'), type_='check')
        batch.drop_column('failure_mode')
