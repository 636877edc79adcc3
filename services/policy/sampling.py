"""Sampling parameters of one policy request: the contract between the describer and the policy.

Torch-free on purpose: the describer imports it without loading the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling parameters (SPEC: N = 8, temperature 0.7–1.0, top-p 0.9).

    Frozen and hashable: the policy batches requests whose sampling is equal, so a seed set on
    only some requests keeps them out of the others' batch.
    """

    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 64
    seed: int | None = None  # None = unseeded
    greedy: bool = False
