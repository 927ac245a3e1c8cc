"""Audit events: who changed what, append-only."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from chathub.storage.models import AuditEvent


async def record(
    session: AsyncSession,
    *,
    team_id: str,
    actor_id: str | None,
    action: str,
    target_type: str,
    target_id: str | None,
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEvent(
            team_id=team_id,
            actor_id=actor_id,
            action=action,
            target_type=target_type,
            target_id=target_id,
            data=data,
        )
    )
