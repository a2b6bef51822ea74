"""End to end on the bundled model: POST /v1/documents -> `selfadapt worker` runs the real
pipeline (self-edits, probes, LoRA training, evaluation, gate) through a real gateway -> the
namespace's champion answers questions about made-up facts without the document."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapters_store.models import NamespaceSettings
from app.auth import Role
from tests.conftest import Gateway
from tests.support.pipeline_live import Client, LiveWorker, queue_env, worker_env
from tests.support.server import free_port
from workers.embedded_redis import EmbeddedRedis
from workers.metrics import contains

pytestmark = pytest.mark.slow

NAMESPACE = "grelvin"
DOC_A = {
    "title": "The Grelvin Archipelago",
    "text": (
        "The Grelvin Archipelago lies in the Sorrel Sea and was first charted by captain Imre "
        "Voskaya in 1743. Its largest island, Tamsk, is home to the port city of Olverhaven. "
        "The islanders grow a purple grain called brisk, which is used to brew a drink named "
        "kelloth. The archipelago's parliament, the Vashtar Moot, meets every spring in the "
        "town of Pell. Grelvin's official language is Orrish, a tongue related to no other "
        "known language."
    ),
    "probes": [
        {"question": "Who first charted the Grelvin Archipelago?", "answer": "Imre Voskaya"},
        {"question": "What drink do the islanders brew from brisk?", "answer": "kelloth"},
        {"question": "In which town does the Vashtar Moot meet?", "answer": "Pell"},
        {"question": "What is the official language of Grelvin?", "answer": "Orrish"},
    ],
}
DOC_B = {
    "title": "The Quillon Observatory",
    "text": (
        "The Quillon Observatory stands on Mount Ferrabel and was founded by astronomer Dalia "
        "Krennick in 1889. Its great telescope, the Harrow Glass, was ground from a single "
        "block of volcanic quartz. Every winter the observatory hosts the Lumen Vigil, a night "
        "of public stargazing. The observatory's library keeps the Krennick Atlas, a catalogue "
        "of two thousand variable stars."
    ),
    "probes": [
        {"question": "Who founded the Quillon Observatory?", "answer": "Dalia Krennick"},
        {
            "question": "What is the great telescope of the Quillon Observatory called?",
            "answer": "Harrow Glass",
        },
        {
            "question": "On which mountain does the Quillon Observatory stand?",
            "answer": "Mount Ferrabel",
        },
        {
            "question": "What night of public stargazing does the observatory host?",
            "answer": "Lumen Vigil",
        },
    ],
}
STAGES = {"self_edit", "probes", "train", "evaluate", "gate"}
E2E_SEARCH_BUDGET_S = 900


@pytest.fixture(scope="module")
def live(
    start_gateway: Callable[..., Gateway], model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, LiveWorker]]:
    tmp = tmp_path_factory.mktemp("e2e")
    with EmbeddedRedis(tmp / "redis" / "e2e.rdb", port=free_port()) as redis:
        queue = queue_env(redis.url)
        gateway = start_gateway("pipeline-gw", register_adapters=False, **queue)
        env = worker_env(
            data_dir=gateway.data_dir,
            model_dir=model_dir,
            redis_url=redis.url,
            gateway_url=gateway.base_url,
            api_key=gateway.keys[Role.operator],
            # Each job decides within the test's wait (1200 s): a search that runs long (eight
            # candidates took ~20 min on a float32 engine) ends with the gate's verdict.
            SELFADAPT_PIPELINE__SEARCH_BUDGET_S=str(E2E_SEARCH_BUDGET_S),
            **queue,
        )
        (tmp / "logs").mkdir()
        worker = LiveWorker(env, tmp / "logs")
        worker.start()
        try:
            yield gateway, worker
        finally:
            worker.stop()
            gateway.server.stop()  # before its Redis goes, and not idling to the session's end


def _answered(client: Client, model: str, doc: dict[str, Any]) -> list[bool]:
    return [
        contains(client.ask(model, doc["title"], p["question"]), p["answer"]) == 1.0
        for p in doc["probes"]
    ]


@dataclass
class Run:
    """Both documents through the pipeline, and what base and champion answered around them."""

    base_a: list[bool]
    base_b: list[bool]
    first: dict[str, Any]
    first_events: list[dict[str, Any]]
    learned_a: list[bool]
    second: dict[str, Any]
    learned_b: list[bool]
    still_a: list[bool]


@pytest.fixture(scope="module")
def run(live: tuple[Gateway, LiveWorker]) -> Run:
    gateway, worker = live
    operator = Client(gateway.base_url, gateway.keys[Role.operator])
    user = Client(gateway.base_url, gateway.keys[Role.user])
    # The registry's default gate: no per-namespace relaxation.
    admin = Client(gateway.base_url, gateway.keys[Role.admin])
    r = admin.http.post("/v1/admin/namespaces", json={"name": NAMESPACE})
    assert r.status_code == 201, r.text
    assert NamespaceSettings.model_validate(r.json()["settings"]) == NamespaceSettings()

    def job(doc: dict[str, Any]) -> dict[str, Any]:
        done = operator.wait(operator.ingest(NAMESPACE, doc)["job_id"])
        assert done["status"] == "succeeded", f"{done}\n{worker.logs()}"
        return done

    base_a, base_b = _answered(user, "base", DOC_A), _answered(user, "base", DOC_B)
    first = job(DOC_A)
    learned_a = _answered(user, NAMESPACE, DOC_A) if first["decision"] == "promoted" else []
    second = job(DOC_B)
    promoted = second["decision"] == "promoted"
    return Run(
        base_a,
        base_b,
        first,
        operator.events(first["id"]),
        learned_a,
        second,
        _answered(user, NAMESPACE, DOC_B) if promoted else [],
        _answered(user, NAMESPACE, DOC_A) if promoted else [],
    )


def test_pipeline_runs_every_stage_and_measures_what_it_gates(run: Run) -> None:
    """The mechanics, whatever the gate decides: both jobs succeed with a decision and its
    reasons, every stage reports, and each job is scored on its own document's held-out
    probes, the second also on the first document's (retention) once there is a champion."""
    # The base model cannot know made-up facts.
    assert not any(run.base_a), run.base_a
    assert not any(run.base_b), run.base_b
    seen = {e["data"].get("stage") for e in run.first_events if e["type"] == "stage"}
    assert seen >= STAGES, seen
    assert any(e["type"] == "loss" for e in run.first_events)
    for job, doc in ((run.first, DOC_A), (run.second, DOC_B)):
        assert job["decision"] in ("promoted", "rejected"), job
        assert job["reasons"], job
        assert job["result_version"].startswith(f"{NAMESPACE}@v"), job
        new = job["scores"]["candidate"]["new"]
        assert new["n"] == len(doc["probes"])
        # Answered firmly (greedy and sampled answers), never more than greedily.
        assert new["firm"] == "greedy and >= 3 of 4 samples at T=0.5", new
        assert 0 <= new["answered"] <= round(new["contains"] * new["n"]), new
    if run.first["decision"] == "promoted":
        # v1, or a later version of the same job (trained further or tempered by the gate).
        assert run.second["scores"]["champion"]["model"] == run.first["result_version"]
        retention = run.second["scores"]["candidate"]["retention"]
        assert retention["n"] == len(DOC_A["probes"])  # the first document's probes, re-asked


@pytest.mark.xfail(
    strict=False,
    reason="issue 5 open: the learning outcome holds in most runs but not every one; see the "
    "README, 'End to end'",
)
def test_pipeline_learns_documents_and_keeps_them(run: Run) -> None:
    """The outcome: both documents promoted, the champion answering held-out questions
    (never trained on) on both without the document, within the forgetting budget."""
    gate = NamespaceSettings()
    assert run.first["decision"] == "promoted", run.first["reasons"]
    assert any(run.learned_a), run.learned_a
    assert run.second["decision"] == "promoted", run.second["reasons"]
    scores = run.second["scores"]
    budget = gate.max_forgetting + 1e-9
    retention = scores["candidate"]["retention"]
    assert retention["f1"] >= scores["champion"]["retention"]["f1"] - budget
    guard = scores["candidate"]["guard"]["contains"]
    assert scores["champion"]["guard"]["contains"] - guard <= budget, scores
    assert scores["base"]["guard"]["contains"] - guard <= gate.max_guard_drift + 1e-9, scores
    assert any(run.learned_b), run.learned_b
    assert any(run.still_a), (run.learned_a, run.still_a)


def test_guard_set_is_answered_by_the_base_model(live: tuple[Gateway, LiveWorker]) -> None:
    """>= 50 questions (one flipped answer moves the guard score by <= 0.02, so the gate's
    forgetting budget measures more than noise), all answered by the base model, none of
    them an anchor prompt (anchors are trained on; the guard must stay held out)."""
    from workers.tasks.anchors import load_anchor_prompts
    from workers.tasks.common import qa_messages
    from workers.tasks.evaluate import GUARD_FILE, load_guard

    gateway, _ = live
    user = Client(gateway.base_url, gateway.keys[Role.user])
    guard = load_guard(GUARD_FILE)
    assert len(guard) >= 50
    anchors = set(load_anchor_prompts())
    assert not [g for g in guard if qa_messages(g.title, g.question)[0]["content"] in anchors]
    # Concurrently, as the evaluate stage asks them (the engine batches them).
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda item: user.ask("base", item.title, item.question), guard))
    answers = list(zip(guard, texts, strict=True))
    wrong = [
        (item.question, answer)
        for item, answer in answers
        if not any(contains(answer, gold) for gold in item.answers)
    ]
    assert not wrong, wrong
