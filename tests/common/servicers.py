"""Test-only servicers of spr.v1 Admin and Describer that exercise the shared gRPC bootstrap.

They are NOT the real services: each method misbehaves on request (raise, abort, sleep, stream) so
that tests can check what the bootstrap does with it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import grpc

from services.common.errors import ImageUndecodable
from services.common.grpc_server import RegisterFn, service_names
from spr.v1 import adapters_pb2, adapters_pb2_grpc, describer_pb2, describer_pb2_grpc


class MisbehavingAdmin(adapters_pb2_grpc.AdminServicer):
    """Promote's ``version`` picks the behaviour: ok, boom, bad-image, abort, sleep:<seconds>."""

    def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        # Report what the handler sees, so tests can check the default/capped deadline.
        return adapters_pb2.ListAdaptersResponse(aliases={"time_remaining": repr(context.time_remaining())})

    def Promote(
        self, request: adapters_pb2.PromoteRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.AliasResponse:
        action = request.version
        if action == "boom":
            raise RuntimeError("secret detail /etc/private")
        if action == "bad-image":
            raise ImageUndecodable("not an image")
        if action == "abort":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such adapter")
        if action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
        return adapters_pb2.AliasResponse(previous_version=request.reason[:16])

    def Rollback(
        self, request: adapters_pb2.RollbackRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.AliasResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "test servicer")

    def GetPipelineStats(
        self, request: adapters_pb2.PipelineStatsRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.PipelineStatsResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "test servicer")

    def TriggerTraining(
        self, request: adapters_pb2.TriggerTrainingRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.TriggerTrainingResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "test servicer")


class CountingDescriber(describer_pb2_grpc.DescriberServicer):
    """Streams ``sampling.num_samples`` candidates; region_id "boom" fails after the first one."""

    def DescribeRegion(
        self, request: describer_pb2.DescribeRegionRequest, context: grpc.ServicerContext
    ) -> Iterator[describer_pb2.DescribeRegionResponse]:
        for index in range(request.sampling.num_samples):
            if index == 1 and request.region_id == "boom":
                raise ValueError("stream broke")
            yield describer_pb2.DescribeRegionResponse(
                candidate=describer_pb2.Candidate(sample_index=index, text=f"sample {index}")
            )


def register_test_services(server: grpc.Server) -> Iterable[str]:
    """A RegisterFn adding both test servicers."""
    adapters_pb2_grpc.add_AdminServicer_to_server(MisbehavingAdmin(), server)
    describer_pb2_grpc.add_DescriberServicer_to_server(CountingDescriber(), server)
    return service_names(adapters_pb2, describer_pb2)


REGISTER: RegisterFn = register_test_services
