"""`selfadapt model ...`: prepare the bundled base model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.model_prep import ModelPrepError, prepare_bundled_model
from app.settings import get_settings

model_app = typer.Typer(
    name="model",
    help="Manage the base model (convert the bundled SmolLM2 GGUF into an HF directory).",
    no_args_is_help=True,
)


@model_app.command("prepare")
def prepare(
    dest: Annotated[
        Path | None,
        typer.Option(help="target directory [default: <data_dir>/models/SmolLM2-135M-Instruct]"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if it verifies")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Convert the bundled GGUF into an HF bf16 model directory (once; checksummed)."""
    target = dest if dest is not None else get_settings().bundled_model_dir
    try:
        path = prepare_bundled_model(target.expanduser(), progress=progress, force=force)
    except ModelPrepError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(str(path))
