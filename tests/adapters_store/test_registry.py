"""AdapterRegistry on SQLite and PostgreSQL: versions, promote/rollback rules, audit, events."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store.blobs import BlobStore
from adapters_store.events import ChangeEvent
from adapters_store.models import AdapterStatus, AdapterVersion, AuditEvent, Namespace
from adapters_store.registry import AdapterRegistry
from adapters_store.validation import InvalidAdapter
from app.errors import Conflict, InvalidRequest, NotFound
from tests.adapters_store.conftest import RecordingPublisher, copy_adapter


async def _count(maker: async_sessionmaker[AsyncSession], model: type) -> int:
    async with maker() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def _register(
    registry: AdapterRegistry, tiny: list[Path], n: int, ns: str = "acme"
) -> list[AdapterVersion]:
    return [await registry.register_version(ns, tiny[i % len(tiny)], "worker") for i in range(n)]


def _alias_moved(ns: str, version_id: int) -> ChangeEvent:
    return ChangeEvent("alias_moved", ns, "champion", version_id)


async def test_version_numbers_per_namespace(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    acme = await _register(registry, tiny_adapters, 3)
    other = await _register(registry, tiny_adapters, 1, ns="other")
    assert [v.version for v in acme] == [1, 2, 3]
    assert [v.name for v in acme] == ["acme@v1", "acme@v2", "acme@v3"]
    assert other[0].version == 1
    assert len({v.id for v in [*acme, *other]}) == 4  # global ids: the engine's LoRA ids
    v1 = acme[0]
    assert (v1.status, v1.rank, v1.base_model, v1.created_by) == (
        AdapterStatus.candidate,
        4,
        "smollm2-test",
        "worker",
    )
    assert registry.blobs.path_for(v1.blob_sha256).is_dir()
    assert [ns.name for ns in await registry.list_namespaces()] == ["acme", "other"]
    actions = [e.action for e in await registry.audit(namespace="acme")]
    assert actions == ["version.create"] * 3 + ["namespace.create"]


async def test_concurrent_registrations_get_distinct_numbers(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    await registry.ensure_namespace("acme", "admin")
    rows = await asyncio.gather(
        *(registry.register_version("acme", tiny_adapters[0], "w") for _ in range(5))
    )
    assert sorted(r.version for r in rows) == [1, 2, 3, 4, 5]


async def test_deleted_numbers_and_ids_are_not_reused(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    rows = await _register(registry, tiny_adapters, 3)
    await registry.delete("acme", 3, "admin")
    again = await registry.register_version("acme", tiny_adapters[2], "w")
    assert again.version == 4
    assert again.id > rows[2].id


async def test_register_lineage_and_metadata(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    parent = (await _register(registry, tiny_adapters, 1))[0]
    child = await registry.register_version(
        "acme",
        tiny_adapters[1],
        "worker",
        parent_version=1,
        job_id="job-7",
        scores={"f1": 0.5},
        note="from docs",
    )
    assert (child.parent_version_id, child.job_id, child.scores, child.note) == (
        parent.id,
        "job-7",
        {"f1": 0.5},
        "from docs",
    )
    with pytest.raises(NotFound):
        await registry.register_version("acme", tiny_adapters[1], "w", parent_version=9)
    updated = await registry.set_scores(child.id, {"f1": 0.9})
    assert (await registry.get_version("acme", 2)).scores == updated.scores == {"f1": 0.9}


async def test_promote_moves_champion_with_audit_and_event(
    registry: AdapterRegistry, tiny_adapters: list[Path], publisher: RecordingPublisher
) -> None:
    v1, v2 = await _register(registry, tiny_adapters, 2)
    publisher.events.clear()

    promoted = await registry.promote("acme", 1, "alice", reason="first")
    assert promoted.status is AdapterStatus.promoted
    assert (await registry.resolve("acme")).name == "acme@v1"
    await registry.promote("acme", 2, "alice")
    resolved = await registry.resolve("acme")
    assert (resolved.name, resolved.version_id, resolved.version) == ("acme@v2", v2.id, 2)
    assert (await registry.get_version("acme", 1)).status is AdapterStatus.promoted

    first, second = reversed(
        [e for e in await registry.audit(namespace="acme") if e.action == "version.promote"]
    )
    assert (first.actor, first.target, first.reason) == ("alice", "acme@v1", "first")
    assert first.before == {"champion": None, "previous_champion": None}
    assert first.after is not None
    assert first.after["champion"]["version_id"] == v1.id
    assert second.before == first.after
    assert second.after is not None
    assert second.after["champion"]["name"] == "acme@v2"
    assert second.after["previous_champion"]["name"] == "acme@v1"
    assert publisher.events == [_alias_moved("acme", v1.id), _alias_moved("acme", v2.id)]


async def test_promote_champion_again_is_a_no_op(
    registry: AdapterRegistry, tiny_adapters: list[Path], publisher: RecordingPublisher
) -> None:
    await _register(registry, tiny_adapters, 1)
    await registry.promote("acme", 1, "alice")
    events, audits = len(publisher.events), len(await registry.audit())
    await registry.promote("acme", 1, "alice")
    assert (len(publisher.events), len(await registry.audit())) == (events, audits)


async def test_before_move_runs_before_the_alias_moves(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    await _register(registry, tiny_adapters, 2)
    await registry.promote("acme", 1, "alice")
    seen: list[str] = []

    async def load(version: AdapterVersion) -> None:
        seen.append(version.name)
        seen.append((await registry.resolve("acme")).name)  # still the old champion

    await registry.promote("acme", 2, "alice", before_move=load)
    assert seen == ["acme@v2", "acme@v1"]
    assert (await registry.resolve("acme")).name == "acme@v2"


async def test_failed_before_move_changes_nothing(
    registry: AdapterRegistry,
    tiny_adapters: list[Path],
    publisher: RecordingPublisher,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    await _register(registry, tiny_adapters, 2)
    await registry.promote("acme", 1, "alice")
    audits, events = await _count(sessionmaker, AuditEvent), list(publisher.events)

    async def engine_down(version: AdapterVersion) -> None:
        raise RuntimeError("engine could not load the adapter")

    with pytest.raises(RuntimeError):
        await registry.promote("acme", 2, "alice", before_move=engine_down)
    with pytest.raises(RuntimeError):
        await registry.rollback("acme", "alice", to_version=2, before_move=engine_down)

    assert (await registry.resolve("acme")).name == "acme@v1"
    assert (await registry.get_version("acme", 2)).status is AdapterStatus.candidate
    assert await _count(sessionmaker, AuditEvent) == audits
    assert publisher.events == events


@pytest.mark.parametrize("status", [AdapterStatus.archived, AdapterStatus.failed])
async def test_promote_refused_for_retired_versions(
    registry: AdapterRegistry, tiny_adapters: list[Path], status: AdapterStatus
) -> None:
    await _register(registry, tiny_adapters, 2)
    v2 = await registry.get_version("acme", 2)
    if status is AdapterStatus.archived:
        await registry.archive("acme", 2, "alice")
    else:
        await registry.set_status(v2.id, status)
    with pytest.raises(Conflict) as exc:
        await registry.promote("acme", 2, "alice")
    assert (exc.value.code, exc.value.status_code) == ("not_promotable", 409)


async def test_rejected_version_may_be_promoted_by_an_admin(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    (v1,) = await _register(registry, tiny_adapters, 1)
    await registry.set_status(v1.id, AdapterStatus.rejected)
    assert (await registry.promote("acme", 1, "alice")).status is AdapterStatus.promoted


async def test_rollback_walks_back_through_earlier_champions(
    registry: AdapterRegistry, tiny_adapters: list[Path], publisher: RecordingPublisher
) -> None:
    v1, v2, _v3 = await _register(registry, tiny_adapters, 3)
    for n in (1, 2, 3):
        await registry.promote("acme", n, "alice")

    back = await registry.rollback("acme", "bob", reason="v3 forgets")
    assert back.name == "acme@v2"
    assert (await registry.resolve("acme")).version_id == v2.id
    assert (await registry.rollback("acme", "bob")).name == "acme@v1"
    with pytest.raises(Conflict) as exc:
        await registry.rollback("acme", "bob")
    assert exc.value.code == "no_previous_champion"
    assert (await registry.resolve("acme")).name == "acme@v1"

    rollbacks = [e for e in await registry.audit("acme") if e.action == "version.rollback"]
    assert [e.target for e in rollbacks] == ["acme@v1", "acme@v2"]
    last = rollbacks[-1]
    assert last.reason == "v3 forgets"
    assert last.actor == "bob"
    assert last.before is not None
    assert last.before["champion"]["name"] == "acme@v3"
    assert last.after is not None
    assert last.after["champion"]["name"] == "acme@v2"
    assert publisher.events[-2:] == [_alias_moved("acme", v2.id), _alias_moved("acme", v1.id)]


async def test_rollback_to_named_version(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    await _register(registry, tiny_adapters, 3)
    for n in (1, 2, 3):
        await registry.promote("acme", n, "alice")
    assert (await registry.rollback("acme", "bob", to_version=1)).name == "acme@v1"
    assert (await registry.resolve("acme")).name == "acme@v1"
    # The plain rollback after that goes back to what was replaced.
    assert (await registry.rollback("acme", "bob")).name == "acme@v3"
    with pytest.raises(NotFound) as exc:
        await registry.rollback("acme", "bob", to_version=42)
    assert exc.value.code == "version_not_found"


async def test_rollback_without_champion_history(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    await _register(registry, tiny_adapters, 1)
    with pytest.raises(Conflict) as exc:
        await registry.rollback("acme", "bob")
    assert exc.value.code == "no_previous_champion"
    with pytest.raises(NotFound) as nf:
        await registry.rollback("ghost", "bob")
    assert nf.value.code == "namespace_not_found"


async def test_delete_refused_for_champion(
    registry: AdapterRegistry, tiny_adapters: list[Path], publisher: RecordingPublisher
) -> None:
    await _register(registry, tiny_adapters, 1)
    await registry.promote("acme", 1, "alice")
    events = list(publisher.events)
    with pytest.raises(Conflict) as exc:
        await registry.delete("acme", 1, "alice")
    assert (exc.value.code, exc.value.status_code) == ("champion_delete", 409)
    assert (await registry.get_version("acme", 1)).status is AdapterStatus.promoted
    assert publisher.events == events


async def test_delete_refused_for_pinned_alias(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    await _register(registry, tiny_adapters, 2)
    await registry.set_alias("acme", "stable", 1, "alice", pinned=True)
    with pytest.raises(Conflict) as exc:
        await registry.delete("acme", 1, "alice")
    assert exc.value.code == "pinned_delete"
    assert (await registry.resolve("acme@stable")).name == "acme@v1"
    # An unpinned alias does not protect its version; it goes with it.
    await registry.set_alias("acme", "canary", 2, "alice")
    await registry.delete("acme", 2, "alice")
    assert "acme/canary" not in await registry.aliases_snapshot()
    with pytest.raises(InvalidRequest):
        await registry.set_alias("acme", "champion", 1, "alice")


async def test_delete_removes_unreferenced_blob_and_keeps_lineage(
    registry: AdapterRegistry, tiny_adapters: list[Path], blobs: BlobStore
) -> None:
    v1, v2 = await _register(registry, [tiny_adapters[0]], 2)  # same content: one blob
    v3 = await registry.register_version("acme", tiny_adapters[1], "w", parent_version=1)
    assert v1.blob_sha256 == v2.blob_sha256
    await registry.delete("acme", 1, "alice")
    assert blobs.exists(v1.blob_sha256)  # v2 still uses it
    assert (await registry.get_version("acme", 3)).parent_version_id is None
    await registry.delete("acme", 2, "alice")
    assert not blobs.exists(v1.blob_sha256)
    assert blobs.exists(v3.blob_sha256)
    with pytest.raises(NotFound):
        await registry.get_version("acme", 1)
    deletes = [e for e in await registry.audit("acme") if e.action == "version.delete"]
    assert [e.target for e in deletes] == ["acme@v2", "acme@v1"]
    assert deletes[0].before is not None
    assert deletes[0].before["version_id"] == v2.id


async def test_archive(
    registry: AdapterRegistry, tiny_adapters: list[Path], publisher: RecordingPublisher
) -> None:
    _v1, v2 = await _register(registry, tiny_adapters, 2)
    await registry.promote("acme", 1, "alice")
    archived = await registry.archive("acme", 2, "alice")
    assert archived.status is AdapterStatus.archived
    assert publisher.events[-1] == ChangeEvent("version_changed", "acme", None, v2.id)
    event = (await registry.audit("acme", limit=1))[0]
    assert (event.action, event.target) == ("version.archive", "acme@v2")
    assert event.before is not None
    assert event.before["status"] == "candidate"
    assert event.after is not None
    assert event.after["status"] == "archived"
    with pytest.raises(Conflict) as exc:
        await registry.archive("acme", 1, "alice")
    assert exc.value.code == "champion_archive"


async def test_resolve(registry: AdapterRegistry, tiny_adapters: list[Path]) -> None:
    v1, _v2 = await _register(registry, tiny_adapters, 2)
    with pytest.raises(NotFound) as exc:
        await registry.resolve("acme")
    assert exc.value.message == "namespace 'acme' has no champion yet"
    await registry.promote("acme", 1, "alice")

    champion = await registry.resolve("acme")
    assert champion == await registry.resolve("acme@champion")
    assert (champion.name, champion.version_id, champion.namespace) == ("acme@v1", v1.id, "acme")
    assert champion.blob_sha256 == v1.blob_sha256
    pinned = await registry.resolve("acme@v2")
    assert (pinned.name, pinned.status) == ("acme@v2", AdapterStatus.candidate)

    for model, code in [
        ("acme@v9", "version_not_found"),
        ("acme@nope", "version_not_found"),
        ("ghost", "namespace_not_found"),
        ("ghost@v1", "namespace_not_found"),
        ("base", "namespace_not_found"),
        ("Bad Name!", "namespace_not_found"),
    ]:
        with pytest.raises(NotFound) as exc:
            await registry.resolve(model)
        assert (exc.value.code, exc.value.param) == (code, "model"), model


async def test_aliases_snapshot(registry: AdapterRegistry, tiny_adapters: list[Path]) -> None:
    v1, v2 = await _register(registry, tiny_adapters, 2)
    assert await registry.aliases_snapshot() == {}
    await registry.promote("acme", 1, "alice")
    await registry.promote("acme", 2, "alice")
    assert await registry.aliases_snapshot() == {
        "acme/champion": v2.id,
        "acme/previous_champion": v1.id,
    }


async def test_audit_listing_and_paging(
    registry: AdapterRegistry, tiny_adapters: list[Path]
) -> None:
    await _register(registry, tiny_adapters, 2)
    await _register(registry, tiny_adapters, 1, ns="other")
    await registry.promote("acme", 1, "alice")
    everything = await registry.audit()
    assert [e.id for e in everything] == sorted((e.id for e in everything), reverse=True)
    assert len(everything) == 6
    acme = await registry.audit(namespace="acme")
    assert {e.namespace for e in acme} == {"acme"}
    assert len(acme) == 4
    page1 = await registry.audit(namespace="acme", limit=2)
    page2 = await registry.audit(namespace="acme", limit=2, before_id=page1[-1].id)
    assert [e.id for e in page1 + page2] == [e.id for e in acme]
    assert acme[0].at.tzinfo is not None


async def test_publisher_sees_committed_state(
    sessionmaker: async_sessionmaker[AsyncSession],
    blobs: BlobStore,
    tiny_adapters: list[Path],
) -> None:
    seen: list[tuple[str, str]] = []

    class CheckingPublisher:
        async def publish(self, event: ChangeEvent) -> None:
            # A separate session: only committed rows are visible to it.
            fresh = AdapterRegistry(sessionmaker, blobs, None, base_model="m")
            seen.append((event.kind, (await fresh.resolve("acme")).name))

    registry = AdapterRegistry(sessionmaker, blobs, CheckingPublisher(), base_model="m")
    await registry.register_version("acme", tiny_adapters[0], "w")
    seen.clear()  # nothing to resolve yet at registration
    await registry.promote("acme", 1, "alice")
    assert seen == [("alias_moved", "acme@v1")]


async def test_failing_publisher_does_not_fail_a_change(
    sessionmaker: async_sessionmaker[AsyncSession],
    blobs: BlobStore,
    tiny_adapters: list[Path],
) -> None:
    class BrokenPublisher:
        async def publish(self, event: ChangeEvent) -> None:
            raise ConnectionError("redis down")

    registry = AdapterRegistry(sessionmaker, blobs, BrokenPublisher(), base_model="m")
    await registry.register_version("acme", tiny_adapters[0], "w")
    await registry.promote("acme", 1, "alice")
    assert (await registry.resolve("acme")).name == "acme@v1"


async def test_import_version(
    registry: AdapterRegistry,
    fact_adapters: dict[str, Path],
    model_dir: Path,
    tmp_path: Path,
) -> None:
    src = copy_adapter(fact_adapters["zorb"], tmp_path / "upload")
    row = await registry.import_version("acme", src, "alice", model_dir, 32)
    assert (row.name, row.status, row.rank) == ("acme@v1", AdapterStatus.candidate, 16)
    event = (await registry.audit("acme", limit=1))[0]
    assert (event.action, event.actor, event.target) == ("version.import", "alice", "acme@v1")
    stored = registry.blobs.path_for(row.blob_sha256)
    assert sorted(p.name for p in stored.iterdir()) == sorted(p.name for p in src.iterdir())


async def test_bad_import_stores_nothing(
    registry: AdapterRegistry,
    sessionmaker: async_sessionmaker[AsyncSession],
    fact_adapters: dict[str, Path],
    model_dir: Path,
    tmp_path: Path,
    blobs: BlobStore,
) -> None:
    src = copy_adapter(fact_adapters["zorb"], tmp_path / "upload")
    with pytest.raises(InvalidAdapter) as exc:
        await registry.import_version("acme", src, "alice", model_dir, 8)
    assert exc.value.code == "rank_too_large"
    (src / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidAdapter):
        await registry.import_version("acme", src, "alice", model_dir, 32)
    for model in (Namespace, AdapterVersion, AuditEvent):
        assert await _count(sessionmaker, model) == 0
    assert not blobs.root.exists() or not list(blobs.root.glob("??/*"))


async def test_namespaces(registry: AdapterRegistry) -> None:
    ns = await registry.ensure_namespace("acme", "alice")
    assert (ns.name, ns.created_by, ns.gate.auto_promote) == ("acme", "alice", True)
    assert ns.settings == {
        "min_gain": 0.0,
        "max_forgetting": 0.05,
        "max_guard_drift": 0.1,
        "auto_promote": True,
    }
    assert (await registry.ensure_namespace("acme", "bob")).id == ns.id
    updated = await registry.update_namespace_settings("acme", {"min_gain": 0.1}, "alice")
    assert updated.gate.min_gain == 0.1
    assert updated.gate.max_forgetting == 0.05
    assert (await registry.get_namespace("acme")).settings["min_gain"] == 0.1
    with pytest.raises(InvalidRequest) as exc:
        await registry.update_namespace_settings("acme", {"nope": 1}, "alice")
    assert exc.value.param == "settings.nope"
    for bad in ("base", "A", "x", "1abc", "a_b", "a" * 64):
        with pytest.raises(InvalidRequest):
            await registry.ensure_namespace(bad, "alice")
    with pytest.raises(NotFound) as nf:
        await registry.get_namespace("ghost")
    assert nf.value.code == "namespace_not_found"
    actions = [e.action for e in await registry.audit("acme")]
    assert actions == ["namespace.update", "namespace.create"]
