"""The GIL hand-off interval of the processes pyrepl3 owns (server, session processes).

A cancel reaches a busy cell through another thread: the server's event
loop reads the request, a session process's channel reader reads the
message, the timer thread fires a ``timeout``.  While the cell's thread
computes (``while True: pass``) that thread waits for the GIL until the
interpreter forces a switch, ``sys.getswitchinterval()`` later: 5 ms by
default, paid once per hand-off, and a cancel over the protocol crosses
two of them (request in, response out).  ``bench/bench_server.py``
measured cancel -> response of such a loop in an in-process session over a
unix socket at 2.9-3.5 ms p50 with 0.5 ms against 8.4-9.8 ms with 5 ms
(docs/protocol.md, "Measured").

The price: when two threads both want the CPU, they switch every
interval instead of every 5 ms; a cell printing as fast as it can, whose
events the loop writes, is such a case (events/s moved either way within
the noise of the same runs).  Only the processes pyrepl3 runs itself set
it; an application embedding the engine keeps its own setting.
"""

from __future__ import annotations

import os
import sys

#: seconds; 10x the interpreter's default
INTERVAL = 0.0005


def shorten_switch_interval(interval: float | None = None) -> None:
    """Make a thread waiting for the GIL get it within ``interval`` (never longer
    than the process already had).  ``PYREPL3_SWITCH_INTERVAL`` (seconds)
    overrides the default, for operators and for measuring the trade."""
    if interval is None:
        try:
            interval = float(os.environ.get("PYREPL3_SWITCH_INTERVAL") or INTERVAL)
        except ValueError:
            interval = INTERVAL
    if interval > 0 and sys.getswitchinterval() > interval:
        sys.setswitchinterval(interval)
