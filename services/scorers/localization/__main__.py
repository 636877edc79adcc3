"""``python -m services.scorers.localization``: run the localization scorer gRPC service.

Configure with ``SPR_LOCALIZATION_*`` variables or ``--config FILE``; ``--help-env`` lists them. The
Kafka stage is a separate process: ``python -m services.scorers.localization.stage``.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.grpc_server import run_service
from services.scorers.localization.servicer import make_register
from services.scorers.localization.settings import LocalizationSettings


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point (``spr-localization-scorer``)."""
    run_service(LocalizationSettings, make_register, argv)


if __name__ == "__main__":
    main()
