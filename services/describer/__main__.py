"""``python -m services.describer``: run the Describer gRPC service (health, reflection, metrics).

Configure with ``SPR_DESCRIBER_*`` variables or ``--config FILE``; ``--help-env`` lists them. The
Kafka stage is a separate process: ``python -m services.describer.stage``.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.grpc_server import run_service
from services.describer.servicer import make_register
from services.describer.settings import DescriberSettings


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point (``spr-describer``)."""
    run_service(DescriberSettings, make_register, argv)


if __name__ == "__main__":
    main()
