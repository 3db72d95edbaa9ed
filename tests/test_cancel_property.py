"""Cancellation property test: random cells, cancelled at random moments.

Cells are drawn from a small grammar (loops, one-line loops, recursion,
generators, comprehensions, ``try``/``finally``, ``with`` on locks and
conditions, waits with a timeout), run in the main thread or a worker
thread, and cancelled from another thread after a random delay.  After
every cancel these must hold:

* the cell ended (within a generous bound), with ``CellCancelled``;
* every ``finally`` that was entered ran to its end;
* every lock and condition the cell used is released;
* the next cell runs normally, and no stray cancel hits the cells after it.

``PYREPL3_CANCEL_CASES`` sets the number of cases per thread (default 120,
so 240 per test session: 2,400 across the ten sessions of the CI matrix);
``PYREPL3_CANCEL_SEED`` replays a run.  A failure prints the seed and the
cell.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import pytest

import pyrepl3_ext
from pyrepl3_ext import CellCancelled

CASES = int(os.environ.get("PYREPL3_CANCEL_CASES", "120"))
SEED = int(os.environ.get("PYREPL3_CANCEL_SEED", str(random.randrange(1 << 30))))
BOUND = 30.0  # seconds: a hang, not a latency measurement

#: The innermost statements: each runs for ever (the cancel ends it).
CORES = {
    "loop": ["i = 0", "while True:", "    i += 1"],
    "oneline": ["while True: pass"],
    "calls": ["while True:", "    _f(1)"],
    "recursion": ["_down(300)"],
    "generator": ["for _ in _gen():", "    pass"],
    "comprehension": ["while True:", "    [x * x for x in range(200)]"],
    "event wait": ["while True:", "    _threading.Event().wait(0.005)"],
    "condition wait": ["while True:", "    with _cond:", "        _cond.wait(0.005)"],
    "sleep": ["while True:", "    _time.sleep(0.005)"],
}

PRELUDE = """\
import threading as _threading, time as _time
def _f(a):
    return a + 1
def _down(n):
    if n == 0:
        while True:
            pass
    return _down(n - 1)
def _gen():
    try:
        while True:
            yield 1
    finally:
        _log.append("gen-finally")
"""


def make_cell(rng: random.Random, where: str) -> list[str]:
    """A random cell: nested wrappers around a core loop, as source lines."""
    core = rng.choice(list(CORES))
    lines = list(CORES[core])
    used: set = set()  # a plain lock taken twice deadlocks (a worker cannot be freed)
    for depth in range(rng.randrange(0, 4)):
        kind = rng.choice(["try", "with lock", "with rlock", "func", "acquire-try"])
        if kind in used and kind in ("with lock", "acquire-try"):
            kind = "with rlock"
        used.add(kind)
        tag = f"{kind}-{depth}"
        body = ["    " + line for line in lines]
        if kind == "try":
            lines = ["try:", *body, "finally:", f"    _log.append({tag!r})"]
            lines = [f"_log.append('enter {tag}')", *lines]
        elif kind in ("with lock", "with rlock"):
            name = "_lock" if kind == "with lock" else "_rlock"
            lines = [f"with {name}:", *body]
        elif kind == "acquire-try":
            lines = ["_lock2.acquire()", f"_log.append('enter {tag}')", "try:", *body,
                     "finally:", "    _lock2.release()", f"    _log.append({tag!r})"]
        else:  # a function around it
            lines = [f"def _wrapped_{depth}():", *body, f"_wrapped_{depth}()"]
    return ["_started.set()", *lines]


def finally_ran(log: list) -> bool:
    entered = [entry[len("enter "):] for entry in log if entry.startswith("enter ")]
    done = [entry for entry in log if not entry.startswith("enter ") and entry != "gen-finally"]
    return sorted(entered) == sorted(done)


def check_documented_limits(lines: list[str], where: str) -> bool:
    """Whether the cell is one the docs say cannot be cancelled safely here."""
    if where == "worker" and sys.version_info < (3, 12):
        return True  # asynchronous exception: no safe points (docs/cancellation.md)
    if sys.version_info < (3, 12):
        # 3.11: a one-line loop directly in a try/with body (jump attribution)
        for above, line in zip(lines, lines[1:]):
            if line.strip() == "while True: pass" and above.rstrip().endswith(":"):
                return True
    return False


@pytest.mark.parametrize("where", ["main", "worker"])
def test_random_cells_cancelled_at_random_moments(quiet, where):
    rng = random.Random(f"{SEED}-{where}")
    ip = quiet
    ip.run_cell(PRELUDE, store_history=False)
    for case in range(CASES):
        lines = make_cell(rng, where)
        source = "\n".join(lines)
        relaxed = check_documented_limits(lines, where)
        started = threading.Event()
        log: list = []
        locks = {"_lock": threading.Lock(), "_rlock": threading.RLock(),
                 "_lock2": threading.Lock(), "_cond": threading.Condition()}
        ip.user_ns.update(locks, _started=started, _log=log)
        eid = f"prop-{where}-{case}"
        delay = rng.choice([0.0, rng.uniform(0, 0.003), rng.uniform(0, 0.03)])
        box: dict = {}

        def cell() -> None:
            box["result"] = pyrepl3_ext.run_cell(ip, source, execution_id=eid,
                                                 store_history=False)

        def canceller() -> None:
            if started.wait(BOUND):
                time.sleep(delay)
                box["hit"] = pyrepl3_ext.cancel(ip, eid, "property")

        context = f"seed {SEED}, {where} case {case}, delay {delay:.4f}:\n{source}"
        helper = threading.Thread(target=canceller, daemon=True)
        helper.start()
        if where == "main":
            cell()
        else:
            runner = threading.Thread(target=cell, daemon=True)
            runner.start()
            runner.join(BOUND)
            assert not runner.is_alive(), f"not cancelled within {BOUND} s; {context}"
        helper.join(BOUND)
        assert not helper.is_alive(), context
        assert box.get("hit") is True, context
        error = box["result"].error_in_exec
        assert isinstance(error, CellCancelled) and error.execution_id == eid, \
            f"{error!r}; {context}"
        if not relaxed:
            assert finally_ran(log), f"a finally was cut short: {log}; {context}"
            for name, lock in locks.items():
                held = lock._is_owned() if name in ("_rlock", "_cond") else lock.locked()
                assert not held, f"{name} still held; {context}"
        # the next cells run normally: nothing stray is left to hit them
        for n in range(3):
            follow = pyrepl3_ext.run_cell(ip, f"{n} + 1", execution_id=f"{eid}-next{n}",
                                          store_history=False)
            assert follow.error_in_exec is None and follow.result == n + 1, \
                f"{follow.error_in_exec!r} after {context}"
    assert sys.gettrace() is None
