"""Human review: the review queue (review_items and their category index) and the console's sessions.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 07:40:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('review_items',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('submission_id', sa.String(length=40), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('priority', sa.Float(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('conversation_id', sa.String(length=128), nullable=True),
    sa.Column('categories', JSON, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_by', sa.String(length=40), nullable=True),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('claim_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('decision', sa.String(length=16), nullable=True),
    sa.Column('reason', sa.String(length=1000), nullable=True),
    sa.Column('corrected_categories', JSON, nullable=True),
    sa.Column('decided_by', sa.String(length=40), nullable=True),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('override_decision', sa.String(length=16), nullable=True),
    sa.Column('override_reason', sa.String(length=1000), nullable=True),
    sa.Column('overridden_by', sa.String(length=40), nullable=True),
    sa.Column('overridden_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'claimed', 'decided')", name=op.f('ck_review_items_status_known')),
    sa.CheckConstraint("decision IS NULL OR decision IN ('allow', 'block')",
                       name=op.f('ck_review_items_decision_known')),
    sa.CheckConstraint("override_decision IS NULL OR override_decision IN ('allow', 'block')",
                       name=op.f('ck_review_items_override_decision_known')),
    sa.ForeignKeyConstraint(['submission_id'], ['submissions.id'],
                            name=op.f('fk_review_items_submission_id_submissions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_review_items_tenant_id_tenants'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_review_items')),
    sa.UniqueConstraint('submission_id', name=op.f('uq_review_items_submission_id'))
    )
    op.create_index('ix_review_items_tenant_status_priority', 'review_items',
                    ['tenant_id', 'status', 'priority', 'created_at', 'id'], unique=False)
    op.create_index('ix_review_items_tenant_status_created', 'review_items',
                    ['tenant_id', 'status', 'created_at', 'id'], unique=False)

    op.create_table('review_item_categories',
    sa.Column('review_id', sa.String(length=40), nullable=False),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(['review_id'], ['review_items.id'],
                            name=op.f('fk_review_item_categories_review_id_review_items'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('review_id', 'category', name=op.f('pk_review_item_categories'))
    )
    op.create_index('ix_review_item_categories_tenant_category', 'review_item_categories',
                    ['tenant_id', 'category'], unique=False)

    op.create_table('console_sessions',
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('api_key_id', sa.String(length=40), nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_console_sessions_api_key_id_api_keys'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_console_sessions_tenant_id_tenants'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('token_hash', name=op.f('pk_console_sessions'))
    )
    op.create_index('ix_console_sessions_expires_at', 'console_sessions', ['expires_at'], unique=False)
    op.create_index(op.f('ix_console_sessions_api_key_id'), 'console_sessions', ['api_key_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_console_sessions_api_key_id'), table_name='console_sessions')
    op.drop_index('ix_console_sessions_expires_at', table_name='console_sessions')
    op.drop_table('console_sessions')
    op.drop_index('ix_review_item_categories_tenant_category', table_name='review_item_categories')
    op.drop_table('review_item_categories')
    op.drop_index('ix_review_items_tenant_status_created', table_name='review_items')
    op.drop_index('ix_review_items_tenant_status_priority', table_name='review_items')
    op.drop_table('review_items')
