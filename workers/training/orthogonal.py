"""Training a LoRA update orthogonal to an earlier one (O-LoRA's idea, as a hard constraint).

A LoRA update is ``s * B @ A`` per target module: ``A`` (r x in) reads ``r`` directions of the
module's input, ``B`` (out x r) writes ``r`` directions of its output. An update summed with an
earlier one (`workers.training.merge`) disturbs what the earlier one learned where the two
share directions. Wang et al., "Orthogonal Subspace Learning for Language Model Continual
Learning" (O-LoRA, 2023) penalise the overlap of the new ``A`` with the earlier ones; here it
is removed exactly instead: after every optimizer step (and at the start) each module's new
factors are projected onto the orthogonal complement of the earlier adapter's directions, on
the input side (``A``'s rows), the output side (``B``'s columns) or both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from workers.training.adapter_files import WEIGHTS

if TYPE_CHECKING:
    import torch

Side = Literal["in", "out", "both"]
SIDES: tuple[Side, ...] = ("in", "out", "both")


@dataclass(frozen=True)
class OrthogonalTo:
    """Keep a new LoRA orthogonal to the adapter in ``adapter_dir`` on ``side`` of each
    module; ``name`` is that adapter's name where the caller has one (events, lineage).

    Raises:
        ValueError: an unknown side.
    """

    adapter_dir: Path
    side: Side = "in"
    name: str = ""

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"unknown orthogonal side {self.side!r} ({' | '.join(SIDES)})")


def module_name(key: str) -> str:
    """The target module a LoRA tensor belongs to, the same for a saved adapter's key
    (``...q_proj.lora_A.weight``) and a PEFT model's parameter
    (``...q_proj.lora_A.default.weight``)."""
    for factor in (".lora_A.", ".lora_B."):
        if factor in key:
            return key.split(factor)[0]
    raise ValueError(f"not a LoRA factor: {key}")


def _factor(key: str) -> str:
    return "A" if ".lora_A." in key else "B"


def orthonormal_basis(directions: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (columns) of the span of ``directions``' columns (float64)."""
    import torch

    q, r = torch.linalg.qr(directions.double())
    keep = r.diagonal().abs() > 1e-10 * max(1.0, float(r.diagonal().abs().max()))
    basis: torch.Tensor = q[:, keep]
    return basis


@dataclass
class _Module:
    a: torch.Tensor  # the new adapter's lora_A parameter (r x in)
    b: torch.Tensor  # its lora_B parameter (out x r)
    q_in: torch.Tensor | None  # basis of the earlier A's row space (in x k)
    q_out: torch.Tensor | None  # basis of the earlier B's column space (out x k)


class OrthogonalProjector:
    """Keeps a model's trainable LoRA factors orthogonal to an earlier adapter's, module by
    module (`project`, called after every optimizer step)."""

    def __init__(self, modules: list[_Module]) -> None:
        if not modules:
            raise ValueError("the earlier adapter shares no target module with the model")
        self.modules = modules

    @classmethod
    def build(
        cls, parameters: Iterable[tuple[str, torch.Tensor]], to: OrthogonalTo
    ) -> OrthogonalProjector:
        """From a PEFT model's ``named_parameters()`` and the earlier adapter (``to``, its
        side checked when it was made).

        Raises:
            ValueError: no module of the earlier adapter in the model.
        """
        from safetensors.torch import load_file

        side = to.side
        earlier = load_file(str(Path(to.adapter_dir) / WEIGHTS))
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for name, param in parameters:
            if param.requires_grad and (".lora_A." in name or ".lora_B." in name):
                factors.setdefault(module_name(name), {})[_factor(name)] = param
        old: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in earlier.items():
            old.setdefault(module_name(key), {})[_factor(key)] = tensor
        modules = []
        for name, new in sorted(factors.items()):
            if name not in old or set(new) != {"A", "B"}:
                continue
            device = new["A"].device  # the bases live beside the factors they project
            q_in = q_out = None
            if side in ("in", "both"):
                q_in = orthonormal_basis(old[name]["A"].T).to(device)
            if side in ("out", "both"):
                q_out = orthonormal_basis(old[name]["B"]).to(device)
            modules.append(_Module(new["A"], new["B"], q_in, q_out))
        return cls(modules)

    def project(self) -> None:
        """Removes every new factor's component along the earlier adapter's directions."""
        import torch

        with torch.no_grad():
            for m in self.modules:
                if m.q_in is not None:
                    q = m.q_in.to(m.a.dtype)
                    m.a.sub_((m.a @ q) @ q.T)
                if m.q_out is not None:
                    q = m.q_out.to(m.b.dtype)
                    m.b.sub_(q @ (q.T @ m.b))

    def overlap(self) -> float:
        """The largest norm, over modules, of a new factor's component along the earlier
        directions (0 after `project`, up to float error)."""
        import torch

        worst = 0.0
        with torch.no_grad():
            for m in self.modules:
                if m.q_in is not None:
                    worst = max(worst, float(torch.linalg.norm(m.a.double() @ m.q_in)))
                if m.q_out is not None:
                    worst = max(worst, float(torch.linalg.norm(m.q_out.T @ m.b.double())))
        return worst
