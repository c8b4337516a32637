"""The garbage collector, settled after start-up.

Measured on a cache miss (issue 22): the cycle collector took ~15 % of the proxy's CPU
and freed nothing, because all per-request garbage dies by reference counting; what it
kept doing was traverse the long-lived objects of start-up (modules, settings, pools).
So once the app is up: collect once, freeze what is left (``gc.freeze``: never scanned
again), and raise the thresholds so that young-generation passes are rare. Cycles made
later (an exception's traceback, a failing upstream call) are still collected: the
collector runs, only less often.
"""

from __future__ import annotations

import gc

# Generation 0 every 50,000 net container allocations (default 700); the older ones
# after 20 and 100 passes of the younger (defaults 10, 10).
THRESHOLDS = (50_000, 20, 100)


class SettledCollector:
    """Settle on entry (after start-up), restore on exit; re-entrant for the test
    suite's many apps in one process (only the outermost restores)."""

    _depth = 0
    _saved: tuple[int, int, int] = gc.get_threshold()

    def settle(self) -> None:
        if SettledCollector._depth == 0:
            SettledCollector._saved = gc.get_threshold()
        SettledCollector._depth += 1
        gc.collect()
        gc.freeze()
        gc.set_threshold(*THRESHOLDS)

    def restore(self) -> None:
        SettledCollector._depth -= 1
        if SettledCollector._depth == 0:
            gc.unfreeze()
            gc.set_threshold(*SettledCollector._saved)
