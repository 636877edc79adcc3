"""The Admin API: adapter versions, aliases and promotion, rollback, and pipeline health (SPEC §3).

Layout, as every service:

* :mod:`.history` — replays the compacted ``adapters`` topic into manifests, aliases and each alias's
  trail of versions (what rollback returns to);
* :mod:`.gate` — the eval gate a version passes before an alias such as ``stable`` may name it;
* :mod:`.replicas` — what each policy replica has loaded, scraped from its Triton ``/metrics``;
* :mod:`.pipeline` — consumer lag, throughput and dead letters per stage, from Kafka's offsets;
* :mod:`.logic` — :class:`~.logic.AdminCore`, the core (no gRPC);
* :mod:`.servicer` — ``spr.v1.Admin`` over gRPC;
* :mod:`.settings`, :mod:`.metrics`, :mod:`.errors`; ``python -m services.admin`` starts the server.

Nothing here imports torch or the policy: the admin service stays a small process.
"""
