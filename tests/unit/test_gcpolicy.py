"""The collector's policy for long-lived processes (infra/gcpolicy.py)."""

from __future__ import annotations

import subprocess
import sys


def test_settle_freezes_what_is_held_and_collects_cycles_less_often_but_still() -> None:
    # In a fresh interpreter: freezing is process-wide and must not leak into this one.
    script = """
import gc, weakref
from infra import gcpolicy
held = [object() for _ in range(1000)]
gcpolicy.settle()
assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()
assert gc.get_threshold()[0] == gcpolicy.YOUNG_THRESHOLD, gc.get_threshold()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None, "a cycle made after settle() was not collected"
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
