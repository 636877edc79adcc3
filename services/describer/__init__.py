"""The Describer: the policy MLLM (on Triton) describes an image region N times (SPEC §2 "Prompting").

Layout, as every service:

* :mod:`.families` — model families: coordinate format, prompt templates, the exact image resize;
* :mod:`.triton_client` — the async Triton gRPC client of the ``spr_policy`` model (retries, errors);
* :mod:`.logic` — the core: validate, crop/resize, prompt, call, parse into full-image pixels;
* :mod:`.servicer` — ``spr.v1.Describer`` over gRPC; :mod:`.stage` — the Kafka stage
  ``regions`` -> ``descriptions``;
* :mod:`.settings`, :mod:`.metrics`, :mod:`.errors`; ``python -m services.describer`` starts the server.
"""
