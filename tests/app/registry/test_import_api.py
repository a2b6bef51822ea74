"""Bad imports through the admin API: 4xx with OpenAI error JSON, and nothing stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.registry.conftest import InProcessGateway, adapter_files, write_tiny_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _files(folder: Path, **names: str) -> list[Any]:
    """Multipart parts for the folder's files, renamed per `names` (file -> sent name)."""
    parts = []
    for path in sorted(folder.iterdir()):
        sent = names.get(path.name, path.name)
        parts.append(("files", (sent, path.read_bytes(), "application/octet-stream")))
    return parts


async def _nothing_stored(gw: InProcessGateway) -> None:
    r = await gw.operator.get("/v1/admin/namespaces")
    assert r.json()["data"] == []
    assert (await gw.operator.get("/v1/admin/audit")).json()["data"] == []
    blobs = gw.settings.adapter_root / "blobs"
    stored = [p for p in blobs.glob("*/*") if p.parent.name != "tmp"] if blobs.exists() else []
    assert stored == []
    uploads = gw.settings.adapter_root / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


@pytest.fixture
def folder(tiny_adapters: list[Path], tmp_path: Path) -> Path:
    out = tmp_path / "upload"
    out.mkdir()
    for name in (CONFIG, WEIGHTS):
        (out / name).write_bytes((tiny_adapters[0] / name).read_bytes())
    return out


async def _import(gw: InProcessGateway, parts: list[Any], ns: str = "acme") -> httpx.Response:
    return await gw.admin.post(f"/v1/admin/namespaces/{ns}/versions:import", files=parts)


def _assert_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code, err
    message: str = err["message"]
    return message


async def test_import_pickle_refused(gw: InProcessGateway, folder: Path) -> None:
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    message = _assert_error(await _import(gw, _files(folder)), 400, "pickle_refused")
    assert "safetensors" in message
    await _nothing_stored(gw)


@pytest.mark.parametrize(
    "name", ["../adapter_config.json", "/etc/adapter_config.json", "..", "a\\b", "sub/x.json"]
)
async def test_import_path_traversal_names_refused(
    gw: InProcessGateway, folder: Path, name: str
) -> None:
    parts = _files(folder, **{CONFIG: name})
    _assert_error(await _import(gw, parts), 400, "bad_file_name")
    await _nothing_stored(gw)


async def test_import_unexpected_or_missing_files(gw: InProcessGateway, folder: Path) -> None:
    (folder / "train_log.json").write_text("{}")
    _assert_error(await _import(gw, _files(folder)), 400, "unexpected_file")
    (folder / "train_log.json").unlink()
    _assert_error(await _import(gw, adapter_files(folder, [CONFIG])), 400, "missing_file")
    await _nothing_stored(gw)


async def test_import_rank_too_large(gw: InProcessGateway, tmp_path: Path, model_dir: Path) -> None:
    big = write_tiny_adapter(model_dir, tmp_path / "big", seed=1, rank=64, layers=1)
    _assert_error(await _import(gw, adapter_files(big)), 400, "rank_too_large")
    await _nothing_stored(gw)


async def test_import_wrong_base(gw: InProcessGateway, folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:, :100].copy()  # in_features of another model
    save_file(tensors, str(folder / WEIGHTS))
    message = _assert_error(await _import(gw, _files(folder)), 400, "wrong_base")
    assert "different base model" in message
    await _nothing_stored(gw)


async def test_import_unknown_target_module(gw: InProcessGateway, folder: Path) -> None:
    _edit_config(folder, target_modules=["c_attn"])
    _assert_error(await _import(gw, _files(folder)), 400, "unknown_target_module")
    await _nothing_stored(gw)


async def test_import_truncated_weights(gw: InProcessGateway, folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    _assert_error(await _import(gw, _files(folder)), 400, "bad_safetensors")
    await _nothing_stored(gw)


async def test_import_not_lora(gw: InProcessGateway, folder: Path) -> None:
    _edit_config(folder, peft_type="PREFIX_TUNING")
    _assert_error(await _import(gw, _files(folder)), 400, "not_lora")
    await _nothing_stored(gw)


async def test_import_bad_namespace(gw: InProcessGateway, folder: Path) -> None:
    _assert_error(await _import(gw, _files(folder), ns="base"), 400, "invalid_namespace")
    _assert_error(await _import(gw, _files(folder), ns="Bad_Name"), 400, "invalid_namespace")
    await _nothing_stored(gw)


async def test_import_too_large_is_413(gw: InProcessGateway, folder: Path) -> None:
    registry = gw.settings.registry.model_copy(update={"max_import_mb": 1})
    gw.state.adapters._settings = gw.settings.model_copy(update={"registry": registry})
    with (folder / WEIGHTS).open("ab") as fh:
        fh.write(b"\0" * (1 << 20))
    r = await _import(gw, _files(folder))
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    await _nothing_stored(gw)


async def test_import_same_content_twice_shares_blob(
    gw: InProcessGateway, tiny_adapters: list[Path]
) -> None:
    v1 = await gw.import_adapter("acme", tiny_adapters[0])
    v2 = await gw.import_adapter("acme", tiny_adapters[0])
    assert v2["name"] == "acme@v2"
    assert v1["blob_sha256"] == v2["blob_sha256"]
    assert v1["id"] != v2["id"]  # distinct engine LoRA ids, same verified files
