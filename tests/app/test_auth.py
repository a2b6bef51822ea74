"""API keys: hashing, bearer authentication, the principal cache, roles and bootstrap."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.auth import (
    Authenticator,
    Principal,
    Role,
    ensure_admin_key,
    generate_api_key,
    hash_api_key,
    revoke_key,
)
from app.db import repo
from app.errors import APIError, Conflict, NotFound, PermissionDenied, Unauthorized
from tests.factories import DB_BACKENDS, make_api_key, migrated_db

SessionMaker = async_sessionmaker[AsyncSession]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=DB_BACKENDS)
async def db(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[AsyncEngine, SessionMaker]]:
    async with migrated_db(request.param, tmp_path) as engine_and_sessionmaker:
        yield engine_and_sessionmaker


@pytest.fixture
def sessionmaker(db: tuple[AsyncEngine, SessionMaker]) -> SessionMaker:
    return db[1]


def _assert_envelope(exc: APIError, status: int, type_: str, code: str) -> None:
    assert (exc.status_code, exc.type, exc.code, exc.param) == (status, type_, code, None)
    assert exc.body()["error"] == {
        "message": exc.message,
        "type": type_,
        "param": None,
        "code": code,
    }


async def _revoke(sessionmaker: SessionMaker, key_id: int) -> None:
    async with sessionmaker() as session:
        await revoke_key(session, key_id=key_id)
        await session.commit()


def test_generate_api_key_is_random_and_prefixed() -> None:
    keys = {generate_api_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("sa-") and len(k) >= 40 for k in keys)


def test_hash_api_key_is_sha256_hex() -> None:
    assert hash_api_key("sa-abc") == hashlib.sha256(b"sa-abc").hexdigest()
    assert len(hash_api_key(generate_api_key())) == 64


@pytest.mark.parametrize(
    ("have", "need", "allowed"),
    [
        (Role.admin, Role.admin, True),
        (Role.admin, Role.operator, True),
        (Role.admin, Role.user, True),
        (Role.operator, Role.operator, True),
        (Role.operator, Role.user, True),
        (Role.operator, Role.admin, False),
        (Role.user, Role.user, True),
        (Role.user, Role.operator, False),
        (Role.user, Role.admin, False),
    ],
)
def test_role_includes(have: Role, need: Role, allowed: bool) -> None:
    assert have.includes(need) is allowed
    principal = Principal(key_id=1, name="k", role=have)
    if allowed:
        principal.require(need)
    else:
        with pytest.raises(PermissionDenied) as info:
            principal.require(need)
        _assert_envelope(info.value, 403, "permission_error", "insufficient_role")
        assert f"'{need}' role" in info.value.message


def test_role_values_are_stored_strings() -> None:
    assert [r.value for r in Role] == ["user", "operator", "admin"]
    assert Role("operator") is Role.operator


async def test_authenticate_valid_key(sessionmaker: SessionMaker) -> None:
    row, key = await make_api_key(sessionmaker, name="alice", role=Role.operator)
    assert row.prefix == key[:12]
    auth = Authenticator(sessionmaker, cache_ttl_s=5)

    principal = await auth.authenticate(f"Bearer {key}")

    assert principal == Principal(key_id=row.id, name="alice", role=Role.operator)
    assert await auth.authenticate(f"bearer   {key} ") == principal  # scheme is case-insensitive
    async with sessionmaker() as session:
        stored = await repo.get_api_key(session, key_id=row.id)
    assert stored is not None
    assert stored.last_used_at is not None
    assert stored.last_used_at.tzinfo is not None
    assert stored.created_at.utcoffset() is not None
    assert stored.key_hash == hash_api_key(key)


@pytest.mark.parametrize("header", [None, "", "   "])
async def test_authenticate_missing_header(sessionmaker: SessionMaker, header: str | None) -> None:
    auth = Authenticator(sessionmaker, cache_ttl_s=5)
    with pytest.raises(Unauthorized) as info:
        await auth.authenticate(header)
    _assert_envelope(info.value, 401, "authentication_error", "missing_api_key")
    assert info.value.message.startswith("Missing API key. Send 'Authorization: Bearer <key>'")
    assert info.value.headers == {"WWW-Authenticate": "Bearer"}


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "sa-abc"])
async def test_authenticate_malformed_header(sessionmaker: SessionMaker, header: str) -> None:
    auth = Authenticator(sessionmaker, cache_ttl_s=5)
    with pytest.raises(Unauthorized) as info:
        await auth.authenticate(header)
    _assert_envelope(info.value, 401, "authentication_error", "invalid_api_key")


async def test_authenticate_unknown_key(sessionmaker: SessionMaker) -> None:
    auth = Authenticator(sessionmaker, cache_ttl_s=5)
    with pytest.raises(Unauthorized) as info:
        await auth.authenticate(f"Bearer {generate_api_key()}")
    _assert_envelope(info.value, 401, "authentication_error", "invalid_api_key")
    assert info.value.message.startswith("Invalid API key")


async def test_authenticate_revoked_key_after_invalidate(sessionmaker: SessionMaker) -> None:
    row, key = await make_api_key(sessionmaker)
    auth = Authenticator(sessionmaker, cache_ttl_s=60)
    await auth.authenticate(f"Bearer {key}")

    await _revoke(sessionmaker, row.id)
    auth.invalidate()

    with pytest.raises(Unauthorized) as info:
        await auth.authenticate(f"Bearer {key}")
    _assert_envelope(info.value, 401, "authentication_error", "invalid_api_key")


async def test_authenticate_cache_trusts_key_until_ttl(sessionmaker: SessionMaker) -> None:
    row, key = await make_api_key(sessionmaker)
    clock = FakeClock()
    auth = Authenticator(sessionmaker, cache_ttl_s=5, clock=clock)
    await auth.authenticate(f"Bearer {key}")
    await _revoke(sessionmaker, row.id)  # as another process would, without invalidate()

    clock.now += 4.9
    assert (await auth.authenticate(f"Bearer {key}")).key_id == row.id
    clock.now += 0.2
    with pytest.raises(Unauthorized):
        await auth.authenticate(f"Bearer {key}")


async def test_authenticate_cache_skips_sql(db: tuple[AsyncEngine, SessionMaker]) -> None:
    engine, sessionmaker = db
    _, key = await make_api_key(sessionmaker)
    statements: list[str] = []

    def _record(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", _record)
    try:
        auth = Authenticator(sessionmaker, cache_ttl_s=5)
        for _ in range(10):
            await auth.authenticate(f"Bearer {key}")
        cached_run = len(statements)
        uncached = Authenticator(sessionmaker, cache_ttl_s=0)
        for _ in range(3):
            await uncached.authenticate(f"Bearer {key}")
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", _record)
    # Ten cached requests cost one lookup (SELECT + last_used UPDATE); uncached ones pay each time.
    assert cached_run == 2
    assert len(statements) - cached_run == 3 * cached_run


async def test_authenticate_cache_is_bounded(sessionmaker: SessionMaker) -> None:
    keys = [(await make_api_key(sessionmaker, name=f"k{i}"))[1] for i in range(5)]
    auth = Authenticator(sessionmaker, cache_ttl_s=60, max_cached=2)
    for key in keys:
        await auth.authenticate(f"Bearer {key}")
    assert len(auth._cache) == 2
    assert (await auth.authenticate(f"Bearer {keys[0]}")).name == "k0"  # evicted: reloaded


async def test_revoke_key_unknown_id(sessionmaker: SessionMaker) -> None:
    async with sessionmaker() as session:
        with pytest.raises(NotFound) as info:
            await revoke_key(session, key_id=4242)
    _assert_envelope(info.value, 404, "not_found_error", "api_key_not_found")


async def test_revoke_key_last_admin_refused(sessionmaker: SessionMaker) -> None:
    first, _ = await make_api_key(sessionmaker, name="root", role=Role.admin)
    async with sessionmaker() as session:
        with pytest.raises(Conflict) as info:
            await revoke_key(session, key_id=first.id)
    _assert_envelope(info.value, 409, "invalid_request_error", "last_admin_key")

    second, _ = await make_api_key(sessionmaker, name="root2", role=Role.admin)
    await _revoke(sessionmaker, first.id)
    async with sessionmaker() as session:
        with pytest.raises(Conflict):
            await revoke_key(session, key_id=second.id)


async def test_revoke_key_is_idempotent(sessionmaker: SessionMaker) -> None:
    row, _ = await make_api_key(sessionmaker)
    await _revoke(sessionmaker, row.id)
    async with sessionmaker() as session:
        first = await repo.get_api_key(session, key_id=row.id)
        assert first is not None
        revoked_at = first.revoked_at
    await _revoke(sessionmaker, row.id)
    async with sessionmaker() as session:
        again = await repo.get_api_key(session, key_id=row.id)
    assert again is not None
    assert revoked_at is not None
    assert again.revoked_at == revoked_at


async def test_ensure_admin_key_creates_once(sessionmaker: SessionMaker) -> None:
    key = await ensure_admin_key(sessionmaker, preset=None)
    assert key is not None
    assert await ensure_admin_key(sessionmaker, preset=None) is None

    principal = await Authenticator(sessionmaker, cache_ttl_s=5).authenticate(f"Bearer {key}")
    assert principal.role is Role.admin
    async with sessionmaker() as session:
        assert len(await repo.list_api_keys(session)) == 1


async def test_ensure_admin_key_ignores_non_admin_keys(sessionmaker: SessionMaker) -> None:
    await make_api_key(sessionmaker, role=Role.operator)
    assert await ensure_admin_key(sessionmaker, preset=None) is not None


async def test_ensure_admin_key_uses_preset(sessionmaker: SessionMaker) -> None:
    preset = "sa-preset-admin-key-for-tests-0123456789"
    assert await ensure_admin_key(sessionmaker, preset=preset) == preset
    assert await ensure_admin_key(sessionmaker, preset=preset) is None
    principal = await Authenticator(sessionmaker, cache_ttl_s=5).authenticate(f"Bearer {preset}")
    assert principal.role is Role.admin


async def test_ensure_admin_key_reactivates_revoked_preset(sessionmaker: SessionMaker) -> None:
    preset = "sa-preset-admin-key-for-tests-0123456789"
    await ensure_admin_key(sessionmaker, preset=preset)
    async with sessionmaker() as session:  # revoked by hand, bypassing the last-admin guard
        (row,) = await repo.list_api_keys(session)
        await repo.revoke_api_key(session, key=row)
        await session.commit()

    assert await ensure_admin_key(sessionmaker, preset=preset) == preset
    async with sessionmaker() as session:
        assert await repo.active_admin_ids(session) == [row.id]
