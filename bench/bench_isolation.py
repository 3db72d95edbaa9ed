"""Process sessions: creation, round trip, idle memory and cancel latency, side by side.

Run: ``python bench/bench_isolation.py [--quick] [--only PART]``.  Everything is measured in
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
    # a runaway recursion with a raised limit (issue 14): a cancel 50 ms in
    # lands about 10^5 frames deep
    "recursion 10**6": "import sys\nsys.setrecursionlimit(10**6)\ndef r(): return r()\nr()",
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
    # a transaction cell's added latency: x = 1 in a session whose every cell
    # is a transaction against x = 1 in a plain one, calls interleaved; back
    # to back (no idle time: every checkpoint is forked on the cell's path) and
    # after an idle gap before each call, as a person or an agent types (a
    # standby checkpoint waits, its hot pages copied ahead: engine/prefault.py)
    from traitlets.config import Config

    config = Config()
    config.PyREPL3.transactions = True
    plain_session = engine.create_session(isolation="process")
    session = engine.create_session(isolation="process", config=config)
    for _ in range(10):
        plain_session.execute("x = 1")
        session.execute("x = 1")
    for label, gap in (("back to back", 0.0), ("after 50 ms idle", 0.05)):
        plain, transaction = [], []
        for _ in range(rounds * 10):
            for target, bucket in random.sample([(plain_session, plain),
                                                 (session, transaction)], 2):
                if gap:
                    time.sleep(gap)
                t0 = time.perf_counter()
                target.execute("x = 1")
                bucket.append(time.perf_counter() - t0)
        out[f"transaction x = 1, {label}"] = summary(transaction)
        out[f"plain x = 1, {label}"] = summary(plain)
        out[f"transaction added, {label}, p50 ms"] = (statistics.median(transaction)
                                                      - statistics.median(plain)) * 1e3
    out["standby"] = session.standby
    engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parts = {
        "creation": lambda q: creation(rounds=20 if q else 60, jupyter_rounds=3 if q else 8),
        "round_trip": lambda q: asyncio.run(_round_trips(100 if q else 400)),
        "idle_memory": lambda q: idle_memory(5 if q else 10),
        "cancel": lambda q: cancel_latency(10 if q else 40),
        "checkpoints": lambda q: checkpoints([1, 100] if q else [1, 100, 1024], 5 if q else 15),
    }
    parser.add_argument("--only", action="append", choices=sorted(parts),
                        help="measure only this part (repeatable); default: all")
    options = parser.parse_args()
    results = {name: measure(options.quick) for name, measure in parts.items()
               if not options.only or name in options.only}
    if "creation" in results:
        _print_creation(results)
    if "round_trip" in results:
        _print_round_trip(results)
    if "idle_memory" in results:
        _print_idle_memory(results)
    if "cancel" in results:
        _print_cancel(results)
    if "checkpoints" in results:
        _print_checkpoints(results)
    print(f"results: {write_results('isolation', results)}")


def _print_creation(results: dict) -> None:
    print("session creation (ms)")
    for name, s in results["creation"].items():
        print(f"  {name:<16} p50 {s['p50_ms']:8.1f}  p99 {s['p99_ms']:8.1f}  (n={s['n']})")
    base = results["creation"]["in-process"]["p50_ms"]
    for name, s in results["creation"].items():
        print(f"  {name:<16} / in-process p50: {s['p50_ms'] / base:6.2f}")


def _print_round_trip(results: dict) -> None:
    print("x = 1 round trip over the protocol (ms)")
    for name, s in results["round_trip"].items():
        if isinstance(s, dict):
            print(f"  {name:<16} p50 {s['p50_ms']:7.3f}  p99 {s['p99_ms']:7.3f}")
    print(f"  process - in-process (paired p50): "
          f"{results['round_trip']['process minus in-process, paired p50_ms']:+.3f} ms")


def _print_idle_memory(results: dict) -> None:
    mem = results["idle_memory"]
    print(f"idle process session (mean of {mem['sessions']}), MiB: " +
          "  ".join(f"{k.upper()} {v:.1f}" for k, v in mem["per_session_mib"].items()) +
          f"   (fork server RSS {mem['fork_server_mib']['rss']:.1f})")


def _print_cancel(results: dict) -> None:
    print("cancel to result in a process session (ms)")
    for name, s in results["cancel"].items():
        print(f"  {name:<16} p50 {s['p50_ms']:7.2f}  p99 {s['p99_ms']:7.2f}  "
              f"max {s['max_ms']:7.2f}")


def _print_checkpoints(results: dict) -> None:
    print("checkpoints (ms; extra memory in MiB, PSS of worker + checkpoint)")
    for name, c in results["checkpoints"].items():
        if name.endswith("MiB"):
            print(f"  {name:>9}: take p50 {c['take']['p50_ms']:6.2f}  restore p50 "
                  f"{c['restore']['p50_ms']:6.2f}  extra after take "
                  f"{c['extra_mib_after_take']:7.1f}  after 10% rewrite "
                  f"{c['extra_mib_after_10pct_rewrite']:7.1f}")
    c = results["checkpoints"]
    for label in ("back to back", "after 50 ms idle"):
        print(f"  transaction cell x = 1, {label}: p50 "
              f"{c[f'transaction x = 1, {label}']['p50_ms']:.2f} vs "
              f"{c[f'plain x = 1, {label}']['p50_ms']:.2f} ms plain "
              f"(+{c[f'transaction added, {label}, p50 ms']:.2f} ms)")


if __name__ == "__main__":
    main()
