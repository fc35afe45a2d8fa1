"""Tenant policies: named policies with immutable versions, term lists (blocklists and allowlists), the tenant's
default policy, backtests; verdicts keep each category's decision, list matches and the shadow decision.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 07:30:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('policies',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('current_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('retired_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_policies_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_policies')),
    sa.UniqueConstraint('tenant_id', 'name', name='uq_policies_tenant_name')
    )
    op.create_table('policy_versions',
    sa.Column('id', BIGINT_PK, autoincrement=True, nullable=False),
    sa.Column('policy_id', sa.String(length=40), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('document', JSON, nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], name=op.f('fk_policy_versions_policy_id_policies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_policy_versions')),
    sa.UniqueConstraint('policy_id', 'version', name='uq_policy_versions_policy_version')
    )
    op.create_table('term_lists',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('description', sa.String(length=500), nullable=True),
    sa.Column('terms', JSON, nullable=False),
    sa.Column('patterns', JSON, nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('blocklist', 'allowlist')", name=op.f('ck_term_lists_kind_known')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_term_lists_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_term_lists')),
    sa.UniqueConstraint('tenant_id', 'kind', 'name', name='uq_term_lists_tenant_kind_name')
    )
    op.create_table('backtests',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('policy_name', sa.String(length=64), nullable=False),
    sa.Column('request', JSON, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('result', JSON, nullable=True),
    sa.Column('error', sa.String(length=500), nullable=True),
    sa.Column('created_by', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'completed', 'failed')", name=op.f('ck_backtests_status_known')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_backtests_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_backtests'))
    )
    op.create_index('ix_backtests_tenant_created', 'backtests', ['tenant_id', 'created_at'], unique=False)
    with op.batch_alter_table('tenants') as batch:
        batch.add_column(sa.Column('default_policy', sa.String(length=64), nullable=True))
    with op.batch_alter_table('verdicts') as batch:
        batch.add_column(sa.Column('category_decisions', JSON, nullable=True))
        batch.add_column(sa.Column('matches', JSON, nullable=True))
        batch.add_column(sa.Column('shadow', JSON, nullable=True))
        batch.add_column(sa.Column('shadow_decision', sa.String(length=16), nullable=True))
    op.create_index('ix_verdicts_tenant_policy_created', 'verdicts', ['tenant_id', 'policy_name', 'created_at'],
                    unique=False)
    op.create_index('ix_verdicts_tenant_created', 'verdicts', ['tenant_id', 'created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_verdicts_tenant_created', table_name='verdicts')
    op.drop_index('ix_verdicts_tenant_policy_created', table_name='verdicts')
    with op.batch_alter_table('verdicts') as batch:
        batch.drop_column('shadow_decision')
        batch.drop_column('shadow')
        batch.drop_column('matches')
        batch.drop_column('category_decisions')
    with op.batch_alter_table('tenants') as batch:
        batch.drop_column('default_policy')
    op.drop_index('ix_backtests_tenant_created', table_name='backtests')
    op.drop_table('backtests')
    op.drop_table('term_lists')
    op.drop_table('policy_versions')
    op.drop_table('policies')
