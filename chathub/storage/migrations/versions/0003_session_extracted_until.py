"""the last message extraction read, per session

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 12:00:00.000000

Sessions that exist already count as read up to their newest finished
message: extraction used to keep its place in memory only, so what they hold
was read before (or is as lost as after any restart), and reading every old
session again from its start would repeat the model calls of its history.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chat_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("extracted_until", sa.String(length=36), nullable=True))
    op.execute(
        "UPDATE chat_sessions SET extracted_until = ("
        "SELECT max(messages.id) FROM messages "
        "WHERE messages.session_id = chat_sessions.id AND messages.status <> 'streaming')"
    )


def downgrade() -> None:
    with op.batch_alter_table("chat_sessions", schema=None) as batch_op:
        batch_op.drop_column("extracted_until")
