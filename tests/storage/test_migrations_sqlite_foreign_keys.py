"""On SQLite, a migration that rebuilds a table (batch mode: copy, drop the
old one, rename) keeps the rows that reference it: foreign keys are off while
migrations run, and checked before they commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from alembic import command

from chathub.storage.migrate import alembic_config, upgrade_async

NOW = "2026-11-29 10:00:00"
LATER = "2026-11-29 10:00:05"


def _counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("teams", "chat_sessions", "messages")
        }


def _revision(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        revision: str = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    return revision


def _add_session_with_messages(path: Path, session_id: str = "s1") -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO teams (id, name, created_at) VALUES ('t1', 'T', ?)", (NOW,))
        conn.execute(
            "INSERT INTO chat_sessions (id, team_id, title, mode, archived, last_seq,"
            " created_at, updated_at) VALUES (?, 't1', 'x', 'chat', 0, 2, ?, ?)",
            (session_id, NOW, NOW),
        )
        for n in (1, 2):
            conn.execute(
                "INSERT INTO messages (id, team_id, session_id, role, content, status,"
                " created_at) VALUES (?, 't1', 's1', 'user', 'hi', 'complete', ?)",
                (f"m{n}", NOW),
            )


async def test_downgrade_and_upgrade_keep_the_messages(tmp_path: Path) -> None:
    path = tmp_path / "chathub.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade_async(url)
    head = _revision(path)
    _add_session_with_messages(path)
    with sqlite3.connect(path) as conn:  # m2 answers m1
        conn.execute(
            "UPDATE messages SET role = 'assistant', completed_at = ? WHERE id = 'm2'", (LATER,)
        )
    before = _counts(path)
    assert before == {"teams": 1, "chat_sessions": 1, "messages": 2}

    # 0003's downgrade rebuilds chat_sessions (drops the old table)
    await asyncio.to_thread(command.downgrade, alembic_config(url), "0002")
    assert _revision(path) == "0002"
    assert _counts(path) == before
    await upgrade_async(url)
    assert _revision(path) == head
    assert _counts(path) == before
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT extracted_until FROM chat_sessions").fetchone() == ("m2",)
        # 0004: when the session's last reply ended
        assert conn.execute("SELECT last_message_at FROM chat_sessions").fetchone() == (LATER,)


async def test_a_migration_that_leaves_broken_references_rolls_back(tmp_path: Path) -> None:
    """Rows whose foreign key points nowhere (here: messages of a session
    that is not there) fail the migration as a whole, instead of being kept
    silently: the schema stays where it was."""
    path = tmp_path / "chathub.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade_async(url, "0002")
    _add_session_with_messages(path, session_id="s-other")  # messages point at "s1"
    with pytest.raises(RuntimeError, match="foreign key"):
        await upgrade_async(url)
    assert _revision(path) == "0002"
    assert _counts(path) == {"teams": 1, "chat_sessions": 1, "messages": 2}
