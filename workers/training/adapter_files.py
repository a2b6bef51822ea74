"""Adapter folders on disk: their file names, and writing one all at once or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"


@contextmanager
def atomic_dir(out_dir: Path, *, mode: int | None = None) -> Iterator[Path]:
    """A temp folder beside ``out_dir`` to write into, renamed to ``out_dir`` when the block
    ends, removed when it raises (a reader never sees half a folder).

    ``mode``: the folder's permissions (default: what the umask gives a new folder; mkdtemp
    makes it 0700, and the engine must read it).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o777 & ~umask
        tmp.chmod(mode)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
