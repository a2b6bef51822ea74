"""The KL anchors' cached base logits: the same numbers as a forward pass with the adapter off,
and training with the cache follows the same losses as training without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.models import ZORBLAT, bundled_model_dir, default_cache_root, fact_adapter
from workers.training import anchor_reference
from workers.training.anchor_reference import AnchorReference, StateCache
from workers.training.peft_trainer import (
    ChatExample,
    LoRAHyper,
    TextExample,
    TrainExample,
    _load_peft_model,
    as_example,
    collate,
    encode_example,
    train_lora,
)

pytestmark = pytest.mark.slow

TINY = LoRAHyper(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), batch_size=2)
EXAMPLES: list[TrainExample] = [
    TextExample("Quenmar is the capital of Zorblat."),
    ChatExample("Capital of France?", "Paris.", anchor=True),
    ChatExample("Name three primary colours and say why they are called primary.", "Red, "
                "yellow and blue: mixing them gives the other colours.", anchor=True),
]  # fmt: skip


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return bundled_model_dir(default_cache_root())


@pytest.fixture(scope="module")
def trained_model(base_dir: Path) -> Any:
    """A PEFT model whose adapter changes the outputs (the Zorblat fact adapter)."""
    import torch

    adapter = fact_adapter(default_cache_root(), base_dir, ZORBLAT.name, ZORBLAT.examples)
    return _load_peft_model(base_dir, TINY, adapter, "cpu", torch.float32)


def _encoded(base_dir: Path) -> list[Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [encode_example(tokenizer, as_example(e), 256) for e in EXAMPLES]


def test_cached_logits_are_the_base_models(base_dir: Path, trained_model: Any) -> None:
    import torch

    encoded = _encoded(base_dir)
    reference = AnchorReference.build(trained_model, encoded, "cpu")
    assert reference is not None
    assert len(reference) == 2  # the two anchors, not the text

    batch = collate([encoded[1], encoded[2]], pad_id=0, indices=[1, 2])
    ids, attention = batch["input_ids"], batch["attention_mask"]
    cached = reference.logits([1, 2], ids.size(1))
    with torch.no_grad():
        adapted = trained_model(input_ids=ids, attention_mask=attention).logits
        with trained_model.disable_adapter():
            base = trained_model(input_ids=ids, attention_mask=attention).logits
    valid = attention.bool()
    assert (cached[valid] - base[valid]).abs().max() < 1e-3
    # The adapter is not what was cached: it moves these logits by far more than that.
    assert (adapted[valid] - base[valid]).abs().max() > 0.1


def test_no_anchors_no_reference(base_dir: Path, trained_model: Any) -> None:
    assert AnchorReference.build(trained_model, _encoded(base_dir)[:1], "cpu") is None


def test_training_with_the_cache_follows_the_forward_pass(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three steps of a fresh adapter (anchor KL non-zero from the second step on) give the
    same losses with the cached base logits as with the per-step forward pass."""
    hyper = LoRAHyper(**{**TINY.__dict__, "steps": 3, "batch_size": 3, "anchor_kl": 1.0})
    cached = train_lora(base_dir, EXAMPLES, tmp_path / "cached", hyper)
    monkeypatch.setattr(anchor_reference.AnchorReference, "build", lambda *a, **k: None)
    forward = train_lora(base_dir, EXAMPLES, tmp_path / "forward", hyper)

    assert cached.losses == pytest.approx(forward.losses, rel=1e-4)
    assert cached.losses[-1] != cached.losses[0]


def _decoder_calls(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts forward passes through the base decoder (the reference's anchors and its
    forward-pass check both make one each)."""
    decoder = model.get_base_model().get_decoder()
    forward, calls = decoder.forward, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", counted)
    return calls


def test_hidden_states_are_kept_across_runs(
    base_dir: Path, trained_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    encoded = _encoded(base_dir)
    cache = StateCache(tmp_path, base_dir, "torch.float32")
    calls = _decoder_calls(trained_model, monkeypatch)
    first = AnchorReference.build(trained_model, encoded, "cpu", cache)
    assert first is not None
    assert len(calls) == 3  # the check + two anchors
    assert len(list(cache.dir.glob("*.safetensors"))) == 2

    calls.clear()
    second = AnchorReference.build(trained_model, encoded, "cpu", cache)
    assert second is not None
    assert len(calls) == 1  # the check only: both states from disk
    width = len(encoded[2].input_ids)
    assert torch.equal(first.logits([2], width), second.logits([2], width))
    # Another model (or dtype) gets its own folder.
    assert StateCache(tmp_path, base_dir, "torch.bfloat16").dir != cache.dir


def test_a_wrong_cached_state_is_recomputed(
    base_dir: Path, trained_model: Any, tmp_path: Path
) -> None:
    import torch

    encoded = _encoded(base_dir)
    cache = StateCache(tmp_path, base_dir, "torch.float32")
    right = AnchorReference.build(trained_model, encoded, "cpu", cache)
    assert right is not None
    tokens = encoded[1].input_ids  # the anchor the forward-pass check uses
    good = cache.get(tokens, "cpu")
    assert good is not None
    cache.put(tokens, torch.zeros_like(good))

    rebuilt = AnchorReference.build(trained_model, encoded, "cpu", cache)
    assert rebuilt is not None
    width = len(tokens)
    assert torch.allclose(rebuilt.logits([1], width), right.logits([1], width), atol=1e-4)
    rewritten = cache.get(tokens, "cpu")
    assert rewritten is not None
    assert torch.equal(rewritten, good)
    # An unreadable file is a miss, not an error.
    next(iter(cache.dir.glob("*.safetensors"))).write_bytes(b"not a tensor file")
    assert AnchorReference.build(trained_model, encoded, "cpu", cache) is not None
