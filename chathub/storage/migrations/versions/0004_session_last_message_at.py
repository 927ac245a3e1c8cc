"""when a reply of a session last ended

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 15:00:00.000000

Sessions that exist already take the time their newest finished reply was
completed; one with no finished reply keeps none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chat_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_message_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE chat_sessions SET last_message_at = ("
        "SELECT max(messages.completed_at) FROM messages "
        "WHERE messages.session_id = chat_sessions.id AND messages.role = 'assistant')"
    )


def downgrade() -> None:
    with op.batch_alter_table("chat_sessions", schema=None) as batch_op:
        batch_op.drop_column("last_message_at")
