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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
        cls, model: Any, encoded: Sequence[EncodedExample], device: str
    ) -> AnchorReference | None:
        """The base's final hidden states of every anchor in ``encoded`` (a PEFT model); None
        when there are no anchors or the model's logits are not its output layer's."""
        import torch

        anchors = [i for i, example in enumerate(encoded) if example.anchor]
        base = model.get_base_model()
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        if not anchors or decoder is None:
            return None
        hidden: dict[int, torch.Tensor] = {}
        with torch.no_grad(), model.disable_adapter():
            for i in anchors:
                ids = torch.tensor([encoded[i].input_ids], device=device)
                hidden[i] = decoder(input_ids=ids).last_hidden_state[0]
            probe = anchors[0]
            ids = torch.tensor([encoded[probe].input_ids], device=device)
            full = model(input_ids=ids).logits[0].float()
        reference = cls(model, hidden)
        cached = reference.logits([probe], full.size(0))[0].float()
        error = float((cached - full).abs().max())
        if error > ATOL:
            logger.warning(
                "anchor reference: cached logits differ from the forward pass by %.2g; "
                "computing the base's distributions every step instead",
                error,
            )
            return None
        return reference

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
