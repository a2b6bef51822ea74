"""BlobStore: content addressing, atomic installs, verification of corrupt and missing blobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store.blobs import BlobCorrupt, BlobMissing, BlobStore, hash_dir


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def _blob_dirs(root: Path) -> list[Path]:
    return [p for p in root.glob("??/*") if p.is_dir()]


FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"\x00" * 1000}


def test_put_dir_idempotent(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    first = store.put_dir(_folder(tmp_path / "a", FILES))
    second = store.put_dir(_folder(tmp_path / "b", FILES))

    assert first == second
    assert first.path == tmp_path / "blobs" / first.sha256[:2] / first.sha256
    assert first.size_bytes == sum(len(v) for v in FILES.values())
    assert _blob_dirs(tmp_path / "blobs") == [first.path]
    assert sorted(p.name for p in first.path.iterdir()) == sorted(FILES)
    assert first.sha256 == hash_dir(first.path)[0]


def test_put_dir_different_content_different_sha(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    one = store.put_dir(_folder(tmp_path / "a", FILES))
    two = store.put_dir(_folder(tmp_path / "b", {**FILES, "README.md": b"hi"}))
    assert one.sha256 != two.sha256
    assert len(_blob_dirs(tmp_path / "blobs")) == 2


def test_put_dir_file_boundaries_are_part_of_the_hash(tmp_path: Path) -> None:
    # Without sizes in the hash, a's tail could be read as b's name: same stream, same sha.
    split = _folder(tmp_path / "split", {"a": b"1", "b": b"2"})
    joined = _folder(tmp_path / "joined", {"a": b"1b\x002"})
    assert hash_dir(split)[0] != hash_dir(joined)[0]


def test_put_dir_leaves_no_temp_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    store.put_dir(_folder(tmp_path / "a", FILES))
    store.put_dir(_folder(tmp_path / "b", FILES))  # the duplicate's temp copy is dropped
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_put_dir_failure_is_atomic(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    src = _folder(tmp_path / "a", FILES)
    with pytest.raises(FileNotFoundError):
        store.put_dir(src, names=[*FILES, "manifest.json"])  # one named file is missing
    assert _blob_dirs(tmp_path / "blobs") == []
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_put_dir_names_selects_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    src = _folder(tmp_path / "a", {**FILES, "train_log.json": b"{}"})
    (src / "checkpoint-1").mkdir()
    blob = store.put_dir(src, names=list(FILES))
    assert sorted(p.name for p in blob.path.iterdir()) == sorted(FILES)


def test_put_dir_skips_symlinks_and_subdirs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not copy")
    src = _folder(tmp_path / "a", FILES)
    (src / "README.md").symlink_to(secret)
    (src / "sub").mkdir()
    blob = store.put_dir(src)
    assert sorted(p.name for p in blob.path.iterdir()) == sorted(FILES)
    with pytest.raises(FileNotFoundError):
        store.put_dir(src, names=["README.md"])


def test_corrupt_blob_detected(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    blob = store.put_dir(_folder(tmp_path / "a", FILES))
    weights = blob.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[500] ^= 0xFF  # flip one byte
    weights.write_bytes(bytes(data))

    assert store.path_for(blob.sha256) == blob.path  # trusted from the in-memory cache
    with pytest.raises(BlobCorrupt) as exc:
        store.verify(blob.sha256, force=True)
    assert exc.value.sha256 == blob.sha256
    with pytest.raises(BlobCorrupt):
        store.path_for(blob.sha256)  # the failed check dropped it from the cache
    with pytest.raises(BlobCorrupt):
        BlobStore(tmp_path / "blobs").path_for(blob.sha256)  # a fresh process rehashes


def test_put_dir_replaces_corrupt_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    blob = store.put_dir(_folder(tmp_path / "a", FILES))
    (blob.path / "adapter_config.json").write_bytes(b"{}")
    fresh = BlobStore(tmp_path / "blobs")
    assert fresh.put_dir(_folder(tmp_path / "b", FILES)) == blob
    assert fresh.verify(blob.sha256, force=True) == blob.path


def test_missing_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(BlobMissing):
        store.path_for("0" * 64)
    with pytest.raises(BlobMissing):
        store.path_for("../../etc")  # not a sha256: never turned into a path

    blob = store.put_dir(_folder(tmp_path / "a", FILES))
    assert store.delete(blob.sha256)
    assert not blob.path.exists()
    with pytest.raises(BlobMissing):
        store.path_for(blob.sha256)
    assert not store.delete(blob.sha256)


def test_cleanup_tmp_removes_stale_dirs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    stale = tmp_path / "blobs" / "tmp" / "dead"
    stale.mkdir(parents=True)
    assert store.cleanup_tmp(older_than_s=3600) == 0
    assert store.cleanup_tmp(older_than_s=-1) == 1
    assert not stale.exists()
