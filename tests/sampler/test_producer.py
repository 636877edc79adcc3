"""The region sampler on a real broker: seeded, rate-limited, resumable after kill -9, restartable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer

from services.common.kafka_io import KafkaSettings, Topic, ensure_topics
from services.devstack.broker import BrokerProcess
from services.sampler.producer import HEADER_POSITION, HEADER_RUN, RegionSampler, TokenBucket
from services.sampler.settings import SamplerSettings
from spr.v1 import common_pb2

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO-format file: 60 images of 320x240 with 3-7 boxes each."""
    rng = random.Random(7)
    images, annotations = [], []
    for image_id in range(1, 61):
        images.append({"id": image_id, "file_name": f"img{image_id}.jpg", "width": 320, "height": 240})
        for _ in range(rng.randint(3, 7)):
            x, y = rng.uniform(0, 280), rng.uniform(0, 200)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": rng.randint(1, 3),
                    "bbox": [x, y, rng.uniform(5, 40), rng.uniform(5, 40)],
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(["cat", "dog", "bus"], 1)]
    path = tmp_path_factory.mktemp("coco") / "toy.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def sampler_settings(kafka: KafkaSettings, dataset: Path, **overrides: Any) -> SamplerSettings:
    values: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "api_version": ".".join(map(str, kafka.api_version)) if kafka.api_version else None,
        "regions_topic": f"regions-{uuid.uuid4().hex[:8]}",
        "dataset": dataset,
        "image_root": str(dataset.parent),
        "rate": 0,
        "metrics_enabled": False,
        **overrides,
    }
    return SamplerSettings(**values)


def read_regions(kafka: KafkaSettings, topic: str, idle_s: float = 2.0) -> list[Any]:
    """Every record of ``topic`` (until nothing new arrived for ``idle_s``)."""
    consumer = KafkaConsumer(
        topic, **kafka.common_kwargs(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    got: list[Any] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            for batch in consumer.poll(timeout_ms=300).values():
                got.extend(batch)
                last = time.monotonic()
    finally:
        consumer.close()
    return got


def positions(records: list[Any]) -> list[int]:
    return sorted(int(dict(r.headers)[HEADER_POSITION]) for r in records)


def test_the_same_seed_samples_the_same_regions_keyed_by_region_id(
    kafka_broker: BrokerProcess, dataset: Path
) -> None:
    kafka = kafka_broker.settings()
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        settings = sampler_settings(kafka, dataset, seed=seed, max_regions=40, run_id=f"run-{name}")
        assert RegionSampler(settings).run(threading.Event()) == 40
        records = read_regions(kafka, settings.regions_topic)
        runs[name] = {r.key: common_pb2.Region.FromString(r.value) for r in records}
        assert len(runs[name]) == len(records) == 40
        assert all(region.region_id == key.decode() for key, region in runs[name].items())
        assert {dict(r.headers)[HEADER_RUN] for r in records} == {f"run-{name}".encode()}
    assert runs["a"] == runs["b"]  # same seed: same ids and identical regions
    assert runs["a"] != runs["c"]
    assert all(region.sampler_seed == 3 for region in runs["a"].values())


def test_the_token_bucket_paces_the_regions(kafka_broker: BrokerProcess, dataset: Path) -> None:
    settings = sampler_settings(kafka_broker.settings(), dataset, max_regions=16, rate=10.0, burst=1)
    started = time.monotonic()
    assert RegionSampler(settings).run(threading.Event()) == 16
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 6.0  # 15 waits of 0.1 s after the first token

    bucket, begin = TokenBucket(rate=50.0, burst=5), time.monotonic()
    for _ in range(5):
        bucket.take()
    assert time.monotonic() - begin < 0.05  # the burst is available at once


def start_sampler(settings: SamplerSettings, *flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, value in settings.model_dump(exclude_none=True).items():
        env[f"SPR_SAMPLER_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    argv = [sys.executable, "-m", "services.sampler.producer", *flags]
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_a_sampler_killed_mid_run_resumes_without_repeating_or_losing_regions(
    kafka_broker: BrokerProcess, dataset: Path
) -> None:
    kafka = kafka_broker.settings()
    clean = sampler_settings(kafka, dataset, max_regions=60, batch_size=8, seed=11, run_id="clean")
    RegionSampler(clean).run(threading.Event())
    expected = {r.key for r in read_regions(kafka, clean.regions_topic)}

    settings = sampler_settings(kafka, dataset, max_regions=60, batch_size=8, seed=11, rate=8.0)
    # Created before anyone reads it (a read of a missing topic may auto-create it with 1 partition).
    ensure_topics(kafka, [Topic(settings.regions_topic, common_pb2.Region, partitions=settings.partitions)])
    process = start_sampler(settings)
    watcher = KafkaConsumer(
        settings.regions_topic,
        **kafka.common_kwargs(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        deadline, seen = time.monotonic() + 60, 0
        while seen < 20:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sampler exited or stalled: {process.communicate(timeout=5)[0]}")
            seen += sum(len(batch) for batch in watcher.poll(timeout_ms=100).values())
        process.send_signal(signal.SIGKILL)  # mid-batch, with sends in flight
        process.wait(30)
    finally:
        watcher.close()
        if process.poll() is None:
            process.kill()
    before = read_regions(kafka, settings.regions_topic)
    assert 20 <= len(before) < 60

    resumed = start_sampler(settings)
    output, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, output
    records = read_regions(kafka, settings.regions_topic)
    assert positions(records) == list(range(60)), output  # each position exactly once
    assert Counter(r.key for r in records).most_common(1)[0][1] == 1
    assert {r.key for r in records} == expected  # the same regions as a run never killed

    again = start_sampler(settings)  # the run is complete: nothing more to sample
    assert again.communicate(timeout=120)[0] and again.returncode == 0
    assert len(read_regions(kafka, settings.regions_topic)) == 60

    restarted = start_sampler(settings, "--restart")  # asked to: the whole sequence again
    output, _ = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, output
    assert Counter(r.key for r in read_regions(kafka, settings.regions_topic)) == {key: 2 for key in expected}
