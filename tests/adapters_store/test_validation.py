"""Import validation on real PEFT adapters of the bundled model, and the ways uploads go wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapters_store.validation import (
    ALLOWED_FILES,
    WRONG_BASE,
    InvalidAdapter,
    base_shapes,
    read_safetensors_shapes,
    validate_peft_dir,
    validate_upload_names,
)
from tests.adapters_store.conftest import TINY_TARGETS, copy_adapter

MAX_RANK = 32


@pytest.fixture
def tiny(tiny_adapters: list[Path], tmp_path: Path) -> Path:
    """A writable copy of a tiny real adapter."""
    return copy_adapter(tiny_adapters[0], tmp_path / "tiny")


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _expect(code: str, path: Path, model_dir: Path, **kwargs: Any) -> InvalidAdapter:
    with pytest.raises(InvalidAdapter) as exc:
        validate_peft_dir(path, base_model_dir=model_dir, max_rank=MAX_RANK, **kwargs)
    assert exc.value.code == code, exc.value.message
    assert exc.value.status_code == 400
    return exc.value


def test_fact_adapter_is_valid(
    fact_adapters: dict[str, Path], model_dir: Path, tmp_path: Path
) -> None:
    src = copy_adapter(fact_adapters["zorb"], tmp_path / "zorb")
    info = validate_peft_dir(src, base_model_dir=model_dir, max_rank=MAX_RANK)
    assert info.rank == 16
    assert info.alpha == 32
    assert set(info.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert info.config["peft_type"] == "LORA"


def test_tiny_adapter_is_valid(tiny: Path, model_dir: Path) -> None:
    info = validate_peft_dir(tiny, base_model_dir=model_dir, max_rank=MAX_RANK)
    assert (info.rank, info.alpha, set(info.target_modules)) == (4, 8.0, set(TINY_TARGETS))


def test_trainer_folder_needs_allow_extra_files(
    fact_adapters: dict[str, Path], model_dir: Path
) -> None:
    src = fact_adapters["zorb"]  # carries train_log.json
    assert (src / "train_log.json").is_file()
    _expect("unexpected_file", src, model_dir)
    info = validate_peft_dir(
        src, base_model_dir=model_dir, max_rank=MAX_RANK, allow_extra_files=True
    )
    assert info.rank == 16


@pytest.mark.parametrize("name", ["adapter_model.bin", "optimizer.pt", "x.pth", "y.pkl", "z.ckpt"])
def test_pickle_file_refused(tiny: Path, model_dir: Path, name: str) -> None:
    (tiny / name).write_bytes(b"\x80\x04N.")
    err = _expect("pickle_refused", tiny, model_dir)
    assert "pickle files are not accepted; save with safetensors" in err.message
    _expect("pickle_refused", tiny, model_dir, allow_extra_files=True)


def test_rank_too_large(fact_adapters: dict[str, Path], model_dir: Path, tmp_path: Path) -> None:
    src = copy_adapter(fact_adapters["zorb"], tmp_path / "zorb")
    with pytest.raises(InvalidAdapter) as exc:
        validate_peft_dir(src, base_model_dir=model_dir, max_rank=8)
    assert exc.value.code == "rank_too_large"


def test_rank_in_tensors_checked_too(tiny: Path, model_dir: Path) -> None:
    _edit_config(tiny, r=1)  # the config lies; the tensors have rank 4
    with pytest.raises(InvalidAdapter) as exc:
        validate_peft_dir(tiny, base_model_dir=model_dir, max_rank=2)
    assert exc.value.code == "rank_too_large"


def test_truncated_safetensors(tiny: Path, model_dir: Path) -> None:
    weights = tiny / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = _expect("bad_safetensors", tiny, model_dir)
    assert "truncated" in err.message


def test_garbage_safetensors(tiny: Path, model_dir: Path) -> None:
    (tiny / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    _expect("bad_safetensors", tiny, model_dir)


def _handmade_adapter(path: Path, *, in_features: int, out_features: int = 576) -> Path:
    path.mkdir()
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": np.zeros((8, in_features), dtype=np.float32),
        f"{prefix}.lora_B.weight": np.zeros((out_features, 8), dtype=np.float32),
    }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_handmade_adapter_with_right_shapes_passes(model_dir: Path, tmp_path: Path) -> None:
    hidden = base_shapes(model_dir)["model.layers.0.self_attn.q_proj.weight"]
    assert hidden == (576, 576)
    path = _handmade_adapter(tmp_path / "ok", in_features=576)
    assert validate_peft_dir(path, base_model_dir=model_dir, max_rank=MAX_RANK).rank == 8


def test_wrong_base_shapes(model_dir: Path, tmp_path: Path) -> None:
    path = _handmade_adapter(tmp_path / "wrong", in_features=1000)
    err = _expect("wrong_base", path, model_dir)
    assert WRONG_BASE in err.message
    path = _handmade_adapter(tmp_path / "wrong-out", in_features=576, out_features=64)
    _expect("wrong_base", path, model_dir)


def test_wrong_base_module_missing(tiny: Path, model_dir: Path) -> None:
    # Rename the tensors as if the base had 100 layers: no base weight for layer 99.
    from safetensors.numpy import load_file

    weights = tiny / "adapter_model.safetensors"
    tensors = {k.replace("layers.0.", "layers.99."): v for k, v in load_file(weights).items()}
    save_file(tensors, str(weights))
    _expect("wrong_base", tiny, model_dir)


def test_target_module_not_in_base(tiny: Path, model_dir: Path) -> None:
    _edit_config(tiny, target_modules=["q_proj", "c_attn"])
    err = _expect("unknown_target_module", tiny, model_dir)
    assert "c_attn" in err.message
    _edit_config(tiny, target_modules=r".*\.c_attn")
    _expect("unknown_target_module", tiny, model_dir)


def test_config_not_lora(tiny: Path, model_dir: Path) -> None:
    _edit_config(tiny, peft_type="IA3")
    _expect("not_lora", tiny, model_dir)
    (tiny / "adapter_config.json").write_text("{not json")
    _expect("bad_config", tiny, model_dir)


def test_missing_files(tiny: Path, model_dir: Path) -> None:
    (tiny / "adapter_config.json").unlink()
    _expect("missing_file", tiny, model_dir)
    _expect("missing_file", tiny / "nope", model_dir)


def test_base_checks_skipped_without_base(model_dir: Path, tmp_path: Path) -> None:
    path = _handmade_adapter(tmp_path / "wrong", in_features=1000)
    assert validate_peft_dir(path, base_model_dir=None, max_rank=None).rank == 8


def test_read_safetensors_shapes(tiny: Path) -> None:
    shapes = read_safetensors_shapes(tiny / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert shapes[key] == (4, 576)


def test_upload_names_accepted() -> None:
    names = ["adapter_model.safetensors", "adapter_config.json", "README.md"]
    assert validate_upload_names(names) == names
    assert set(validate_upload_names(sorted(ALLOWED_FILES))) == ALLOWED_FILES


@pytest.mark.parametrize(
    ("names", "code"),
    [
        (["../adapter_config.json", "adapter_model.safetensors"], "bad_file_name"),
        (["/etc/passwd", "adapter_config.json"], "bad_file_name"),
        (["adapter/adapter_config.json", "adapter_model.safetensors"], "bad_file_name"),
        (["..\\adapter_config.json", "adapter_model.safetensors"], "bad_file_name"),
        (["..", "adapter_config.json"], "bad_file_name"),
        (["C:adapter_config.json", "adapter_model.safetensors"], "bad_file_name"),
        (["", "adapter_config.json"], "bad_file_name"),
        (["adapter_config.json", "adapter_model.bin"], "pickle_refused"),
        (["adapter_config.json", "adapter_model.safetensors", "evil.sh"], "unexpected_file"),
        (["adapter_config.json", "adapter_config.json"], "duplicate_file"),
        (["adapter_model.safetensors"], "missing_file"),
    ],
)
def test_upload_names_refused(names: list[str], code: str) -> None:
    with pytest.raises(InvalidAdapter) as exc:
        validate_upload_names(names)
    assert exc.value.code == code
    body = exc.value.body()["error"]
    assert (body["type"], body["code"]) == ("invalid_request_error", code)


def test_validation_does_not_touch_the_folder(tiny: Path, model_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in tiny.iterdir()}
    validate_peft_dir(tiny, base_model_dir=model_dir, max_rank=MAX_RANK)
    assert {p.name: p.read_bytes() for p in tiny.iterdir()} == before
    shutil.rmtree(tiny)
