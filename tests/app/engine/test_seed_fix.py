"""The seeded-sampling patch, on a stand-in of vLLM's model runner with real CPU generators.

The live proof (real engine, chunked prefill) is `test_seeded_requests_survive_chunked_prefill`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from app.engine import seed_fix


class Runner:
    """The parts of GPUModelRunner that `_sample` and `_bookkeeping_sync` touch here."""

    def __init__(self, seeds: dict[int, int], discard: list[bool]) -> None:
        generators = {i: torch.Generator().manual_seed(s) for i, s in seeds.items()}
        self.input_batch = SimpleNamespace(num_reqs=len(discard), generators=generators)
        self.discard_request_mask = SimpleNamespace(np=np.array(discard + [False] * 4))

    def _sample(self) -> dict[int, torch.Tensor]:
        """Draws like the sampler: a block of random numbers per seeded request."""
        return {i: torch.rand(3, generator=g) for i, g in self.input_batch.generators.items()}

    def _bookkeeping_sync(self) -> list[int]:
        """The stock rewind of discarded requests' generators (vLLM 0.32 gpu_model_runner)."""
        indices = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        for i in indices:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)
        return sorted(self.input_batch.generators)


class Patched(Runner):
    _sample = seed_fix.wrap_sample(Runner._sample)
    _bookkeeping_sync = seed_fix.wrap_bookkeeping(Runner._bookkeeping_sync)


def _first_draw(seed: int) -> torch.Tensor:
    return torch.rand(3, generator=torch.Generator().manual_seed(seed))


def test_stock_rewind_fails_on_cpu_generators() -> None:
    assert seed_fix.cpu_generators_lack_offsets()
    runner = Runner({0: 1, 1: 2}, [True, False])
    runner._sample()
    with pytest.raises(RuntimeError, match="offset"):
        runner._bookkeeping_sync()


def test_patch_rewinds_discarded_generators_and_keeps_the_rest() -> None:
    runner = Patched({0: 1, 1: 2, 3: 4}, [True, False, False, True])
    drawn: Any = runner._sample()
    assert runner._bookkeeping_sync() == [1]  # the stock rewind saw only the kept request
    assert sorted(runner.input_batch.generators) == [0, 1, 3]  # all back in the batch
    # A chunk's discarded draw is undone: the next step draws what the first one did.
    after = runner._sample()
    assert torch.equal(after[0], drawn[0])
    assert torch.equal(after[0], _first_draw(1))
    assert torch.equal(after[3], drawn[3])
    # A request whose token was kept moved on.
    assert not torch.equal(after[1], drawn[1])


def test_patch_is_a_no_op_without_seeded_requests() -> None:
    runner = Patched({}, [True, True])
    runner._sample()
    assert runner._bookkeeping_sync() == []


def test_install_patches_vllm_model_runner_once() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert seed_fix.install()
    patched = GPUModelRunner._bookkeeping_sync
    assert seed_fix.install()
    assert GPUModelRunner._bookkeeping_sync is patched
    assert GPUModelRunner._selfadapt_seed_fix  # type: ignore[attr-defined]
