"""The session log sharded over several Redis databases: where each
session's keys live, delivery across instances from every shard, and the
shard list every instance must agree on. (The SessionLog contract itself runs
on the sharded log too, in test_session_log_contract.py.)"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from chathub.config import ConfigError, Settings
from chathub.server.redis_log import ShardedSessionLog
from chathub.server.session_log import Event, create_session_log
from tests.harness import REDIS_URL, eventually
from tests.server.test_session_log_contract import SHARD_URLS, drop_keys

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = f"chathub-test-{secrets.token_hex(6)}"
    yield value
    for url in SHARD_URLS:
        await drop_keys(value, url)


def sharded(prefix: str, urls: list[str] = SHARD_URLS) -> ShardedSessionLog:
    return ShardedSessionLog(urls, prefix=prefix, reconnect_max_s=0.2)


async def keys_on(url: str, prefix: str) -> set[str]:
    client = aioredis.Redis.from_url(url)
    try:
        return {key.decode() async for key in client.scan_iter(match=f"{prefix}:*")}
    finally:
        await client.aclose()


async def test_each_session_lives_on_one_shard_and_every_instance_hears_all(prefix: str) -> None:
    writer, reader = sharded(prefix), sharded(prefix)
    await writer.start()
    await reader.start()
    heard: list[Event] = []
    reader.add_listener(heard.append)
    try:
        sessions = [f"s-{n}-{secrets.token_hex(4)}" for n in range(40)]
        homes = {sid: writer.shards.index(writer.shard_of(sid)) for sid in sessions}
        assert set(homes.values()) == {0, 1}  # 40 random ids: both shards in use
        for sid in sessions:
            for n in range(3):
                await writer.append(sid, "reply.delta", {"reply_id": "r", "text": f"{n}"})

        await eventually(lambda: len(heard) >= 120)
        assert len(heard) == 120  # each event once, though both shards share a server
        for sid in sessions:
            assert [e.seq for e in heard if e.session_id == sid] == [1, 2, 3]
            assert await reader.last_seq(sid) == 3

        on_shard = [await keys_on(url, prefix) for url in SHARD_URLS]
        for sid, home in homes.items():
            stream = f"{prefix}:log:{{{sid}}}"
            assert stream in on_shard[home]
            assert stream not in on_shard[1 - home]
        assert f"{prefix}:log-shard" in on_shard[0] and f"{prefix}:log-shard" in on_shard[1]
    finally:
        await writer.close()
        await reader.close()


async def test_the_log_is_ready_only_while_every_shard_is(prefix: str) -> None:
    log = sharded(prefix)
    await log.start()
    try:
        assert await log.ready()
        await log.shards[1].close()
        assert not await log.ready()
    finally:
        await log.close()


async def test_an_instance_with_the_shards_in_another_order_does_not_start(prefix: str) -> None:
    first = sharded(prefix)
    await first.start()
    try:
        swapped = sharded(prefix, list(reversed(SHARD_URLS)))
        with pytest.raises(ConfigError, match="same CHATHUB_REDIS_LOG_SHARDS"):
            await swapped.start()
        fewer = sharded(prefix, SHARD_URLS[:1])
        with pytest.raises(ConfigError, match="shard 0/2 to other instances, but 0/1 here"):
            await fewer.start()
        again = sharded(prefix)  # the same list: fine
        await again.start()
        await again.close()
    finally:
        await first.close()


def test_settings_that_cannot_shard_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs CHATHUB_REDIS_URL"):
        Settings(redis_log_shards=SHARD_URLS).check_redis()
    with pytest.raises(ConfigError, match="twice"):
        Settings(redis_url=REDIS_URL, redis_log_shards=[REDIS_URL, REDIS_URL]).check_redis()
    settings = Settings(redis_url=REDIS_URL, redis_log_shards=SHARD_URLS)
    settings.check_redis()
    log = create_session_log(settings)
    assert isinstance(log, ShardedSessionLog) and len(log.shards) == 2


def test_the_shard_list_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATHUB_REDIS_LOG_SHARDS", '["redis://a:6379/0", "redis://b:6379/0"]')
    assert Settings().redis_log_shards == ["redis://a:6379/0", "redis://b:6379/0"]


async def test_the_refusal_names_the_shard_without_its_password(prefix: str) -> None:
    first = sharded(prefix)
    await first.start()
    try:
        # The test Redis's default user has no password: it accepts any.
        url = SHARD_URLS[1].replace("redis://", "redis://:not-a-secret@", 1)
        other = ShardedSessionLog([url, SHARD_URLS[0]], prefix=prefix, reconnect_max_s=0.2)
        with pytest.raises(ConfigError) as refused:
            await other.start()
        assert "not-a-secret" not in str(refused.value)
        assert "127.0.0.1" in str(refused.value)
    finally:
        await first.close()
