"""Reliability (issue 11): failed authentications counted per window instead of one audit event each.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 07:40:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('auth_failure_windows',
    sa.Column('chain_id', sa.String(length=40), nullable=False),
    sa.Column('subject_type', sa.String(length=16), nullable=False),
    sa.Column('subject_id', sa.String(length=64), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=True),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('first_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('chain_id', 'subject_type', 'subject_id', 'window_start',
                            name=op.f('pk_auth_failure_windows'))
    )
    op.create_index('ix_auth_failure_windows_window_start', 'auth_failure_windows', ['window_start'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_auth_failure_windows_window_start', table_name='auth_failure_windows')
    op.drop_table('auth_failure_windows')
