"""Engine sessions running concurrently: only on the patched IPython build.

Skipped on stock IPython, where the engine refuses concurrent sessions
(tests/test_engine.py checks that).  Run with ``nox -s patched``.
"""

from __future__ import annotations

import io
import sys
import threading
import time

import pytest
from traitlets.config import Config

from pyrepl3_ext._compat import is_patched_build

pytestmark = pytest.mark.skipif(
    not is_patched_build(),
    reason="needs the pyrepl3-patched IPython build (nox -s patched)")

from pyrepl3_ext import CellCancelled, Engine  # noqa: E402

WAIT = 60
N_SESSIONS = 8


@pytest.fixture
def engine():
    config = Config()
    config.InteractiveShell.xmode = "Plain"
    eng = Engine(config=config)
    try:
        yield eng
    finally:
        assert eng.close(timeout=WAIT)


def in_threads(jobs, switch_interval=1e-5):
    """Run each callable in its own thread at once; re-raise the first failure."""
    errors = []

    def wrap(job):
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    # Until the output-routing patch lands, IPython's history tee wraps the
    # shared sys.stdout/stderr ``write`` per cell, and concurrent cells can
    # leave a wrapper of a (later closed) shell behind: run on streams of
    # our own, dropped afterwards.
    old = sys.getswitchinterval()
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    sys.setswitchinterval(switch_interval)
    try:
        threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    finally:
        sys.setswitchinterval(old)
        sys.stdout, sys.stderr = streams
    if errors:
        raise errors[0]


def test_engine_reports_concurrency(engine):
    assert engine.concurrent


def test_sessions_run_cells_at_the_same_time(engine):
    sessions = [engine.create_session(f"s{k}") for k in range(N_SESSIONS)]
    barrier = threading.Barrier(N_SESSIONS)
    for s in sessions:
        s.shell.user_ns["barrier"] = barrier
    # each cell waits until all 8 are inside a cell at once: on a build that
    # ran sessions one at a time the barrier would break
    results = {}
    in_threads([lambda s=s: results.__setitem__(s.id, s.execute("barrier.wait(30)\n'met'").result)
                for s in sessions])
    assert results == {s.id: "met" for s in sessions}


def test_concurrent_sessions_each_see_only_their_own(engine):
    sessions = [engine.create_session(f"own{k}") for k in range(N_SESSIONS)]
    cells = 60
    wrong: dict[str, list] = {s.id: [] for s in sessions}

    def drive(s, k):
        s.execute(f"mine = {k}\nseen = []")
        for i in range(cells):
            value = k * 1000 + i
            r = s.execute(f"import IPython\nv = {value}\n"
                          f"seen.append((mine, IPython.get_ipython() is get_ipython()))\nv")
            if r.result != value or r.execution_count != i + 2:
                wrong[s.id].append((i, r.result, r.execution_count))

    in_threads([lambda s=s, k=k: drive(s, k) for k, s in enumerate(sessions)])
    assert wrong == {s.id: [] for s in sessions}
    for k, s in enumerate(sessions):
        seen = s.execute("seen").result
        assert seen == [(k, True)] * cells
        assert s.execute("Out[2]").result == k * 1000


def test_concurrent_await_cells_on_their_own_loops(engine):
    sessions = [engine.create_session(f"aw{k}") for k in range(N_SESSIONS)]
    results = {}

    def drive(s, k):
        s.execute("import asyncio")
        out = []
        for i in range(20):
            r = s.execute(f"await asyncio.sleep(0)\nx = {k} + {i}\nx")
            out.append((r.result, r.error_in_exec))
        results[k] = out

    in_threads([lambda s=s, k=k: drive(s, k) for k, s in enumerate(sessions)])
    for k in range(N_SESSIONS):
        assert results[k] == [(k + i, None) for i in range(20)]


def test_cancelling_one_session_leaves_the_others_running(engine):
    victim, *others = [engine.create_session(f"c{k}") for k in range(4)]
    for s in others:
        s.execute("import time")
    results = {}

    def run_victim():
        h = victim.execute("while True: pass", wait=False)
        slow = [s.execute("time.sleep(0.3)\n'done'", wait=False) for s in others]
        while h.mode == "":  # started: the cell itself is cancelled, not its queue entry
            time.sleep(0.001)
        assert victim.cancel(h.execution_id)
        r = h.result(WAIT)
        # error_before_exec when the cancel lands as IPython enters the code
        results["victim"] = r.error_in_exec or r.error_before_exec
        results["others"] = [x.result(WAIT).result for x in slow]

    in_threads([run_victim])
    assert isinstance(results["victim"], CellCancelled)
    assert results["others"] == ["done"] * len(others)


def test_closing_sessions_while_others_run(engine):
    keep = engine.create_session("keep")
    keep.execute("import time")
    out = {}

    def churn():
        running = keep.execute("time.sleep(0.2)\n'kept'", wait=False)
        out["tmp"] = []
        for k in range(10):
            s = engine.create_session(f"tmp{k}")
            out["tmp"].append(s.execute(f"{k} * 2").result)
            assert s.close(WAIT)
        out["kept"] = running.result(WAIT).result

    in_threads([churn])
    assert out == {"tmp": [k * 2 for k in range(10)], "kept": "kept"}
    assert [s.id for s in engine.sessions] == ["keep"]
