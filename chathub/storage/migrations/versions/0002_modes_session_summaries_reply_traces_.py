"""modes, session summaries, reply traces, immutable versions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 10:03:57.170043
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Version rows are immutable: a change is a new row. Below the ORM, UPDATE is
# always refused; DELETE only inside an explicit purge (a team's removal, or
# test clean-up), which sets `chathub.allow_purge` for its transaction.
IMMUTABLE = (
    "task_versions",
    "insight_versions",
    "state_versions",
    "dashboard_summaries",
    "session_summaries",
)
PG_FUNCTION = """
CREATE OR REPLACE FUNCTION chathub_reject_version_change() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'DELETE' AND current_setting('chathub.allow_purge', true) = 'on' THEN
    RETURN OLD;
  END IF;
  RAISE EXCEPTION 'rows of % are immutable versions: append a new version instead',
    TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END
$$ LANGUAGE plpgsql
"""


def _protect() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        for table in IMMUTABLE:
            op.execute(
                f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION chathub_reject_version_change()"
            )
    else:
        for table in IMMUTABLE:
            op.execute(
                f"CREATE TRIGGER {table}_immutable BEFORE UPDATE ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'rows of this table are immutable versions'); END"
            )


def _unprotect() -> None:
    for table in IMMUTABLE:
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_immutable ON {table}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_immutable")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS chathub_reject_version_change()")


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "modes",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("team_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name=op.f("fk_modes_team_id_teams"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_modes")),
        sa.UniqueConstraint("team_id", "name", name="uq_modes_team_name"),
    )
    with op.batch_alter_table("modes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_modes_team_id"), ["team_id"], unique=False)

    op.create_table(
        "session_summaries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("team_id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("covers_until", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["chat_sessions.id"],
            name=op.f("fk_session_summaries_session_id_chat_sessions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
            name=op.f("fk_session_summaries_team_id_teams"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_session_summaries")),
        sa.UniqueConstraint("session_id", "version", name="uq_session_summaries_version"),
    )
    with op.batch_alter_table("session_summaries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_session_summaries_session_id"), ["session_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_session_summaries_team_id"), ["team_id"], unique=False)

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trace", sa.JSON(), nullable=True))

    _protect()


def downgrade() -> None:
    _unprotect()
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("trace")

    with op.batch_alter_table("session_summaries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_session_summaries_team_id"))
        batch_op.drop_index(batch_op.f("ix_session_summaries_session_id"))

    op.drop_table("session_summaries")
    with op.batch_alter_table("modes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_modes_team_id"))

    op.drop_table("modes")
