"""The learning benchmark end to end at tiny scale: real engine, real PEFT training, one
passage (the ReSTEM conditions are exercised by the bench smoke run, see bench/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.learning import main
from bench.learning_stats import LearningResult

pytestmark = pytest.mark.slow

# The first passage of ../shared/data/squad-dev.jsonl, shipped so the test needs no checkout
# layout around the repository.
DEV = Path(__file__).resolve().parents[1] / "data" / "squad-dev-first.jsonl"


@pytest.mark.timeout(900)
def test_learning_bench_tiny_run_writes_scored_conditions(tmp_path: Path, model_dir: Path) -> None:
    if not DEV.is_file():
        pytest.fail(f"the dev passages are missing: {DEV}")
    out = tmp_path / "out"
    argv = [
        "--data", str(DEV), "--model", str(model_dir), "--limit", "1", "--steps", "2",
        "--k", "1", "--self-edit-max-tokens", "64", "--n-boot", "50",
        "--conditions", "base", "passage", "self_edit", "in_context",
        "--out-dir", str(out), "--name", "tiny", "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    assert main(argv) == 0
    result = LearningResult.model_validate_json((out / "tiny.json").read_text())
    assert set(result.conditions) == {"base", "passage", "self_edit", "in_context"}
    n = len(json.loads(DEV.read_text().splitlines()[0])["questions"])
    for name, score in result.conditions.items():
        assert score.n_questions == n, name
        assert score.f1_ci[0] <= score.f1 <= score.f1_ci[1], name
    assert result.conditions["passage"].train is not None
    assert result.conditions["passage"].train.steps_mean == 2
    # The passage in the prompt answers better than no passage: the harness asks for real.
    assert result.conditions["in_context"].contains > result.conditions["base"].contains
    replies = json.loads((out / "tiny-answers.json").read_text())
    assert all(isinstance(r, str) for r in replies["self_edit"]["squad-val-0017"]["replies"])
    assert (out / "tiny.png").stat().st_size > 0
