"""Summing adapters: the written adapter's update is exactly the sum of the inputs' updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.training.merge import exact_sum_refusal, sum_adapters

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _adapter(path: Path, seed: int, *, rank: int = 4, alpha: int = 8, **extra: object) -> Path:
    torch.manual_seed(seed)
    path.mkdir(parents=True)
    save_file(
        {A: torch.randn(rank, 16), B: torch.randn(16, rank)},
        str(path / "adapter_model.safetensors"),
    )
    config = {"r": rank, "lora_alpha": alpha, "target_modules": ["q_proj"], **extra}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _delta(path: Path) -> torch.Tensor:
    """The update PEFT (and vLLM) apply: alpha / r * B @ A."""
    config = json.loads((path / "adapter_config.json").read_text())
    w = load_file(str(path / "adapter_model.safetensors"))
    scale: float = config["lora_alpha"] / config["r"]
    return scale * (w[B] @ w[A])


def test_the_sum_is_exact_whatever_the_ranks_and_alphas(tmp_path: Path) -> None:
    one = _adapter(tmp_path / "one", seed=1, rank=4, alpha=8)
    two = _adapter(tmp_path / "two", seed=2, rank=2, alpha=16)
    out = sum_adapters([one, two], tmp_path / "sum")
    torch.testing.assert_close(_delta(out), _delta(one) + _delta(two))
    config = json.loads((out / "adapter_config.json").read_text())
    # The first adapter's scaling (8 / 4) kept: alpha 12 for rank 6.
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (6, 12, ["q_proj"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_what_cannot_be_summed_is_refused_and_nothing_written(tmp_path: Path) -> None:
    one = _adapter(tmp_path / "one", seed=1)
    with pytest.raises(ValueError, match="at least two"):
        sum_adapters([one], tmp_path / "out")
    rs = _adapter(tmp_path / "rs", seed=2, use_rslora=True)
    with pytest.raises(ValueError, match="rsLoRA"):
        sum_adapters([one, rs], tmp_path / "out")
    pattern = _adapter(tmp_path / "pattern", seed=3, rank_pattern={"q_proj": 2})
    with pytest.raises(ValueError, match="per-module"):
        sum_adapters([one, pattern], tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    save_file(
        {A.replace("q_proj", "k_proj"): torch.randn(4, 16)},
        str(other / "adapter_model.safetensors"),
    )
    (other / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="other modules"):
        sum_adapters([one, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        sum_adapters([one, one], tmp_path / "taken")


def test_a_sum_over_max_rank_is_its_best_approximation_of_that_rank(tmp_path: Path) -> None:
    one = _adapter(tmp_path / "one", seed=1, rank=4, alpha=8)
    two = _adapter(tmp_path / "two", seed=2, rank=4, alpha=4)
    exact = _delta(one) + _delta(two)
    roomy = sum_adapters([one, two], tmp_path / "roomy", max_rank=8)
    torch.testing.assert_close(_delta(roomy), exact)
    cut = sum_adapters([one, two], tmp_path / "cut", max_rank=5)
    assert json.loads((cut / "adapter_config.json").read_text())["r"] == 5
    u, s, vh = torch.linalg.svd(exact.double())
    best = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close(_delta(cut).double(), best, rtol=1e-4, atol=1e-4)


def test_adapters_of_one_scaling_keep_their_factors(tmp_path: Path) -> None:
    one = _adapter(tmp_path / "one", seed=1, rank=4, alpha=8)
    two = _adapter(tmp_path / "two", seed=2, rank=4, alpha=8)
    out = sum_adapters([one, two], tmp_path / "out")
    w1, w2, summed = (load_file(str(d / "adapter_model.safetensors")) for d in (one, two, out))
    torch.testing.assert_close(summed[B], torch.cat([w1[B], w2[B]], dim=1))
    torch.testing.assert_close(summed[A], torch.cat([w1[A], w2[A]], dim=0))
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_weights_scale_each_update(tmp_path: Path) -> None:
    one = _adapter(tmp_path / "one", seed=1)
    two = _adapter(tmp_path / "two", seed=2)
    out = sum_adapters([one, two], tmp_path / "out", weights=[1.0, 0.25])
    torch.testing.assert_close(_delta(out), _delta(one) + 0.25 * _delta(two))
    with pytest.raises(ValueError, match="1 weights for 2 adapters"):
        sum_adapters([one, two], tmp_path / "bad", weights=[1.0])


def test_an_exact_sum_is_one_within_the_max_rank_of_a_summable_config() -> None:
    config = {"r": 16, "lora_alpha": 32}
    assert exact_sum_refusal(config, 16, 32) is None
    assert exact_sum_refusal(config, 17, 32) == "rank 16 + 17 > 32 (the sum would be cut by SVD)"
    assert exact_sum_refusal({**config, "use_rslora": True}, 4, 32) == (
        "rsLoRA adapters are not summed"
    )
    assert exact_sum_refusal({**config, "rank_pattern": {"q_proj": 8}}, 4, 32) == (
        "adapters with per-module ranks or alphas are not summed"
    )
