"""credex: the points program's administration tool."""

__version__ = "0.1.0"


def collect_for_a_long_run() -> None:
    """The garbage collector's settings for a command that works through many rows or messages
    (``award bulk``, ``relay run``, ``warehouse run``), called once it has imported what it needs.

    Everything alive at that point (the imported modules, their classes and functions: most of
    the process's heap) lives until exit, yet every full pass of the collector walked all of it
    again, and a long run triggers passes all the time: about a sixth of ``award bulk``'s CPU.
    ``gc.freeze()`` moves those objects out of the collector's sight. Young passes come every
    50,000 allocations instead of 700 (a batch of rows allocates hundreds of thousands of
    objects); reference cycles are still collected, a little later. Nothing else changes.
    The garbage of start-up is collected first, so that none of it is kept for good.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000)
