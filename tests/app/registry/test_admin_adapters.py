"""Admin API over the registry on a fake engine (SQLite and PostgreSQL): import, promote,
rollback, archive, delete, audit, roles, and what serving a namespace looks like."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx

from app.auth import Role
from app.settings import Settings
from tests.app.registry.conftest import InProcessGateway, in_process_gateway


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code, err
    return err


async def _audit(gw: InProcessGateway, namespace: str = "acme") -> list[dict[str, Any]]:
    r = await gw.operator.get("/v1/admin/audit", params={"namespace": namespace})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


async def test_import_creates_candidate_with_audit(
    gw: InProcessGateway, tiny_adapters: list[Path]
) -> None:
    v1 = await gw.import_adapter("acme", tiny_adapters[0])
    assert v1["name"] == "acme@v1"
    assert v1["status"] == "candidate"
    assert v1["rank"] == 4
    assert v1["aliases"] == []
    assert v1["created_by"] == "test-admin"
    blob = gw.settings.adapter_root / "blobs" / v1["blob_sha256"][:2] / v1["blob_sha256"]
    assert sorted(p.name for p in blob.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    r = await gw.operator.get("/v1/admin/namespaces/acme/versions")
    assert [v["name"] for v in r.json()["data"]] == ["acme@v1"]
    ns = (await gw.operator.get("/v1/admin/namespaces/acme")).json()
    assert ns["champion"] is None
    assert ns["settings"]["auto_promote"] is True
    actions = [(e["action"], e["target"], e["actor"]) for e in await _audit(gw)]
    assert actions == [
        ("version.import", "acme@v1", "test-admin"),
        ("namespace.create", "acme", "test-admin"),
    ]


async def test_promote_loads_before_serving_and_names_version(
    gw: InProcessGateway, tiny_adapters: list[Path]
) -> None:
    v1 = await gw.import_adapter("acme", tiny_adapters[0])
    _error(await gw.ask("acme"), 404, "model_not_found")  # no champion yet
    change = await gw.promote("acme", 1)
    assert change["champion"]["name"] == "acme@v1"
    assert change["champion"]["status"] == "promoted"
    assert change["champion"]["aliases"] == ["champion"]
    assert change["previous"] is None
    [loaded] = gw.engine.loaded  # loaded into the engine by the promotion itself
    assert (loaded.name, loaded.lora_id) == ("acme@v1", v1["id"])
    assert loaded.path.name == v1["blob_sha256"]

    r = await gw.ask("acme")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "acme@v1"
    assert r.headers["x-selfadapt-model"] == "acme@v1"
    assert r.headers["x-selfadapt-adapter"] == "acme@v1"
    assert gw.engine.requests[-1][2] == loaded
    base = await gw.ask("base")
    assert base.json()["model"] == "base"
    assert "x-selfadapt-adapter" not in base.headers


async def test_promote_rollback_cycle_with_audit(
    gw: InProcessGateway, tiny_adapters: list[Path]
) -> None:
    for folder in tiny_adapters[:3]:
        await gw.import_adapter("acme", folder)
    await gw.promote("acme", 1)
    change = await gw.promote("acme", 2)
    assert (change["champion"]["name"], change["previous"]) == ("acme@v2", "acme@v1")
    assert (await gw.ask("acme")).json()["model"] == "acme@v2"

    r = await gw.admin.post("/v1/admin/namespaces/acme/rollback", json={"reason": "bad answers"})
    assert r.status_code == 200, r.text
    assert (r.json()["champion"]["name"], r.json()["previous"]) == ("acme@v1", "acme@v2")
    assert (await gw.ask("acme")).json()["model"] == "acme@v1"

    r = await gw.admin.post("/v1/admin/namespaces/acme/rollback", json={"to_version": 3})
    assert r.json()["champion"]["name"] == "acme@v3"
    assert (await gw.ask("acme")).json()["model"] == "acme@v3"

    events = await _audit(gw)
    assert [(e["action"], e["target"]) for e in events[:4]] == [
        ("version.rollback", "acme@v3"),
        ("version.rollback", "acme@v1"),
        ("version.promote", "acme@v2"),
        ("version.promote", "acme@v1"),
    ]
    first_rollback = events[1]
    assert first_rollback["reason"] == "bad answers"
    assert first_rollback["before"]["champion"]["name"] == "acme@v2"
    assert first_rollback["after"]["champion"]["name"] == "acme@v1"
    assert {e["actor"] for e in events} == {"test-admin"}


async def test_archive_and_delete_rules(gw: InProcessGateway, tiny_adapters: list[Path]) -> None:
    v1 = await gw.import_adapter("acme", tiny_adapters[0])
    v2 = await gw.import_adapter("acme", tiny_adapters[1])
    await gw.promote("acme", 1)
    base = "/v1/admin/namespaces/acme/versions"
    _error(await gw.admin.delete(f"{base}/1"), 409, "champion_delete")
    _error(await gw.admin.post(f"{base}/v1/archive"), 409, "champion_archive")

    r = await gw.admin.post(f"{base}/2/archive")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "archived"
    _error(await gw.admin.post(f"{base}/2/promote"), 409, "not_promotable")

    r = await gw.admin.delete(f"{base}/v2")
    assert r.json() == {
        "id": v2["id"],
        "object": "adapter_version",
        "name": "acme@v2",
        "deleted": True,
    }
    _error(await gw.operator.get(f"{base}/2"), 404, "version_not_found")
    blobs = gw.settings.adapter_root / "blobs"
    assert not (blobs / v2["blob_sha256"][:2] / v2["blob_sha256"]).exists()
    assert (blobs / v1["blob_sha256"][:2] / v1["blob_sha256"]).is_dir()
    actions = [e["action"] for e in await _audit(gw)]
    assert actions[:3] == ["version.delete", "version.archive", "version.promote"]
    _error(await gw.admin.delete(f"{base}/7"), 404, "version_not_found")
    _error(
        await gw.admin.delete("/v1/admin/namespaces/nope/versions/1"), 404, "namespace_not_found"
    )


async def test_admin_routes_need_admin_operator_may_read(
    gw: InProcessGateway, tiny_adapters: list[Path]
) -> None:
    await gw.import_adapter("acme", tiny_adapters[0])
    files: dict[str, Any] = {"files": ("adapter_config.json", b"{}")}
    for method, path in [
        ("GET", "/v1/admin/namespaces"),
        ("GET", "/v1/admin/namespaces/acme/versions/1"),
        ("GET", "/v1/admin/audit"),
        ("POST", "/v1/admin/namespaces/acme/versions/1/promote"),
    ]:
        err = _error(await gw.user.request(method, path), 403, "insufficient_role")
        assert err["type"] == "permission_error"
    r = await gw.user.post("/v1/admin/namespaces/acme/versions:import", files=files)
    _error(r, 403, "insufficient_role")
    assert (await gw.operator.get("/v1/admin/namespaces")).status_code == 200
    for method, path in [
        ("POST", "/v1/admin/namespaces/acme/versions/1/promote"),
        ("POST", "/v1/admin/namespaces/acme/rollback"),
        ("POST", "/v1/admin/namespaces/acme/versions/1/archive"),
        ("DELETE", "/v1/admin/namespaces/acme/versions/1"),
    ]:
        _error(await gw.operator.request(method, path), 403, "insufficient_role")
    anonymous = await gw.admin.get("/v1/admin/namespaces", headers={"Authorization": ""})
    _error(anonymous, 401, "missing_api_key")
    actions = [e["action"] for e in await _audit(gw)]
    assert actions == ["version.import", "namespace.create"]  # nothing else ran


async def test_pinning_rules_by_role(gw: InProcessGateway, tiny_adapters: list[Path]) -> None:
    await gw.import_adapter("acme", tiny_adapters[0])
    await gw.import_adapter("acme", tiny_adapters[1])
    await gw.promote("acme", 1)
    unknown = _error(await gw.ask("acme@v9"), 404, "model_not_found")
    hidden = _error(await gw.ask("acme@v2"), 404, "model_not_found")  # candidate
    assert hidden["message"] == unknown["message"].replace("acme@v9", "acme@v2")
    assert hidden["param"] == "model"
    for role in (Role.operator, Role.admin):
        r = await gw.ask("acme@v2", gw.clients[role])
        assert r.json()["model"] == "acme@v2"
        assert r.headers["x-selfadapt-adapter"] == "acme@v2"
    assert (await gw.ask("acme@v1")).json()["model"] == "acme@v1"  # promoted: public
    assert (await gw.ask("acme@champion")).json()["model"] == "acme@v1"
    for bad in ("ACME", "acme@", "acme@v1@v2", "a", "nope", "nope@v1"):
        _error(await gw.ask(bad), 404, "model_not_found")
    await gw.promote("acme", 2)
    assert (await gw.ask("acme@v2")).json()["model"] == "acme@v2"  # promoted now


async def test_models_list_namespaces_and_versions_by_role(
    gw: InProcessGateway, tiny_adapters: list[Path]
) -> None:
    await gw.import_adapter("acme", tiny_adapters[0])
    await gw.import_adapter("acme", tiny_adapters[1])
    await gw.import_adapter("beta", tiny_adapters[2])  # no champion: not servable by name
    await gw.promote("acme", 1)

    async def cards(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
        r = await client.get("/v1/models")
        assert r.status_code == 200, r.text
        return {c["id"]: c for c in r.json()["data"]}

    user = await cards(gw.user)
    assert list(user) == ["base", "acme", "acme@v1"]
    assert user["acme"]["parent"] == "acme@v1"
    assert user["acme@v1"]["parent"] == "base"
    assert user["acme@v1"]["root"] == str(gw.settings.model_dir)
    operator = await cards(gw.operator)
    assert list(operator) == ["base", "acme", "acme@v1", "acme@v2", "beta@v1"]
    r = await gw.user.get("/v1/models/acme")
    assert (r.json()["id"], r.json()["parent"]) == ("acme", "acme@v1")
    _error(await gw.user.get("/v1/models/acme@v2"), 404, "model_not_found")
    assert (await gw.operator.get("/v1/models/acme@v2")).json()["id"] == "acme@v2"


async def test_namespace_create_and_settings(gw: InProcessGateway) -> None:
    r = await gw.admin.post(
        "/v1/admin/namespaces", json={"name": "acme", "settings": {"min_gain": 0.1}}
    )
    assert r.status_code == 201, r.text
    assert r.json()["settings"]["min_gain"] == 0.1
    r = await gw.admin.patch("/v1/admin/namespaces/acme", json={"auto_promote": False})
    assert r.json()["settings"] == {
        "min_gain": 0.1,
        "max_forgetting": 0.05,
        "max_guard_drift": 0.1,
        "auto_promote": False,
    }
    err = _error(
        await gw.admin.post("/v1/admin/namespaces", json={"name": "base"}), 400, "invalid_namespace"
    )
    assert err["param"] == "namespace"
    _error(
        await gw.admin.patch("/v1/admin/namespaces/acme", json={"nope": 1}), 400, "invalid_request"
    )
    names = [n["name"] for n in (await gw.operator.get("/v1/admin/namespaces")).json()["data"]]
    assert names == ["acme"]


async def test_corrupt_or_missing_blob_is_clear_error_not_a_crash(
    settings: Settings, keys: dict[Role, str], tiny_adapters: list[Path]
) -> None:
    async with in_process_gateway(settings, keys) as gw:
        v1 = await gw.import_adapter("acme", tiny_adapters[0])
        v2 = await gw.import_adapter("acme", tiny_adapters[1])
        await gw.promote("acme", 1)
    blobs = settings.adapter_root / "blobs"
    weights = blobs / v1["blob_sha256"][:2] / v1["blob_sha256"] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    shutil.rmtree(blobs / v2["blob_sha256"][:2] / v2["blob_sha256"])

    async with in_process_gateway(settings, keys) as gw:  # a fresh process: nothing verified
        err = _error(await gw.ask("acme"), 500, "adapter_blob_corrupt")
        assert err["type"] == "server_error"
        assert "acme@v1" in err["message"]
        _error(await gw.ask("acme@v2", gw.operator), 500, "adapter_blob_missing")
        assert (await gw.ask("base")).status_code == 200  # the gateway serves on
        r = await gw.admin.post("/v1/admin/namespaces/acme/versions/2/promote")
        _error(r, 500, "adapter_blob_missing")  # refused before the alias moves
        ns = (await gw.operator.get("/v1/admin/namespaces/acme")).json()
        assert ns["champion"] == "acme@v1"
        assert gw.engine.loaded == []
