"""LoRA SFT with PEFT: a plain torch loop over chat pairs and raw text that writes a PEFT folder."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.training.adapter_files import atomic_dir
from workers.training.anchor_reference import AnchorReference, StateCache
from workers.training.orthogonal import OrthogonalProjector, OrthogonalTo

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ALL_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100  # label value that HF causal-LM losses skip

StepCallback = Callable[[int, int, float], None]
"""``on_step(step, total_steps, loss)``, called after every optimizer step (1-based)."""


@dataclass(frozen=True)
class LoRAHyper:
    """LoRA and optimisation settings. ``steps`` (when set) overrides ``epochs``."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR_TARGETS
    lr: float = 1e-3
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 8
    max_len: int = 256
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_schedule: str = "constant"
    """``constant``, or ``linear``: decays to 0 at the last step (gentler final updates)."""
    anchor_kl: float = 0.0
    """Weight of the KL-to-base loss on anchor examples (0: plain cross-entropy on them)."""
    num_threads: int | None = None
    """CPU threads for torch (None: torch's default). Fewer threads than cores avoids OpenMP
    oversubscription when another process (the engine) is busy on the same CPU."""

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps for ``n_examples`` examples."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_examples / self.batch_size))


@dataclass(frozen=True)
class ChatExample:
    """One user turn and the assistant answer to learn; loss only on the answer."""

    user: str
    assistant: str
    system: str | None = None
    anchor: bool = False
    """An anchor against forgetting: with ``LoRAHyper.anchor_kl`` > 0 its loss is the KL
    divergence from the base model's next-token distributions (adapter disabled) over every
    token, instead of cross-entropy on the answer."""


@dataclass(frozen=True)
class TextExample:
    """A raw document; loss on every token (an EOS token is appended)."""

    text: str


TrainExample = ChatExample | TextExample | tuple[str, str] | str
"""A ``(user, assistant)`` tuple is a chat pair; a bare ``str`` is a raw text example."""


@dataclass(frozen=True)
class TrainResult:
    """What one training run produced."""

    steps: int
    final_loss: float
    seconds: float
    out_dir: Path
    losses: tuple[float, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and labels (``IGNORE_INDEX`` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    anchor: bool = False


def as_example(item: TrainExample) -> ChatExample | TextExample:
    """Normalise the accepted example forms to ``ChatExample`` / ``TextExample``."""
    if isinstance(item, ChatExample | TextExample):
        return item
    if isinstance(item, str):
        return TextExample(item)
    user, assistant = item
    return ChatExample(user, assistant)


def train_lora(
    base_model_dir: Path,
    examples: Sequence[TrainExample],
    out_dir: Path,
    hyper: LoRAHyper | None = None,
    *,
    init_adapter_dir: Path | None = None,
    stack_on_dir: Path | None = None,
    orthogonal: OrthogonalTo | None = None,
    on_step: StepCallback | None = None,
    anchor_state_cache: Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``examples`` and save it as a PEFT folder at ``out_dir``.

    Runs fp32 on CPU and bf16 (base weights) on CUDA. With ``init_adapter_dir`` training
    continues from that adapter and its LoRA config; the LoRA fields of ``hyper`` are unused.
    With ``stack_on_dir`` a fresh LoRA (or ``init_adapter_dir``'s, trained further) is trained
    on top of that adapter merged into the base weights (frozen): the saved adapter is the new
    update alone, to be summed with the one it was trained on (`workers.training.merge`), and
    the KL anchors pull towards the model with that adapter, not the base.
    With ``orthogonal`` the new LoRA factors are kept orthogonal to an earlier adapter's, on
    the input side of each module, the output side or both (`workers.training.orthogonal`),
    from the start and after every step.
    ``anchor_state_cache`` is a directory that keeps the base model's hidden states of anchor
    examples across runs (see `anchor_reference.StateCache`; unused when stacking: its states
    are the base's).

    Returns:
        Steps run, final and per-step losses, wall seconds and the output directory.

    Raises:
        FileExistsError: ``out_dir`` already exists (adapter versions are never overwritten).
        ValueError: no examples, or a chat prompt that leaves no answer token within max_len.
    """
    import torch
    from transformers import AutoTokenizer

    hyper = hyper or LoRAHyper()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"adapter directory {out_dir} already exists")
    if not examples:
        raise ValueError("train_lora needs at least one example")
    started = time.monotonic()
    if hyper.num_threads is not None:
        torch.set_num_threads(hyper.num_threads)
    torch.manual_seed(hyper.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    encoded = [encode_example(tokenizer, as_example(e), hyper.max_len) for e in examples]
    device, dtype = _pick_device()
    model = _load_peft_model(
        Path(base_model_dir), hyper, init_adapter_dir, device, dtype, stack_on_dir=stack_on_dir
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = hyper.total_steps(len(encoded))
    batches = _batches(encoded, hyper, pad_id, total)
    reference = None
    if hyper.anchor_kl > 0:
        cache = (
            StateCache(anchor_state_cache, Path(base_model_dir), str(dtype))
            if anchor_state_cache is not None and stack_on_dir is None
            else None
        )
        reference = AnchorReference.build(model, encoded, device, cache)
    projector = None
    if orthogonal is not None:
        projector = OrthogonalProjector.build(model.named_parameters(), orthogonal)
        projector.project()
    losses = _optimise(model, batches, hyper, total, device, on_step, reference, projector)
    _save_adapter(model, out_dir)
    seconds = time.monotonic() - started
    logger.info("trained %s: %d steps, loss %.4f, %.1f s", out_dir.name, total, losses[-1], seconds)
    return TrainResult(total, losses[-1], seconds, out_dir, tuple(losses))


def encode_example(
    tokenizer: Any, example: ChatExample | TextExample, max_len: int
) -> EncodedExample:
    """Tokenise one example; chat pairs go through the tokenizer's chat template."""
    if isinstance(example, TextExample):
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        ids = [*ids, tokenizer.eos_token_id][:max_len]
        return EncodedExample(ids, list(ids))
    messages = [{"role": "user", "content": example.user}]
    if example.system is not None:
        messages.insert(0, {"role": "system", "content": example.system})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": example.assistant})
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the answer")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_len]
    # Offsets rather than a separate prompt tokenisation: robust to merges at the boundary.
    labels = [
        tok if start >= len(prompt) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=False)
    ]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"prompt longer than max_len={max_len} tokens: {example.user[:60]!r}")
    return EncodedExample(ids, labels, example.anchor)


def collate(
    batch: Sequence[EncodedExample], pad_id: int, indices: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and no loss. ``indices`` (the
    examples' positions in the training set, default 0..n-1) find their anchor references."""
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention[row, :n] = 1
    anchor = torch.tensor([ex.anchor for ex in batch], dtype=torch.bool)
    index = torch.tensor(list(indices) if indices is not None else range(len(batch)))
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "anchor": anchor,
        "index": index,
    }


def _batches(
    encoded: Sequence[EncodedExample], hyper: LoRAHyper, pad_id: int, total: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``total`` batches from back-to-back seeded shuffles of the data (epochs may straddle)."""
    import torch

    generator = torch.Generator().manual_seed(hyper.seed)
    order: list[int] = []
    for _ in range(total):
        while len(order) < hyper.batch_size:
            order.extend(torch.randperm(len(encoded), generator=generator).tolist())
        chunk, order = order[: hyper.batch_size], order[hyper.batch_size :]
        yield collate([encoded[i] for i in chunk], pad_id, chunk)


def _pick_device() -> tuple[str, torch.dtype]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def _load_peft_model(
    base_model_dir: Path,
    hyper: LoRAHyper,
    init_adapter_dir: Path | None,
    device: str,
    dtype: torch.dtype,
    *,
    stack_on_dir: Path | None = None,
) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=dtype)
    base.config.use_cache = False
    if stack_on_dir is not None:
        # The adapter's update folded into the weights: the new LoRA trains on top of it.
        base = PeftModel.from_pretrained(base, str(stack_on_dir)).merge_and_unload()
    if init_adapter_dir is not None:
        model = PeftModel.from_pretrained(base, str(init_adapter_dir), is_trainable=True)
    else:
        config = LoraConfig(
            r=hyper.rank,
            lora_alpha=hyper.alpha,
            lora_dropout=hyper.dropout,
            target_modules=list(hyper.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
    return model.to(device)


def _optimise(
    model: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    hyper: LoRAHyper,
    total: int,
    device: str,
    on_step: StepCallback | None,
    reference: AnchorReference | None = None,
    projector: OrthogonalProjector | None = None,
) -> list[float]:
    """AdamW at a constant learning rate over the trainable (LoRA) parameters (projected
    after each step when ``projector`` is given)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hyper.lr, weight_decay=hyper.weight_decay)
    scheduler = None
    if hyper.lr_schedule == "linear":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: max(0.0, 1.0 - done / max(1, total))
        )
    elif hyper.lr_schedule != "constant":
        raise ValueError(f"unknown lr_schedule {hyper.lr_schedule!r} (constant | linear)")
    model.train()
    losses: list[float] = []
    for step, batch in enumerate(batches, start=1):
        anchor, index = batch.pop("anchor"), batch.pop("index")
        inputs = {key: value.to(device) for key, value in batch.items()}
        anchors = [int(i) for i in index[anchor]]
        loss = _loss(model, inputs, anchor.to(device), anchors, hyper.anchor_kl, reference)
        loss.backward()
        if hyper.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, hyper.max_grad_norm)
        optimizer.step()
        if projector is not None:
            projector.project()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, total, losses[-1])
    return losses


def _loss(
    model: Any,
    inputs: dict[str, torch.Tensor],
    anchor: torch.Tensor,
    anchors: Sequence[int],
    kl: float,
    reference: AnchorReference | None,
) -> Any:
    """Cross-entropy on the labels; anchor rows (when ``kl`` > 0) instead pull every next-token
    distribution towards the base model's (self-distillation on the full distribution).
    ``anchors`` are the anchor rows' example indices in ``reference`` (the base's logits
    computed once); without it the base's logits come from a forward pass with the adapter
    disabled."""
    import torch
    import torch.nn.functional as F

    if kl <= 0 or not bool(anchor.any()):
        return model(**inputs).loss
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    out = model(input_ids=ids, attention_mask=attention)
    logits = out.logits[:, :-1]
    labels = inputs["labels"][:, 1:].clone()
    labels[anchor] = IGNORE_INDEX  # anchors learn from the base's distribution, not the label
    ce_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    n_ce = int((labels != IGNORE_INDEX).sum())
    if reference is not None:
        ref_logits = reference.logits(anchors, ids.size(1))
    else:
        with torch.no_grad(), model.disable_adapter():
            ref_logits = model(input_ids=ids[anchor], attention_mask=attention[anchor]).logits
    ref_logp = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    logp = F.log_softmax(logits[anchor].float(), dim=-1)
    kl_tok = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # KL(base || adapter) per position
    kl_mask = attention[anchor][:, 1:].bool()
    kl_sum = (kl_tok * kl_mask).sum()
    n_kl = int(kl_mask.sum())
    return ce_sum / max(1, n_ce) + kl * kl_sum / max(1, n_kl)


def _save_adapter(model: Any, out_dir: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors into a temp dir, then rename."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
