"""The adapter store: immutable, content-addressed LoRA adapter versions in a directory.

Layout (a plain directory, a mounted PVC, or any path a pod can reach)::

    <root>/versions/<version>/adapter_config.json
                              adapter_model.safetensors      # standard PEFT folder: PEFT, vLLM load it
                              spr_pair_ids.txt               # ids of the pairs it was trained on
                              spr_manifest.json              # spr.v1.AdapterManifest as JSON, written last
    <root>/staging/<random>/                                 # work area, never listed

Publication writes into `staging/`, fsyncs, then renames the folder into `versions/` in one
`rename(2)`: a reader either sees a complete version or none (the manifest is also the last file
written, the rule that carries over to object stores, which have no rename). Versions are named
`spr-v<round>-<hash8>` where hash8 is taken from the sha256 of the adapter's files and base model,
so the same training output always gets the same name and re-publishing is idempotent.

`spr_pair_ids.txt` (one pair id a line, sorted) is how the trainer never trains a pair twice: a pair
id that reappears on `pairs` after the round that used it was published (an upstream retry, a replay)
is found in :meth:`AdapterStore.trained_pair_ids`. It lives inside the version folder, so it becomes
visible in the same rename as the weights: a crash can neither lose the record nor leave it without
its version. PEFT and vLLM ignore the extra file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from spr.v1 import adapters_pb2

MANIFEST_NAME = "spr_manifest.json"
PAIR_IDS_NAME = "spr_pair_ids.txt"
_CHUNK = 1 << 20


class AdapterStoreError(Exception):
    """A version is missing, incomplete or fails verification."""


@dataclass(frozen=True)
class VerifiedAdapter:
    """A version whose files matched its manifest when it was checked."""

    version: str
    path: Path
    manifest: adapters_pb2.AdapterManifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: Path) -> list[adapters_pb2.FileDigest]:
    """sha256 and size of every file under `folder` except the manifest, in a stable order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return [
        adapters_pb2.FileDigest(
            path=str(p.relative_to(folder)), sha256=sha256_file(p), size_bytes=p.stat().st_size
        )
        for p in files
    ]


def content_version(files: list[adapters_pb2.FileDigest], base_model_id: str, round_index: int) -> str:
    digest = hashlib.sha256(base_model_id.encode())
    for f in files:
        digest.update(f"{f.path}\0{f.sha256}\0".encode())
    return f"spr-v{round_index}-{digest.hexdigest()[:8]}"


def write_pair_ids(folder: Path, pair_ids: Iterable[str]) -> Path:
    """Record in an adapter folder the ids of the pairs it was trained on (before publishing it)."""
    ids = sorted(set(pair_ids))
    if any(not pid or "\n" in pid for pid in ids):
        raise AdapterStoreError("pair ids must be non-empty single-line strings")
    path = folder / PAIR_IDS_NAME
    path.write_text("".join(f"{pid}\n" for pid in ids))
    return path


def manifest_to_json(manifest: adapters_pb2.AdapterManifest) -> str:
    return json_format.MessageToJson(manifest, sort_keys=True, indent=1)


def manifest_from_json(text: str) -> adapters_pb2.AdapterManifest:
    return json_format.Parse(text, adapters_pb2.AdapterManifest())


def _fsync_tree(folder: Path) -> None:
    """Flush file contents and directory entries so a crash after rename cannot expose empty files."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    for directory in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AdapterStore:
    """A directory of immutable adapter versions. Safe for concurrent readers and one publisher."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(str(root).removeprefix("file://"))
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"

    def publish(
        self, adapter_dir: Path, manifest: adapters_pb2.AdapterManifest, round_index: int
    ) -> adapters_pb2.AdapterManifest:
        """Copy a PEFT adapter folder into the store atomically; return the completed manifest.

        `manifest` carries lineage (base model, pair ranges, hyper-parameters, metrics); this fills in
        version, file digests, uri and creation time. Publishing identical content again returns the
        existing version untouched.
        """
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        staging = self.staging_dir / uuid.uuid4().hex
        shutil.copytree(adapter_dir, staging, ignore=shutil.ignore_patterns(MANIFEST_NAME))
        try:
            return self._commit(staging, manifest, round_index)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(
        self, staging: Path, manifest: adapters_pb2.AdapterManifest, round_index: int
    ) -> adapters_pb2.AdapterManifest:
        completed = adapters_pb2.AdapterManifest()
        completed.CopyFrom(manifest)
        del completed.files[:]
        completed.files.extend(file_digests(staging))
        completed.version = content_version(list(completed.files), completed.base_model_id, round_index)
        final = self.versions_dir / completed.version
        completed.uri = final.as_uri()
        if not completed.created_unix_ms:
            completed.created_unix_ms = int(time.time() * 1000)
        if final.exists():
            return self.verify(completed.version).manifest
        (staging / MANIFEST_NAME).write_text(manifest_to_json(completed))
        _fsync_tree(staging)
        os.rename(staging, final)
        _fsync_tree(self.versions_dir)
        return completed

    def list_versions(self) -> list[adapters_pb2.AdapterManifest]:
        """Every complete version (those with a manifest), oldest first."""
        if not self.versions_dir.is_dir():
            return []
        manifests = []
        for folder in self.versions_dir.iterdir():
            path = folder / MANIFEST_NAME
            if path.is_file():
                manifests.append(manifest_from_json(path.read_text()))
        return sorted(manifests, key=lambda m: (m.created_unix_ms, m.version))

    def trained_pair_ids(self) -> set[str]:
        """Ids of every pair some complete version was trained on (versions without the file add none)."""
        trained: set[str] = set()
        if not self.versions_dir.is_dir():
            return trained
        for folder in self.versions_dir.iterdir():
            ids = folder / PAIR_IDS_NAME
            if (folder / MANIFEST_NAME).is_file() and ids.is_file():
                trained.update(line for line in ids.read_text().splitlines() if line)
        return trained

    def path_of(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise AdapterStoreError(f"invalid adapter version {version!r}")
        return self.versions_dir / version

    def verify(self, version: str, expected_base_model_id: str | None = None) -> VerifiedAdapter:
        """Check that a version is complete, its files match their sha256, and its base model fits."""
        folder = self.path_of(version)
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise AdapterStoreError(f"adapter {version!r} not found in {self.root}")
        manifest = manifest_from_json(manifest_path.read_text())
        if expected_base_model_id is not None and manifest.base_model_id != expected_base_model_id:
            raise AdapterStoreError(
                f"adapter {version!r} was trained on {manifest.base_model_id!r}, "
                f"this replica serves {expected_base_model_id!r}"
            )
        actual = {f.path: f.sha256 for f in file_digests(folder)}
        expected = {f.path: f.sha256 for f in manifest.files}
        if actual != expected:
            bad = sorted(p for p in set(actual) | set(expected) if actual.get(p) != expected.get(p))
            raise AdapterStoreError(f"adapter {version!r} fails its checksums: {', '.join(bad)}")
        return VerifiedAdapter(version=version, path=folder, manifest=manifest)

    def clean_staging(self, older_than_s: float = 3600.0) -> int:
        """Remove staging folders left by publishers that died mid-copy; return how many."""
        if not self.staging_dir.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - older_than_s
        for folder in self.staging_dir.iterdir():
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed
