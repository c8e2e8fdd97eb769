"""What ``award bulk``, ``relay run`` and ``warehouse run`` do to the garbage collector once they
have imported what they need (``collect_for_a_long_run``): what is alive then is frozen out of
the collector's passes, and garbage made afterwards, cycles included, is still collected."""

from __future__ import annotations

import gc
import weakref

from credex import collect_for_a_long_run


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector can free it


def test_what_was_alive_is_frozen_and_a_cycle_made_later_is_still_collected_unasked() -> None:
    alive = _Node()
    assert any(tracked is alive for tracked in gc.get_objects())
    collect_for_a_long_run()
    assert gc.get_freeze_count() > 0
    assert not any(tracked is alive for tracked in gc.get_objects()), "no pass should walk it again"

    cycle = _Node()
    freed = weakref.ref(cycle)
    del cycle
    assert freed() is not None  # a cycle outlives its last name: it waits for a pass
    made = []
    threshold = gc.get_threshold()[0]
    for _ in range(4 * threshold):  # a young pass must come long before the end
        made.append([])
        if freed() is None:
            break
    assert freed() is None, "no pass of the collector freed the cycle"
    # Within about the threshold (other threads' frees may delay the pass a little): soon, not at exit.
    assert len(made) <= 2 * threshold, f"the cycle was freed only after {len(made)} allocations"
