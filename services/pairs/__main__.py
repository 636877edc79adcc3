"""``python -m services.pairs`` (``spr-pair-builder``): run the pair builder until SIGTERM/SIGINT.

Configure with ``SPR_PAIRS_*`` variables or ``--config FILE``; ``--help-env`` lists them. On SIGTERM the
builder finishes its current poll, waits for the acknowledgement of everything it produced, commits,
and leaves its consumer group (open regions are re-read by whoever owns their partitions next).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from services.common import metrics as common_metrics
from services.common.settings import load_settings
from services.pairs.builder import PairBuilder
from services.pairs.settings import PairBuilderSettings

_LOG = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point (``spr-pair-builder``)."""
    settings = load_settings(PairBuilderSettings, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.metrics_enabled:
        common_metrics.start_metrics_server(settings.metrics_port, settings.metrics_host)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    builder = PairBuilder(settings)
    _LOG.info(
        "pair builder: %s -> %s (group %s, run %r)",
        ", ".join(t.name for t in builder.inputs),
        settings.pairs_topic,
        settings.group_id,
        settings.run_id,
    )
    try:
        builder.run(stop)
    finally:
        builder.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()
