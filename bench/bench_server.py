"""Protocol server: execute round-trip latency and event throughput.

Run: ``python bench/bench_server.py [--samples N] [--quick]``.  Starts
``pyrepl3 serve`` on a unix socket (and on stdio), one client, and times
``execute`` of a trivial cell from request to response (all its events
received), side by side with an in-process ``Session.execute`` of the same
cell (what the server adds is the difference), then streams a cell that
prints many lines and reports events per second.  Writes JSON to
``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import write_results  # noqa: E402
from pyrepl3_ext.client import Client, ServerProcess  # noqa: E402


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_ms": statistics.median(s) * 1e3,
            "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] * 1e3,
            "n": len(s)}


async def round_trips(client: Client, session: str, samples: int) -> list[float]:
    times = []
    for _ in range(20):  # warm
        await client.run(session, "x = 1")
    for _ in range(samples):
        t0 = time.perf_counter()
        await client.run(session, "x = 1")
        times.append(time.perf_counter() - t0)
    return times


async def event_rate(client: Client, session: str, lines: int) -> float:
    t0 = time.perf_counter()
    response, events = await client.run(session, f"for i in range({lines}):\n    print(i)")
    elapsed = time.perf_counter() - t0
    return len(events) / elapsed


def in_process(samples: int) -> list[float]:
    from pyrepl3_ext.engine import Engine

    with Engine() as engine:
        session = engine.create_session()
        for _ in range(20):
            session.execute("x = 1", on_event=lambda e: None)
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            session.execute("x = 1", on_event=lambda e: None)
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    samples, lines = (200, 2000) if args.quick else (args.samples, args.lines)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.sock")
        with ServerProcess("--unix", path):
            async def over_unix() -> tuple[list[float], float]:
                async with await Client.connect_unix(path) as client:
                    session = await client.create_session()
                    return (await round_trips(client, session, samples),
                            await event_rate(client, session, lines))

            unix_times, unix_rate = asyncio.run(over_unix())

    async def over_stdio() -> list[float]:
        async with await Client.spawn_stdio() as client:
            session = await client.create_session()
            return await round_trips(client, session, samples)

    stdio_times = asyncio.run(over_stdio())
    local = in_process(samples)
    out["unix"] = percentiles(unix_times)
    out["stdio"] = percentiles(stdio_times)
    out["in_process"] = percentiles(local)
    out["events_per_second_unix"] = unix_rate
    print(f"execute round trip of `x = 1` ({samples} samples; client and server on this machine)")
    print(f"{'path':<28}{'p50 ms':>9}{'p99 ms':>9}")
    for name, key in (("pyrepl3 serve --unix", "unix"), ("pyrepl3 serve --stdio", "stdio"),
                      ("in process Session.execute", "in_process")):
        print(f"{name:<28}{out[key]['p50_ms']:>9.3f}{out[key]['p99_ms']:>9.3f}")
    print(f"server overhead at p50: {out['unix']['p50_ms'] - out['in_process']['p50_ms']:+.3f} ms "
          f"(unix) over in-process; target p50 <= 0.5 ms round trip")
    print(f"events per second (a cell printing {lines} lines, unix): {unix_rate:,.0f}")
    print(f"wrote {write_results('server', out)}")


if __name__ == "__main__":
    main()
