"""The adapter store: atomic, content-addressed, verified publication."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.adapters.store import (
    MANIFEST_NAME,
    PAIR_IDS_NAME,
    AdapterStore,
    AdapterStoreError,
    write_pair_ids,
)
from spr.v1 import adapters_pb2


def _adapter_folder(root: Path, payload: bytes) -> Path:
    folder = root / f"adapter-{hashlib.sha256(payload).hexdigest()[:8]}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(payload)
    return folder


def _manifest() -> adapters_pb2.AdapterManifest:
    return adapters_pb2.AdapterManifest(base_model_id="tiny-qwen", pair_count=3)


def test_publish_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    folder = _adapter_folder(tmp_path, b"weights-1" * 100)
    first = store.publish(folder, _manifest(), round_index=1)
    again = store.publish(folder, _manifest(), round_index=1)
    other = store.publish(_adapter_folder(tmp_path, b"weights-2" * 100), _manifest(), round_index=2)
    assert first.version.startswith("spr-v1-") and len(first.version) == len("spr-v1-") + 8
    assert again.version == first.version and again.created_unix_ms == first.created_unix_ms
    assert other.version.startswith("spr-v2-") and other.version != first.version
    assert [m.version for m in store.list_versions()] == [first.version, other.version]
    assert {f.path for f in first.files} == {"adapter_config.json", "adapter_model.safetensors"}
    assert store.verify(first.version, expected_base_model_id="tiny-qwen").manifest == first
    assert not any(store.staging_dir.iterdir())


def test_verify_rejects_tampered_files_and_wrong_base(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    manifest = store.publish(_adapter_folder(tmp_path, b"w" * 64), _manifest(), round_index=1)
    with pytest.raises(AdapterStoreError, match="trained on"):
        store.verify(manifest.version, expected_base_model_id="another-base")
    weights = store.path_of(manifest.version) / "adapter_model.safetensors"
    weights.write_bytes(b"x" * 64)
    with pytest.raises(AdapterStoreError, match=r"checksums: adapter_model\.safetensors"):
        store.verify(manifest.version)
    with pytest.raises(AdapterStoreError, match="not found"):
        store.verify("spr-v9-deadbeef")
    with pytest.raises(AdapterStoreError, match="invalid"):
        store.path_of("../etc")


def test_publisher_killed_mid_copy_leaves_no_listed_version(tmp_path: Path) -> None:
    """kill -9 during the copy: the half-written folder stays in staging and is never listed."""
    store_root = tmp_path / "store"
    big = _adapter_folder(tmp_path, os.urandom(64))
    # A large file makes the copy slow enough to be killed in the middle.
    (big / "adapter_model.safetensors").write_bytes(os.urandom(96 << 20))
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from services.adapters.store import AdapterStore
        from spr.v1 import adapters_pb2
        AdapterStore({str(store_root)!r}).publish(
            Path({str(big)!r}), adapters_pb2.AdapterManifest(base_model_id="b"), round_index=1)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    staging = store_root / "staging"
    while proc.poll() is None and not (staging.is_dir() and any(staging.iterdir())):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = AdapterStore(store_root)
    assert store.list_versions() == []
    assert not (store_root / "versions").exists() or not any(
        (p / MANIFEST_NAME).exists() for p in (store_root / "versions").iterdir()
    )
    assert store.clean_staging(older_than_s=-1) >= 0
    assert not any(staging.iterdir())


def test_trained_pair_ids_come_from_complete_versions_only(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    first = _adapter_folder(tmp_path, b"weights-1" * 100)
    write_pair_ids(first, ["p2", "p1", "p1"])
    assert (first / PAIR_IDS_NAME).read_text() == "p1\np2\n"  # sorted, unique: content-addressed
    published = store.publish(first, _manifest(), round_index=1)
    assert PAIR_IDS_NAME in {f.path for f in published.files}  # covered by the manifest's checksums
    second = _adapter_folder(tmp_path, b"weights-2" * 100)
    write_pair_ids(second, ["p3"])
    store.publish(second, _manifest(), round_index=2)
    store.publish(_adapter_folder(tmp_path, b"weights-3" * 100), _manifest(), round_index=3)  # no ids file
    # A version folder without its manifest is incomplete (a crash mid-publication): not counted.
    partial = store.versions_dir / "spr-v9-00000000"
    partial.mkdir()
    (partial / PAIR_IDS_NAME).write_text("p9\n")
    assert store.trained_pair_ids() == {"p1", "p2", "p3"}
    with pytest.raises(AdapterStoreError):
        write_pair_ids(second, ["two\nlines"])
