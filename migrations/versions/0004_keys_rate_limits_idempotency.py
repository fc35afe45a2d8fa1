"""Per-key and per-tenant rate limits, and the idempotency-key store.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 18:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('tenants', sa.Column('rate_limit_rpm', sa.Integer(), nullable=True))
    op.add_column('tenants', sa.Column('rate_limit_tpm', sa.Integer(), nullable=True))
    op.add_column('api_keys', sa.Column('rate_limit_rpm', sa.Integer(), nullable=True))
    op.add_column('api_keys', sa.Column('rate_limit_tpm', sa.Integer(), nullable=True))
    op.create_table('idempotency_keys',
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('api_key_id', sa.String(length=40), nullable=True),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('response_body', sa.Text(), nullable=True),
    sa.Column('response_headers', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_idempotency_keys_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', 'key', name=op.f('pk_idempotency_keys'))
    )
    op.create_index('ix_idempotency_keys_expires_at', 'idempotency_keys', ['expires_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_idempotency_keys_expires_at', table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
    op.drop_column('api_keys', 'rate_limit_tpm')
    op.drop_column('api_keys', 'rate_limit_rpm')
    op.drop_column('tenants', 'rate_limit_tpm')
    op.drop_column('tenants', 'rate_limit_rpm')
