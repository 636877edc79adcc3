"""``spr.v1.Admin`` over gRPC: a thin adapter from the RPCs to :class:`.logic.AdminCore`.

Errors are typed (:mod:`services.common.errors`, :mod:`services.admin.errors`) and raised; the shared
bootstrap turns them into their gRPC status with the code in the ``spr-error-code`` trailer.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from services.admin.logic import AdminCore
from services.admin.settings import AdminSettings
from services.common.grpc_server import RegisterFn, service_names
from spr.v1 import adapters_pb2, adapters_pb2_grpc


class AdminServicer(adapters_pb2_grpc.AdminServicer):
    """Each RPC is one call of the core."""

    def __init__(self, core: AdminCore) -> None:
        self.core = core

    def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        """Versions in the store, aliases on the topic, versions loaded on the replicas."""
        return self.core.list_adapters()

    def Promote(
        self, request: adapters_pb2.PromoteRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.AliasResponse:
        """Move an alias to a stored version (through the eval gate for gated aliases)."""
        return self.core.promote(
            request.version, request.alias, request.reason, skip_eval_gate=request.skip_eval_gate
        )

    def Rollback(
        self, request: adapters_pb2.RollbackRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.AliasResponse:
        """Move an alias back to ``to_version`` or to its previous version."""
        return self.core.rollback(request.alias, request.to_version, request.reason)

    def GetPipelineStats(
        self, request: adapters_pb2.PipelineStatsRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.PipelineStatsResponse:
        """Consumer lag, throughput and dead letters per stage."""
        return self.core.pipeline_stats()

    def TriggerTraining(
        self, request: adapters_pb2.TriggerTrainingRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.TriggerTrainingResponse:
        """Queue an on-demand training round for the long-running trainer; returns its trigger id."""
        return self.core.trigger_training(request.reason)


def make_register(settings: AdminSettings) -> RegisterFn:
    """The RegisterFn of ``run_service``: one AdminCore per process."""
    return register_with(AdminCore(settings))


def register_with(core: AdminCore) -> RegisterFn:
    """A RegisterFn adding a servicer around an existing core (tests, embedding)."""

    def register(server: grpc.Server) -> Iterable[str]:
        adapters_pb2_grpc.add_AdminServicer_to_server(AdminServicer(core), server)
        return service_names(adapters_pb2)

    return register
