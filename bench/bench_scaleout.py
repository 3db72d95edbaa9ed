"""Scale-out: what the Ray gateway costs, beside a local isolated session in the same run.

Run: ``python bench/bench_scaleout.py [--samples N] [--cancels N] [--placements N]``.
Starts a Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``:
a head and three nodes, as ``tests/test_scaleout_ray.py``), a gateway on it
(``RayPlacement``) and, as the reference, ``pyrepl3 serve --isolation
process`` on a unix socket: a session in a supervised process on this
machine, the same kind of session a node hosts.  Then, alternating between
the two in random order:

* placement: ``session.create`` to its answer (through the gateway: a Ray
  placement group and a fork on the chosen node; locally: the fork);
* ``x = 1``: execute request to response, all events received;
* cancel of ``while True: pass``: cancel request to the execute response;
* events/s: a cell printing ``--lines`` lines, events over elapsed time.

Prints p50/p99 and the gateway/local ratio of each; writes JSON to
``bench/results/``.  Needs ``pip install 'pyrepl3[ray]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from bench._common import write_results  # noqa: E402
from pyrepl3_ext.client import Client, ServerProcess  # noqa: E402
from pyrepl3_ext.scaleout.gateway import Gateway, serving_unix  # noqa: E402
from pyrepl3_ext.scaleout.ray_placement import RayPlacement  # noqa: E402

BUSY = "while True:\n    pass"


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_ms": statistics.median(s) * 1e3,
            "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] * 1e3, "n": len(s)}


async def placement_time(client: Client) -> float:
    t0 = time.perf_counter()
    session = await client.create_session()
    elapsed = time.perf_counter() - t0
    await client.close_session(session)
    return elapsed


async def round_trip(client: Client, session: str) -> float:
    t0 = time.perf_counter()
    response, _events = await client.run(session, "x = 1")
    elapsed = time.perf_counter() - t0
    assert response["status"] == "ok", response
    return elapsed


async def cancel_time(client: Client, session: str) -> float:
    execution = client.execute(session, BUSY)
    async for event in execution:
        if event["type"] == "started":
            break
    await asyncio.sleep(0.02)  # well inside the loop
    t0 = time.perf_counter()
    await client.cancel(session, execution.execution_id, "bench")
    response = await execution.response()
    elapsed = time.perf_counter() - t0
    assert response["status"] == "cancelled", response
    return elapsed


async def event_rate(client: Client, session: str, lines: int) -> float:
    t0 = time.perf_counter()
    _response, events = await client.run(session, f"for i in range({lines}):\n    print(i)")
    return len(events) / (time.perf_counter() - t0)


async def measure(paths: dict[str, str], args: argparse.Namespace) -> dict[str, list[float]]:
    rng = random.Random(1234)
    res: dict[str, list[float]] = {}
    clients = {name: await Client.connect_unix(path) for name, path in paths.items()}
    sessions = {name: await c.create_session() for name, c in clients.items()}
    for name in clients:  # warm both paths
        for _ in range(20):
            await round_trip(clients[name], sessions[name])
    names = list(clients)
    for kind, count, work in (
            ("placement", args.placements, lambda n: placement_time(clients[n])),
            ("x = 1 round trip", args.samples,
             lambda n: round_trip(clients[n], sessions[n])),
            ("cancel -> response, busy loop", args.cancels,
             lambda n: cancel_time(clients[n], sessions[n])),
            ("events/s", args.rounds,
             lambda n: event_rate(clients[n], sessions[n], args.lines))):
        for _ in range(count):
            rng.shuffle(names)
            for name in names:
                res.setdefault(f"{kind}: {name}", []).append(await work(name))
    for client in clients.values():
        await client.close()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="x = 1 round trips per path")
    parser.add_argument("--cancels", type=int, default=40, help="cancels per path")
    parser.add_argument("--placements", type=int, default=60, help="session.create per path")
    parser.add_argument("--lines", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5, help="events/s measurements")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.cancels, args.placements, args.lines, args.rounds = 60, 10, 10, 2000, 2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=4, memory=8 * 2 ** 30)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="pyrepl3-bench-scaleout-")
    local = ServerProcess("--unix", os.path.join(work, "local.sock"), "--isolation", "process",
                          "--limits", "memory=256M")
    try:
        placement = RayPlacement(None, session_cpus=0.1,
                                 host_options={"session_limits": {"memory": "256M"}})
        with serving_unix(Gateway(placement), os.path.join(work, "gateway.sock")):
            res = asyncio.run(measure({"gateway (Ray, 3 nodes)": os.path.join(work, "gateway.sock"),
                                       "local process session": local.address}, args))
    finally:
        local.stop()
        ray.shutdown()
        cluster.shutdown()
    out: dict = {}
    print(f"{'figure':<58} {'p50':>10} {'p99':>10}")
    for key, samples in res.items():
        if key.startswith("events/s"):
            out[key] = {"median": statistics.median(samples), "samples": samples}
            print(f"{key:<58} {statistics.median(samples):>10,.0f} events/s")
        else:
            out[key] = percentiles(samples)
            print(f"{key:<58} {out[key]['p50_ms']:>8.2f}ms {out[key]['p99_ms']:>8.2f}ms")
    print()
    for kind in ("placement", "x = 1 round trip", "cancel -> response, busy loop", "events/s"):
        gw, lo = (out[f"{kind}: {n}"] for n in ("gateway (Ray, 3 nodes)", "local process session"))
        if kind == "events/s":
            print(f"{kind}: gateway / local = {gw['median'] / lo['median']:.2f}")
        else:
            print(f"{kind}: gateway / local p50 = {gw['p50_ms'] / lo['p50_ms']:.2f}")
    print("written to", write_results("scaleout", {"results": out, "args": vars(args)}))


if __name__ == "__main__":
    main()
