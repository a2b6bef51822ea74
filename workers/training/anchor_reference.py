"""The base model's side of the KL anchors, computed once per training run instead of per step.

An anchor example's loss is KL(base || adapter) over every next-token distribution, and the
base side used to be a second forward pass through the whole model (adapter disabled) on every
step with anchors in it. The base never changes during a run and anchors repeat: a 100-step
pipeline job draws its 20 anchors ~530 times. So `AnchorReference` runs the base decoder once
per anchor before training, keeps its final hidden states (tokens x hidden size, ~0.6 MB for a
256-token anchor of the bundled model) and turns them into logits with the output layer alone
each step: one matmul instead of every layer.

Exact, not an approximation: the output layer is applied with the adapter disabled, and
`build` checks one anchor against the full forward pass; a model whose logits are more than
the output layer of the decoder's last hidden state (e.g. soft-capped) gets no cache and the
trainer falls back to the per-step forward pass.

The hidden states depend only on the base model and the anchor's tokens, and every job draws
its anchors from the same pool, so `StateCache` keeps them on disk across runs (one small
safetensors file per anchor under a fingerprint of the model's files and dtype): a job whose
anchors were all seen before skips the base forward passes (measured: ~3.5 s of a 100-step
job's fixed cost on the 2-core box). A cached state that fails the forward-pass check is
recomputed with the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from workers.training.peft_trainer import EncodedExample

logger = logging.getLogger(__name__)

ATOL = 1e-3
"""Largest logit difference between the cached path and the full forward pass (float32 on CPU
agree to ~1e-5; bf16 on CUDA rounds differently)."""


class AnchorReference:
    """Base-model logits for the anchor examples of one run, by example index."""

    def __init__(self, model: Any, hidden: dict[int, torch.Tensor]) -> None:
        self._model = model
        self._hidden = hidden

    def __len__(self) -> int:
        return len(self._hidden)

    @classmethod
    def build(
        cls,
        model: Any,
        encoded: Sequence[EncodedExample],
        device: str,
        cache: StateCache | None = None,
    ) -> AnchorReference | None:
        """The base's final hidden states of every anchor in ``encoded`` (a PEFT model), read
        from ``cache`` where it has them; None when there are no anchors or the model's logits
        are not its output layer's."""
        import torch

        anchors = [i for i, example in enumerate(encoded) if example.anchor]
        base = model.get_base_model()
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        if not anchors or decoder is None:
            return None

        def states(use_cache: bool) -> dict[int, torch.Tensor]:
            hidden: dict[int, torch.Tensor] = {}
            with torch.no_grad(), model.disable_adapter():
                for i in anchors:
                    tokens = encoded[i].input_ids
                    found = cache.get(tokens, device) if cache is not None and use_cache else None
                    if found is None:
                        ids = torch.tensor([tokens], device=device)
                        found = decoder(input_ids=ids).last_hidden_state[0]
                        if cache is not None:
                            cache.put(tokens, found)
                    hidden[i] = found
            return hidden

        probe = anchors[0]
        with torch.no_grad(), model.disable_adapter():
            ids = torch.tensor([encoded[probe].input_ids], device=device)
            full = model(input_ids=ids).logits[0].float()
        reference = cls(model, states(use_cache=True))
        error = reference._error(probe, full)
        if error > ATOL and cache is not None:
            logger.warning("anchor reference: cached states are off by %.2g; recomputing", error)
            reference = cls(model, states(use_cache=False))
            error = reference._error(probe, full)
        if error > ATOL:
            logger.warning(
                "anchor reference: cached logits differ from the forward pass by %.2g; "
                "computing the base's distributions every step instead",
                error,
            )
            return None
        return reference

    def _error(self, index: int, full: torch.Tensor) -> float:
        cached = self.logits([index], full.size(0))[0].float()
        return float((cached - full).abs().max())

    def logits(self, indices: Sequence[int], width: int) -> torch.Tensor:
        """``(len(indices), width, vocab)`` base logits of those anchors, right-padded (the
        padded positions' logits are those of a zero hidden state: mask them out)."""
        import torch

        rows = [self._hidden[i] for i in indices]
        first = rows[0]
        states = torch.zeros(
            (len(rows), width, first.size(-1)), dtype=first.dtype, device=first.device
        )
        for row, h in enumerate(rows):
            n = min(width, h.size(0))
            states[row, :n] = h[:n]
        with torch.no_grad(), self._model.disable_adapter():
            out: torch.Tensor = self._model.get_base_model().get_output_embeddings()(states)
        return out


class StateCache:
    """The base decoder's final hidden states of anchors, on disk: one safetensors file per
    anchor, named by the hash of its token ids, under ``root/<fingerprint of model + dtype>``.
    Written to a temp file and renamed, so readers never see half a file."""

    def __init__(self, root: Path, model_dir: Path, dtype: str) -> None:
        self.dir = Path(root) / model_fingerprint(model_dir, dtype)

    def _path(self, tokens: Sequence[int]) -> Path:
        digest = hashlib.sha256(",".join(map(str, tokens)).encode()).hexdigest()[:32]
        return self.dir / f"{digest}.safetensors"

    def get(self, tokens: Sequence[int], device: str) -> torch.Tensor | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(tokens)
        if not path.is_file():
            return None
        try:
            state = load_file(path, device=device)["hidden"]
        except (SafetensorError, KeyError, OSError) as e:
            logger.warning("anchor state cache: unreadable %s (%s); recomputing", path.name, e)
            return None
        if state.dim() != 2 or state.size(0) != len(tokens):
            return None
        return state

    def put(self, tokens: Sequence[int], state: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._path(tokens)
        tmp: str | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.dir)
            os.close(fd)
            save_file({"hidden": state.detach().contiguous().cpu()}, tmp)
            os.replace(tmp, path)
        except OSError as e:  # a full or read-only disk costs speed, never the training run
            logger.warning("anchor state cache: cannot write %s (%s)", path, e)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def model_fingerprint(model_dir: Path, dtype: str) -> str:
    """Names a model's weights without reading them: its config and every file's name, size
    and modification time, plus the dtype the states are computed in."""
    model_dir = Path(model_dir)
    h = hashlib.sha256(dtype.encode())
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    config = model_dir / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    return h.hexdigest()[:16]
