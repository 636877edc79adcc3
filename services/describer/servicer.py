"""``spr.v1.Describer`` over gRPC: a thin adapter from the RPC to :class:`.logic.Describer`.

Errors are typed (:mod:`services.common.errors`, :mod:`services.describer.errors`) and raised; the
shared bootstrap (:mod:`services.common.grpc_server`) turns them into their gRPC status with the code
in the ``spr-error-code`` trailer, counts them, and turns anything unexpected into INTERNAL without
stopping the server. The handler's deadline (the client's, or the server default) bounds the Triton
call; a client that cancels cancels the Triton call too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import grpc

from services.common.grpc_server import RegisterFn, service_names
from services.describer.logic import Describer
from services.describer.settings import DescriberSettings
from spr.v1 import describer_pb2, describer_pb2_grpc


class DescriberServicer(describer_pb2_grpc.DescriberServicer):
    """Streams one ``DescribeRegionResponse`` per candidate."""

    def __init__(self, describer: Describer) -> None:
        self.describer = describer

    def DescribeRegion(
        self, request: describer_pb2.DescribeRegionRequest, context: grpc.ServicerContext
    ) -> Iterator[describer_pb2.DescribeRegionResponse]:
        """Describe the region, then stream its candidates (all N come from one Triton call)."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        description = self.describer.describe(request, deadline=deadline, on_cancel=context.add_callback)
        yield from description.responses()


def make_register(settings: DescriberSettings) -> RegisterFn:
    """The RegisterFn of ``run_service``: one Describer (Triton client + event loop) per process."""
    return register_with(Describer(settings))


def register_with(describer: Describer) -> RegisterFn:
    """A RegisterFn adding a servicer around an existing Describer (tests, embedding)."""

    def register(server: grpc.Server) -> Iterable[str]:
        describer_pb2_grpc.add_DescriberServicer_to_server(DescriberServicer(describer), server)
        return service_names(describer_pb2)

    return register
