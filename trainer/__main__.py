"""`python -m trainer once|run|rollback|export-parquet [--field value ...]` (`--help` lists every field).

* once: read the pairs waiting from the committed offsets, train one round, publish, commit; exit.
* run: the long-running mode; trains every N new pairs, every T minutes, or on demand (Admin
  TriggerTraining -> `trainer.control`).
* rollback: re-point an alias (`--alias stable [--to_version V]`) on the `adapters` topic.
* export-parquet: write the waiting pairs as a Hugging Face Parquet dataset (`--out FILE`); commits nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from trainer.config import TrainerConfig

log = logging.getLogger("trainer")
COMMANDS = ("once", "run", "rollback", "export-parquet")


@dataclass
class CommandArgs:
    """Arguments of the rollback and export-parquet commands."""

    alias: str = field(default="stable", metadata={"help": "rollback: the alias to re-point."})
    to_version: str = field(default="", metadata={"help": "rollback: target version ('' = previous)."})
    reason: str = field(default="", metadata={"help": "rollback: why (recorded on the topic)."})
    out: str = field(default="pairs.parquet", metadata={"help": "export-parquet: output file."})


def _once(cfg: TrainerConfig) -> int:
    from spr.v1 import adapters_pb2
    from trainer.rounds import make_trigger, run_round
    from trainer.source import Batch, drain, open_consumer

    consumer = open_consumer(cfg)
    try:
        trigger = make_trigger(adapters_pb2.TRIGGER_KIND_ONE_SHOT, "spr-trainer once")
        report = run_round(cfg, consumer, drain(consumer, cfg, Batch()), trigger)
    finally:
        consumer.close()
    print(json.dumps(asdict(report), sort_keys=True))
    return 0


def _run(cfg: TrainerConfig) -> int:
    from prometheus_client import start_http_server

    from services.adapters.store import AdapterStore
    from trainer.rounds import SKIPPED, TriggerPolicy, run_round
    from trainer.source import Batch, on_demand, open_consumer, open_control_consumer

    if cfg.metrics_port:
        start_http_server(cfg.metrics_port)
    policy, store = TriggerPolicy(cfg), AdapterStore(cfg.store)
    consumer, control, batch = open_consumer(cfg), open_control_consumer(cfg), Batch()
    trained = store.trained_pair_ids()
    try:
        while True:
            batch.add(consumer.poll(timeout_ms=1000, max_records=cfg.max_pairs))
            polled = control.poll(timeout_ms=100, max_records=1)  # one request per round
            trigger = policy.due(batch, trained, on_demand(polled))
            if trigger is None:
                control.commit(polled)  # malformed control records only: logged, not retried
                time.sleep(0.1)
                continue
            log.info("round triggered: %s", trigger.reason)
            report = run_round(cfg, consumer, batch, trigger)
            log.info("round: %s", json.dumps(asdict(report), sort_keys=True))
            control.commit(polled)  # the request is answered only once its round is over
            if report.outcome != SKIPPED:  # a skipped batch stays: its records are not committed
                batch, trained = Batch(), store.trained_pair_ids()
    except KeyboardInterrupt:
        return 0
    finally:
        consumer.close()
        control.close()


def _rollback(cfg: TrainerConfig, args: CommandArgs) -> int:
    from trainer.publish import rollback

    response = rollback(cfg, args.alias, args.to_version, args.reason or "rollback by trainer CLI")
    print(
        json.dumps(
            {"alias": args.alias, "version": response.alias.version, "previous": response.previous_version}
        )
    )
    return 0


def _export(cfg: TrainerConfig, args: CommandArgs) -> int:
    from services.describer.families import get_family
    from trainer.dataset import build_dataset, dataset_sha256, export_parquet
    from trainer.source import Batch, drain, open_consumer

    consumer = open_consumer(cfg)
    try:
        batch = drain(consumer, cfg, Batch())
    finally:
        consumer.close()  # nothing committed: exporting does not consume pairs for training
    dataset = build_dataset(batch.pairs(), get_family(cfg.model_family))
    path = export_parquet(dataset, Path(args.out))
    print(json.dumps({"path": str(path), "rows": len(dataset), "dataset_sha256": dataset_sha256(dataset)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m trainer` (and `spr-trainer`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(f"usage: python -m trainer {{{'|'.join(COMMANDS)}}} [--help] [options]", file=sys.stderr)
        return 2
    command = args.pop(0)
    parser = HfArgumentParser((TrainerConfig, CommandArgs))  # type: ignore[arg-type]
    cfg, extra = parser.parse_args_into_dataclasses(args=args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "once":
        return _once(cfg)
    if command == "run":
        return _run(cfg)
    if command == "rollback":
        return _rollback(cfg, extra)
    return _export(cfg, extra)


if __name__ == "__main__":
    sys.exit(main())
