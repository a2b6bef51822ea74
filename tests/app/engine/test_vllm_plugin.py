"""Tests for the vLLM plugin that replaces the CPU LoRA torch ops."""

import functools
import logging
from collections.abc import Callable

import pytest
import torch

from app.engine import vllm_plugin
from app.engine.vllm_plugin import ENV_VAR, OP_NAMES, PATCHED_OPS

torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")
lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
lora_layer_utils = pytest.importorskip("vllm.lora.layers.utils")

SLOTS, IN, RANK, OUT = 3, 32, 8, 48
# Token-level indices (bgmv) and, for sgmv, (per-sequence indices, sequence lengths); 7 tokens.
TOKEN_CASES = {
    "mixed": [0, -1, 2, -1, 1, 0, -1],
    "all_base": [-1] * 7,
    "single": [1] * 7,
    "unsorted": [2, 0, 1, 2, 0, 1, 0],
}
SEQ_CASES = {
    "mixed": ([0, -1, 2, -1], [2, 1, 3, 1]),
    "all_base": ([-1], [7]),
    "single": ([1], [7]),
    "unsorted": ([2, 0, 1, 2], [1, 2, 3, 1]),
}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def stock_state(monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[..., None]]:
    """Put the stock ops back wherever the CPU wrapper reads them; teardown restores."""
    stock = vllm_plugin.original_ops()
    for namespace in (lora_ops, torch_ops, punica_cpu):
        for name in OP_NAMES:
            monkeypatch.setattr(namespace, name, stock[name])
    monkeypatch.setattr(vllm_plugin, "_decided", False)
    monkeypatch.setattr(vllm_plugin, "_originals", dict(vllm_plugin._originals))
    monkeypatch.delenv(ENV_VAR, raising=False)
    return stock


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol): bf16 ops compute in bf16, so they get about 3 significant digits."""
    return (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 3e-2)


def _inputs(
    n_tokens: int, n_in: int, n_out: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random activations `[tokens, in]` and stacked weights `[slots, 1, out, in]`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n_in, generator=gen).to(dtype)
    w = (0.1 * torch.randn(SLOTS, 1, n_out, n_in, generator=gen)).to(dtype)
    return x, w


def _reference(
    x: torch.Tensor,
    w: torch.Tensor,
    y0: torch.Tensor,
    indices: list[int],
    *,
    add: bool,
    scale: float = 1.0,
    col0: int = 0,
) -> torch.Tensor:
    """Per-token loop in float64: `y[t, cols] (+)= scale * x[t] @ W[i].T`; i == -1 adds nothing."""
    w64 = w.squeeze(1).double()
    y = y0.double().clone()
    cols = slice(col0, col0 + w64.shape[1])
    for t, i in enumerate(indices):
        delta = torch.zeros(w64.shape[1], dtype=torch.float64)
        if i >= 0:
            delta = scale * (x[t].double() @ w64[i].T)
        y[t, cols] = y[t, cols] + delta if add else delta
    return y


def _assert_matches(y: torch.Tensor, ref: torch.Tensor, indices: list[int]) -> None:
    rtol, atol = _tol(y.dtype)
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
    base_rows = [t for t, i in enumerate(indices) if i < 0]
    # Base rows get exactly nothing: unchanged when accumulating, zero when assigning.
    assert torch.equal(y[base_rows].double(), ref[base_rows])


def _exploded(case: str) -> list[int]:
    seq_indices, seq_lens = SEQ_CASES[case]
    return [i for i, n in zip(seq_indices, seq_lens, strict=True) for _ in range(n)]


def _seq_args(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    seq_indices, seq_lens = SEQ_CASES[case]
    lens = torch.tensor(seq_lens)
    starts = torch.cumsum(lens, 0) - lens
    return starts, lens, torch.tensor(seq_indices), len(seq_lens), max(seq_lens), sum(seq_lens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TOKEN_CASES)
def test_bgmv_shrink_matches_reference(case: str, dtype: torch.dtype) -> None:
    indices = TOKEN_CASES[case]
    x, w = _inputs(len(indices), IN, RANK, dtype)
    y0 = torch.full((len(indices), RANK + 2), 7.0, dtype=dtype)
    y = y0.clone()
    PATCHED_OPS["bgmv_shrink"](x, w, y, torch.tensor(indices), 0.5)
    _assert_matches(y, _reference(x, w, y0, indices, add=False, scale=0.5), indices)


@pytest.mark.parametrize("add", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TOKEN_CASES)
def test_bgmv_expand_matches_reference(case: str, dtype: torch.dtype, add: bool) -> None:
    indices = TOKEN_CASES[case]
    x, w = _inputs(len(indices), RANK, OUT, dtype)
    y0 = torch.randn(len(indices), OUT + 4).to(dtype)
    y = y0.clone()
    PATCHED_OPS["bgmv_expand"](x, w, y, torch.tensor(indices), add)
    _assert_matches(y, _reference(x, w, y0, indices, add=add), indices)


@pytest.mark.parametrize("add", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TOKEN_CASES)
def test_bgmv_expand_slice_matches_reference(case: str, dtype: torch.dtype, add: bool) -> None:
    indices = TOKEN_CASES[case]
    x, w = _inputs(len(indices), RANK, OUT, dtype)
    y0 = torch.randn(len(indices), 5 + OUT + 3).to(dtype)
    y = y0.clone()
    PATCHED_OPS["bgmv_expand_slice"](x, w, y, torch.tensor(indices), 5, OUT, add)
    _assert_matches(y, _reference(x, w, y0, indices, add=add, col0=5), indices)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SEQ_CASES)
def test_sgmv_shrink_matches_reference(case: str, dtype: torch.dtype) -> None:
    indices = _exploded(case)
    x, w = _inputs(len(indices), IN, RANK, dtype)
    y0 = torch.zeros(len(indices), RANK, dtype=dtype)
    y = y0.clone()
    PATCHED_OPS["sgmv_shrink"](x, w, y, *_seq_args(case), 2.0)
    _assert_matches(y, _reference(x, w, y0, indices, add=False, scale=2.0), indices)


@pytest.mark.parametrize("add", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SEQ_CASES)
def test_sgmv_expand_matches_reference(case: str, dtype: torch.dtype, add: bool) -> None:
    indices = _exploded(case)
    x, w = _inputs(len(indices), RANK, OUT, dtype)
    y0 = torch.randn(len(indices), OUT).to(dtype)
    y = y0.clone()
    PATCHED_OPS["sgmv_expand"](x, w, y, *_seq_args(case), add)
    _assert_matches(y, _reference(x, w, y0, indices, add=add), indices)


@pytest.mark.parametrize("add", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SEQ_CASES)
def test_sgmv_expand_slice_matches_reference(case: str, dtype: torch.dtype, add: bool) -> None:
    indices = _exploded(case)
    x, w = _inputs(len(indices), RANK, OUT, dtype)
    y0 = torch.randn(len(indices), 3 + OUT).to(dtype)
    y = y0.clone()
    PATCHED_OPS["sgmv_expand_slice"](x, w, y, *_seq_args(case), 3, OUT, add)
    _assert_matches(y, _reference(x, w, y0, indices, add=add, col0=3), indices)


@pytest.mark.parametrize("add", [True, False])
def test_bgmv_expand_single_row_broadcasts_like_stock(
    stock_state: dict[str, Callable[..., None]], add: bool
) -> None:
    x, w = _inputs(1, RANK, OUT, torch.float32)
    y0 = torch.randn(4, OUT)
    expected, y = y0.clone(), y0.clone()
    stock_state["bgmv_expand"](x, w, expected, torch.tensor([2]), add)
    PATCHED_OPS["bgmv_expand"](x, w, y, torch.tensor([2]), add)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("name", OP_NAMES)
def test_patched_op_without_base_rows_matches_stock(
    stock_state: dict[str, Callable[..., None]], name: str
) -> None:
    # Stock ops are right when no token has index -1; the patch must keep their exact contract.
    case = "unsorted"
    n_tokens = sum(SEQ_CASES[case][1]) if name.startswith("sgmv") else len(TOKEN_CASES[case])
    shrink = name.endswith("shrink")
    x, w = _inputs(n_tokens, IN if shrink else RANK, RANK if shrink else OUT, torch.float32)
    y0 = torch.randn(n_tokens, 2 + (RANK if shrink else OUT))
    lead = _seq_args(case) if name.startswith("sgmv") else (torch.tensor(TOKEN_CASES[case]),)
    tail: tuple[float | int | bool, ...] = (True,)
    if shrink:
        tail = (0.5,)
    elif "slice" in name:
        tail = (2, OUT, True)
    expected, y = y0.clone(), y0.clone()
    stock_state[name](x, w, expected, *lead, *tail)
    PATCHED_OPS[name](x, w, y, *lead, *tail)
    torch.testing.assert_close(y, expected)


def test_stock_bgmv_expand_mixed_indices_leaks(stock_state: dict[str, Callable[..., None]]) -> None:
    indices = TOKEN_CASES["mixed"]
    x, w = _inputs(len(indices), RANK, OUT, torch.float32)
    y0 = torch.randn(len(indices), OUT)
    y = y0.clone()
    stock_state["bgmv_expand"](x, w, y, torch.tensor(indices), True)
    with pytest.raises(AssertionError):
        _assert_matches(y, _reference(x, w, y0, indices, add=True), indices)


def test_probe_leaks_stock_ops_reported(stock_state: dict[str, Callable[..., None]]) -> None:
    assert vllm_plugin.probe_leaks(stock_state) == [
        "bgmv_shrink",
        "bgmv_expand",
        "bgmv_expand_slice",
    ]


def test_probe_leaks_patched_ops_clean() -> None:
    assert vllm_plugin.probe_leaks(PATCHED_OPS) == []


def test_register_auto_patches_cpu_wrapper_namespaces(
    stock_state: dict[str, Callable[..., None]],
) -> None:
    vllm_plugin.register()
    for namespace in (lora_ops, torch_ops, punica_cpu):
        for name in OP_NAMES:
            assert getattr(namespace, name) is PATCHED_OPS[name], (namespace.__name__, name)
    # A consumer imported after register() picks the patched names off the package.
    from vllm.lora.ops.torch_ops import bgmv_expand

    assert bgmv_expand is PATCHED_OPS["bgmv_expand"]
    assert vllm_plugin.original_ops() == stock_state


def test_register_twice_idempotent(
    stock_state: dict[str, Callable[..., None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    vllm_plugin.register()

    def _no_probe(ops: object) -> list[str]:
        raise AssertionError("register() probed twice")

    monkeypatch.setattr(vllm_plugin, "probe_leaks", _no_probe)
    vllm_plugin.register()
    # Even a forced re-install over patched ops keeps the stock ops as the originals.
    monkeypatch.setattr(vllm_plugin, "_decided", False)
    monkeypatch.setenv(ENV_VAR, "force")
    vllm_plugin.register()
    assert punica_cpu.bgmv_shrink is PATCHED_OPS["bgmv_shrink"]
    assert vllm_plugin.original_ops() == stock_state


def test_register_env_off_leaves_stock(
    stock_state: dict[str, Callable[..., None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "off")
    vllm_plugin.register()
    assert all(getattr(punica_cpu, name) is stock_state[name] for name in OP_NAMES)


def _fixed_upstream(monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[..., None]]:
    """Install distinct, correct functions in place of the stock ops, as a fixed vLLM would."""
    fixed: dict[str, Callable[..., None]] = {
        name: functools.wraps(op)(functools.partial(op)) for name, op in PATCHED_OPS.items()
    }
    for namespace in (lora_ops, torch_ops, punica_cpu):
        for name in OP_NAMES:
            monkeypatch.setattr(namespace, name, fixed[name])
    return fixed


def test_register_auto_upstream_fixed_noop(
    stock_state: dict[str, Callable[..., None]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fixed = _fixed_upstream(monkeypatch)
    with caplog.at_level(logging.INFO, logger=vllm_plugin.__name__):
        vllm_plugin.register()
    assert all(getattr(punica_cpu, name) is fixed[name] for name in OP_NAMES)
    assert "already handle index -1" in caplog.text


def test_register_force_upstream_fixed_patches(
    stock_state: dict[str, Callable[..., None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fixed_upstream(monkeypatch)
    monkeypatch.setattr(vllm_plugin, "_originals", {})
    monkeypatch.setenv(ENV_VAR, "force")
    vllm_plugin.register()
    assert all(getattr(punica_cpu, name) is PATCHED_OPS[name] for name in OP_NAMES)


def test_register_ops_module_missing_noop(
    stock_state: dict[str, Callable[..., None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_plugin, "OPS_MODULE", "vllm.lora.ops.no_such_ops")
    vllm_plugin.register()
    assert vllm_plugin._decided
    assert all(getattr(lora_ops, name) is stock_state[name] for name in OP_NAMES)


# lora ids per token (0 = base model) for a wrapper whose slots hold the ids [11, 22, None].
WRAPPER_IDS = [11, 0, 22, 22, 0, 11]
WRAPPER_SLOT_OF = {0: -1, 11: 0, 22: 1}


def _run_wrapper(is_prefill: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `add_lora_linear` through `PunicaWrapperCPU`; return (y, reference)."""
    wrapper = punica_cpu.PunicaWrapperCPU(8, 8, "cpu")
    ids = WRAPPER_IDS
    mapping = lora_layer_utils.LoRAMapping(tuple(ids), tuple(ids), is_prefill=is_prefill)
    wrapper.update_metadata(mapping, [11, 22, None], 3, 1000)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(ids), IN, generator=gen)
    lora_a = torch.randn(SLOTS, 1, RANK, IN, generator=gen)
    lora_b = torch.randn(SLOTS, 1, OUT, RANK, generator=gen)
    y0 = torch.randn(len(ids), OUT, generator=gen)
    y, ref = y0.clone(), y0.clone()
    wrapper.add_lora_linear(y, x, (lora_a,), (lora_b,), 0.5, (OUT,))
    for t, lora_id in enumerate(ids):
        slot = WRAPPER_SLOT_OF[lora_id]
        if slot >= 0:
            ref[t] += 0.5 * (x[t] @ lora_a[slot, 0].T) @ lora_b[slot, 0].T
    return y, ref


@pytest.mark.parametrize("is_prefill", [True, False])
def test_punica_wrapper_mixed_batch_correct_after_register(
    stock_state: dict[str, Callable[..., None]], is_prefill: bool
) -> None:
    vllm_plugin.register()
    y, ref = _run_wrapper(is_prefill)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    base_rows = [t for t, lora_id in enumerate(WRAPPER_IDS) if lora_id == 0]
    assert torch.equal(y[base_rows], ref[base_rows])


@pytest.mark.parametrize("is_prefill", [True, False])
def test_punica_wrapper_mixed_batch_stock_leaks(
    stock_state: dict[str, Callable[..., None]], is_prefill: bool
) -> None:
    y, ref = _run_wrapper(is_prefill)
    base_rows = [t for t, lora_id in enumerate(WRAPPER_IDS) if lora_id == 0]
    assert not torch.allclose(y[base_rows], ref[base_rows])
