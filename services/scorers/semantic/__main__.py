"""``python -m services.scorers.semantic``: run the semantic scorer gRPC service.

Configure with ``SPR_SEMANTIC_*`` variables or ``--config FILE``; ``--help-env`` lists them. The
Kafka stage is a separate process: ``python -m services.scorers.semantic.stage``.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.grpc_server import run_service
from services.scorers.semantic.servicer import make_register
from services.scorers.semantic.settings import SemanticSettings


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point (``spr-semantic-scorer``)."""
    run_service(SemanticSettings, make_register, argv)


if __name__ == "__main__":
    main()
