"""Where a round trip's and a cancel's time goes, from timestamps taken inside
the server.

Run: ``python bench/timeline_server.py [--trips N] [--cancels N]``.

``bench_server.py`` gives end-to-end figures whose run-to-run spread (0.5
ms on a cancel) hides changes of 0.1 ms; this one says which step moved.
It starts ``pyrepl3 serve --unix`` with a few of its functions wrapped to
record ``time.perf_counter()`` (``CLOCK_MONOTONIC``, the same clock in
every process of the machine) on entry and exit: the read callback
(``feed``), the ``execute`` and ``cancel`` handlers, the cell's run on its
session thread, the arming of a cancel, its delivery in the cell, every
message a thread queues, and the loop's writes.  A raw client drives
``x = 1`` round trips and cancels of ``while True: pass`` in an in-process
session and stamps what it sends and receives; per step, the median offset
from the request's sending is printed.  The wrappers cost a few
microseconds each: compare runs of this script, not its totals with
``bench_server.py``.  Not run by ``nox -s bench`` (it is a diagnosis, not a
figure with a target).
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def serve_with_timestamps(out: str, argv: list[str]) -> int:
    """The child: the server, its steps stamped, the stamps written at exit."""
    from time import perf_counter

    import pyrepl3_ext.server as server
    from pyrepl3_ext import cli
    from pyrepl3_ext.cancellation import manager, monitoring
    from pyrepl3_ext.engine import executor

    stamps: list[tuple[str, float]] = []

    def stamped(owner: object, name: str, tag: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            stamps.append((tag, perf_counter()))
            try:
                return inner(*args, **kwargs)
            finally:
                stamps.append((tag + " end", perf_counter()))
        setattr(owner, name, wrapper)

    stamped(server.Connection, "feed", "loop: read callback")
    stamped(server.Connection, "_flush", "loop: writes the outbox")
    stamped(server.Server, "_execute", "loop: execute handler")
    stamped(server.Server, "_cancel", "loop: cancel handler")
    stamped(executor.SessionExecutor, "_run", "cell thread: runs the job")
    stamped(manager.CancellationManager, "_arm", "loop: arms the cancel")
    deliver = monitoring._mon_deliver

    def delivered(frame: object, scope: object) -> None:
        stamps.append(("cell thread: the cancel is delivered", perf_counter()))
        return deliver(frame, scope)
    monitoring._mon_deliver = delivered
    queue = server.Connection.send_threadsafe

    def queued(conn: object, message: object, **kwargs: object) -> None:
        kind = "response"
        if isinstance(message, bytes) and b'"execution.event"' in message:
            kind = json.loads(message)["params"]["event"]["type"] + " event"
        stamps.append((f"cell thread: queues the {kind}", perf_counter()))
        return queue(conn, message, **kwargs)
    server.Connection.send_threadsafe = queued

    def write() -> None:
        with open(out, "w") as f:
            json.dump(stamps, f)
    atexit.register(write)
    return cli.main(argv)


def received_until(raw: object, answers: dict) -> list:
    """Read until a response to each id in ``answers`` (id -> what it answers),
    stamping each message as it arrives."""
    got, waiting = [], set(answers)
    while waiting:
        m = raw.message()  # type: ignore[attr-defined]
        now = time.perf_counter()
        if "id" in m:
            waiting.discard(m["id"])
            got.append((f"client: receives the response to {answers[m['id']]}", now))
        else:
            got.append((f"client: receives the {m['params']['event']['type']} event", now))
    return got


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(serve_with_timestamps(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=300)
    parser.add_argument("--cancels", type=int, default=40)
    args = parser.parse_args()
    from bench.bench_server import LOOP, Raw

    with tempfile.TemporaryDirectory() as tmp:
        path, out = os.path.join(tmp, "s.sock"), os.path.join(tmp, "stamps.json")
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", out,
                                  "serve", "--unix", path],
                                 stderr=subprocess.PIPE, text=True)
        assert child.stderr is not None
        for line in child.stderr:
            if "listening on" in line:
                break
        else:
            sys.exit(f"the server did not start (exit {child.wait()})")
        raw = Raw(path)
        sid = raw.call("session.create", isolation="in-process")["session"]
        samples: dict[str, list] = {"round trip": [], "cancel": []}
        for i in range(args.trips + 30):
            t0 = time.perf_counter()
            rid = raw.send("execute", session=sid, code="x = 1")
            got = received_until(raw, {rid: "execute"})
            if i >= 30:  # the first ones warm up
                samples["round trip"].append((t0, got))
        for i in range(args.cancels + 3):
            eid = f"c{i}"
            rid = raw.send("execute", session=sid, code=LOOP, execution_id=eid)
            raw.until_response(-1, event="started")
            time.sleep(0.02)
            t0 = time.perf_counter()
            cid = raw.send("cancel", session=sid, execution_id=eid)
            got = received_until(raw, {rid: "execute", cid: "cancel"})
            if i >= 3:
                samples["cancel"].append((t0, got))
        raw.close()
        child.terminate()
        child.wait(60)
        with open(out) as f:
            stamps = sorted((t, tag) for tag, t in json.load(f))
    times = [t for t, _tag in stamps]
    for name, runs in samples.items():
        offsets: dict[str, list[float]] = collections.defaultdict(list)
        for t0, received in runs:
            end = received[-1][1]
            seen: collections.Counter = collections.Counter()
            lo, hi = bisect.bisect_left(times, t0), bisect.bisect_right(times, end)
            for t, tag in stamps[lo:hi] + [(t, tag) for tag, t in received]:
                seen[tag] += 1
                label = tag if seen[tag] == 1 else f"{tag} ({seen[tag]})"
                offsets[label].append((t - t0) * 1e3)
        print(f"\n{name}: ms after the request was sent, median of {len(runs)} "
              f"(n: how many had the step)")
        for label, values in sorted(offsets.items(), key=lambda kv: statistics.median(kv[1])):
            print(f"  {statistics.median(values):7.3f}  {label}  (n={len(values)})")


if __name__ == "__main__":
    main()
