"""Tempering an adapter's update: exact scaling from the base, interpolation from a parent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.training.temper import temper_adapter

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _adapter(path: Path, seed: int, rank: int = 4) -> Path:
    torch.manual_seed(seed)
    path.mkdir(parents=True)
    save_file(
        {A: torch.randn(rank, 16), B: torch.randn(16, rank)},
        str(path / "adapter_model.safetensors"),
    )
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    (path / "manifest.json").write_text(json.dumps({"job_id": "adj_1", "mode": "fresh"}))
    return path


def _delta(path: Path) -> torch.Tensor:
    w = load_file(str(path / "adapter_model.safetensors"))
    return w[B] @ w[A]


def test_from_the_base_the_update_is_scaled_exactly(tmp_path: Path) -> None:
    cand = _adapter(tmp_path / "cand", seed=1)
    out = temper_adapter(cand, tmp_path / "out", 0.6)
    torch.testing.assert_close(_delta(out), 0.6 * _delta(cand))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tempered"] == {"scale": 0.6, "towards": "base"}
    assert manifest["job_id"] == "adj_1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_from_a_parent_the_factors_are_interpolated(tmp_path: Path) -> None:
    parent, cand = _adapter(tmp_path / "parent", seed=1), _adapter(tmp_path / "cand", seed=2)
    out = temper_adapter(cand, tmp_path / "out", 0.25, parent_dir=parent)
    p, c, t = (load_file(str(d / "adapter_model.safetensors")) for d in (parent, cand, out))
    for key in (A, B):
        torch.testing.assert_close(t[key], p[key] + 0.25 * (c[key] - p[key]))
    # Between the two updates: closer to the parent's than the candidate's.
    d = _delta(out)
    assert (d - _delta(parent)).norm() < (d - _delta(cand)).norm()


def test_bad_scale_mismatched_parent_and_existing_output_are_refused(tmp_path: Path) -> None:
    cand = _adapter(tmp_path / "cand", seed=1)
    for scale in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="scale"):
            temper_adapter(cand, tmp_path / f"out-{scale}", scale)
    other = _adapter(tmp_path / "other", seed=1, rank=8)
    with pytest.raises(ValueError, match="does not match"):
        temper_adapter(cand, tmp_path / "out", 0.5, parent_dir=other)
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        temper_adapter(cand, tmp_path / "taken", 0.5)


def test_temper_tries_setting_is_checked() -> None:
    from pydantic import ValidationError

    from app.settings import PipelineSettings

    assert PipelineSettings().temper_tries == 3
    assert PipelineSettings(temper_tries=0).temper_tries == 0  # off
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        PipelineSettings(temper_tries=-1)


def test_bisection_halves_the_interval_towards_the_largest_passing_scale() -> None:
    from workers.tasks.temper import Bisection

    search = Bisection()
    assert search.next_scale() == 0.5
    search.too_large(0.5)  # still forgot too much
    assert search.next_scale() == 0.25
    search.too_small(0.25)  # passed: look for a larger one that passes too
    assert search.next_scale() == 0.375
