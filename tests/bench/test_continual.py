"""bench/continual.py: the matrix, retention and loading logic (no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.continual import (
    DEFAULT_DATA,
    Progress,
    diagonal,
    load_passages,
    lower_triangle,
    plot,
    retention,
)

SQUAD_DEV = Path(__file__).resolve().parents[1] / "data" / "squad-dev-first.jsonl"


def test_lower_triangle_hides_documents_not_yet_learned() -> None:
    rows = [[0.5, 0.1, 0.0], [0.4, 0.6, 0.0], [0.3, 0.5, 0.9]]
    assert lower_triangle(rows) == [[0.5, None, None], [0.4, 0.6, None], [0.3, 0.5, 0.9]]
    assert diagonal(lower_triangle(rows)) == [0.5, 0.6, 0.9]


def test_retention_is_relative_to_the_score_after_the_own_update() -> None:
    m = lower_triangle([[0.5, 0, 0], [0.4, 0.6, 0], [0.25, 0.6, 0.9]])
    out = retention(m)
    assert out["after_update"] == 2
    assert out["per_document"] == [0.5, 1.0]
    assert out["mean"] == pytest.approx(0.75)
    assert out["n"] == 2
    assert retention(m, after=1)["per_document"] == [pytest.approx(0.8)]


def test_retention_skips_documents_never_learned() -> None:
    m = lower_triangle([[0.0, 0], [0.5, 0.4]])
    assert retention(m) == {"after_update": 1, "per_document": [None], "mean": None, "n": 0}
    assert retention(lower_triangle([[0.7]]))["mean"] is None  # one update: nothing earlier


def test_load_passages_builtin_and_squad_schema() -> None:
    made_up = load_passages(DEFAULT_DATA, 8, seed=None)
    assert len(made_up) == 8
    assert all(len(p.questions) == 4 for p in made_up)
    for p in made_up:  # every answer is stated in its document, never in another's title
        assert all(q.answers[0].lower() in p.text.lower() for q in p.questions)
        assert p.as_ingest()["probes"][0]["answer"] == p.questions[0].answers[0]
    squad = load_passages(SQUAD_DEV, 1, seed=1)
    assert [p.id for p in squad] == ["squad-val-0017"]
    assert all(p.questions and p.questions[0].title == p.title for p in squad)
    with pytest.raises(SystemExit):
        load_passages(DEFAULT_DATA, 9, seed=None)


def test_plot_writes_a_heatmap(tmp_path: Path) -> None:
    m = lower_triangle([[0.5, 0.0], [0.4, 0.6]])
    result = {
        "documents": [{"id": "made-up-01"}, {"id": "made-up-02"}],
        "guard": [{"contains": 1.0}, {"contains": 0.95}],
        "retention": {"f1": retention(m)},
        "f1": m,
        "contains": m,
    }
    path = plot(result, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_flags_override_only_what_is_given() -> None:
    """The benches' gate flags become the namespace's settings; none given: the defaults."""
    import argparse

    from adapters_store.models import NamespaceSettings
    from bench.cycle import gate_args, gate_from

    parser = argparse.ArgumentParser()
    gate_args(parser)
    assert gate_from(parser.parse_args([])) is None
    gate = gate_from(parser.parse_args(["--max-forgetting", "0", "--max-guard-drift", "0.2"]))
    assert gate == {"max_forgetting": 0.0, "max_guard_drift": 0.2}
    assert NamespaceSettings.model_validate(gate).min_gain == 0.0


def test_a_sampled_run_records_its_seed_so_its_documents_can_be_loaded_again() -> None:
    passages = load_passages(DEFAULT_DATA, 3, seed=11)
    progress = Progress(passages, {}, None, [], {}, [], [], [], [], sample_seed=11)
    result = progress.result(DEFAULT_DATA)
    assert result["sample_seed"] == 11
    assert result["complete"] is False
    again = load_passages(Path(result["data"]), len(result["documents"]), seed=11)
    assert [p.id for p in again] == [d["id"] for d in result["documents"]]
