"""Orthogonal LoRA updates: the projection removes exactly the earlier adapter's directions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workers.training.adapter_files import WEIGHTS
from workers.training.orthogonal import (
    OrthogonalProjector,
    OrthogonalTo,
    module_name,
    orthonormal_basis,
)

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


def _earlier(tmp_path: Path, a: torch.Tensor, b: torch.Tensor, module: str = MODULE) -> Path:
    save_file({f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}, str(tmp_path / WEIGHTS))
    return tmp_path


def _params(rank: int = 3, d_in: int = 12, d_out: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        f"{MODULE}.lora_A.default.weight": torch.randn(rank, d_in, generator=g).requires_grad_(),
        f"{MODULE}.lora_B.default.weight": torch.randn(d_out, rank, generator=g).requires_grad_(),
    }


def test_module_name_of_saved_keys_and_parameters() -> None:
    assert module_name(f"{MODULE}.lora_A.weight") == MODULE
    assert module_name(f"{MODULE}.lora_B.default.weight") == MODULE
    with pytest.raises(ValueError, match="not a LoRA factor"):
        module_name(f"{MODULE}.weight")


def test_basis_drops_dependent_directions() -> None:
    v = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])  # two copies of one direction
    assert orthonormal_basis(torch.cat([v, v], dim=1)).shape == (3, 1)


@pytest.mark.parametrize("side", ["in", "out", "both"])
def test_projection_removes_the_earlier_directions_only(tmp_path: Path, side: str) -> None:
    g = torch.Generator().manual_seed(0)
    old_a, old_b = torch.randn(2, 12, generator=g), torch.randn(10, 2, generator=g)
    params = _params()
    a, b = params[f"{MODULE}.lora_A.default.weight"], params[f"{MODULE}.lora_B.default.weight"]
    a0, b0 = a.detach().clone(), b.detach().clone()
    to = OrthogonalTo(_earlier(tmp_path, old_a, old_b), side)  # type: ignore[arg-type]
    projector = OrthogonalProjector.build(params.items(), to)
    assert projector.overlap() > 0.1

    projector.project()

    assert projector.overlap() < 1e-5
    q_in, q_out = orthonormal_basis(old_a.T).float(), orthonormal_basis(old_b).float()
    if side in ("in", "both"):
        assert (a @ old_a.T).abs().max() < 1e-5  # A's rows read nothing the old A read
        assert torch.allclose(a, a0 - (a0 @ q_in) @ q_in.T, atol=1e-6)
    else:
        assert torch.equal(a, a0)
    if side in ("out", "both"):
        assert (old_b.T @ b).abs().max() < 1e-5  # B writes nothing the old B wrote
        assert torch.allclose(b, b0 - q_out @ (q_out.T @ b0), atol=1e-6)
    else:
        assert torch.equal(b, b0)


def test_unknown_sides_and_foreign_adapters_are_refused(tmp_path: Path) -> None:
    earlier = _earlier(tmp_path, torch.randn(2, 12), torch.randn(10, 2), module="other.v_proj")
    with pytest.raises(ValueError, match="no target module"):
        OrthogonalProjector.build(_params().items(), OrthogonalTo(earlier, "in"))
    with pytest.raises(ValueError, match="unknown orthogonal side"):
        OrthogonalTo(earlier, "sideways")  # type: ignore[arg-type]
