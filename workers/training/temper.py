"""Tempering a LoRA update: move an adapter part of the way back towards where it started.

A candidate that learned its documents but cost the guard set or earlier documents a little
too much often passes with a smaller step: the weight-space interpolation of WiSE-FT, applied
to the adapter. Without a parent (an adapter trained from the base) the update is scaled
exactly: ``lora_B * scale`` gives ``scale * B @ A``. With a parent (an adapter trained on from
the champion) both LoRA factors are interpolated, ``P + scale * (C - P)``: ``scale`` 0 is the
parent and 1 the candidate, and the product in between is close to, not exactly, the linear
mix of the two updates (the evaluation that follows measures what it is).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from workers.training.adapter_files import CONFIG, MANIFEST, WEIGHTS, atomic_dir


def temper_adapter(
    candidate_dir: Path, out_dir: Path, scale: float, *, parent_dir: Path | None = None
) -> Path:
    """Writes the tempered adapter (config, weights, manifest) to ``out_dir`` and returns it.

    Raises:
        ValueError: ``scale`` outside (0, 1), or a parent whose tensors do not match the
            candidate's (another rank or other target modules).
        FileExistsError: ``out_dir`` exists.
    """
    from safetensors.torch import load_file, save_file

    if not 0.0 < scale < 1.0:
        raise ValueError(f"scale must be in (0, 1), got {scale}")
    if out_dir.exists():
        raise FileExistsError(f"adapter directory {out_dir} already exists")
    weights = load_file(str(candidate_dir / WEIGHTS))
    if parent_dir is None:
        tempered = {k: v * scale if ".lora_B." in k else v for k, v in weights.items()}
    else:
        parent = load_file(str(parent_dir / WEIGHTS))
        mismatch = sorted(
            k for k in weights if k not in parent or parent[k].shape != weights[k].shape
        )
        if mismatch or set(parent) != set(weights):
            raise ValueError(
                f"parent adapter {parent_dir.name} does not match the candidate's tensors "
                f"({len(mismatch)} differ, e.g. {mismatch[:1]})"
            )
        tempered = {k: parent[k] + scale * (v - parent[k]) for k, v in weights.items()}
    with atomic_dir(out_dir, mode=0o755) as tmp:
        shutil.copy(candidate_dir / CONFIG, tmp / CONFIG)
        save_file({k: v.contiguous() for k, v in tempered.items()}, str(tmp / WEIGHTS))
        towards = "parent" if parent_dir else "base"
        write_tempered_manifest(candidate_dir, tmp, scale, towards=towards)
    return out_dir


def write_tempered_manifest(source_dir: Path, out_dir: Path, scale: float, *, towards: str) -> None:
    """Writes ``out_dir``'s lineage manifest: ``source_dir``'s (the adapter tempered), with
    ``tempered`` saying by what scale and towards what (``parent`` or ``base``)."""
    manifest = source_dir / MANIFEST
    lineage = json.loads(manifest.read_text()) if manifest.is_file() else {}
    lineage["tempered"] = {"scale": scale, "towards": towards}
    (out_dir / MANIFEST).write_text(json.dumps(lineage, indent=2) + "\n")
