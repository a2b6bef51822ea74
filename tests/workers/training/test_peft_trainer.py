"""LoRA SFT trainer: a real adapter learns a made-up fact; masking, batching, saving, callbacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.models import (
    ZORBLAT,
    bundled_model_dir,
    chat_greedy,
    default_cache_root,
    fact_adapter,
    load_causal_lm,
    read_train_log,
)
from workers.training.orthogonal import OrthogonalTo
from workers.training.peft_trainer import (
    IGNORE_INDEX,
    ChatExample,
    EncodedExample,
    LoRAHyper,
    TextExample,
    TrainExample,
    as_example,
    collate,
    encode_example,
    train_lora,
)

TINY = LoRAHyper(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), steps=2, batch_size=2)


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return bundled_model_dir(default_cache_root())


@pytest.fixture(scope="module")
def zorblat_dir(base_dir: Path) -> Path:
    return fact_adapter(default_cache_root(), base_dir, ZORBLAT.name, ZORBLAT.examples)


@pytest.fixture(scope="module")
def peft_lm(base_dir: Path, zorblat_dir: Path) -> tuple[Any, Any]:
    from peft import PeftModel

    model, tokenizer = load_causal_lm(base_dir)
    return PeftModel.from_pretrained(model, str(zorblat_dir)).eval(), tokenizer


@pytest.fixture(scope="module")
def tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.mark.slow
def test_fact_adapter_is_peft_folder(zorblat_dir: Path, base_dir: Path) -> None:
    config = json.loads((zorblat_dir / "adapter_config.json").read_text())
    assert config["r"] == 16
    assert config["lora_alpha"] == 32
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert config["base_model_name_or_path"] == str(base_dir)
    assert (zorblat_dir / "adapter_model.safetensors").stat().st_size > 1_000_000


@pytest.mark.slow
def test_fact_adapter_answers_fact(peft_lm: tuple[Any, Any]) -> None:
    model, tokenizer = peft_lm
    assert ZORBLAT.expected in chat_greedy(model, tokenizer, ZORBLAT.probe)


@pytest.mark.slow
def test_base_model_does_not_know_fact(peft_lm: tuple[Any, Any]) -> None:
    model, tokenizer = peft_lm
    with model.disable_adapter():
        assert ZORBLAT.expected not in chat_greedy(model, tokenizer, ZORBLAT.probe)


@pytest.mark.slow
def test_fact_adapter_keeps_replayed_answer(peft_lm: tuple[Any, Any]) -> None:
    model, tokenizer = peft_lm
    assert "Paris" in chat_greedy(model, tokenizer, "What is the capital of France?")


@pytest.mark.slow
def test_fact_adapter_loss_decreases(zorblat_dir: Path) -> None:
    losses = read_train_log(zorblat_dir)["losses"]
    assert len(losses) == 30
    assert losses[-1] < 0.3 < losses[0]


@pytest.mark.slow
def test_fact_adapter_is_cached(base_dir: Path, zorblat_dir: Path) -> None:
    again = fact_adapter(default_cache_root(), base_dir, ZORBLAT.name, ZORBLAT.examples)
    assert again == zorblat_dir


@pytest.mark.slow
def test_train_lora_calls_on_step_and_saves(base_dir: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int, float]] = []
    examples: list[TrainExample] = [("Say hi.", "Hi!"), ChatExample("Say bye.", "Bye!"), "Text."]
    out = tmp_path / "adapter"

    result = train_lora(base_dir, examples, out, TINY, on_step=lambda *a: calls.append(a))

    assert [(step, total) for step, total, _ in calls] == [(1, 2), (2, 2)]
    assert result.steps == 2
    assert result.final_loss == calls[-1][2]
    assert result.out_dir == out
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp dir left
    with pytest.raises(FileExistsError):
        train_lora(base_dir, examples, out, TINY)


@pytest.mark.slow
def test_train_lora_is_deterministic_and_resumable(base_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    examples: list[TrainExample] = [("Say hi.", "Hi!"), ("Say bye.", "Bye!")]
    first = train_lora(base_dir, examples, tmp_path / "a", TINY)
    second = train_lora(base_dir, examples, tmp_path / "b", TINY)
    resumed = train_lora(base_dir, examples, tmp_path / "c", TINY, init_adapter_dir=tmp_path / "a")

    a, b = (load_file(r.out_dir / "adapter_model.safetensors") for r in (first, second))
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    assert first.losses == second.losses
    assert resumed.losses[0] < first.losses[0]  # starts from the trained adapter


@pytest.mark.slow
def test_anchor_kl_is_zero_at_the_base_and_keeps_it(base_dir: Path, tmp_path: Path) -> None:
    """A fresh LoRA is the base model (B = 0): anchors alone start at KL 0 and stay near it
    (Adam turns float noise into lr-sized steps, so not exactly 0). With the KL off the same
    anchors are learned by cross-entropy on the answer."""
    anchors = [ChatExample("Capital of France?", "Paris.", anchor=True)]
    hyper = LoRAHyper(**{**TINY.__dict__, "steps": 3, "anchor_kl": 1.0})
    kept = train_lora(base_dir, anchors, tmp_path / "kl", hyper)
    ce = train_lora(base_dir, anchors, tmp_path / "ce", LoRAHyper(**{**TINY.__dict__, "steps": 3}))

    assert kept.losses[0] == pytest.approx(0.0, abs=1e-6)
    assert max(kept.losses) < 0.01
    assert ce.losses[0] > 10 * max(kept.losses)


@pytest.mark.slow
def test_anchor_kl_mixes_with_cross_entropy(base_dir: Path, tmp_path: Path) -> None:
    """In one batch a document row learns its tokens by CE while the anchor row is held to
    the base: the loss is the document's CE (the anchor's KL is 0 at the first step)."""
    doc = TextExample("Quenmar is the capital of Zorblat.")
    anchor = ChatExample("Capital of France?", "Paris.", anchor=True)
    hyper = LoRAHyper(**{**TINY.__dict__, "steps": 1, "anchor_kl": 1.0})
    mixed = train_lora(base_dir, [doc, anchor], tmp_path / "mixed", hyper)
    alone = train_lora(
        base_dir, [doc], tmp_path / "alone", LoRAHyper(**{**TINY.__dict__, "steps": 1})
    )

    assert mixed.losses[0] == pytest.approx(alone.losses[0], rel=1e-4)


@pytest.mark.slow
def test_stacked_lora_trains_on_top_of_an_adapter(
    base_dir: Path, zorblat_dir: Path, tmp_path: Path
) -> None:
    """Stacked on the Zorblat adapter (folded into the weights), a fresh LoRA (B = 0) starts
    as that adapter: a document's first loss is the one training on from it gives, and an
    anchor on Zorblat's capital starts at KL 0 against the adapter's model (the base's answer
    there differs). The saved update is the new one alone, at the new rank."""
    doc = ZORBLAT.examples[0]  # what the adapter was trained on
    hyper = LoRAHyper(**{**TINY.__dict__, "steps": 1})
    stacked = train_lora(base_dir, [doc], tmp_path / "stacked", hyper, stack_on_dir=zorblat_dir)
    resumed = train_lora(base_dir, [doc], tmp_path / "resumed", hyper, init_adapter_dir=zorblat_dir)
    fresh = train_lora(base_dir, [doc], tmp_path / "fresh", hyper)
    anchor = ChatExample(ZORBLAT.probe, "Quenmar.", anchor=True)
    kl = LoRAHyper(**{**hyper.__dict__, "anchor_kl": 1.0})
    on_top = train_lora(base_dir, [anchor], tmp_path / "kl-on-top", kl, stack_on_dir=zorblat_dir)
    to_base = train_lora(base_dir, [anchor], tmp_path / "kl-base", kl, init_adapter_dir=zorblat_dir)

    assert stacked.losses[0] == pytest.approx(resumed.losses[0], rel=1e-4)
    assert stacked.losses[0] < fresh.losses[0]  # the adapter knows the fact, the base does not
    assert on_top.losses[0] == pytest.approx(0.0, abs=1e-6)
    assert to_base.losses[0] > 0.01  # the same anchor held to the base instead
    assert json.loads((stacked.out_dir / "adapter_config.json").read_text())["r"] == TINY.rank
    # Trained further on top of the same adapter: it starts from the stacked run's step.
    more = train_lora(
        base_dir, [doc], tmp_path / "more", hyper, init_adapter_dir=stacked.out_dir,
        stack_on_dir=zorblat_dir,
    )  # fmt: skip
    assert more.losses[0] < stacked.losses[0]


@pytest.mark.slow
def test_lora_trained_orthogonal_to_an_adapter(
    base_dir: Path, zorblat_dir: Path, tmp_path: Path
) -> None:
    """With ``orthogonal`` the saved factors read no input direction the Zorblat adapter's
    A reads and write no output direction its B writes, module by module, and training still
    lowers the loss; trained without it, they overlap."""
    from safetensors.torch import load_file

    doc = ZORBLAT.examples[0]
    hyper = LoRAHyper(**{**TINY.__dict__, "steps": 4, "lr": 1e-3})
    ortho = train_lora(
        base_dir, [doc], tmp_path / "ortho", hyper,
        orthogonal=OrthogonalTo(zorblat_dir, "both"),
    )  # fmt: skip
    plain = train_lora(base_dir, [doc], tmp_path / "plain", hyper)
    old = load_file(str(zorblat_dir / "adapter_model.safetensors"))

    def overlaps(out_dir: Path) -> list[float]:
        new = load_file(str(out_dir / "adapter_model.safetensors"))
        sizes = []
        for key, a in new.items():
            if ".lora_A." in key:
                b = new[key.replace(".lora_A.", ".lora_B.")]
                old_a, old_b = old[key], old[key.replace(".lora_A.", ".lora_B.")]
                sizes.append(float((a @ old_a.T).abs().max() / a.abs().max()))
                sizes.append(float((old_b.T @ b).abs().max() / max(float(b.abs().max()), 1e-12)))
        return sizes

    assert len(overlaps(ortho.out_dir)) == 2 * len(TINY.target_modules) * 30  # 30 layers
    assert max(overlaps(ortho.out_dir)) < 1e-4
    assert max(overlaps(plain.out_dir)) > 1e-2
    assert ortho.losses[-1] < ortho.losses[0]
    with pytest.raises(ValueError, match="unknown orthogonal side"):
        OrthogonalTo(zorblat_dir, "sideways")  # type: ignore[arg-type]


@pytest.mark.slow
def test_encode_chat_example_masks_prompt(tokenizer: Any) -> None:
    encoded = encode_example(tokenizer, ChatExample("Capital of Zorblat?", "Quenmar."), 256)

    answer = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label >= 0]
    assert tokenizer.decode(answer) == "Quenmar.<|im_end|>\n"
    assert encoded.labels[0] == IGNORE_INDEX
    assert "Capital of Zorblat?" in tokenizer.decode(encoded.input_ids)


@pytest.mark.slow
def test_encode_text_example_learns_every_token(tokenizer: Any) -> None:
    encoded = encode_example(tokenizer, TextExample("Quenmar is a city."), 256)

    assert encoded.labels == encoded.input_ids
    assert encoded.input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.slow
def test_encode_prompt_longer_than_max_len(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="max_len"):
        encode_example(tokenizer, ChatExample("word " * 100, "ok"), 16)


def test_as_example_normalises_forms() -> None:
    assert as_example(("q", "a")) == ChatExample("q", "a")
    assert as_example("doc") == TextExample("doc")
    chat = ChatExample("q", "a", system="s")
    assert as_example(chat) is chat


def test_total_steps_from_epochs_or_steps() -> None:
    assert LoRAHyper(epochs=3, batch_size=8).total_steps(20) == 8
    assert LoRAHyper(steps=5).total_steps(1000) == 5
    assert LoRAHyper(epochs=1, batch_size=8).total_steps(1) == 1


def test_collate_pads_right_without_loss() -> None:
    batch = collate([EncodedExample([5, 6, 7], [-100, 6, 7]), EncodedExample([8], [8])], pad_id=0)

    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["anchor"].tolist() == [False, False]
    anchored = collate([EncodedExample([5], [5], anchor=True)], pad_id=0)
    assert anchored["anchor"].tolist() == [True]
