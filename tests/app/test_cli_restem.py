"""`selfadapt restem run` against a real HTTP listener (fake engine, SQLite): the job id, the
JSON answer, and the server's errors for bad input (exit 1) or a missing key (exit 2).
`--watch` on a real worker run is covered by tests/workers/restem/test_restem_live.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from app.auth import Role
from app.cli import cli
from tests.app.registry.conftest import gateway_settings
from tests.conftest import _create_keys
from tests.support.server import fake_engine_server

DOC = {
    "title": "Zorblat",
    "text": "Zorblat's capital is Quenmar.",
    "probes": [{"question": "What is the capital of Zorblat?", "answer": "Quenmar"}],
}


@pytest.fixture
def served(tmp_path: Path, model_dir: Path) -> Iterator[tuple[str, dict[Role, str]]]:
    settings = gateway_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir)
    keys = _create_keys(settings)
    with fake_engine_server(settings) as url:
        r = httpx.post(
            f"{url}/v1/documents",
            json={"namespace": "acme", "documents": [DOC]},
            headers={"Authorization": f"Bearer {keys[Role.operator]}"},
        )
        assert r.status_code == 202, r.text
        yield url, keys


def test_restem_run_prints_the_job_id(served: tuple[str, dict[Role, str]]) -> None:
    url, keys = served
    env = {"SELFADAPT_URL": url, "SELFADAPT_API_KEY": keys[Role.admin]}
    result = CliRunner().invoke(
        cli, ["restem", "run", "-n", "acme", "--rounds", "1", "--docs", "1", "--samples", "2"],
        env=env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job_id = result.output.strip()
    assert job_id.startswith("adj_")
    shown = CliRunner().invoke(cli, ["jobs", "show", job_id, "--json"], env=env)
    job = json.loads(shown.output)
    assert (job["kind"], job["status"]) == ("restem", "queued")
    assert job["params"] == {"rounds": 1, "docs": 1, "samples": 2}
    again = CliRunner().invoke(cli, ["restem", "run", "-n", "acme", "--json"], env=env)
    assert again.exit_code == 1
    assert "error (409)" in again.output


def test_restem_run_bad_input(served: tuple[str, dict[Role, str]]) -> None:
    url, keys = served
    runner = CliRunner()
    admin = ["--url", url, "--key", keys[Role.admin]]
    unknown = runner.invoke(cli, ["restem", "run", "-n", "nowhere", *admin])
    assert unknown.exit_code == 1
    assert "error (404): Namespace 'nowhere' does not exist." in unknown.output
    too_many = runner.invoke(cli, ["restem", "run", "-n", "acme", "--samples", "99", *admin])
    assert too_many.exit_code == 1
    assert "error (400): 'samples' must be between 1 and 10, got 99." in too_many.output
    operator = runner.invoke(
        cli, ["restem", "run", "-n", "acme", "--url", url, "--key", keys[Role.operator]]
    )
    assert operator.exit_code == 1
    assert "error (403)" in operator.output
    nokey = runner.invoke(
        cli, ["restem", "run", "-n", "acme", "--url", url], env={"SELFADAPT_API_KEY": ""}
    )
    assert nokey.exit_code == 2
