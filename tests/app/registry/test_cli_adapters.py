"""`selfadapt adapters ...` against a real HTTP listener (fake engine, SQLite)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.auth import Role
from app.cli import cli
from app.settings import Settings
from tests.app.registry.conftest import gateway_settings
from tests.conftest import _create_keys
from tests.support.server import fake_engine_server


@pytest.fixture
def served(tmp_path: Path, model_dir: Path) -> Iterator[tuple[str, dict[Role, str]]]:
    settings: Settings = gateway_settings(
        tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir
    )
    keys = _create_keys(settings)
    with fake_engine_server(settings) as url:
        yield url, keys


def test_cli_import_promote_rollback_list_audit(
    served: tuple[str, dict[Role, str]], tiny_adapters: list[Path]
) -> None:
    url, keys = served
    runner = CliRunner()
    env = {"SELFADAPT_URL": url, "SELFADAPT_API_KEY": keys[Role.admin]}

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["adapters", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    assert "imported acme@v1 (candidate" in run("import", "acme", str(tiny_adapters[0]))
    run("import", "acme", str(tiny_adapters[1]))
    assert "champion is now acme@v1 (was none)" in run("promote", "acme", "1")
    assert "champion is now acme@v2 (was acme@v1)" in run("promote", "acme", "v2", "--reason", "x")
    assert "champion is now acme@v1 (was acme@v2)" in run("rollback", "acme")
    assert run("list").split() == ["acme", "champion=acme@v1"]
    versions = run("list", "acme").splitlines()
    assert versions[0].split()[:3] == ["acme@v1", "promoted", "champion"]
    assert versions[1].split()[:3] == ["acme@v2", "promoted", "-"]
    assert json.loads(run("show", "acme", "2"))["name"] == "acme@v2"
    audit = run("audit", "--namespace", "acme").splitlines()
    assert [line.split()[2] for line in audit[:3]] == [
        "version.rollback",
        "version.promote",
        "version.promote",
    ]
    assert "x" in audit[1]
    as_json = json.loads(run("audit", "--limit", "1", "--json"))
    assert len(as_json["data"]) == 1


def test_cli_errors_print_message_and_exit_1(
    served: tuple[str, dict[Role, str]], tmp_path: Path
) -> None:
    url, keys = served
    runner = CliRunner()
    user = runner.invoke(cli, ["adapters", "list", "--url", url, "--key", keys[Role.user]])
    assert user.exit_code == 1
    assert "error (403)" in user.output
    missing = runner.invoke(
        cli, ["adapters", "promote", "acme", "3", "--url", url, "--key", keys[Role.admin]]
    )
    assert missing.exit_code == 1
    assert "namespace 'acme' does not exist" in missing.output
    folder = tmp_path / "adapter"
    folder.mkdir()
    admin = ["--url", url, "--key", keys[Role.admin]]
    empty = runner.invoke(cli, ["adapters", "import", "acme", str(folder), *admin])
    assert empty.exit_code == 2
    (folder / "adapter_config.json").write_text("{}")
    bad = runner.invoke(cli, ["adapters", "import", "acme", str(folder), *admin])
    assert bad.exit_code == 1
    assert "error (400): missing adapter_model.safetensors" in bad.output
    nokey = runner.invoke(cli, ["adapters", "list", "--url", url], env={"SELFADAPT_API_KEY": ""})
    assert nokey.exit_code == 2
