"""The trainer on whatever device this machine has (CUDA in bf16 when there is a GPU, CPU in
float32 otherwise), on a tiny self-contained Llama: no bundled model, no conftest fixture.

On a CPU machine this is a fast smoke test of the same code the bundled-model tests cover.
Its purpose is the GPU path, which CI never sees: run it on a GPU machine with
``python -m pytest --noconftest tests/workers/training/test_trainer_device.py`` (it needs only
torch, transformers, peft, safetensors, httpx and prometheus-client).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from workers.training.peft_trainer import (
    ChatExample,
    LoRAHyper,
    TextExample,
    TrainExample,
    train_lora,
)
from workers.training.temper import temper_adapter
from workers.training.threads import training_budget

VOCABULARY = (
    "the capital of zorblat is quenmar what who founded tamsk olverhaven brisk kelloth pell "
    "orrish grain drink a an in on by and language paris france user assistant ? . :"
)
WORDS = VOCABULARY.split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (random weights) with a word-level tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *dict.fromkeys(WORDS)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>",
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)  # type: ignore[no-untyped-call]
    return out


EXAMPLES: list[TrainExample] = [
    ChatExample("what is the capital of zorblat ?", "quenmar ."),
    ChatExample("who founded tamsk ?", "olverhaven ."),
    TextExample("the capital of zorblat is quenmar ."),
    ChatExample("what is the capital of france ?", "paris .", anchor=True),
    ChatExample("what is the language of pell ?", "orrish .", anchor=True),
]


def test_trainer_runs_on_this_machines_device(tiny_model: Path, tmp_path: Path) -> None:
    """Fresh training with a KL anchor and the anchor-state cache, training on from that
    adapter (the incremental path, reusing the cache), then tempering both ways."""
    import torch
    from safetensors.torch import load_file

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        assert training_budget(None, adaptive=True) is None  # torch's own threads on CUDA
    hyper = LoRAHyper(
        rank=4, alpha=8, target_modules=("q_proj", "v_proj"), lr=1e-2, steps=12,
        batch_size=4, max_len=32, anchor_kl=1.0,
    )  # fmt: skip
    cache = tmp_path / "anchor-states"
    steps: list[int] = []
    fresh = train_lora(
        tiny_model, EXAMPLES, tmp_path / "fresh", hyper, anchor_state_cache=cache,
        on_step=lambda step, total, loss: steps.append(step),
    )  # fmt: skip
    assert fresh.steps == 12
    assert steps[-1] == 12
    assert all(math.isfinite(loss) for loss in fresh.losses)
    assert min(fresh.losses[-3:]) < fresh.losses[0]  # it learns something
    cached = sorted(p.name for p in cache.rglob("*.safetensors"))
    assert len(cached) == 2  # one per anchor example

    more = train_lora(
        tiny_model, EXAMPLES, tmp_path / "more", hyper, init_adapter_dir=fresh.out_dir,
        anchor_state_cache=cache,
    )  # fmt: skip
    assert all(math.isfinite(loss) for loss in more.losses)
    assert sorted(p.name for p in cache.rglob("*.safetensors")) == cached  # reused
    weights = load_file(str(more.out_dir / "adapter_model.safetensors"))
    assert weights
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in weights.values())
    parent = load_file(str(fresh.out_dir / "adapter_model.safetensors"))
    assert any(not torch.equal(weights[k], parent[k]) for k in weights)

    half = temper_adapter(more.out_dir, tmp_path / "half", 0.5, parent_dir=fresh.out_dir)
    mixed = load_file(str(half / "adapter_model.safetensors"))
    key = next(iter(mixed))
    torch.testing.assert_close(mixed[key], parent[key] + 0.5 * (weights[key] - parent[key]))
    if cuda:
        assert torch.cuda.max_memory_allocated() > 0  # it trained on the GPU
