"""Process sessions: creation, round trip, idle memory and cancel latency, side by side.

Run: ``python bench/bench_isolation.py [--quick]``.  Everything is measured in
one run, variants interleaved, so the ratios hold on a noisy machine:

* **creation**: ``Engine.create_session()`` in process, with
  ``isolation="process"`` (warm fork server), and a Jupyter kernel started
  and ready through ``jupyter_client`` (when installed), each sample
  followed by closing what it created (not timed);
* **round trip**: ``x = 1`` over the protocol (``pyrepl3 serve`` on a unix
  socket, one client) to an in-process and to a process session of the same
  server, requests alternating, request sent to response received with all
  events;
* **idle memory** of a process session: RSS, PSS and USS (private pages)
  of each worker from ``/proc/PID/smaps_rollup``: RSS counts the pages
  shared copy-on-write with the fork server in every worker, PSS splits
  them among the sharers, USS is what closing the session gives back;
* **cancel latency** in a process session, ``cancel()`` to result, for
  every blocking call the worker's main thread can be in;
* **checkpoints**: take and restore time for namespaces of 1 MiB, 100 MiB
  and 1 GiB, a checkpoint's extra memory (PSS) right after it is taken and
  after the session rewrites 10 % of its data, and what a transaction cell
  adds to ``x = 1``.

Writes JSON to ``bench/results/``.
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

from bench._common import write_results  # noqa: E402
from pyrepl3_ext import Engine  # noqa: E402
from pyrepl3_ext.client import Client, ServerProcess  # noqa: E402

BLOCKING = {
    "time.sleep": "import time; time.sleep(100)",
    "Event.wait": "import threading; threading.Event().wait()",
    "Queue.get": "import queue; queue.Queue().get()",
    "socket.recv": "import socket\na, b = socket.socketpair()\na.recv(1)",
    "subprocess.run": "import subprocess; subprocess.run(['sleep', '100'])",
    "input()": "input('? ')",
    "while True": "while True:\n    pass",
}


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_ms": statistics.median(s) * 1e3,
            "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] * 1e3,
            "max_ms": s[-1] * 1e3, "n": len(s)}


def _jupyter_start() -> float:
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    t0 = time.perf_counter()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    elapsed = time.perf_counter() - t0
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    return elapsed


def creation(rounds: int, jupyter_rounds: int) -> dict:
    engine = Engine()
    engine.warm_up(wait=True)
    times: dict[str, list[float]] = {"in-process": [], "process": [], "jupyter kernel": []}
    try:
        import jupyter_client  # noqa: F401
        have_jupyter = True
    except ImportError:
        have_jupyter = False
    for i in range(rounds):
        order = ["in-process", "process"]
        if have_jupyter and i < jupyter_rounds:
            order.append("jupyter kernel")
        random.shuffle(order)
        for variant in order:
            if variant == "jupyter kernel":
                times[variant].append(_jupyter_start())
                continue
            t0 = time.perf_counter()
            session = engine.create_session(isolation=variant)
            times[variant].append(time.perf_counter() - t0)
            session.close()
    engine.close()
    return {k: summary(v) for k, v in times.items() if v}


async def _round_trips(samples: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")
        with ServerProcess("--unix", path, "--isolation", "process"):
            for _ in range(200):
                if os.path.exists(path):
                    break
                await asyncio.sleep(0.05)
            client = await Client.connect_unix(path)
            sessions = {"in-process": await client.create_session(isolation="in-process"),
                        "process": await client.create_session(isolation="process")}
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(50):
                for sid in sessions.values():
                    await client.run(sid, "x = 1")
            for _ in range(samples):
                order = list(sessions.items())
                random.shuffle(order)
                for variant, sid in order:
                    t0 = time.perf_counter()
                    await client.run(sid, "x = 1")
                    times[variant].append(time.perf_counter() - t0)
            await client.close()
    result = {k: summary(v) for k, v in times.items()}
    diffs = sorted(p - i for p, i in zip(times["process"], times["in-process"]))
    result["process minus in-process, paired p50_ms"] = statistics.median(diffs) * 1e3
    return result


def _memory(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1]) * 1024
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0), "uss": uss}


def idle_memory(count: int) -> dict:
    engine = Engine()
    sessions = [engine.create_session(isolation="process") for _ in range(count)]
    for s in sessions:
        s.execute("x = 1")  # a used session, not a pristine fork
    time.sleep(0.2)
    per = [_memory(s.pid) for s in sessions]
    server = _memory(engine._supervisor.forkserver_pid)
    engine.close()
    mib = 1024 * 1024
    return {"sessions": count,
            "per_session_mib": {k: statistics.mean(m[k] for m in per) / mib
                                for k in ("rss", "pss", "uss")},
            "fork_server_mib": {k: v / mib for k, v in server.items()}}


def cancel_latency(samples: int) -> dict:
    engine = Engine()
    session = engine.create_session(isolation="process")
    times: dict[str, list[float]] = {k: [] for k in BLOCKING}
    for _ in range(samples):
        order = list(BLOCKING.items())
        random.shuffle(order)
        for name, code in order:
            handle = session.execute(code, wait=False, on_event=lambda e: None)
            while not handle._job.started:
                time.sleep(0.001)
            time.sleep(0.05)
            t0 = time.perf_counter()
            session.cancel(handle.execution_id)
            result = handle.result(60)
            times[name].append(time.perf_counter() - t0)
            assert result.error_in_exec is not None, name
            if session.lost is not None:
                session.restart()
    engine.close()
    return {k: summary(v) for k, v in times.items()}


def _pss(pid: int) -> int:
    return _memory(pid)["pss"]


def checkpoints(sizes_mib: list[int], rounds: int) -> dict:
    """Checkpoint and restore time by namespace size; a checkpoint's extra
    memory right after it is taken and after the session rewrites 10 % of
    its data (PSS of worker + checkpoint, so shared pages count once)."""
    engine = Engine()
    out: dict = {}
    for mib in sizes_mib:
        session = engine.create_session(isolation="process",
                                        limits={"memory": f"{3 * mib + 512}M"})
        session.execute(f"data = bytearray(b'x') * ({mib} * 2**20)")
        take, restore = [], []
        for i in range(rounds):
            t0 = time.perf_counter()
            session.take_snapshot("c")
            take.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            session.restore_snapshot("c")
            restore.append(time.perf_counter() - t0)
        session.delete_snapshot("c")  # its pages would be shared three ways below
        time.sleep(0.1)
        before = _pss(session.pid)
        session.take_snapshot("m")
        checkpoint_pid = session._checkpoints["m"].pid
        time.sleep(0.1)
        after_take = _pss(session.pid) + _pss(checkpoint_pid) - before
        session.execute(f"n = len(data) // 10\ndata[:n] = b'y' * n")
        time.sleep(0.1)
        after_write = _pss(session.pid) + _pss(checkpoint_pid) - before
        out[f"{mib} MiB"] = {"take": summary(take), "restore": summary(restore),
                             "extra_mib_after_take": after_take / 2**20,
                             "extra_mib_after_10pct_rewrite": after_write / 2**20}
        session.close()
    # a transaction cell's added latency: x = 1 with and without, interleaved
    session = engine.create_session(isolation="process")
    plain, transaction = [], []
    for _ in range(10):
        session.execute("x = 1")
        session.execute("x = 1", transaction=True)
    for _ in range(rounds * 10):
        for variant, bucket in random.sample([(False, plain), (True, transaction)], 2):
            t0 = time.perf_counter()
            session.execute("x = 1", transaction=variant)
            bucket.append(time.perf_counter() - t0)
    out["transaction x = 1"] = summary(transaction)
    out["plain x = 1"] = summary(plain)
    out["transaction added, p50 ms"] = (statistics.median(transaction)
                                        - statistics.median(plain)) * 1e3
    engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    options = parser.parse_args()
    quick = options.quick
    results = {
        "creation": creation(rounds=20 if quick else 60, jupyter_rounds=3 if quick else 8),
        "round_trip": asyncio.run(_round_trips(100 if quick else 400)),
        "idle_memory": idle_memory(5 if quick else 10),
        "cancel": cancel_latency(10 if quick else 40),
        "checkpoints": checkpoints([1, 100] if quick else [1, 100, 1024], 5 if quick else 15),
    }
    print("session creation (ms)")
    for name, s in results["creation"].items():
        print(f"  {name:<16} p50 {s['p50_ms']:8.1f}  p99 {s['p99_ms']:8.1f}  (n={s['n']})")
    base = results["creation"]["in-process"]["p50_ms"]
    for name, s in results["creation"].items():
        print(f"  {name:<16} / in-process p50: {s['p50_ms'] / base:6.2f}")
    print("x = 1 round trip over the protocol (ms)")
    for name, s in results["round_trip"].items():
        if isinstance(s, dict):
            print(f"  {name:<16} p50 {s['p50_ms']:7.3f}  p99 {s['p99_ms']:7.3f}")
    print(f"  process - in-process (paired p50): "
          f"{results['round_trip']['process minus in-process, paired p50_ms']:+.3f} ms")
    mem = results["idle_memory"]
    print(f"idle process session (mean of {mem['sessions']}), MiB: " +
          "  ".join(f"{k.upper()} {v:.1f}" for k, v in mem["per_session_mib"].items()) +
          f"   (fork server RSS {mem['fork_server_mib']['rss']:.1f})")
    print("cancel to result in a process session (ms)")
    for name, s in results["cancel"].items():
        print(f"  {name:<16} p50 {s['p50_ms']:7.2f}  p99 {s['p99_ms']:7.2f}  "
              f"max {s['max_ms']:7.2f}")
    print("checkpoints (ms; extra memory in MiB, PSS of worker + checkpoint)")
    for name, c in results["checkpoints"].items():
        if name.endswith("MiB"):
            print(f"  {name:>9}: take p50 {c['take']['p50_ms']:6.2f}  restore p50 "
                  f"{c['restore']['p50_ms']:6.2f}  extra after take "
                  f"{c['extra_mib_after_take']:7.1f}  after 10% rewrite "
                  f"{c['extra_mib_after_10pct_rewrite']:7.1f}")
    c = results["checkpoints"]
    print(f"  transaction cell x = 1: p50 {c['transaction x = 1']['p50_ms']:.2f} vs "
          f"{c['plain x = 1']['p50_ms']:.2f} ms plain (+{c['transaction added, p50 ms']:.2f} ms)")
    print(f"results: {write_results('isolation', results)}")


if __name__ == "__main__":
    main()
