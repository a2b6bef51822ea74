"""/v1/admin/keys over HTTP: create, list, revoke, role guard and error envelopes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.api.admin.keys import router
from app.auth import Authenticator, Role, ensure_admin_key
from app.deps import get_state
from app.errors import install_error_handlers
from app.settings import Settings
from tests.factories import DB_BACKENDS, db_settings, make_api_key, migrated_db

URL = "/v1/admin/keys"


@dataclass
class KeysState:
    """The slice of app.state.AppState that the key routes use (no engine, no services)."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    authenticator: Authenticator


class Ctx:
    def __init__(self, client: httpx.AsyncClient, state: KeysState, admin_key: str) -> None:
        self.client = client
        self.state = state
        self.admin_key = admin_key

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}


@pytest.fixture(params=DB_BACKENDS)
async def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ctx]:
    async with migrated_db(request.param, tmp_path) as (engine, sessionmaker):
        settings = db_settings(str(engine.url), tmp_path)
        # Long TTL on purpose: revocation must work through invalidate(), not expiry.
        state = KeysState(settings, sessionmaker, Authenticator(sessionmaker, cache_ttl_s=60))
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(router)
        app.dependency_overrides[get_state] = lambda: state
        admin_key = await ensure_admin_key(sessionmaker, preset=None)
        assert admin_key is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Ctx(client, state, admin_key)


def _assert_error(
    resp: httpx.Response, status: int, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)
    assert error["message"]
    return error


async def test_create_user_key_returns_plaintext_once(ctx: Ctx) -> None:
    resp = await ctx.client.post(URL, json={"name": "app1"}, headers=ctx.headers())

    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["object"] == "api_key"
    assert (body["name"], body["role"], body["revoked_at"]) == ("app1", "user", None)
    assert body["key"].startswith("sa-")
    assert body["prefix"] == body["key"][:12]
    assert "key_hash" not in body
    principal = await ctx.state.authenticator.authenticate(f"Bearer {body['key']}")
    assert (principal.key_id, principal.role) == (body["id"], Role.user)


async def test_list_keys_shows_public_fields_only(ctx: Ctx) -> None:
    await ctx.client.post(URL, json={"name": "ops", "role": "operator"}, headers=ctx.headers())

    resp = await ctx.client.get(URL, headers=ctx.headers())

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    assert [(k["name"], k["role"]) for k in body["data"]] == [
        ("bootstrap-admin", "admin"),
        ("ops", "operator"),
    ]
    for item in body["data"]:
        assert not {"key", "key_hash"} & item.keys()
    assert body["data"][0]["last_used_at"] is not None  # the admin key authenticated this call


@pytest.mark.parametrize("role", [Role.user, Role.operator])
async def test_non_admin_key_forbidden(ctx: Ctx, role: Role) -> None:
    _, key = await make_api_key(ctx.state.sessionmaker, role=role)

    resp = await ctx.client.get(URL, headers=ctx.headers(key))

    error = _assert_error(resp, 403, "permission_error", "insufficient_role")
    assert "'admin' role" in error["message"]


async def test_missing_key_unauthorized(ctx: Ctx) -> None:
    resp = await ctx.client.get(URL)

    error = _assert_error(resp, 401, "authentication_error", "missing_api_key")
    assert error["message"].startswith("Missing API key")
    assert resp.headers["www-authenticate"] == "Bearer"


async def test_bad_key_unauthorized(ctx: Ctx) -> None:
    resp = await ctx.client.get(URL, headers=ctx.headers("sa-not-a-real-key"))

    error = _assert_error(resp, 401, "authentication_error", "invalid_api_key")
    assert error["message"].startswith("Invalid API key")


async def test_revoke_key_stops_it_working(ctx: Ctx) -> None:
    created = (
        await ctx.client.post(URL, json={"name": "tmp", "role": "admin"}, headers=ctx.headers())
    ).json()
    assert (await ctx.client.get(URL, headers=ctx.headers(created["key"]))).status_code == 200

    resp = await ctx.client.delete(f"{URL}/{created['id']}", headers=ctx.headers())

    assert resp.status_code == 200, resp.text
    assert resp.json()["revoked_at"] is not None
    again = await ctx.client.get(URL, headers=ctx.headers(created["key"]))
    _assert_error(again, 401, "authentication_error", "invalid_api_key")


async def test_revoke_unknown_key_not_found(ctx: Ctx) -> None:
    resp = await ctx.client.delete(f"{URL}/9999", headers=ctx.headers())

    _assert_error(resp, 404, "not_found_error", "api_key_not_found")


async def test_revoke_last_admin_conflict(ctx: Ctx) -> None:
    keys = (await ctx.client.get(URL, headers=ctx.headers())).json()["data"]

    resp = await ctx.client.delete(f"{URL}/{keys[0]['id']}", headers=ctx.headers())

    _assert_error(resp, 409, "invalid_request_error", "last_admin_key")
    assert (await ctx.client.get(URL, headers=ctx.headers())).status_code == 200


async def test_create_malformed_json(ctx: Ctx) -> None:
    headers = {**ctx.headers(), "Content-Type": "application/json"}

    resp = await ctx.client.post(URL, content=b'{"name": ', headers=headers)

    error = _assert_error(resp, 400, "invalid_request_error", "invalid_request")
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "role": "root"}, "role"),
        ({"name": ""}, "name"),
        ({"role": "user"}, "name"),
        ({"name": "x", "rol": "admin"}, "rol"),
    ],
)
async def test_create_invalid_body(ctx: Ctx, body: dict[str, Any], param: str) -> None:
    resp = await ctx.client.post(URL, json=body, headers=ctx.headers())

    _assert_error(resp, 400, "invalid_request_error", "invalid_request", param)


async def test_revoke_non_integer_id(ctx: Ctx) -> None:
    resp = await ctx.client.delete(f"{URL}/abc", headers=ctx.headers())

    _assert_error(resp, 400, "invalid_request_error", "invalid_request", "key_id")
