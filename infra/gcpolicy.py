"""The garbage collector's policy for the stack's long-lived processes.

A turn allocates a few thousand short-lived objects, nearly none of them in cycles. With
CPython's default thresholds (700, 10, 10) that sets off a young collection every few
hundred allocations and, often enough, a full one that walks every object the process
holds (Ray's worker, the loaded modules, VADER's lexicon, the contexts). py-spy --native put
~14% of a busy shard's CPU in the collector, and the API process spent ~0.16 ms a turn in it
(issue 14). `settle()` is called once a process has
loaded what it keeps: it moves those objects out of the collector's sight (`gc.freeze`)
and raises the young threshold, so collections are rarer and each one walks only what was
made since. Cycles are still collected, just in larger batches.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000
"""Allocations (net of frees) between young collections; CPython's default is 700."""


def settle() -> None:
    """Freeze what the process holds now and collect cycles less often from here on."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
