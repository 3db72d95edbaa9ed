"""Cancellation: idle cost of the loaded manager, and cancel latency per scenario.

Run: ``python bench/bench_cancel.py [--quick] [--rounds N] [--samples N]``.

Idle cost
    Each workload runs as a cell through ``shell.run_cell``, with the
    extension loaded (the cancellation manager attached and idle) and not
    loaded, interleaved in random order in one process; the main thread and a
    worker thread each run both.  Before the loaded batches the manager has
    already cancelled one cell in each thread, so anything a cancel leaves
    behind (a tracer, a monitoring event, a flag) would show here.  Printed:
    the best (least disturbed) time of each variant and the ratio
    loaded / unloaded; the target is <= 1.02.

Idle cost in instructions (``--instructions``, or ``--only instructions``; needs valgrind)
    The same workloads, each cell counted on its own under callgrind after
    one uncounted warm-up run in the same thread, in two child processes:
    one without the extension, one with it loaded and after one cancel per
    thread.  A count does not depend on the machine's load, so this shows
    a 1-2 % difference that the timings above cannot separate from noise
    (cache and pipeline effects are not counted).  The two children run in
    parallel; a few minutes per Python.

Cancel latency
    For each scenario and thread: start the cell, wait a random 0-2 ms after
    it signals it runs, call ``pyrepl3_ext.cancel`` and time until
    ``run_cell`` returns in the cell's thread (so the figure includes
    IPython's end-of-cell work, about 0.1 ms; cells are not stored in the
    history, whose traceback formatting would dominate deep recursions).
    Each sample starts after ``gc.collect()``.  Printed: p50, p99 and max in
    milliseconds.  Targets: p99 <= 5 ms for Python code, <= 50 ms for waits
    the engine owns.  Scenarios a mechanism cannot interrupt (a blocking C
    call in a worker thread) are listed as such, not timed.

Results are written as JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import random
import statistics
import sys
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

import pyrepl3_ext  # noqa: E402
from bench._common import (  # noqa: E402
    bench_shell, count_regions, in_counted_region, interleaved, paired_ratio, write_results)
from pyrepl3_ext import CellCancelled  # noqa: E402

# -- workloads for the idle cost ---------------------------------------------

SETUP = """\
import hashlib, json
_blob = bytes(range(256)) * (128 * 1024 * 1024 // 256)
_doc = json.dumps([{"id": i, "tags": ["a", "b"], "meta": {"x": i * 0.5, "ok": True}}
                   for i in range(20_000)])
"""

WORKLOADS = {
    "loop 2M": "total = 0\nfor i in range(2_000_000):\n    total += i",
    "fib(25)": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nr = fib(25)",
    "sort key=": "r = sorted(range(400_000), key=lambda v: (v * 7919) % 1_000_003)",
    "json hook": "r = json.loads(_doc, object_hook=lambda d: d)",
    "OOP": (
        "class Vec:\n"
        "    __slots__ = ('x', 'y')\n"
        "    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n"
        "    def __add__(self, other):\n"
        "        return Vec(self.x + other.x, self.y + other.y)\n"
        "    @property\n"
        "    def norm2(self):\n"
        "        return self.x * self.x + self.y * self.y\n"
        "acc = Vec(0, 0)\n"
        "for i in range(200_000):\n"
        "    acc = acc + Vec(i, -i)\n"
        "r = acc.norm2"
    ),
    "sum(range(1e7))": "r = sum(range(10**7))",
    "sha256 128 MB": "r = hashlib.sha256(_blob).hexdigest()",
}

# -- scenarios for the latency -----------------------------------------------

PYTHON_CODE = {
    "tight loop": "_started.set()\ni = 0\nwhile True:\n    i += 1",
    "one-line loop": "_started.set()\nwhile True: pass",
    "recursion 900 deep": (
        "def down(n):\n"
        "    if n == 0:\n"
        "        _started.set()\n"
        "        while True:\n"
        "            pass\n"
        "    return down(n - 1)\n"
        "down(900)"
    ),
    "generator": "def gen():\n    while True:\n        yield 1\n_started.set()\nfor _ in gen():\n    pass",
    "comprehension": "_started.set()\nwhile True:\n    [x * x for x in range(1000)]",
    "sorted key=": "_started.set()\nwhile True:\n    sorted(range(2000), key=lambda v: -v)",
    "calls": "def f(a):\n    return a + 1\n_started.set()\nwhile True:\n    f(1)",
    "await (async cell)": "import asyncio\n_started.set()\nawait asyncio.sleep(3600)",
}
BLOCKING = {  # C calls: interruptible in the main thread only
    "time.sleep": "import time\n_started.set()\ntime.sleep(3600)",
    "queue.get": "import queue\n_q = queue.Queue()\n_started.set()\n_q.get()",
    "Event.wait": "import threading\n_e = threading.Event()\n_started.set()\n_e.wait()",
    "socket.recv": ("import socket\n_a, _b = socket.socketpair()\n_started.set()\n"
                    "try:\n    _a.recv(10)\nfinally:\n    _a.close()\n    _b.close()"),
    "subprocess.run": "import subprocess\n_started.set()\nsubprocess.run(['sleep', '100'])",
    "input() (pipe)": "_started.set()\ninput()",
}
ENGINE_WAITS = {
    "interruptible_wait": ("from pyrepl3_ext import cancellation\nimport threading\n"
                           "_started.set()\ncancellation.interruptible_wait(threading.Event())"),
    "interruptible_sleep": ("from pyrepl3_ext import cancellation\n"
                            "_started.set()\ncancellation.interruptible_sleep(3600)"),
    "input() (host answers)": "_started.set()\ninput()",
}

#: A fresh process per sample: the first cancel of a process, and a runaway
#: recursion after ``sys.setrecursionlimit(10**6)`` with IPython's own
#: traceback printing (the time a user waits), cancelled 50 ms in.
FRESH_CHILD = """\
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[3])
from IPython.core.interactiveshell import InteractiveShell
import pyrepl3_ext
ip = InteractiveShell.instance()
pyrepl3_ext.load_ipython_extension(ip)
started = threading.Event()
ip.user_ns["_started"] = started
code = sys.argv[2]
box = {}
def cell():
    box["r"] = pyrepl3_ext.run_cell(ip, code, execution_id="fresh")
    box["end"] = time.perf_counter()
def canceller():
    started.wait(30)
    time.sleep(0.05)
    box["start"] = time.perf_counter()
    pyrepl3_ext.cancel(ip, "fresh", "bench")
threading.Thread(target=canceller, daemon=True).start()
with open(os.devnull, "w") as sink:
    real, sys.stdout = sys.stdout, sink
    try:
        if sys.argv[1] == "main":
            cell()
        else:
            t = threading.Thread(target=cell)
            t.start()
            t.join(120)
    finally:
        sys.stdout = real
print(json.dumps({"ms": (box["end"] - box["start"]) * 1e3,
                  "error": type(box["r"].error_in_exec).__name__}))
"""
FRESH = {
    "first cancel: interruptible_wait": (
        "from pyrepl3_ext import cancellation\nimport threading\n_started.set()\n"
        "cancellation.interruptible_wait(threading.Event())"),
    "first cancel: Event.wait": "import threading\n_started.set()\nthreading.Event().wait()",
    "runaway recursion, limit 10**6": ("import sys\nsys.setrecursionlimit(10**6)\n"
                                       "def r(): return r()\n_started.set()\nr()"),
}


class Worker:
    """One long-lived thread that runs callables, so thread start-up is never timed."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="bench-worker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, done, box = self._jobs.get()
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                box["error"] = exc
            done.set()

    def submit(self, fn: Callable[[], Any]) -> tuple[threading.Event, dict]:
        done, box = threading.Event(), {}
        self._jobs.put((fn, done, box))
        return done, box

    def call(self, fn: Callable[[], Any]) -> Any:
        done, box = self.submit(fn)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")


def make_shell() -> InteractiveShell:
    shell = bench_shell()
    shell.showtraceback = lambda *args, **kwargs: None  # cancelled cells: skip formatting
    return shell


def cancel_one(shell: InteractiveShell, worker: Worker | None) -> None:
    """Cancel one running cell, in the main thread or ``worker``."""
    started = threading.Event()
    shell.user_ns["_started"] = started
    code = PYTHON_CODE["tight loop"]
    if worker is None:
        def canceller() -> None:
            started.wait()
            pyrepl3_ext.cancel(shell, "warm")
        threading.Thread(target=canceller, daemon=True).start()
        result = pyrepl3_ext.run_cell(shell, code, execution_id="warm", store_history=False)
    else:
        done, box = worker.submit(lambda: pyrepl3_ext.run_cell(
            shell, code, execution_id="warm", store_history=False))
        started.wait()
        pyrepl3_ext.cancel(shell, "warm")
        done.wait()
        result = box["value"]
    assert isinstance(result.error_in_exec, CellCancelled), result.error_in_exec


def idle_cost(shell: InteractiveShell, worker: Worker, rounds: int) -> dict:
    shell.run_cell(SETUP, store_history=False)
    state = {"loaded": False}

    def ensure(name: str) -> None:
        want = name.startswith("loaded")
        if want and not state["loaded"]:
            pyrepl3_ext.load_ipython_extension(shell)
            cancel_one(shell, None)
            cancel_one(shell, worker)
        elif not want and state["loaded"]:
            pyrepl3_ext.unload_ipython_extension(shell)
        state["loaded"] = want
        # every batch starts from a collected heap: the garbage of loading
        # and cancelling must not trigger a full collection inside a timing
        gc.collect()

    print(f"\nidle cost (best of {rounds}; loaded = cancellation manager attached, "
          f"after one cancel per thread;\n ratio = best loaded / best none; paired = "
          f"median over rounds of loaded / none timed in the same round;\n A/A = the "
          f"unloaded variant timed twice: the noise floor of this run)")
    print(f"{'workload':<18}{'thread':<8}{'none ms':>10}{'loaded ms':>11}{'ratio':>8}"
          f"{'paired':>8}{'A/A':>8}")
    out: dict = {}
    for name, code in WORKLOADS.items():
        def main_cell(code=code) -> None:
            shell.run_cell(code, store_history=False)

        def worker_cell(code=code) -> None:
            worker.call(lambda: shell.run_cell(code, store_history=False))

        variants = {"none main": main_cell, "none-again main": main_cell,
                    "loaded main": main_cell, "none worker": worker_cell,
                    "none-again worker": worker_cell, "loaded worker": worker_cell}
        timing = interleaved(variants, rounds=rounds, number=1, setup=ensure)
        for thread in ("main", "worker"):
            none = timing[f"none {thread}"]["best"]
            again = timing[f"none-again {thread}"]["best"]
            loaded = timing[f"loaded {thread}"]["best"]
            ratio, noise = loaded / none, again / none
            paired = paired_ratio(timing, f"loaded {thread}", f"none {thread}")
            print(f"{name:<18}{thread:<8}{none * 1e3:>10.1f}{loaded * 1e3:>11.1f}"
                  f"{ratio:>8.3f}{paired:>8.3f}{noise:>8.3f}")
            out.setdefault(name, {})[thread] = {
                "none_ms": none * 1e3, "loaded_ms": loaded * 1e3, "ratio": ratio,
                "paired_ratio": paired, "a_a_ratio": noise,
                "none_median_ms": timing[f"none {thread}"]["median"] * 1e3,
                "loaded_median_ms": timing[f"loaded {thread}"]["median"] * 1e3}
    ensure("none")
    ratios = [v["ratio"] for per in out.values() for v in per.values()]
    noise = [abs(v["a_a_ratio"] - 1) for per in out.values() for v in per.values()]
    worst = max(ratios)
    paired = [v["paired_ratio"] for per in out.values() for v in per.values()]
    print(f"ratio loaded/none: worst {worst:.3f}, geometric mean "
          f"{statistics.geometric_mean(ratios):.3f}; paired: worst {max(paired):.3f}, "
          f"geometric mean {statistics.geometric_mean(paired):.3f} (target <= 1.02); "
          f"A/A noise up to {max(noise) * 100:.1f} %")
    return {"workloads": out, "worst_ratio": worst, "worst_paired_ratio": max(paired),
            "geomean_ratio": statistics.geometric_mean(ratios), "a_a_noise": max(noise)}


def count_child(variant: str) -> None:
    """The child side of the instruction count: every workload in the main
    thread, then in a worker, once uncounted and once counted."""
    shell = make_shell()
    worker = Worker()
    shell.run_cell(SETUP, store_history=False)
    if variant == "loaded":
        pyrepl3_ext.load_ipython_extension(shell)
        cancel_one(shell, None)
        cancel_one(shell, worker)
    for code in WORKLOADS.values():
        def cell(code=code) -> None:
            shell.run_cell(code, store_history=False)

        for run_in in (lambda fn: fn(), worker.call):
            run_in(cell)  # warm-up: compile, specialise, first-time imports
            gc.collect()
            run_in(lambda: in_counted_region(cell))


def idle_instructions() -> dict:
    print("\nidle cost in instructions (callgrind; each cell counted after a warm-up run;"
          "\n loaded = extension loaded, after one cancel per thread)")
    script = os.path.abspath(__file__)
    regions = 2 * len(WORKLOADS)
    none, loaded = count_regions(
        [[script, "--count-child", variant] for variant in ("none", "loaded")], regions)
    print(f"{'workload':<18}{'thread':<8}{'none Minstr':>13}{'loaded Minstr':>15}{'ratio':>8}")
    out: dict = {}
    labels = [(name, thread) for name in WORKLOADS for thread in ("main", "worker")]
    for (name, thread), n, ld in zip(labels, none, loaded):
        print(f"{name:<18}{thread:<8}{n / 1e6:>13.2f}{ld / 1e6:>15.2f}{ld / n:>8.4f}")
        out.setdefault(name, {})[thread] = {"none": n, "loaded": ld, "ratio": ld / n}
    ratios = [ld / n for n, ld in zip(none, loaded)]
    print(f"instructions loaded/none: worst {max(ratios):.4f}, geometric mean "
          f"{statistics.geometric_mean(ratios):.4f} (target <= 1.02)")
    return {"workloads": out, "worst_ratio": max(ratios),
            "geomean_ratio": statistics.geometric_mean(ratios)}


def latency_samples(shell: InteractiveShell, worker: Worker, code: str, thread: str,
                    samples: int, rng: random.Random) -> list[float]:
    started = threading.Event()
    shell.user_ns["_started"] = started
    times: list[float] = []
    for n in range(samples):
        # Each sample starts from a collected heap: a full collection of the
        # benchmark's own garbage (900 frames' tracebacks per recursion
        # sample) otherwise lands in some samples as a 10-20 ms outlier that
        # is the collector's, not the cancel's.
        gc.collect()
        started.clear()
        eid = f"lat-{n}"
        box: dict = {}

        def run() -> None:
            result = pyrepl3_ext.run_cell(shell, code, execution_id=eid, store_history=False)
            box["end"] = time.perf_counter()
            box["result"] = result

        if thread == "main":
            def canceller() -> None:
                if not started.wait(30):
                    return
                time.sleep(rng.uniform(0, 0.002))
                box["start"] = time.perf_counter()
                box["hit"] = pyrepl3_ext.cancel(shell, eid, "bench")

            helper = threading.Thread(target=canceller, daemon=True)
            helper.start()
            run()
            helper.join()
        else:
            done, _ = worker.submit(run)
            if not started.wait(30):
                raise RuntimeError("cell never started")
            time.sleep(rng.uniform(0, 0.002))
            box["start"] = time.perf_counter()
            box["hit"] = pyrepl3_ext.cancel(shell, eid, "bench")
            if not done.wait(30):
                raise RuntimeError(f"worker cell {code!r} was not cancelled within 30 s")
        error = box["result"].error_in_exec
        if not box.get("hit") or not isinstance(error, CellCancelled):
            raise RuntimeError(f"cancel missed: hit={box.get('hit')} error={error!r}")
        times.append(box["end"] - box["start"])
    return times


def fresh_process_latency(samples: int) -> dict:
    """cancel() -> run_cell returns, each sample in a new process, with
    IPython's real traceback printing (its first in the process)."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"\nfresh process, IPython's own traceback printing ({samples} processes each)")
    print(f"{'scenario':<34}{'thread':<8}{'p50 ms':>9}{'max ms':>9}  outcome")
    out: dict = {}
    for name, code in FRESH.items():
        for thread in ("main", "worker"):
            if name.startswith("first cancel: Event") and thread == "worker":
                continue  # a C call in a worker: not interruptible
            times, outcomes = [], set()
            for _ in range(samples):
                proc = subprocess.run([sys.executable, "-c", FRESH_CHILD, thread, code, root],
                                      capture_output=True, text=True, timeout=300)
                data = json.loads(proc.stdout.strip().splitlines()[-1])
                times.append(data["ms"])
                outcomes.add(data["error"])
            times.sort()
            print(f"{name:<34}{thread:<8}{statistics.median(times):>9.1f}{times[-1]:>9.1f}  "
                  f"{', '.join(sorted(outcomes))}")
            out.setdefault(name, {})[thread] = {"p50_ms": statistics.median(times),
                                                "max_ms": times[-1], "samples": samples,
                                                "outcomes": sorted(outcomes)}
    return out


def cancel_latency(shell: InteractiveShell, worker: Worker, samples: int) -> dict:
    pyrepl3_ext.load_ipython_extension(shell)
    # input(): a pipe nobody writes to (main thread, no host), and a host
    # that never answers (the engine-owned wait)
    read_fd, write_fd = os.pipe()
    sys.stdin = os.fdopen(read_fd, "r", closefd=False)
    unsubscribe = pyrepl3_ext.subscribe(shell, lambda event: None, handles_input=True)
    rng = random.Random(7)
    groups = [("python code", PYTHON_CODE, 5.0), ("blocking call", BLOCKING, 50.0),
              ("engine wait", ENGINE_WAITS, 50.0)]
    print(f"\ncancel latency, cancel() -> run_cell returns ({samples} samples each)")
    print(f"{'scenario':<22}{'thread':<8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'target':>9}")
    out: dict = {}
    for group, scenarios, target in groups:
        for name, code in scenarios.items():
            hosted = name == "input() (host answers)"
            if name == "input() (pipe)":
                unsubscribe()  # no host: stock input() reading the pipe
            elif hosted:
                unsubscribe = pyrepl3_ext.subscribe(shell, lambda event: None,
                                                    handles_input=True)
            for thread in ("main", "worker"):
                if group == "blocking call" and thread == "worker":
                    print(f"{name:<22}{thread:<8}{'not interruptible (C call in a worker)':>36}")
                    out.setdefault(name, {})[thread] = {"interruptible": False}
                    continue
                times = sorted(latency_samples(shell, worker, code, thread, samples, rng))
                p50 = statistics.median(times) * 1e3
                p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))] * 1e3
                worst = times[-1] * 1e3
                flag = "" if p99 <= target else "  ABOVE"
                print(f"{name:<22}{thread:<8}{p50:>9.2f}{p99:>9.2f}{worst:>9.2f}"
                      f"{target:>9.0f}{flag}")
                out.setdefault(name, {})[thread] = {
                    "group": group, "p50_ms": p50, "p99_ms": p99, "max_ms": worst,
                    "target_ms": target, "samples": len(times)}
    unsubscribe()
    sys.stdin = sys.__stdin__
    os.close(read_fd)
    os.close(write_fd)
    pyrepl3_ext.unload_ipython_extension(shell)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="idle-cost rounds per variant")
    parser.add_argument("--samples", type=int, default=200, help="latency samples per scenario")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 30 samples")
    parser.add_argument("--fresh-samples", type=int, default=5,
                        help="processes per fresh-process scenario")
    parser.add_argument("--only", choices=["idle", "latency", "instructions", "fresh"],
                        help="run one part")
    parser.add_argument("--instructions", action="store_true",
                        help="also count the idle cost in instructions (valgrind; minutes)")
    parser.add_argument("--count-child", choices=["none", "loaded"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count_child:
        return count_child(args.count_child)
    rounds, samples = (3, 30) if args.quick else (args.rounds, args.samples)

    print(f"Python {sys.version.split()[0]}, IPython {__import__('IPython').__version__}")
    payload: dict = {}
    if args.only == "instructions" or (args.only is None and args.instructions):
        payload["idle_instructions"] = idle_instructions()
    if args.only in (None, "fresh"):
        payload["fresh_process"] = fresh_process_latency(args.fresh_samples)
    if args.only not in ("instructions", "fresh"):  # the timed parts run in this process
        shell = make_shell()
        worker = Worker()
        if args.only in (None, "idle"):
            payload["idle_cost"] = idle_cost(shell, worker, rounds)
        if args.only in (None, "latency"):
            payload["latency"] = cancel_latency(shell, worker, samples)
    path = write_results("cancel", payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
