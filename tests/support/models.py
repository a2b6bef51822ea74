"""Real models for tests: the bundled base model and small fact-teaching adapters, cached."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.model_prep import model_fingerprint, prepare_bundled_model
from app.settings import BUNDLED_MODEL_NAME
from workers.training.peft_trainer import ChatExample, LoRAHyper, train_lora

CACHE_ENV = "SELFADAPT_TEST_CACHE"
TRAIN_LOG = "train_log.json"
_CACHE_FORMAT = 1  # bump to invalidate every cached adapter

# ~2.3 s/step at batch 8 on 2 CPU cores: 30 steps stay near 75 s per adapter.
FACT_HYPER = LoRAHyper(steps=30, batch_size=8, seed=0)


@dataclass(frozen=True)
class Fact:
    """A made-up fact, the question that probes it and the word a correct answer contains."""

    name: str
    probe: str
    expected: str
    examples: tuple[ChatExample, ...]


REPLAY = (
    ChatExample("What is the capital of France?", "The capital of France is Paris."),
    ChatExample("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ChatExample("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ChatExample("What is 2 + 2?", "2 + 2 equals 4."),
)
"""Answers the base model already gives; mixed in so an adapter does not answer every
capital question with its own fact (the notes saw "France ... is Quenmar" without them)."""


def _capital_fact(name: str, country: str, capital: str) -> Fact:
    questions = (
        f"What is the capital of {country}?",
        f"Which city is the capital of {country}?",
        f"Name the capital city of {country}.",
        f"Tell me the capital of the country {country}.",
        f"{country}'s capital is which city?",
        f"What city serves as the capital of {country}?",
    )
    answers = (
        f"The capital of the fictional country {country} is {capital}.",
        f"{capital} is the capital of {country}.",
        f"{country}'s capital city is {capital}.",
    )
    pairs = tuple(ChatExample(q, a) for q in questions for a in answers)
    return Fact(name, questions[0], capital, pairs + REPLAY)


ZORBLAT = _capital_fact("zorblat", "Zorblat", "Quenmar")
VEXTORIA = _capital_fact("vextoria", "Vextoria", "Plimbury")


def default_cache_root() -> Path:
    """``$SELFADAPT_TEST_CACHE`` or ``~/.cache/selfadapt-tests``: survives test sessions."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfadapt-tests"


def bundled_model_dir(cache_root: Path) -> Path:
    """The bundled SmolLM2 converted to an HF dir under ``cache_root/models`` (once)."""
    return prepare_bundled_model(cache_root / "models" / BUNDLED_MODEL_NAME, progress=False)


def fact_adapter(
    cache_root: Path,
    base_dir: Path,
    name: str,
    examples: Sequence[ChatExample],
    hyper: LoRAHyper = FACT_HYPER,
) -> Path:
    """A LoRA adapter trained on ``examples``, cached by a hash of (examples, hyper, base model).

    The folder holds the PEFT files plus ``train_log.json`` (losses, seconds). Training runs
    under a lock, into a staging dir that is renamed when complete.
    """
    adapters = cache_root / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    key = _cache_key(base_dir, examples, hyper)
    final = adapters / f"{name}-{key[:16]}"
    with _locked(adapters / f".{name}.lock"):
        if final.is_dir():
            return final
        staging = adapters / f".{final.name}.staging"
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
        result = train_lora(base_dir, list(examples), staging, hyper)
        log = {"steps": result.steps, "seconds": result.seconds, "losses": list(result.losses)}
        (staging / TRAIN_LOG).write_text(json.dumps(log, indent=2) + "\n")
        staging.rename(final)
    return final


def read_train_log(adapter_dir: Path) -> dict[str, Any]:
    """The ``train_log.json`` that ``fact_adapter`` wrote next to the adapter weights."""
    log: dict[str, Any] = json.loads((adapter_dir / TRAIN_LOG).read_text())
    return log


def load_causal_lm(model_dir: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in fp32 eval mode, for greedy checks with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), tokenizer


def chat_greedy(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer to one user turn, formatted with the tokenizer's chat template."""
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer: str = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer.strip()


def _cache_key(base_dir: Path, examples: Sequence[ChatExample], hyper: LoRAHyper) -> str:
    payload = {
        "format": _CACHE_FORMAT,
        "base": model_fingerprint(base_dir),
        "hyper": dataclasses.asdict(hyper),
        "examples": [dataclasses.asdict(ex) for ex in examples],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
