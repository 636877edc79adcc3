"""The region sampler (``spr-sampler``): a COCO-format dataset in, ``Region`` records on ``regions`` out.

* **Seeded.** The run's region sequence is :func:`services.sampler.regions.iter_regions` of the
  dataset under ``seed``: images in id order, draw ``i`` of an image from its own generator
  ``(seed, image, i)``. Same dataset and seed, same regions in the same order; region ids are
  :func:`services.core.region_id` (dataset, image, members), the key of every record.
* **Rate-limited.** A token bucket (``rate`` regions/s, ``burst``) paces the sends.
* **Resumable, from the topic itself.** Every record carries headers ``spr-run-id``,
  ``spr-sampler-attempt`` (when this run was (re)started from its beginning), ``spr-sampler-position``
  (its index in the sequence) and ``spr-sampler-batch`` (``start-end`` of its batch). Batches are
  ``batch_size`` consecutive positions, and a batch starts only once the previous one was fully
  acknowledged. So, at start-up, the newest records of this run and attempt (read backwards from the
  end of each partition) name the last batch ``[S, E)``: every position below ``S`` is in the topic,
  and of ``[S, E)`` exactly those found. The sampler re-sends the missing ones of ``[S, E)`` and goes
  on at ``E``: after a crash, even ``kill -9``, no region is sampled twice and none is lost. We chose
  the topic over a checkpoint file because the topic cannot disagree with itself; the price is a
  backwards read of a few records per partition at start-up and regenerating the sequence up to the
  resume point (cheap: sampling is pure numpy).
* **Asked to, it samples again.** ``--restart`` (``SPR_SAMPLER_RESTART=true``) starts a new attempt of
  the same run at position 0; a new ``run_id`` (or seed) is a new run.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer

from services.common import metrics as common_metrics
from services.common.kafka_io import Headers, ProtoProducer, Topic, ensure_topics
from services.common.settings import load_settings
from services.core import read_coco
from services.core.dataset import DatasetError
from services.sampler import tail
from services.sampler.regions import iter_regions
from services.sampler.settings import SamplerSettings
from spr.v1 import common_pb2

_LOG = logging.getLogger(__name__)

HEADER_RUN = "spr-run-id"
HEADER_ATTEMPT = "spr-sampler-attempt"
HEADER_POSITION = "spr-sampler-position"
HEADER_BATCH = "spr-sampler-batch"

PRODUCED = common_metrics.counter("spr_sampler_regions", "Regions produced to the regions topic.")
RATE = common_metrics.gauge(
    "spr_sampler_rate_regions_per_second", "Regions produced per second, measured over each batch."
)
POSITION = common_metrics.gauge("spr_sampler_position", "Next position of the run's region sequence.")


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; :meth:`take` blocks for one."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def take(self, stop: threading.Event | None = None) -> bool:
        """Wait for a token; False when ``stop`` was set meanwhile. ``rate <= 0`` never waits."""
        if self.rate <= 0:
            return True
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            wait = (1 - self._tokens) / self.rate
            if stop is not None and stop.wait(wait):
                return False
            if stop is None:
                time.sleep(wait)


@dataclass(frozen=True)
class Resume:
    """Where a run goes on: its attempt, the batch to complete and the next position."""

    attempt: int
    next_position: int = 0
    #: The last batch ``[start, end)`` and the positions of it still missing from the topic.
    batch: tuple[int, int] = (0, 0)
    missing: frozenset[int] = field(default_factory=frozenset)


@dataclass
class _Tail:
    """The newest records of the run in one partition: ``(attempt, batch, position)`` each."""

    marks: list[tuple[int, tuple[int, int], int]] = field(default_factory=list)


def _mark(record: Any, run_id: str) -> tuple[int, tuple[int, int], int] | None:
    if tail.header(record, HEADER_RUN) != run_id:
        return None
    try:
        start, end = (int(v) for v in (tail.header(record, HEADER_BATCH) or "").split("-"))
        return (
            int(tail.header(record, HEADER_ATTEMPT) or ""),
            (start, end),
            int(tail.header(record, HEADER_POSITION) or ""),
        )
    except ValueError:
        _LOG.warning(
            "ignoring a record of run %s with malformed sampler headers at %d", run_id, record.offset
        )
        return None


def find_resume(consumer: KafkaConsumer, topic: str, run_id: str) -> Resume | None:
    """Where ``run_id`` stopped according to ``topic``; None when the topic holds none of its records.

    Per partition, records are read backwards until one of the run is found; then on, in the
    partitions whose newest record belongs to the newest (attempt, batch), until a record of an
    older batch shows that the rest of the batch is not there.
    """
    newest: dict[Any, tuple[Iterator[Any], _Tail]] = {}
    for partition in tail.partitions_of(consumer, topic):
        records, found = tail.newest_first(consumer, partition), _Tail()
        for record in records:
            mark = _mark(record, run_id)
            if mark is not None:
                found.marks.append(mark)
                break
        if found.marks:
            newest[partition] = (records, found)
    if not newest:
        return None
    attempt, batch = max((found.marks[0][0], found.marks[0][1]) for _, found in newest.values())
    positions: set[int] = set()
    for records, found in newest.values():
        if (found.marks[0][0], found.marks[0][1]) != (attempt, batch):
            continue  # this partition holds nothing of the last batch
        positions.add(found.marks[0][2])
        for record in records:  # the rest of the batch in this partition, until an older record
            mark = _mark(record, run_id)
            if mark is None:
                continue
            if (mark[0], mark[1]) != (attempt, batch):
                break
            positions.add(mark[2])
    missing = frozenset(range(*batch)) - positions
    return Resume(attempt, next_position=batch[1], batch=batch, missing=missing)


class RegionSampler:
    """Produces the run's region sequence to the regions topic; :meth:`run` until done or stopped."""

    def __init__(self, settings: SamplerSettings) -> None:
        self.settings = settings
        self.run_id = settings.effective_run_id()
        self.kafka = settings.kafka()
        self.topic = Topic(settings.regions_topic, common_pb2.Region, partitions=settings.partitions)
        self.dataset = read_coco(
            settings.dataset,
            settings.image_root,
            dataset_id=settings.effective_dataset_id(),
            include_crowd=settings.include_crowd,
        )
        if not any(self.dataset.objects_by_image.values()):
            raise DatasetError(f"{settings.dataset}: no image with an annotated object to sample from")
        if self.dataset.bad_records:
            _LOG.warning(
                "%d dataset records rejected, e.g. %s",
                len(self.dataset.bad_records),
                self.dataset.bad_records[0],
            )

    def sequence(self) -> Iterator[common_pb2.Region]:
        """The run's regions in order (``max_regions`` of them at most)."""
        s = self.settings
        regions = iter_regions(self.dataset, s.seed, per_image=s.regions_per_image, k=s.k, pad=s.pad)
        for position, region in enumerate(regions):
            if s.max_regions and position >= s.max_regions:
                return
            yield region

    def resume_point(self) -> Resume:
        """Where to start: from the topic, or a new attempt at position 0 (first run or restart)."""
        if not self.settings.restart:
            consumer = tail.reader(self.kafka)
            try:
                found = find_resume(consumer, self.topic.name, self.run_id)
            finally:
                consumer.close()
            if found is not None:
                return found
        return Resume(attempt=int(time.time() * 1000))

    def run(self, stop: threading.Event) -> int:
        """Sample and produce until the sequence ends or ``stop`` is set; returns regions produced."""
        if self.settings.ensure_topic:
            ensure_topics(self.kafka, [self.topic])
        resume = self.resume_point()
        _LOG.info(
            "sampler run %s attempt %d: resuming at %d (re-sending %d of batch %s)",
            self.run_id,
            resume.attempt,
            resume.next_position,
            len(resume.missing),
            resume.batch,
        )
        bucket = TokenBucket(self.settings.rate, self.settings.burst)
        produced = 0
        with ProtoProducer(self.kafka) as producer:
            for batch, regions in self._batches(resume):
                started = time.monotonic()
                for position, region in regions:
                    if not bucket.take(stop):
                        producer.flush()
                        return produced
                    producer.send(
                        self.topic,
                        region.region_id,
                        region,
                        extra_headers=self._headers(resume, batch, position),
                    )
                    produced += 1
                    PRODUCED.inc()
                producer.flush()  # the next batch starts only when this one is in the topic
                POSITION.set(batch[1])
                RATE.set(len(regions) / max(time.monotonic() - started, 1e-9))
                if stop.is_set():
                    break
        return produced

    def _batches(
        self, resume: Resume
    ) -> Iterator[tuple[tuple[int, int], list[tuple[int, common_pb2.Region]]]]:
        """``(batch range, [(position, region)])`` from the resume point on.

        First the missing positions of the unfinished batch, then batches ``[S, S + batch_size)``.
        A range may reach past the end of the sequence: positions that do not exist are never
        missing, so a resume after the last batch finds nothing more to send.
        """
        size = self.settings.batch_size
        unfinished: list[tuple[int, common_pb2.Region]] = []
        current: list[tuple[int, common_pb2.Region]] = []
        for position, region in enumerate(self.sequence()):
            if position < resume.next_position:
                if position in resume.missing:
                    unfinished.append((position, region))
                continue
            if unfinished:
                yield resume.batch, unfinished
                unfinished = []
            current.append((position, region))
            if len(current) == size:
                yield (current[0][0], current[0][0] + size), current
                current = []
        if unfinished:
            yield resume.batch, unfinished
        if current:
            yield (current[0][0], current[0][0] + size), current

    def _headers(self, resume: Resume, batch: tuple[int, int], position: int) -> Headers:
        return [
            (HEADER_RUN, self.run_id.encode()),
            (HEADER_ATTEMPT, str(resume.attempt).encode()),
            (HEADER_POSITION, str(position).encode()),
            (HEADER_BATCH, f"{batch[0]}-{batch[1]}".encode()),
        ]


def main(argv: Sequence[str] | None = None) -> None:
    """``spr-sampler [--restart]``: produce the run's regions until done or SIGTERM/SIGINT."""
    args = list(sys.argv[1:] if argv is None else argv)
    restart = "--restart" in args
    args = [a for a in args if a != "--restart"]
    settings = load_settings(SamplerSettings, args, **({"restart": True} if restart else {}))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.metrics_enabled:
        common_metrics.start_metrics_server(settings.metrics_port, settings.metrics_host)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    produced = RegionSampler(settings).run(stop)
    _LOG.info("sampler produced %d regions", produced)


if __name__ == "__main__":
    main()
