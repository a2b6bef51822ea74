"""Checks a PEFT LoRA folder before it enters the store: files, config, tensors, base model fit."""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.errors import InvalidRequest

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
ALLOWED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, "README.md", "manifest.json"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2}
_DTYPE_BYTES |= {"I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# base_model.model.<module>.lora_A.weight, or ...lora_embedding_A for embeddings.
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.weight)?$"
)
WRONG_BASE = "adapter was trained for a different base model"

Shapes = dict[str, tuple[int, ...]]


class InvalidAdapter(InvalidRequest):
    """An adapter upload or folder the store refuses; `code` says which rule it broke."""

    code = "invalid_adapter"

    def __init__(self, message: str, code: str, *, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)


@dataclass(frozen=True)
class PeftInfo:
    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str
    config: dict[str, Any]


def _is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def _pickle_refused(name: str) -> InvalidAdapter:
    return InvalidAdapter(
        f"{name}: pickle files are not accepted; save with safetensors", "pickle_refused"
    )


def validate_upload_names(names: Iterable[str]) -> list[str]:
    """Checks multipart file names: plain allow-listed names only, each once.

    Raises:
        InvalidAdapter: code `bad_file_name`, `pickle_refused`, `unexpected_file`,
            `duplicate_file` or `missing_file`.
    """
    seen: list[str] = []
    for name in names:
        if (
            not name
            or name in {".", ".."}
            or any(c in name for c in "/\\\0")
            or name.startswith("~")
            or re.match(r"^[A-Za-z]:", name)
        ):
            raise InvalidAdapter(f"file name {name!r} is not a plain file name", "bad_file_name")
        if _is_pickle(name):
            raise _pickle_refused(name)
        if name not in ALLOWED_FILES:
            allowed = ", ".join(sorted(ALLOWED_FILES))
            raise InvalidAdapter(
                f"file {name!r} is not accepted (allowed: {allowed})", "unexpected_file"
            )
        if name in seen:
            raise InvalidAdapter(f"file {name!r} was sent twice", "duplicate_file")
        seen.append(name)
    _require(seen)
    return seen


def _require(names: Iterable[str]) -> None:
    missing = [n for n in REQUIRED_FILES if n not in set(names)]
    if missing:
        raise InvalidAdapter(f"missing {', '.join(missing)}", "missing_file")


def _check_files(path: Path, *, allow_extra_files: bool) -> list[str]:
    if not path.is_dir():
        raise InvalidAdapter(f"{path} is not a directory", "missing_file")
    kept: list[str] = []
    for entry in sorted(path.iterdir()):
        if _is_pickle(entry.name):
            raise _pickle_refused(entry.name)
        regular = entry.is_file() and not entry.is_symlink()
        if entry.name in ALLOWED_FILES and regular:
            kept.append(entry.name)
        elif not allow_extra_files:
            raise InvalidAdapter(f"file {entry.name!r} is not accepted", "unexpected_file")
    _require(kept)
    return kept


def read_safetensors_shapes(file: Path) -> Shapes:
    """Tensor shapes from a safetensors header, after checking every byte range is in the file.

    Raises:
        InvalidAdapter: code `bad_safetensors` (unreadable, bad header, truncated data).
    """
    try:
        return _read_header_shapes(file)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise InvalidAdapter(
            f"{file.name} is truncated or not a valid safetensors file: {e}", "bad_safetensors"
        ) from e


def _read_header_shapes(file: Path) -> Shapes:
    size = file.stat().st_size
    with file.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError("header length exceeds the file")
        header = json.loads(fh.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data_len = size - 8 - header_len
    shapes: Shapes = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = (int(x) for x in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
        expected = math.prod(shape) * _DTYPE_BYTES[info["dtype"]]
        if not 0 <= begin <= end <= data_len or end - begin != expected:
            raise ValueError(f"tensor {key!r} lies outside the file (truncated?)")
        shapes[key] = shape
    _safe_open_check(file)
    return shapes


def _safe_open_check(file: Path) -> None:
    # The library's own checks too (overlapping ranges, alignment), without loading tensors.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            list(f.keys())
    except SafetensorError as e:
        raise ValueError(str(e)) from e


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {e}", "bad_config") from e
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} is not a JSON object", "bad_config")
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(
            f"only LoRA adapters are accepted (peft_type={config.get('peft_type')!r})", "not_lora"
        )
    return config


def _check_rank(config: Mapping[str, Any], max_rank: int | None) -> int:
    rank = config.get("r")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(rank, int) or rank < 1 or not isinstance(pattern, dict):
        raise InvalidAdapter(f"{CONFIG_FILE}: r must be a positive integer", "bad_config")
    highest = max([rank, *(int(v) for v in pattern.values())])
    if max_rank is not None and highest > max_rank:
        raise InvalidAdapter(
            f"adapter rank {highest} exceeds the server's max_lora_rank {max_rank}",
            "rank_too_large",
        )
    return rank


def validate_peft_dir(
    path: Path,
    *,
    base_model_dir: Path | None,
    max_rank: int | None,
    allow_extra_files: bool = False,
) -> PeftInfo:
    """Checks a PEFT LoRA folder against the store's rules and (optionally) the base model.

    Args:
        path: the folder holding adapter_config.json and adapter_model.safetensors.
        base_model_dir: the HF dir of the served base model; None skips the base checks.
        max_rank: the engine's max LoRA rank; None skips the rank limit.
        allow_extra_files: ignore unknown non-pickle files (trusted worker output).

    Raises:
        InvalidAdapter: with a `code` naming the broken rule.
    """
    _check_files(path, allow_extra_files=allow_extra_files)
    config = _read_config(path)
    rank = _check_rank(config, max_rank)
    shapes = read_safetensors_shapes(path / WEIGHTS_FILE)
    lora = _lora_tensors(shapes, max_rank)
    targets = config.get("target_modules")
    if base_model_dir is not None:
        base = base_shapes(base_model_dir)
        _check_targets(targets, base)
        _check_fit(lora, base, fan_in_fan_out=bool(config.get("fan_in_fan_out")))
    target_modules = targets if isinstance(targets, str) else tuple(targets or ())
    alpha = float(config.get("lora_alpha") or rank)
    return PeftInfo(rank=rank, alpha=alpha, target_modules=target_modules, config=config)


def _lora_tensors(shapes: Shapes, max_rank: int | None) -> dict[tuple[str, str], tuple[int, ...]]:
    if not shapes:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no tensors", "bad_safetensors")
    lora: dict[tuple[str, str], tuple[int, ...]] = {}
    for key, shape in shapes.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise InvalidAdapter(f"{WEIGHTS_FILE}: {key!r} is not a LoRA tensor", "not_lora")
        lora[(m["module"], m["kind"])] = shape
        is_a = m["kind"] in ("lora_A", "lora_embedding_A") and len(shape) == 2
        if is_a and max_rank is not None and shape[0] > max_rank:
            raise InvalidAdapter(
                f"{key} has rank {shape[0]} > max_lora_rank {max_rank}", "rank_too_large"
            )
    return lora


def base_shapes(base_model_dir: Path) -> Shapes:
    """Weight shapes of the base model, from its safetensors headers (cached per dir)."""
    files = sorted(base_model_dir.glob("*.safetensors"))
    stamp = tuple((f.name, f.stat().st_mtime_ns) for f in files)
    return dict(_base_shapes_cached(str(base_model_dir), stamp))


@lru_cache(maxsize=4)
def _base_shapes_cached(base_dir: str, stamp: tuple[tuple[str, int], ...]) -> Shapes:
    shapes: Shapes = {}
    for name, _ in stamp:
        shapes.update(_read_header_shapes(Path(base_dir) / name))
    if not shapes:
        raise InvalidAdapter(f"base model {base_dir} has no safetensors weights", "wrong_base")
    # Tied embeddings: lm_head shares embed_tokens' weight and is not stored on its own.
    if "lm_head.weight" not in shapes:
        embed = next((k for k in shapes if k.endswith("embed_tokens.weight")), None)
        if embed is not None:
            shapes["lm_head.weight"] = shapes[embed]
    return shapes


def _base_modules(base: Shapes) -> list[str]:
    return [k.removesuffix(".weight") for k in base if k.endswith(".weight")]


def _check_targets(targets: Any, base: Shapes) -> None:
    modules = _base_modules(base)
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, m) for m in modules):
            return
        raise InvalidAdapter(
            f"target_modules {targets!r} matches no module of the base model",
            "unknown_target_module",
        )
    if not isinstance(targets, list) or not targets:
        raise InvalidAdapter(f"{CONFIG_FILE}: target_modules must be a list", "bad_config")
    for target in targets:
        if not any(m == target or m.endswith(f".{target}") for m in modules):
            raise InvalidAdapter(
                f"target module {target!r} does not exist in the base model",
                "unknown_target_module",
            )


def _base_weight(module: str, base: Shapes) -> tuple[int, ...] | None:
    for key in (f"{module}.weight", f"model.{module}.weight", module.removeprefix("model.")):
        if key in base:
            return base[key]
    return None


def _check_fit(
    lora: Mapping[tuple[str, str], tuple[int, ...]], base: Shapes, *, fan_in_fan_out: bool
) -> None:
    for (module, kind), shape in lora.items():
        weight = _base_weight(module, base)
        if weight is None or len(weight) != 2 or len(shape) not in (1, 2):
            raise InvalidAdapter(f"{WRONG_BASE} (no base weight for {module})", "wrong_base")
        out_f, in_f = (weight[1], weight[0]) if fan_in_fan_out else weight
        expected = {
            "lora_A": (None, in_f),
            "lora_B": (out_f, None),
            "lora_embedding_A": (None, weight[0]),
            "lora_embedding_B": (weight[1], None),
            "lora_magnitude_vector": (out_f,),
        }[kind]
        if len(shape) != len(expected) or any(
            e is not None and e != s for e, s in zip(expected, shape, strict=True)
        ):
            raise InvalidAdapter(
                f"{WRONG_BASE} ({module}.{kind} has shape {list(shape)}, base weight "
                f"{list(weight)})",
                "wrong_base",
            )
