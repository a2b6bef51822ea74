"""`selfadapt model prepare`: convert the bundled GGUF model into an HF directory once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.settings import get_settings

model_app = typer.Typer(name="model", help="Manage the served base model.", no_args_is_help=True)


@model_app.command("prepare")
def prepare(
    dest: Annotated[Path | None, typer.Option("--dest", help="output HF directory")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if up to date")] = False,
) -> None:
    """Convert the bundled SmolLM2-135M-Instruct GGUF to an HF dir (idempotent, checksummed)."""
    from app.model_prep import ModelPrepError, prepare_bundled_model

    target = dest or get_settings().bundled_model_dir
    try:
        out = prepare_bundled_model(target, progress=True, force=force)
    except ModelPrepError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(str(out))
