"""vLLM general plugin: correct, adapter-grouped replacements for the CPU LoRA torch ops."""

import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "SELFADAPT_LORA_PATCH"
SEED_ENV_VAR = "SELFADAPT_SEED_PATCH"
OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
OPS_PACKAGE = "vllm.lora.ops.torch_ops"
# Modules under this prefix that did `from vllm.lora.ops.torch_ops import ...` (punica_cpu)
# hold their own references; modules imported later pick the patched names off the package.
_CONSUMER_PREFIX = "vllm.lora."
OP_NAMES = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)

Op = Callable[..., None]

_originals: dict[str, Op] = {}
_decided = False


def _lora_rows(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    dtype: torch.dtype,
    *,
    none_if_inactive: bool = False,
) -> torch.Tensor | None:
    """Return rows `inputs[t] @ weights[indices[t]].T` computed in `dtype`.

    Rows whose index is negative ("no LoRA") are zero. Tokens are grouped by adapter so each
    active adapter costs one matmul, instead of the stock per-token weight gather.

    Args:
        inputs: `[tokens, in]` activations.
        weights: stacked adapter weights, `[slots, 1, out, in]` or `[slots, out, in]`.
        indices: `[tokens]` adapter slot per token, -1 for the base model.
        dtype: dtype of the computation and of the result (the stock ops use the output's).
        none_if_inactive: return None instead of a zero tensor when no token uses an adapter.

    Returns:
        `[tokens, out]` tensor, or None (see `none_if_inactive`).
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    slots, counts = torch.unique(indices, return_counts=True)
    active = [(int(s), int(c)) for s, c in zip(slots.tolist(), counts.tolist(), strict=True)]
    active = [(slot, count) for slot, count in active if slot >= 0]
    if not active and none_if_inactive:
        return None
    x = inputs.to(dtype)
    if len(active) == 1 and active[0][1] == indices.shape[0]:
        return x @ weights[active[0][0]].to(dtype).t()
    out = x.new_zeros((x.shape[0], weights.shape[-2]))
    for slot, _ in active:
        rows = (indices == slot).nonzero().squeeze(1)
        out.index_copy_(0, rows, x.index_select(0, rows) @ weights[slot].to(dtype).t())
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """Like vLLM's `bgmv_shrink`: `y[:, :r] = scaling * x @ A[i].T`, zero where `i == -1`."""
    outputs = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    assert outputs is not None
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """Like vLLM's `bgmv_expand`: `y[:, :n] (+)= x @ B[i].T`, no contribution where `i == -1`."""
    outputs = _lora_rows(
        inputs,
        lora_b_weights,
        lora_indices_tensor,
        output_tensor.dtype,
        none_if_inactive=add_inputs,
    )
    if outputs is None:
        return
    limit = output_tensor.shape[0]
    # Kept from the stock op: a single LoRA row is broadcast over every output row.
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to the output.
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """Like vLLM's `bgmv_expand_slice`, on columns `[slice_offset, slice_offset + slice_size)`."""
    outputs = _lora_rows(
        inputs,
        lora_b_weights,
        lora_indices_tensor,
        output_tensor.dtype,
        none_if_inactive=add_inputs,
    )
    if outputs is None:
        return
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    """Like vLLM's `sgmv_shrink`: per-sequence indices expanded to tokens, then `bgmv_shrink`."""
    exploded = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, exploded, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    """Like vLLM's `sgmv_expand`: per-sequence indices expanded to tokens, then `bgmv_expand`."""
    exploded = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, exploded, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    """Like vLLM's `sgmv_expand_slice`: per-sequence indices, then `bgmv_expand_slice`."""
    exploded = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, exploded, slice_offset, slice_size, add_inputs
    )


PATCHED_OPS: dict[str, Op] = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


def probe_leaks(ops: Mapping[str, Op]) -> list[str]:
    """Return the names of the bgmv ops in `ops` that apply an adapter to an index -1 row.

    The sgmv ops delegate to the bgmv ones, so probing these three covers all six.
    """
    weights = torch.ones((2, 1, 2, 2))
    x = torch.ones((1, 2))
    no_lora = torch.tensor([-1])
    calls: dict[str, Callable[[torch.Tensor], None]] = {
        "bgmv_shrink": lambda y: ops["bgmv_shrink"](x, weights, y, no_lora, 1.0),
        "bgmv_expand": lambda y: ops["bgmv_expand"](x, weights, y, no_lora, True),
        "bgmv_expand_slice": lambda y: ops["bgmv_expand_slice"](x, weights, y, no_lora, 0, 2, True),
    }
    leaking = []
    for name, call in calls.items():
        y = torch.zeros((1, 2))
        call(y)
        if bool(y.any()):
            leaking.append(name)
    return leaking


def original_ops() -> dict[str, Op]:
    """Return the stock vLLM ops (the ones replaced by `register()`, if it patched).

    Raises:
        ImportError: the installed vLLM has no torch LoRA ops.
    """
    module = importlib.import_module(OPS_MODULE)
    return {name: _originals.get(name, getattr(module, name)) for name in OP_NAMES}


def _install(module: ModuleType, package: ModuleType) -> None:
    """Swap the ops in the ops module, its package and every loaded vllm.lora consumer."""
    stock = {name: getattr(module, name) for name in OP_NAMES}
    _originals.update({k: v for k, v in stock.items() if k not in _originals})
    replaced = {id(fn) for fn in _originals.values()}
    targets = [module, package]
    targets += [m for n, m in list(sys.modules.items()) if n.startswith(_CONSUMER_PREFIX) and m]
    for target in targets:
        for name in OP_NAMES:
            if id(getattr(target, name, None)) in replaced:
                setattr(target, name, PATCHED_OPS[name])
    logger.info("selfadapt: patched vLLM CPU LoRA ops %s (index -1 fix, grouped)", list(OP_NAMES))


def register() -> None:
    """Entry point of `vllm.general_plugins`; runs once per vLLM process and is idempotent."""
    global _decided
    if _decided:
        return
    _register_seed_fix()
    _register_lora_ops()
    _decided = True


def _register_seed_fix() -> None:
    """On CPU, make seeded requests survive chunked prefill (see `app.engine.seed_fix`)."""
    from app.engine import seed_fix

    if os.environ.get(SEED_ENV_VAR, "auto").strip().lower() == "off":
        logger.info("selfadapt: seeded-sampling patch disabled by %s=off", SEED_ENV_VAR)
        return
    try:
        from vllm.platforms import current_platform

        if not (current_platform.is_cpu() and seed_fix.cpu_generators_lack_offsets()):
            return
        seed_fix.install()
    except Exception:
        logger.exception("selfadapt: seed patch failed; seeded chunked prefill may crash")


def _register_lora_ops() -> None:
    """Replace the CPU LoRA ops where they apply an adapter to index -1 (or when forced)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower()
    if mode not in ("auto", "off", "force"):
        logger.warning("selfadapt: unknown %s=%r, using 'auto'", ENV_VAR, mode)
        mode = "auto"
    if mode == "off":
        logger.info("selfadapt: LoRA op patch disabled by %s=off", ENV_VAR)
        return
    try:
        module = importlib.import_module(OPS_MODULE)
        package = importlib.import_module(OPS_PACKAGE)
        current = {name: getattr(module, name) for name in OP_NAMES}
    except (ImportError, AttributeError) as e:
        logger.debug("selfadapt: no vLLM torch LoRA ops to patch (%s)", e)
        return
    if mode == "auto":
        try:
            leaking = probe_leaks(current)
        except Exception:
            # A changed op signature means our replacements would not fit either.
            logger.exception("selfadapt: LoRA op probe failed; not patching")
            return
        if not leaking:
            logger.info("selfadapt: vLLM LoRA ops already handle index -1; not patching")
            return
        logger.info("selfadapt: vLLM LoRA ops %s apply an adapter to index -1", leaking)
    _install(module, package)
