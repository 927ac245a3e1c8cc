"""``/team/members`` and ``/team/api-keys`` over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from chathub.storage.db import transaction
from chathub.storage.models import ApiKey, AuditEvent
from tests.harness import RunningServer, TeamFixture

ROLES = ("viewer", "member", "admin", "owner")


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code


async def audit_events(server: RunningServer, team_id: str) -> list[AuditEvent]:
    async with transaction(server.state.sessionmaker) as db:
        rows = await db.scalars(
            select(AuditEvent).where(AuditEvent.team_id == team_id).order_by(AuditEvent.id)
        )
        return list(rows.all())


async def all_pages(
    client: httpx.AsyncClient, path: str, h: dict[str, str], **params: Any
) -> list[Any]:
    items: list[Any] = []
    cursor = None
    while True:
        query = {"limit": 100, **params} | ({"cursor": cursor} if cursor else {})
        r = await client.get(path, params=query, headers=h)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return items


async def add(
    client: httpx.AsyncClient, h: dict[str, str], role: str = "member", email: str | None = None
) -> dict[str, Any]:
    email = email or f"{role}-{secrets.token_hex(4)}@example.com"
    r = await client.post(
        "/team/members", json={"email": email, "name": role.title(), "role": role}, headers=h
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


# ---- members -------------------------------------------------------------------------


async def test_member_lifecycle(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    r = await client.post(
        "/team/members",
        json={"email": "Ada@Example.COM", "name": "Ada Lovelace", "role": "member"},
        headers=h,
    )
    assert r.status_code == 201, r.text
    ada = r.json()
    assert set(ada) == {"id", "email", "name", "role", "created_at"}
    assert ada["email"] == "ada@example.com"  # emails compare case-insensitively
    assert ada["name"] == "Ada Lovelace" and ada["role"] == "member"

    assert (await client.get(f"/team/members/{ada['id']}", headers=h)).json() == ada
    listed = await all_pages(client, "/team/members", h)
    assert {m["id"] for m in listed} == {team.owner.member_id, ada["id"]}

    r = await client.patch(
        f"/team/members/{ada['id']}", json={"role": "admin", "name": "Ada L."}, headers=h
    )
    assert r.status_code == 200, r.text
    assert r.json() == ada | {"role": "admin", "name": "Ada L."}
    assert (await client.get(f"/team/members/{ada['id']}", headers=h)).json()["role"] == "admin"

    r = await client.delete(f"/team/members/{ada['id']}", headers=h)
    assert r.status_code == 204 and r.content == b""
    assert_problem(await client.get(f"/team/members/{ada['id']}", headers=h), 404, "not_found")
    assert ada["id"] not in {m["id"] for m in await all_pages(client, "/team/members", h)}

    events = await audit_events(clean_server, team.team_id)
    assert [(e.action, e.target_id, e.actor_id) for e in events] == [
        ("member.add", ada["id"], team.owner.member_id),
        ("member.update", ada["id"], team.owner.member_id),
        ("member.remove", ada["id"], team.owner.member_id),
    ]
    assert events[1].data == {
        "before": {"name": "Ada Lovelace", "role": "member"},
        "after": {"name": "Ada L.", "role": "admin"},
    }
    assert events[2].data is not None and events[2].data["email"] == "ada@example.com"


async def test_removed_email_can_be_added_again(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    first = await add(client, h, email="back@example.com")
    assert (await client.delete(f"/team/members/{first['id']}", headers=h)).status_code == 204
    again = await add(client, h, email="back@example.com")
    assert again["id"] != first["id"]


async def test_emails_are_stored_lower_cased_within_the_limit(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    email = "\u0130" * 10 + "@" + "\u0130" * 100 + ".example"  # 119, and 229 lower-cased
    r = await client.post("/team/members", json={"email": email}, headers=team.owner.headers)
    assert r.status_code == 201, r.text
    assert r.json()["email"] == email.lower() and len(email.lower()) == 229


async def test_add_defaults_to_member_role(client: httpx.AsyncClient, team: TeamFixture) -> None:
    r = await client.post(
        "/team/members", json={"email": "plain@example.com"}, headers=team.owner.headers
    )
    assert r.status_code == 201
    assert r.json()["role"] == "member" and r.json()["name"] == ""


async def test_empty_patch_changes_nothing(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    m = await add(client, h)
    r = await client.patch(f"/team/members/{m['id']}", json={}, headers=h)
    assert r.status_code == 200 and r.json() == m
    actions = [e.action for e in await audit_events(clean_server, team.team_id)]
    assert actions == ["member.add"]


@pytest.mark.parametrize("email", ["dup@example.com", "DUP@example.com", " dup@example.com "])
async def test_duplicate_email_is_409_and_writes_nothing(
    client: httpx.AsyncClient, team: TeamFixture, email: str
) -> None:
    h = team.owner.headers
    first = await add(client, h, email="dup@example.com")
    r = await client.post(
        "/team/members", json={"email": email, "name": "Other", "role": "admin"}, headers=h
    )
    assert_problem(r, 409, "conflict")
    listed = await all_pages(client, "/team/members", h)
    assert [m for m in listed if m["email"] == "dup@example.com"] == [first]


async def test_same_email_in_another_team_is_fine(
    client: httpx.AsyncClient, team: TeamFixture, other_team: TeamFixture
) -> None:
    await add(client, team.owner.headers, email="both@example.com")
    await add(client, other_team.owner.headers, email="both@example.com")


async def test_members_pagination_has_no_duplicates_or_gaps(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    made = {team.owner.member_id}
    for i in range(22):
        made.add((await add(client, h, email=f"p{i}@example.com"))["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        r = await client.get("/team/members", params=params, headers=h)
        assert r.status_code == 200
        page = r.json()
        assert len(page["items"]) == (5 if pages < 4 else 3)
        seen += [m["id"] for m in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert len(seen) == len(set(seen)) == 23
    assert set(seen) == made
    assert seen == sorted(seen)  # oldest first


@pytest.mark.parametrize("role", ROLES)
async def test_role_filter(client: httpx.AsyncClient, team: TeamFixture, role: str) -> None:
    h = team.owner.headers
    made: dict[str, set[str]] = {r: set() for r in ROLES}
    made["owner"].add(team.owner.member_id)
    for r in ("viewer", "member", "member", "admin", "owner", "viewer"):
        made[r].add((await add(client, h, r, email=f"{r}-{len(made[r])}@example.com"))["id"])
    listed = await all_pages(client, "/team/members", h, role=role)
    assert {m["id"] for m in listed} == made[role]
    assert {m["role"] for m in listed} == {role}


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/team/members", {"role": "god"}),
        ("/team/members", {"role": "OWNER"}),
        *[
            (path, params)
            for path in ("/team/members", "/team/api-keys")
            for params in ({"limit": 0}, {"limit": 101}, {"cursor": "!!"}, {"cursor": "e30"})
        ],
    ],
)
async def test_bad_list_params_are_400(
    client: httpx.AsyncClient, team: TeamFixture, path: str, params: dict[str, Any]
) -> None:
    r = await client.get(path, params=params, headers=team.owner.headers)
    assert_problem(r, 400, "bad_request")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "No Email"},
        {"email": "not-an-email"},
        {"email": "two@@example.com"},
        {"email": "a b@example.com"},
        {"email": "nodot@localhost"},
        {"email": "@example.com"},
        {"email": "x" * 250 + "@example.com"},
        # 250 characters, but 495 once lower-cased ("İ" becomes "i" and a dot)
        {"email": "a@" + "\u0130" * 245 + ".co"},
        {"email": "\u0130" * 40 + "@example.com"},  # a local part of 80 once lower-cased
        {"email": 7},
        {"email": "ok@example.com", "role": "superuser"},
        {"email": "ok@example.com", "role": "Owner"},
        {"email": "ok@example.com", "role": None},
        {"email": "ok@example.com", "name": "x" * 201},
        {"email": "ok@example.com", "name": 5},
        {"email": "ok@example.com", "password": "hunter2"},
        [],
        "ok@example.com",
    ],
)
async def test_bad_member_bodies_are_400_and_write_nothing(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer, body: object
) -> None:
    h = team.owner.headers
    r = await client.post("/team/members", json=body, headers=h)
    assert_problem(r, 400, "bad_request")
    assert [m["id"] for m in await all_pages(client, "/team/members", h)] == [team.owner.member_id]
    assert await audit_events(clean_server, team.team_id) == []


@pytest.mark.parametrize(
    "body",
    [
        {"role": "superuser"},
        {"role": 3},
        {"name": "x" * 201},
        {"email": "new@example.com"},
        {"id": "someone-else"},
        [],
    ],
)
async def test_bad_patches_are_400_and_change_nothing(
    client: httpx.AsyncClient, team: TeamFixture, body: object
) -> None:
    h = team.owner.headers
    m = await add(client, h)
    r = await client.patch(f"/team/members/{m['id']}", json=body, headers=h)
    assert_problem(r, 400, "bad_request")
    assert (await client.get(f"/team/members/{m['id']}", headers=h)).json() == m


async def test_malformed_json_is_400(client: httpx.AsyncClient, team: TeamFixture) -> None:
    r = await client.post(
        "/team/members",
        content=b'{"email": ',
        headers=team.owner.headers | {"content-type": "application/json"},
    )
    assert_problem(r, 400, "bad_request")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/team/members/nope"),
        ("PATCH", "/team/members/nope"),
        ("DELETE", "/team/members/nope"),
        ("DELETE", "/team/api-keys/nope"),
    ],
)
async def test_unknown_ids_are_404(
    client: httpx.AsyncClient, team: TeamFixture, method: str, path: str
) -> None:
    body = {"name": "x"} if method == "PATCH" else None
    r = await client.request(method, path, json=body, headers=team.owner.headers)
    assert_problem(r, 404, "not_found")


ROUTES = [
    ("GET", "/team/members", None),
    ("POST", "/team/members", {"email": "x@example.com"}),
    ("GET", "/team/members/{id}", None),
    ("PATCH", "/team/members/{id}", {"name": "x"}),
    ("DELETE", "/team/members/{id}", None),
    ("GET", "/team/api-keys", None),
    ("POST", "/team/api-keys", {"name": "k"}),
    ("DELETE", "/team/api-keys/{key}", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_needs_credentials(
    client: httpx.AsyncClient,
    team: TeamFixture,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    target = await team.actor("member")
    url = path.format(id=target.member_id, key=target.api_key_id)
    for headers in ({}, {"Authorization": "Bearer chk_nope_nope"}, {"Authorization": "Basic x"}):
        r = await client.request(method, url, json=body, headers=headers)
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    # nothing happened to the target
    got = await client.get(f"/team/members/{target.member_id}", headers=team.owner.headers)
    assert got.status_code == 200 and got.json()["name"] == "Member"
    assert (await client.get("/team/members", headers=target.headers)).status_code == 200


@pytest.mark.parametrize("role", ["viewer", "member"])
async def test_viewers_and_members_read_members_but_cannot_manage(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer, role: str
) -> None:
    caller = await team.actor(role)
    other = await team.actor("viewer")
    h = caller.headers
    listed = await all_pages(client, "/team/members", h)
    assert {team.owner.member_id, caller.member_id, other.member_id} == {m["id"] for m in listed}
    assert (await client.get(f"/team/members/{other.member_id}", headers=h)).status_code == 200

    attempts = [
        client.post("/team/members", json={"email": "x@example.com"}, headers=h),
        client.patch(f"/team/members/{other.member_id}", json={"role": "admin"}, headers=h),
        client.patch(f"/team/members/{caller.member_id}", json={"role": "admin"}, headers=h),
        client.delete(f"/team/members/{other.member_id}", headers=h),
        client.get("/team/api-keys", headers=h),
        client.post("/team/api-keys", json={"name": "mine"}, headers=h),
        client.delete(f"/team/api-keys/{other.api_key_id}", headers=h),
    ]
    for attempt in attempts:
        assert_problem(await attempt, 403, "forbidden")
    got = await client.get(f"/team/members/{other.member_id}", headers=team.owner.headers)
    assert got.json()["role"] == "viewer"
    assert (await client.get("/team/members", headers=other.headers)).status_code == 200
    assert await audit_events(clean_server, team.team_id) == []


async def test_admin_manages_non_owners_only(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    admin = await team.actor("admin")
    h = admin.headers
    # admins add, promote up to admin, rename, demote and remove non-owners
    m = await add(client, h, "member", email="m@example.com")
    r = await client.patch(f"/team/members/{m['id']}", json={"role": "admin"}, headers=h)
    assert r.status_code == 200 and r.json()["role"] == "admin"
    r = await client.patch(f"/team/members/{m['id']}", json={"role": "viewer"}, headers=h)
    assert r.status_code == 200 and r.json()["role"] == "viewer"
    assert (await client.delete(f"/team/members/{m['id']}", headers=h)).status_code == 204

    # ... but cannot create, make, change or remove an owner
    owner_id = team.owner.member_id
    v = await add(client, h, "viewer", email="v@example.com")
    n_events = len(await audit_events(clean_server, team.team_id))
    refused = [
        client.post("/team/members", json={"email": "o@example.com", "role": "owner"}, headers=h),
        client.patch(f"/team/members/{v['id']}", json={"role": "owner"}, headers=h),
        client.patch(f"/team/members/{admin.member_id}", json={"role": "owner"}, headers=h),
        client.patch(f"/team/members/{owner_id}", json={"role": "member"}, headers=h),
        client.patch(f"/team/members/{owner_id}", json={"name": "Renamed"}, headers=h),
        client.delete(f"/team/members/{owner_id}", headers=h),
    ]
    for attempt in refused:
        assert_problem(await attempt, 403, "forbidden")
    members = {m["id"]: m for m in await all_pages(client, "/team/members", team.owner.headers)}
    assert members[owner_id]["role"] == "owner" and members[owner_id]["name"] == "Owner"
    assert members[v["id"]]["role"] == "viewer"
    assert members[admin.member_id]["role"] == "admin"
    assert "o@example.com" not in {m["email"] for m in members.values()}
    assert len(await audit_events(clean_server, team.team_id)) == n_events


async def test_owner_adds_and_promotes_owners(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    second = await add(client, h, "owner", email="o2@example.com")
    assert second["role"] == "owner"
    m = await add(client, h, "member")
    r = await client.patch(f"/team/members/{m['id']}", json={"role": "owner"}, headers=h)
    assert r.status_code == 200 and r.json()["role"] == "owner"
    owners = await all_pages(client, "/team/members", h, role="owner")
    assert len(owners) == 3


async def test_owner_with_an_admin_key_acts_as_admin(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    r = await client.post(
        "/team/api-keys", json={"name": "ci", "role": "admin"}, headers=team.owner.headers
    )
    admin_key = bearer(r.json()["api_key"])
    r = await client.post(
        "/team/members", json={"email": "o@example.com", "role": "owner"}, headers=admin_key
    )
    assert_problem(r, 403, "forbidden")


async def test_last_owner_cannot_be_demoted_or_removed(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    me = team.owner.member_id
    assert_problem(
        await client.patch(f"/team/members/{me}", json={"role": "admin"}, headers=h),
        409,
        "conflict",
    )
    assert_problem(await client.delete(f"/team/members/{me}", headers=h), 409, "conflict")
    got = await client.get(f"/team/members/{me}", headers=h)
    assert got.json()["role"] == "owner"
    # renaming the last owner is fine
    r = await client.patch(f"/team/members/{me}", json={"name": "Boss", "role": "owner"}, headers=h)
    assert r.status_code == 200 and r.json()["name"] == "Boss"

    # with a second owner, either may step down; then the other is the last one
    second = await team.actor("owner")
    r = await client.patch(f"/team/members/{me}", json={"role": "admin"}, headers=second.headers)
    assert r.status_code == 200 and r.json()["role"] == "admin"
    r = await client.delete(f"/team/members/{second.member_id}", headers=second.headers)
    assert_problem(r, 409, "conflict")
    owners = await all_pages(client, "/team/members", second.headers, role="owner")
    assert [o["id"] for o in owners] == [second.member_id]


async def test_owners_stepping_down_together_leave_one_owner(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    second = await team.actor("owner")
    third = await team.actor("owner")
    actors = [team.owner, second, third]
    results = await asyncio.gather(
        *(
            client.patch(f"/team/members/{a.member_id}", json={"role": "member"}, headers=a.headers)
            for a in actors
        )
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 409], [r.text for r in results]
    # the one who was refused is still an owner, with a working owner key
    kept = next(a for a, r in zip(actors, results, strict=True) if r.status_code == 409)
    owners = await all_pages(client, "/team/members", kept.headers, role="owner")
    assert [o["id"] for o in owners] == [kept.member_id]


async def test_owners_removing_each_other_leave_one_owner(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    second = await team.actor("owner")
    results = await asyncio.gather(
        client.delete(f"/team/members/{second.member_id}", headers=team.owner.headers),
        client.delete(f"/team/members/{team.owner.member_id}", headers=second.headers),
    )
    assert sorted(r.status_code for r in results) in ([204, 401], [204, 409]), [
        r.text for r in results
    ]
    survivors = [
        a
        for a in (team.owner, second)
        if (await client.get("/team/members", headers=a.headers)).status_code == 200
    ]
    assert len(survivors) == 1
    owners = await all_pages(client, "/team/members", survivors[0].headers, role="owner")
    assert [o["id"] for o in owners] == [survivors[0].member_id]


async def test_removed_member_loses_access(client: httpx.AsyncClient, team: TeamFixture) -> None:
    gone = await team.actor("admin")
    extra = await client.post("/team/api-keys", json={"name": "second"}, headers=gone.headers)
    token = await client.post("/auth/token", json={"api_key": gone.api_key})
    jwt = token.json()["access_token"]
    assert (await client.get("/team/members", headers=bearer(jwt))).status_code == 200

    assert (
        await client.delete(f"/team/members/{gone.member_id}", headers=team.owner.headers)
    ).status_code == 204
    for h in (gone.headers, bearer(extra.json()["api_key"]), bearer(jwt)):
        assert_problem(await client.get("/team/members", headers=h), 401, "unauthorized")
    keys = await all_pages(client, "/team/api-keys", team.owner.headers)
    assert gone.member_id not in {k["member_id"] for k in keys}


async def test_demotion_lowers_the_members_keys(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    admin = await team.actor("admin")
    assert (await client.get("/team/api-keys", headers=admin.headers)).status_code == 200
    r = await client.patch(
        f"/team/members/{admin.member_id}", json={"role": "viewer"}, headers=team.owner.headers
    )
    assert r.status_code == 200
    assert_problem(await client.get("/team/api-keys", headers=admin.headers), 403, "forbidden")
    keys = await all_pages(client, "/team/api-keys", team.owner.headers)
    assert {k["role"] for k in keys if k["member_id"] == admin.member_id} == {"viewer"}
    # promotion does not raise existing keys: a new key is needed for that
    await client.patch(
        f"/team/members/{admin.member_id}", json={"role": "admin"}, headers=team.owner.headers
    )
    assert_problem(await client.get("/team/api-keys", headers=admin.headers), 403, "forbidden")


# ---- API keys ------------------------------------------------------------------------


async def test_api_key_lifecycle(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    r = await client.post(
        "/team/api-keys", json={"name": "deploy bot", "role": "member"}, headers=h
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert set(created) == {
        "id",
        "name",
        "role",
        "prefix",
        "member_id",
        "created_at",
        "last_used_at",
        "api_key",
    }
    assert created["name"] == "deploy bot" and created["role"] == "member"
    assert created["member_id"] == team.owner.member_id and created["last_used_at"] is None
    secret = created["api_key"]
    assert secret.startswith(created["prefix"]) and len(secret) > len(created["prefix"]) + 20

    # the key works, with its own role, and its use is recorded
    new_key = bearer(secret)
    assert (await client.post("/chat/sessions", json={}, headers=new_key)).status_code == 201
    assert_problem(await client.get("/team/api-keys", headers=new_key), 403, "forbidden")
    listed = {k["id"]: k for k in await all_pages(client, "/team/api-keys", h)}
    assert "api_key" not in listed[created["id"]]
    assert secret not in str(listed)
    assert listed[created["id"]] == {k: v for k, v in created.items() if k != "api_key"} | {
        "last_used_at": listed[created["id"]]["last_used_at"]
    }
    assert listed[created["id"]]["last_used_at"] is not None
    assert {team.owner.api_key_id, created["id"]} == set(listed)

    # only the hash is stored
    async with transaction(clean_server.state.sessionmaker) as db:
        row = await db.get(ApiKey, created["id"])
        assert row is not None
        assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in {str(getattr(row, c.key)) for c in ApiKey.__table__.columns}

    r = await client.delete(f"/team/api-keys/{created['id']}", headers=h)
    assert r.status_code == 204 and r.content == b""
    assert_problem(await client.get("/chat/sessions", headers=new_key), 401, "unauthorized")
    assert_problem(await client.post("/auth/token", json={"api_key": secret}), 401, "unauthorized")
    assert created["id"] not in {k["id"] for k in await all_pages(client, "/team/api-keys", h)}
    assert_problem(
        await client.delete(f"/team/api-keys/{created['id']}", headers=h), 404, "not_found"
    )

    events = [(e.action, e.target_id) for e in await audit_events(clean_server, team.team_id)]
    assert ("api_key.create", created["id"]) in events
    assert ("api_key.revoke", created["id"]) in events
    data = [e.data for e in await audit_events(clean_server, team.team_id)]
    assert secret not in str(data)


async def test_revoking_one_key_leaves_the_members_other_keys(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    admin = await team.actor("admin")
    r = await client.post("/team/api-keys", json={"name": "second"}, headers=admin.headers)
    second = bearer(r.json()["api_key"])
    r = await client.delete(f"/team/api-keys/{admin.api_key_id}", headers=team.owner.headers)
    assert r.status_code == 204
    assert_problem(await client.get("/team/members", headers=admin.headers), 401, "unauthorized")
    assert (await client.get("/team/members", headers=second)).status_code == 200


async def test_key_for_another_member(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    newbie = await add(client, h, "member", email="newbie@example.com")
    r = await client.post(
        "/team/api-keys", json={"name": "laptop", "member_id": newbie["id"]}, headers=h
    )
    assert r.status_code == 201, r.text
    key = r.json()
    assert key["member_id"] == newbie["id"] and key["role"] == "member"  # the member's role
    token = await client.post("/auth/token", json={"api_key": key["api_key"]})
    assert token.status_code == 200
    r = await client.post("/chat/sessions", json={"title": "mine"}, headers=bearer(key["api_key"]))
    assert r.status_code == 201 and r.json()["created_by"] == newbie["id"]


async def test_key_role_defaults_to_the_lower_of_caller_and_member(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    admin = await team.actor("admin")
    r = await client.post("/team/api-keys", json={"name": "own"}, headers=admin.headers)
    assert r.json()["role"] == "admin"
    r = await client.post(
        "/team/api-keys", json={"name": "viewer key", "role": "viewer"}, headers=admin.headers
    )
    assert r.status_code == 201 and r.json()["role"] == "viewer"
    r = await client.post("/team/api-keys", json={"name": "own"}, headers=team.owner.headers)
    assert r.json()["role"] == "owner"


async def test_key_role_limits(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    admin = await team.actor("admin")
    viewer = await team.actor("viewer")
    n_keys = len(await all_pages(client, "/team/api-keys", team.owner.headers))
    n_events = len(await audit_events(clean_server, team.team_id))
    # above the caller's own role
    r = await client.post(
        "/team/api-keys", json={"name": "x", "role": "owner"}, headers=admin.headers
    )
    assert_problem(r, 403, "forbidden")
    # for a member who outranks the caller
    r = await client.post(
        "/team/api-keys",
        json={"name": "x", "member_id": team.owner.member_id, "role": "viewer"},
        headers=admin.headers,
    )
    assert_problem(r, 403, "forbidden")
    # above the member's role
    r = await client.post(
        "/team/api-keys",
        json={"name": "x", "member_id": viewer.member_id, "role": "admin"},
        headers=admin.headers,
    )
    assert_problem(r, 400, "bad_request")
    # for nobody in the team
    r = await client.post(
        "/team/api-keys", json={"name": "x", "member_id": "nobody"}, headers=admin.headers
    )
    assert_problem(r, 404, "not_found")
    # an admin cannot revoke an owner's key
    r = await client.delete(f"/team/api-keys/{team.owner.api_key_id}", headers=admin.headers)
    assert_problem(r, 403, "forbidden")
    assert (await client.get("/team/members", headers=team.owner.headers)).status_code == 200
    # ... but can revoke a viewer's
    r = await client.delete(f"/team/api-keys/{viewer.api_key_id}", headers=admin.headers)
    assert r.status_code == 204
    assert len(await all_pages(client, "/team/api-keys", team.owner.headers)) == n_keys - 1
    assert len(await audit_events(clean_server, team.team_id)) == n_events + 1


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 201},
        {"name": 5},
        {"name": "k", "role": "root"},
        {"name": "k", "member_id": 5},
        {"name": "k", "api_key": "chk_mine_choose"},
        {"name": "k", "expires": "never"},
        [],
    ],
)
async def test_bad_key_bodies_are_400_and_write_nothing(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer, body: object
) -> None:
    h = team.owner.headers
    r = await client.post("/team/api-keys", json=body, headers=h)
    assert_problem(r, 400, "bad_request")
    keys = await all_pages(client, "/team/api-keys", h)
    assert [k["id"] for k in keys] == [team.owner.api_key_id]
    assert await audit_events(clean_server, team.team_id) == []


async def test_api_keys_pagination(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    made = {team.owner.api_key_id}
    for i in range(11):
        r = await client.post("/team/api-keys", json={"name": f"k{i}"}, headers=h)
        made.add(r.json()["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 4} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/team/api-keys", params=params, headers=h)).json()
        seen += [k["id"] for k in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 12 and set(seen) == made
    assert seen == sorted(seen)
