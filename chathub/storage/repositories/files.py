"""Uploaded files: metadata rows; the bytes live in the blob store by sha256.

A deleted file keeps its row with ``deleted_at`` set and is invisible to
every query here except ``blob_is_referenced``.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.errors import NotFound
from chathub.storage.models import File, utcnow
from chathub.storage.pagination import Page, paginate

TEXT_TYPES = ("application/json", "application/xml", "application/x-yaml", "application/yaml")
"""Content types besides ``text/*`` whose files are text (given to the model)."""


def is_text_type(content_type: str) -> bool:
    return content_type.startswith("text/") or content_type in TEXT_TYPES


async def create_file(
    session: AsyncSession,
    *,
    team_id: str,
    name: str,
    size: int,
    content_type: str,
    declared_content_type: str | None,
    sha256: str,
    uploaded_by: str | None,
    session_id: str | None,
) -> File:
    row = File(
        team_id=team_id,
        name=name,
        size=size,
        content_type=content_type,
        declared_content_type=declared_content_type,
        sha256=sha256,
        uploaded_by=uploaded_by,
        session_id=session_id,
    )
    session.add(row)
    await session.flush()
    return row


async def get_file(session: AsyncSession, *, team_id: str, file_id: str) -> File:
    row = await session.scalar(
        select(File).where(File.id == file_id, File.team_id == team_id, File.deleted_at.is_(None))
    )
    if row is None:
        raise NotFound("file not found")
    return row


def _contains(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped.lower()}%"


async def list_files(
    session: AsyncSession,
    *,
    team_id: str,
    limit: int,
    cursor: str | None,
    content_type: str | None = None,
    content_type_prefix: str | None = None,
    session_id: str | None = None,
    q: str | None = None,
) -> Page[File]:
    """Live files, newest first. ``content_type`` matches exactly,
    ``content_type_prefix`` (such as ``image/``) by prefix; ``q`` is a
    case-insensitive substring of the name."""
    stmt = select(File).where(File.team_id == team_id, File.deleted_at.is_(None))
    if content_type is not None:
        stmt = stmt.where(File.content_type == content_type)
    if content_type_prefix is not None:
        stmt = stmt.where(File.content_type.startswith(content_type_prefix, autoescape=True))
    if session_id is not None:
        stmt = stmt.where(File.session_id == session_id)
    if q:
        stmt = stmt.where(func.lower(File.name).like(_contains(q), escape="\\"))
    return await paginate(session, stmt, File.id, limit=limit, cursor=cursor)


async def delete_file(session: AsyncSession, row: File) -> None:
    """Soft delete: the row stays for the audit trail."""
    row.deleted_at = utcnow()
    await session.flush()


async def blob_is_referenced(session: AsyncSession, *, sha256: str) -> bool:
    """Whether any live file row, of any team, points at the blob ``sha256``.

    The one query here not scoped by team, on purpose: the blob store
    deduplicates across teams, so one team deleting its copy must not take
    the bytes from another team's file. It answers only yes or no, so it
    tells a caller nothing about other teams' files."""
    found = await session.scalar(
        select(File.id).where(File.sha256 == sha256, File.deleted_at.is_(None)).limit(1)
    )
    return found is not None
