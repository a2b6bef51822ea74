"""vLLM patch: seeded requests whose prefill is split into chunks crash the CPU engine.

vLLM's model runner samples a token for every scheduled request, also for a request whose
prompt is only partly prefilled; it discards that token and rewinds the request's seeded
generator with ``gen.set_offset(gen.get_offset() - 4)``. Offsets exist only on CUDA (Philox)
generators: a CPU generator raises "CPU Generator does not use offset", the engine core dies
and every later request fails. That happens as soon as a request with ``seed`` shares a step's
token budget with other prompts (or its prompt exceeds the budget).

The fix (installed by `app.engine.vllm_plugin.register` where needed): before sampling, keep
the state of each CPU generator whose token will be discarded; in the bookkeeping step, put
that state back (the CPU equivalent of the rewind) and hide the generator from the stock
offset rewind. A seeded request therefore draws the same random numbers whether or not its
prefill was chunked, as vLLM intends on CUDA.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
_STATES_ATTR = "_selfadapt_discard_generator_states"
_PATCHED_ATTR = "_selfadapt_seed_fix"


def cpu_generators_lack_offsets() -> bool:
    """True when this torch's CPU generators cannot do the stock offset rewind."""
    try:
        torch.Generator(device="cpu").get_offset()
    except RuntimeError:
        return True
    return False


def _discarded_cpu_generators(runner: Any) -> dict[int, torch.Generator]:
    """The CPU generators of the requests whose sampled token this step discards."""
    num_reqs = runner.input_batch.num_reqs
    generators: dict[int, torch.Generator] = runner.input_batch.generators
    if not generators:
        return {}
    indices = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    found = {int(i): generators.get(int(i)) for i in indices}
    return {i: g for i, g in found.items() if g is not None and g.device.type == "cpu"}


def wrap_sample(sample: Callable[..., Any]) -> Callable[..., Any]:
    """`_sample` that first keeps the generator states of to-be-discarded tokens."""

    @functools.wraps(sample)
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        states = {i: g.get_state() for i, g in _discarded_cpu_generators(self).items()}
        setattr(self, _STATES_ATTR, states)
        return sample(self, *args, **kwargs)

    return _sample


def wrap_bookkeeping(bookkeeping: Callable[..., Any]) -> Callable[..., Any]:
    """`_bookkeeping_sync` that rewinds CPU generators by state instead of by offset."""

    @functools.wraps(bookkeeping)
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        states: dict[int, torch.Tensor] = getattr(self, _STATES_ATTR, None) or {}
        setattr(self, _STATES_ATTR, None)
        hidden = _discarded_cpu_generators(self)
        generators: dict[int, torch.Generator] = self.input_batch.generators
        for i, gen in hidden.items():
            if i in states:
                gen.set_state(states[i])
            del generators[i]  # the stock loop would call get_offset() on it
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    return _bookkeeping_sync


def install() -> bool:
    """Patch vLLM's model runner class once; returns whether it is patched now."""
    import importlib

    module = importlib.import_module(RUNNER_MODULE)
    runner = module.GPUModelRunner
    if getattr(runner, _PATCHED_ATTR, False):
        return True
    if not (hasattr(runner, "_sample") and hasattr(runner, "_bookkeeping_sync")):
        logger.warning("selfadapt: vLLM model runner changed; seeded chunked prefill not patched")
        return False
    runner._sample = wrap_sample(runner._sample)
    runner._bookkeeping_sync = wrap_bookkeeping(runner._bookkeeping_sync)
    setattr(runner, _PATCHED_ATTR, True)
    logger.info("selfadapt: patched vLLM seeded sampling for chunked prefill on CPU")
    return True
