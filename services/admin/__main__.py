"""``python -m services.admin``: run the Admin gRPC service (health, reflection, metrics).

Configure with ``SPR_ADMIN_*`` variables or ``--config FILE``; ``--help-env`` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.admin.servicer import make_register
from services.admin.settings import AdminSettings
from services.common.grpc_server import run_service


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point (``python -m services.admin``)."""
    run_service(AdminSettings, make_register, argv)


if __name__ == "__main__":
    main()
