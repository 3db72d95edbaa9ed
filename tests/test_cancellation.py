"""Cancellation manager: any cell, any thread, by id or deadline; nothing stale, nothing left."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pyrepl3_ext
from pyrepl3_ext import CellCancelled, CellTimeout, cancellation

from .conftest import by_execution
from .polling import wait_until

WAIT = 30  # generous upper bounds on waits: a failure, never a timing assertion


@pytest.fixture
def started(ip):
    """An Event the cell sets once it runs; ``cancel_when_started`` cancels then."""
    event = threading.Event()
    ip.user_ns["_started"] = event
    yield event
    ip.user_ns.pop("_started", None)


class _Canceller(threading.Thread):
    """Cancels once the cell has started; ``join`` brings the outcome back to
    the test's thread (an assert in this thread would only be printed)."""

    def __init__(self, ip, started, execution_id, reason):
        super().__init__(daemon=True)
        self.args_ = (ip, started, execution_id, reason)
        self.result: dict = {}

    def run(self):
        ip, started, execution_id, reason = self.args_
        if not started.wait(WAIT):
            self.result["error"] = "cell never started"
            return
        self.result["hit"] = pyrepl3_ext.cancel(ip, execution_id, reason)

    def join(self, timeout=None):
        super().join(timeout)
        assert not self.is_alive(), "the canceller is still waiting"
        assert "error" not in self.result, self.result["error"]
        assert self.result["hit"] is True, "the cancel missed the running cell"


@pytest.fixture
def no_hard_deadline(monkeypatch):
    """Cleanup code is never cut short before ``HARD_DEADLINE``; tests about
    deferral set it out of reach so that a slow machine cannot make them
    depend on the clock (the deadline itself: ``test_hard_deadline_...``)."""
    monkeypatch.setattr(cancellation.CancelScope, "hard_deadline", 3600.0)


def cancel_when_started(ip, started, execution_id, reason="test cancel"):
    thread = _Canceller(ip, started, execution_id, reason)
    thread.start()
    return thread, thread.result


def run_in_thread(ip, code, execution_id, **kw):
    out = {}

    def target():
        out["result"] = pyrepl3_ext.run_cell(ip, code, execution_id=execution_id, **kw)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


SCENARIOS = {
    "tight loop": "_started.set()\ni = 0\nwhile True:\n    i += 1",
    "one-line loop": "_started.set()\nwhile True: pass",
    "recursion 900 deep": textwrap.dedent("""\
        import sys
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 2000))
        def down(n):
            if n == 0:
                _started.set()
                while True:
                    pass
            return down(n - 1)
        down(900)"""),
    "generator": "def gen():\n    while True:\n        yield 1\n_started.set()\nfor _ in gen():\n    pass",
    "comprehension": "_started.set()\nwhile True:\n    [x * x for x in range(1000)]",
    "sorted key= (Python inside C)": "_started.set()\nwhile True:\n    sorted(range(2000), key=lambda v: -v)",
    "calls": "def f(a):\n    return a + 1\n_started.set()\nwhile True:\n    f(1)",
}


def assert_cancelled(result, execution_id, reason="test cancel", kind="cancelled"):
    err = result.error_in_exec
    assert isinstance(err, CellCancelled), repr(err)
    assert err.kind == kind and err.execution_id == execution_id
    assert reason in str(err)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_cancel_main_thread_cell(quiet, started, events, scenario):
    ip = quiet
    thread, hit = cancel_when_started(ip, started, "m1")
    result = pyrepl3_ext.run_cell(ip, SCENARIOS[scenario], execution_id="m1")
    thread.join(WAIT)
    assert hit["hit"] is True
    assert_cancelled(result, "m1")
    evs = by_execution(events, "m1")
    assert [e["type"] for e in evs] == ["started", "error", "finished"]
    assert evs[1]["kind"] == "cancelled" and "test cancel" in evs[1]["evalue"]
    assert evs[2]["status"] == "cancelled"
    assert sys.gettrace() is None
    assert pyrepl3_ext.run_cell(ip, "6 * 7").result == 42  # the shell goes on


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_cancel_worker_thread_cell(quiet, started, scenario):
    ip = quiet
    thread, out = run_in_thread(ip, SCENARIOS[scenario], "w1")
    assert started.wait(WAIT)
    assert pyrepl3_ext.cancel(ip, "w1", "test cancel") is True
    thread.join(WAIT)
    assert not thread.is_alive(), "worker cell was not cancelled"
    assert_cancelled(out["result"], "w1")
    if sys.version_info >= (3, 12):
        tool = cancellation._MONITORING.tool
        assert tool is not None and sys.monitoring.get_events(tool) == 0


def test_worker_cancel_leaves_the_interpreter_clean(quiet, started):
    """A cancelled worker cell must leave nothing pending that a later
    main-thread cancel trips over (3.10/3.11: a retracted SetAsyncExc
    left the eval breaker set and the next signal handler never ran)."""
    ip = quiet
    for _ in range(3):
        started.clear()
        thread, out = run_in_thread(ip, SCENARIOS["tight loop"], "w2")
        assert started.wait(WAIT)
        assert pyrepl3_ext.cancel(ip, "w2", "test cancel") is True
        thread.join(WAIT)
        assert_cancelled(out["result"], "w2")
    started.clear()
    canceller, _ = cancel_when_started(ip, started, "m2")
    result = pyrepl3_ext.run_cell(ip, "import time\n_started.set()\ntime.sleep(60)",
                                  execution_id="m2")
    canceller.join(WAIT)
    assert_cancelled(result, "m2")
    assert pyrepl3_ext.run_cell(ip, "sum(range(10))").result == 45


BLOCKING = {
    "sleep": "import time\n_started.set()\ntime.sleep(60)",
    "queue.get": "import queue\nq = queue.Queue()\n_started.set()\nq.get()",
    "Event.wait": "import threading\nev = threading.Event()\n_started.set()\nev.wait()",
    "held Lock.acquire": "import threading\nlk = threading.Lock()\nlk.acquire()\n_started.set()\nlk.acquire()",
}


@pytest.mark.parametrize("scenario", list(BLOCKING))
def test_cancel_blocking_call_in_main_thread(quiet, started, scenario):
    thread, hit = cancel_when_started(quiet, started, "b1")
    result = pyrepl3_ext.run_cell(quiet, BLOCKING[scenario], execution_id="b1")
    thread.join(WAIT)
    assert_cancelled(result, "b1")


def test_cancel_main_thread_input(quiet, started, monkeypatch):
    read_fd, write_fd = os.pipe()
    try:
        monkeypatch.setattr(sys, "stdin", os.fdopen(read_fd, "r", closefd=False))
        thread, _ = cancel_when_started(quiet, started, "in1")
        result = pyrepl3_ext.run_cell(quiet, "_started.set()\ninput()", execution_id="in1")
        thread.join(WAIT)
        assert_cancelled(result, "in1")
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.parametrize("wait", ["interruptible_wait", "interruptible_sleep"])
@pytest.mark.parametrize("where", ["main", "worker"])
def test_engine_owned_waits_wake_on_cancel(quiet, started, wait, where):
    """The wake is immediate: ``cancel()`` itself sets the event the cell
    waits on before it returns (no signal, tracer or poll needed), and the
    cell then ends with ``CellCancelled``."""
    code = ("from pyrepl3_ext import cancellation\nimport threading\n"
            "_started.set()\n_tid.append(threading.get_ident())\n"
            + ("cancellation.interruptible_wait(threading.Event())"
               if wait == "interruptible_wait" else "cancellation.interruptible_sleep(3600)"))
    quiet.user_ns["_tid"] = tid = []
    seen = {}

    def canceller():
        try:
            assert started.wait(WAIT), "cell never started"
            # the wait has registered its event (a poll of state, not a clock)
            wait_until(lambda: tid and cancellation._thread_wakers.get(tid[0]))
            wakers = list(cancellation._thread_wakers[tid[0]])
            seen["hit"] = pyrepl3_ext.cancel(quiet, "e1", "test cancel")
            seen["woken"] = [w.is_set() for w in wakers]  # right after cancel() returned
            for waker in wakers:  # not woken: release the cell, so the test fails, not hangs
                waker.set()
        except BaseException as exc:  # noqa: BLE001 - asserted in the test's thread
            seen["error"] = exc

    thread = threading.Thread(target=canceller, daemon=True)
    if where == "main":
        thread.start()
        result = pyrepl3_ext.run_cell(quiet, code, execution_id="e1")
        thread.join(WAIT)
    else:
        cell, out = run_in_thread(quiet, code, "e1")
        thread.start()
        thread.join(WAIT)
        assert "error" not in seen, seen
        assert seen["woken"] == [True], seen  # checked before waiting for the cell
        cell.join(WAIT)
        assert not cell.is_alive(), "the wait never woke"
        result = out["result"]
    assert not thread.is_alive()
    assert "error" not in seen, seen
    assert seen["hit"] is True and seen["woken"] == [True], seen
    assert_cancelled(result, "e1")


@pytest.mark.parametrize("where", ["main", "worker"])
def test_a_cancelled_cell_leaves_no_wait_registered_for_its_thread(quiet, started, where):
    """On 3.10/3.11 a worker's cancel is an asynchronous exception, which can
    land in a wait's own cleanup and skip its unregistering (seen in CI as a
    second, stale event for a later thread with the same id).  The cell below
    leaves such an entry as that cleanup would; the cancelled cell's end
    removes it."""
    code = ("import threading\nfrom pyrepl3_ext.cancellation import scope as _scope\n"
            "_scope._thread_wakers.setdefault(threading.get_ident(), set())"
            ".add(threading.Event())\n_tid.append(threading.get_ident())\n"
            "_started.set()\nwhile True:\n    pass")
    quiet.user_ns["_tid"] = tid = []
    canceller, _hit = cancel_when_started(quiet, started, "w1")
    if where == "main":
        result = pyrepl3_ext.run_cell(quiet, code, execution_id="w1")
    else:
        cell, out = run_in_thread(quiet, code, "w1")
        cell.join(WAIT)
        assert not cell.is_alive(), "the cell was not cancelled"
        result = out["result"]
    canceller.join(WAIT)
    assert_cancelled(result, "w1")
    assert tid and tid[0] not in cancellation._thread_wakers


FINALIZING = {
    "__del__": ("class _D:\n    def __del__(self):\n        n = 0\n"
                "        for i in range(200):\n            n += i\n"
                "_started.set()\nwhile True:\n    _D()"),
    "weakref callback": ("import weakref\nclass _T:\n    pass\n_s = weakref.WeakSet()\n"
                         "_started.set()\nwhile True:\n    _t = _T()\n    _s.add(_t)\n"
                         "    del _t"),
}


@pytest.mark.parametrize("where", ["main", "worker"])
@pytest.mark.parametrize("cell", list(FINALIZING))
def test_a_cancel_never_lands_in_a_finalizer_the_cells_garbage_runs(quiet, started, where,
                                                                     cell, monkeypatch):
    """A ``__del__`` or a weakref callback runs from C, and an exception raised
    there is printed as "Exception ignored" and dropped: the cancel must land
    in the cell's own code instead (CI, 3.10: it landed in WeakSet's
    callback)."""
    if where == "worker" and sys.version_info < (3, 12):
        pytest.skip("3.10/3.11 workers get an asynchronous exception, which lands "
                    "anywhere, finalizers included (docs/cancellation.md)")
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type))
    canceller, _hit = cancel_when_started(quiet, started, "f1")
    if where == "main":
        result = pyrepl3_ext.run_cell(quiet, FINALIZING[cell], execution_id="f1")
    else:
        thread, out = run_in_thread(quiet, FINALIZING[cell], "f1")
        thread.join(WAIT)
        assert not thread.is_alive(), "the cell was not cancelled"
        result = out["result"]
    canceller.join(WAIT)
    assert_cancelled(result, "f1")
    assert swallowed == []


def test_interruptible_wait_outside_cells_behaves_like_event_wait():
    ev = threading.Event()
    assert cancellation.interruptible_wait(ev, timeout=0.01) is False
    ev.set()
    assert cancellation.interruptible_wait(ev, timeout=0.01) is True


@pytest.mark.parametrize("where", ["main", "worker"])
def test_finally_and_with_run_and_locks_are_released(quiet, started, where,
                                                     no_hard_deadline):
    code = textwrap.dedent("""\
        import threading
        lock = threading.Lock()
        cleanup = []
        class Resource:
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                n = 0
                for i in range(20000):  # a cleanup long enough to be hit
                    n += 1
                cleanup.append(("exit", n))
        with Resource():
            with lock:
                try:
                    _started.set()
                    i = 0
                    while True:
                        i += 1
                finally:
                    total = 0
                    for k in range(20000):
                        total += 1
                    cleanup.append(("finally", total))
        """)
    if where == "main":
        thread, _ = cancel_when_started(quiet, started, "f1")
        result = pyrepl3_ext.run_cell(quiet, code, execution_id="f1")
        thread.join(WAIT)
    else:
        thread, out = run_in_thread(quiet, code, "f1")
        assert started.wait(WAIT)
        pyrepl3_ext.cancel(quiet, "f1", "test cancel")
        thread.join(WAIT)
        result = out["result"]
    assert_cancelled(result, "f1")
    if where == "worker" and sys.version_info < (3, 12):
        # documented: the asynchronous exception used for worker threads on
        # 3.10/3.11 cannot defer to safe points; the lock is still released
        assert quiet.user_ns["lock"].locked() is False
        return
    assert quiet.user_ns["cleanup"] == [("finally", 20000), ("exit", 20000)]
    assert quiet.user_ns["lock"].locked() is False


def test_cancel_in_finally_is_deferred_until_it_ends(quiet, started, no_hard_deadline):
    # the finally runs on until the cancel has been delivered (armed), so
    # the cancel lands inside it for certain
    quiet.user_ns["_cancelled"] = cancelled = threading.Event()
    code = textwrap.dedent("""\
        done = []
        try:
            pass
        finally:
            _started.set()
            n = 0
            while not _cancelled.is_set() or n < 50_000:
                n += 1
            done.append("finally ran to its end")
        while True:
            pass
        """)

    def cancel_then_release():
        assert started.wait(WAIT)
        hit["hit"] = pyrepl3_ext.cancel(quiet, "fin", "test cancel")
        cancelled.set()

    hit = {}
    thread = threading.Thread(target=cancel_then_release, daemon=True)
    thread.start()
    result = pyrepl3_ext.run_cell(quiet, code, execution_id="fin")
    thread.join(WAIT)
    assert hit == {"hit": True}
    assert_cancelled(result, "fin")
    assert quiet.user_ns["done"] == ["finally ran to its end"]


@pytest.mark.parametrize("where", ["main", "worker"])
def test_hard_deadline_ends_a_cell_stuck_in_finally(quiet, started, where):
    """docs/cancellation.md: a cancel deferred by a ``finally`` that never ends
    is raised anyway once ``HARD_DEADLINE`` (2 s) has passed."""
    code = ("done = []\ntry:\n    pass\nfinally:\n    _started.set()\n"
            "    while True:\n        pass\n    done.append('never')\n")
    if where == "main":
        thread, _ = cancel_when_started(quiet, started, "stuck")
        result = pyrepl3_ext.run_cell(quiet, code, execution_id="stuck")
        thread.join(WAIT)
    else:
        cell, out = run_in_thread(quiet, code, "stuck")
        assert started.wait(WAIT)
        assert pyrepl3_ext.cancel(quiet, "stuck", "test cancel") is True
        cell.join(WAIT)
        assert not cell.is_alive(), "the cell stuck in finally was never cut"
        result = out["result"]
    assert_cancelled(result, "stuck")
    assert quiet.user_ns["done"] == []


def test_cancel_during_import_leaves_no_half_module(quiet, started, tmp_path):
    pkg = tmp_path / "slowimp_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "slow.py").write_text(textwrap.dedent("""\
        import builtins
        VALUE = 1
        if getattr(builtins, "_pyrepl3_slow_import", False):
            builtins._pyrepl3_started.set()
            while True:
                VALUE += 1
        """))
    import builtins

    builtins._pyrepl3_slow_import = True
    builtins._pyrepl3_started = started
    sys.path.insert(0, str(tmp_path))
    try:
        thread, _ = cancel_when_started(quiet, started, "imp")
        result = pyrepl3_ext.run_cell(quiet, "import slowimp_pkg.slow", execution_id="imp")
        thread.join(WAIT)
        assert_cancelled(result, "imp")
        assert "slowimp_pkg.slow" not in sys.modules
        builtins._pyrepl3_slow_import = False
        again = pyrepl3_ext.run_cell(quiet, "import slowimp_pkg.slow\nslowimp_pkg.slow.VALUE")
        assert again.result == 1
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("slowimp_pkg.slow", "slowimp_pkg"):
            sys.modules.pop(name, None)
        del builtins._pyrepl3_slow_import, builtins._pyrepl3_started


@pytest.mark.parametrize("where", ["main", "worker"])
def test_swallowed_cancel_is_cancelled_again(quiet, started, where):
    state = pyrepl3_ext.get_state(quiet)
    grace = state.config.cancel_grace
    quiet.run_line_magic("config", "PyREPL3.cancel_grace = 0.05")
    code = textwrap.dedent("""\
        from pyrepl3_ext import CellCancelled
        swallowed = 0
        try:
            _started.set()
            while True:
                pass
        except CellCancelled:
            swallowed += 1
        while True:   # keeps going as if nothing happened
            swallowed += 0
        """)
    try:
        if where == "main":
            thread, _ = cancel_when_started(quiet, started, "sw")
            result = pyrepl3_ext.run_cell(quiet, code, execution_id="sw")
            thread.join(WAIT)
        else:
            thread, out = run_in_thread(quiet, code, "sw")
            assert started.wait(WAIT)
            pyrepl3_ext.cancel(quiet, "sw", "test cancel")
            thread.join(WAIT)
            assert not thread.is_alive()
            result = out["result"]
    finally:
        state.config.cancel_grace = grace
    assert_cancelled(result, "sw")
    assert quiet.user_ns["swallowed"] == 1


def test_async_cell_is_cancelled_and_spawned_tasks_live(quiet, started, events):
    code = textwrap.dedent("""\
        import asyncio
        cleanup = []
        async def background():
            await asyncio.sleep(0)
            return "alive"
        spawned = asyncio.ensure_future(background())
        try:
            _started.set()
            await asyncio.sleep(60)
        finally:
            cleanup.append("ran")
        """)
    thread, _ = cancel_when_started(quiet, started, "as1")
    result = pyrepl3_ext.run_cell(quiet, code, execution_id="as1")
    thread.join(WAIT)
    assert_cancelled(result, "as1")
    assert quiet.user_ns["cleanup"] == ["ran"]
    evs = by_execution(events, "as1")
    assert evs[0]["mode"] == "async" and evs[1]["kind"] == "cancelled"
    follow = pyrepl3_ext.run_cell(quiet, "await spawned")
    assert follow.result == "alive"


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring (3.12+)")
def test_cancelled_await_leaves_no_events_on_while_the_traceback_prints():
    """A cell suspended in its loop is cancelled through its task.  Whatever
    the order in which the loop and the canceller run, the global events the
    cancel armed (a stack walk per call) are off by the time IPython formats
    the traceback: left on, they made the printing take seconds under load."""
    from pyrepl3_ext import Engine

    tool = cancellation._MONITORING
    seen = []
    with Engine() as engine:
        session = engine.create_session()
        shell = session.shell
        original = shell.showtraceback

        def recording_showtraceback(*args, **kwargs):
            seen.append(sys.monitoring.get_events(tool.tool))
            return original(*args, **kwargs)

        shell.showtraceback = recording_showtraceback
        for n in range(5):
            shell.user_ns["_started"] = started = threading.Event()
            handle = session.execute("import asyncio\n_started.set()\nawait asyncio.sleep(60)",
                                     wait=False)
            assert started.wait(WAIT)
            time.sleep(0.02 * n)  # vary where the loop is when the cancel lands
            assert handle.cancel() is True
            assert isinstance(handle.result(WAIT).error_in_exec, CellCancelled)
    assert seen == [0] * 5


SWALLOWING_AWAIT = textwrap.dedent("""\
    import asyncio
    swallowed = 0
    _started.set()
    while True:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed += 1
            if swallowed >= 3:
                raise
    """)


def test_async_cell_that_swallows_the_cancel_is_cancelled_again(quiet, started):
    """Level-triggered for awaits too: the cell is suspended in its loop
    again (nothing of it on the thread's stack), and the task is cancelled
    again after each grace period until the cell lets it through."""
    thread, _ = cancel_when_started(quiet, started, "as3")
    result = pyrepl3_ext.run_cell(quiet, SWALLOWING_AWAIT, execution_id="as3")
    thread.join(WAIT)
    assert_cancelled(result, "as3")
    assert quiet.user_ns["swallowed"] == 3


def test_async_cell_on_a_session_loop_that_swallows_the_cancel_is_cancelled_again():
    from pyrepl3_ext import Engine

    with Engine() as engine:
        session = engine.create_session()
        session.shell.run_line_magic("xmode", "Plain")  # the real formatter, cheaply
        session.shell.user_ns["_started"] = started = threading.Event()
        handle = session.execute(SWALLOWING_AWAIT, wait=False)
        assert started.wait(WAIT)
        assert handle.cancel() is True
        assert isinstance(handle.result(WAIT).error_in_exec, CellCancelled)
        assert session.shell.user_ns["swallowed"] == 3
        # the session's loop goes on: the next await cell runs normally
        assert session.execute("await asyncio.sleep(0)\n7").result == 7


def test_busy_async_cell_is_cancelled(quiet, started):
    code = "import asyncio\nawait asyncio.sleep(0)\n_started.set()\nwhile True:\n    pass"
    thread, _ = cancel_when_started(quiet, started, "as2")
    result = pyrepl3_ext.run_cell(quiet, code, execution_id="as2")
    thread.join(WAIT)
    assert_cancelled(result, "as2")


def test_timeouts_from_argument_magic_and_config(quiet, events):
    loop = "while True:\n    pass"
    r1 = pyrepl3_ext.run_cell(quiet, loop, execution_id="t-arg", timeout=0.2)
    r2 = pyrepl3_ext.run_cell(quiet, "%%timeout 0.2\n" + loop, execution_id="t-magic")
    quiet.run_line_magic("config", "PyREPL3.cell_timeout = 0.2")
    try:
        r3 = pyrepl3_ext.run_cell(quiet, loop, execution_id="t-config")
    finally:
        quiet.run_line_magic("config", "PyREPL3.cell_timeout = 0")
    for result, eid in ((r1, "t-arg"), (r2, "t-magic"), (r3, "t-config")):
        err = result.error_in_exec
        assert isinstance(err, CellTimeout) and err.kind == "timeout", repr(err)
        assert "timeout of 0.2 s" in str(err)
        evs = by_execution(events, eid)
        assert evs[1]["kind"] == "timeout" and evs[2]["status"] == "cancelled"
    # a deadline that does not expire leaves the cell alone
    assert pyrepl3_ext.run_cell(quiet, "1 + 1", timeout=30).result == 2


needs_monitoring = pytest.mark.skipif(sys.version_info < (3, 12),
                                      reason="the deadline's watch uses sys.monitoring (3.12+)")


@pytest.fixture
def watch(monkeypatch):
    """A watch armed 0.3 s ahead of deadlines of any length (it is 2 ms, for
    timeouts of 20 ms and more), and a record of what it and the deadline's
    timer found: ``armed`` (each watch's outcome), ``fired`` (for each
    ``_deadline`` call, whether the cell had already stopped itself)."""
    from pyrepl3_ext.cancellation import manager as mgr

    monkeypatch.setattr(mgr, "WATCH_LEAD", 0.3)
    monkeypatch.setattr(mgr, "WATCH_MIN_TIMEOUT", 0.0)
    record = {"armed": [], "fired": [], "arm_event": threading.Event()}
    arm_watch, deadline = mgr.CancellationManager._arm_watch, mgr.CancellationManager._deadline

    def recording_arm_watch(self, scope, reason):
        armed = arm_watch(self, scope, reason)
        record["armed"].append(armed)
        record["arm_event"].set()
        return armed

    def recording_deadline(self, scope, timeout):
        record["fired"].append(scope.watch_fired or scope.finished)
        return deadline(self, scope, timeout)

    monkeypatch.setattr(mgr.CancellationManager, "_arm_watch", recording_arm_watch)
    monkeypatch.setattr(mgr.CancellationManager, "_deadline", recording_deadline)
    return record


def _global_events_of_ours() -> int:
    tool = cancellation._MONITORING.tool
    return 0 if tool is None else sys.monitoring.get_events(tool)


def _run_in(where, call):
    if where == "main":
        return call()
    out = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    thread.join(WAIT)
    assert out, "the cell did not end"
    return out[0]


@needs_monitoring
@pytest.mark.parametrize("where", ["main", "worker"])
def test_a_deadline_is_met_by_the_cells_own_event(quiet, watch, where):
    """Armed ahead of the deadline, the cell raises at it by itself: on a
    worker thread the deadline's timer (1 ms later) then finds it stopped."""
    code = "while True: pass"
    result = _run_in(where, lambda: pyrepl3_ext.run_cell(quiet, code, execution_id=f"w-{where}",
                                                         timeout=0.5))
    err = result.error_in_exec
    assert isinstance(err, CellTimeout) and "timeout of 0.5 s" in str(err), repr(err)
    assert err.execution_id == f"w-{where}" and watch["armed"] == [True]
    if where == "worker":
        wait_until(lambda: watch["fired"], WAIT)
        assert watch["fired"] == [True], "the timer, not the cell's own event, stopped it"
    assert _global_events_of_ours() == 0 and cancellation._cancelled_threads == {}


@needs_monitoring
@pytest.mark.parametrize("where", ["main", "worker"])
def test_a_cell_that_ends_inside_its_watch_succeeds_and_leaves_nothing_armed(quiet, watch,
                                                                             where, monkeypatch):
    """The watch never raises before the deadline: a cell that runs armed
    for its last 0.25 s and ends 0.5 s before the deadline is not stopped."""
    from pyrepl3_ext.cancellation import manager as mgr

    monkeypatch.setattr(mgr, "WATCH_LEAD", 0.75)
    code = "import time\nend = time.monotonic() + 0.5\nwhile time.monotonic() < end: pass\n'done'"
    result = _run_in(where, lambda: pyrepl3_ext.run_cell(quiet, code, timeout=1))
    assert result.error_in_exec is None and result.result == "done"
    assert watch["armed"] == [True]  # it ran its last 0.25 s watched
    assert _global_events_of_ours() == 0
    assert cancellation._cancelled_threads == {} and cancellation._MONITORING.armed == {}
    wait_until(lambda: watch["fired"], WAIT)  # the deadline's timer finds it over
    assert watch["fired"] == [True] and cancellation._cancelled_threads == {}


@needs_monitoring
def test_a_cancel_during_the_watch_is_the_hosts(quiet, watch):
    def cancel_once_watched():
        assert watch["arm_event"].wait(WAIT)
        pyrepl3_ext.cancel(quiet, "w-host", "stopped by the host")

    canceller = threading.Thread(target=cancel_once_watched, daemon=True)
    canceller.start()
    result = _run_in("worker", lambda: pyrepl3_ext.run_cell(
        quiet, "while True: pass", execution_id="w-host", timeout=1))
    canceller.join(WAIT)
    err = result.error_in_exec
    assert type(err) is CellCancelled and err.kind == "cancelled", repr(err)
    assert str(err) == "stopped by the host" and watch["armed"] == [True]


@needs_monitoring
def test_a_timeout_the_cell_swallows_at_its_watch_is_raised_again(quiet, watch):
    """The watch's raise is level-triggered like any cancel's: the timer that
    finds the cell stopped by it schedules the grace-period re-arm."""
    swallowed: list[int] = []
    quiet.user_ns["swallowed"] = swallowed
    code = ("from pyrepl3_ext import CellTimeout\n"
            "while len(swallowed) < 2:\n"
            "    try:\n        while True: pass\n"
            "    except CellTimeout:\n        swallowed.append(1)\n"
            "while True: pass")
    result = _run_in("worker", lambda: pyrepl3_ext.run_cell(quiet, code, timeout=0.5))
    assert isinstance(result.error_in_exec, CellTimeout), repr(result.error_in_exec)
    assert swallowed == [1, 1] and watch["fired"][0] is True


def test_cancel_unknown_or_finished_execution_misses(quiet):
    assert pyrepl3_ext.cancel(quiet, "no-such-id") is False
    pyrepl3_ext.run_cell(quiet, "1", execution_id="done-already")
    assert pyrepl3_ext.cancel(quiet, "done-already") is False


def test_user_tracer_is_kept_and_cancel_still_works(quiet, started):
    calls = []

    def user_tracer(frame, event, arg):
        calls.append(event)
        return None

    sys.settrace(user_tracer)
    try:
        thread, _ = cancel_when_started(quiet, started, "dbg")
        result = pyrepl3_ext.run_cell(quiet, "_started.set()\nwhile True:\n    pass",
                                      execution_id="dbg")
        thread.join(WAIT)
        assert sys.gettrace() is user_tracer
    finally:
        sys.settrace(None)
    assert_cancelled(result, "dbg")
    assert calls  # the user's tracer kept receiving events


@pytest.mark.parametrize("where", ["main", "worker"])
def test_stale_cancel_never_hits_the_next_cell(quiet, where):
    """10,000 tiny cells; a thread keeps cancelling the current and previous ids."""
    n = 10_000
    target = {"id": None, "prev": None, "stop": False, "issued": 0}

    progress = threading.Event()

    def canceller():
        while not target["stop"]:
            for eid in (target["prev"], target["id"]):
                if eid is not None:
                    pyrepl3_ext.cancel(quiet, eid, "stale?")
                    target["issued"] += 1
                    progress.set()
            time.sleep(0)  # let the cell thread run; the switch interval does the racing

    def run_all(results):
        for i in range(n):
            target["prev"], target["id"] = target["id"], f"s{i}"
            results.append((f"s{i}", pyrepl3_ext.run_cell(quiet, "x = 1", execution_id=f"s{i}",
                                                          store_history=False)))
            if i % 100 == 0:
                # the race is really exercised whatever the load: the canceller
                # gets at least one turn per hundred cells
                progress.clear()
                if not progress.wait(WAIT):
                    results.append(("canceller", "never ran"))
                    return

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    thread = threading.Thread(target=canceller, daemon=True)
    thread.start()
    results: list = []
    try:
        if where == "main":
            run_all(results)
        else:
            worker = threading.Thread(target=run_all, args=(results,), daemon=True)
            worker.start()
            worker.join(300)
    finally:
        target["stop"] = True
        thread.join(WAIT)
        sys.setswitchinterval(old)
    assert ("canceller", "never ran") not in results
    assert len(results) == n
    wrong = [(eid, r.error_in_exec) for eid, r in results
             if r.error_in_exec is not None and not (
                 isinstance(r.error_in_exec, CellCancelled)
                 and r.error_in_exec.execution_id == eid)]
    assert wrong == []
    assert target["issued"] >= n // 100
    assert pyrepl3_ext.run_cell(quiet, "2 + 2").result == 4
    assert sys.gettrace() is None


def test_cancel_storm(quiet, started):
    """8 threads x 1,000 cancels at one running cell and at ids that do not exist."""
    thread, out = run_in_thread(quiet, "_started.set()\nwhile True:\n    pass", "storm")
    assert started.wait(WAIT)
    hits = []

    def storm(k):
        for j in range(1000):
            hits.append(pyrepl3_ext.cancel(quiet, "storm" if j % 2 else f"ghost-{k}-{j}",
                                           "storm"))

    stormers = [threading.Thread(target=storm, args=(k,), daemon=True) for k in range(8)]
    for t in stormers:
        t.start()
    for t in stormers:
        t.join(WAIT)
    thread.join(WAIT)
    assert not thread.is_alive()
    err = out["result"].error_in_exec
    assert isinstance(err, CellCancelled) and err.execution_id == "storm"
    assert hits.count(True) >= 1 and len(hits) == 8000
    assert pyrepl3_ext.run_cell(quiet, "'still fine'").result == "still fine"


def test_nested_cell_cancel_reaches_the_outer_cell(quiet, started):
    code = ("get_ipython().run_cell('_started.set()\\nwhile True:\\n    pass')\n"
            "after_inner = True\nwhile True:\n    pass")
    thread, _ = cancel_when_started(quiet, started, "outer")
    result = pyrepl3_ext.run_cell(quiet, code, execution_id="outer")
    thread.join(WAIT)
    assert_cancelled(result, "outer")


def test_shield_defers_cancellation(quiet, started):
    code = textwrap.dedent("""\
        from pyrepl3_ext.cancellation import shield
        shielded = []
        with shield():
            _started.set()
            n = 0
            while n < 200_000:
                n += 1
            shielded.append(n)
        while True:
            pass
        """)
    thread, _ = cancel_when_started(quiet, started, "sh")
    result = pyrepl3_ext.run_cell(quiet, code, execution_id="sh")
    thread.join(WAIT)
    assert_cancelled(result, "sh")
    assert quiet.user_ns["shielded"] == [200_000]


def test_nothing_installed_while_idle(ip):
    import signal

    assert sys.gettrace() is None
    handler = signal.getsignal(signal.SIGUSR1)
    assert getattr(handler, "__self__", None) is cancellation._SIGNAL
    if sys.version_info >= (3, 12):
        tool = cancellation._MONITORING.tool
        assert sys.monitoring.get_tool(tool) == "pyrepl3-cancel"
        assert sys.monitoring.get_events(tool) == 0
    # no scope left open (a thread's empty stack is kept for its next cell)
    assert all(not stack for stack in cancellation._thread_scopes.values())
    assert cancellation._cancelled_threads == {}


def test_stacks_of_ended_threads_are_dropped(quiet):
    """A thread's empty scope stack is kept for its next cell; stacks of
    threads that ended are dropped when a new thread registers its stack."""
    def one_cell(barrier):
        barrier.wait(WAIT)  # alive together: distinct thread ids
        pyrepl3_ext.run_cell(quiet, "1", store_history=False)

    tids = []
    for _ in range(3):
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=one_cell, args=(barrier,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        tids += [thread.ident for thread in threads]
    # join() returns a moment before the interpreter forgets the thread
    deadline = time.monotonic() + WAIT
    while set(tids) & set(cancellation._thread_frames()) and time.monotonic() < deadline:
        time.sleep(0.001)
    # A new thread's first cell sweeps.  (A thread that reuses an ended
    # thread's id reuses its empty stack instead, which is as good: the
    # registry is bounded by the ids alive at once.)  An id no thread has:
    fresh = max(cancellation._thread_scopes) + 1
    try:
        cancellation._new_thread_stack(fresh)
        assert not set(tids) & set(cancellation._thread_scopes)
    finally:
        with cancellation._lock:
            cancellation._thread_scopes.pop(fresh, None)


def test_condition_wait_is_never_cut_between_release_and_try():
    """threading.Condition.wait releases the lock, then enters its try: a
    raise in between left the Condition unlocked ("release unlocked lock")."""
    import inspect

    lines, start = inspect.getsourcelines(threading.Condition.wait)
    unsafe = cancellation._unsafe_lines(threading.__file__)
    release = next(start + i for i, line in enumerate(lines) if "_release_save()" in line)
    guard = next(start + i for i, line in enumerate(lines) if line.strip().startswith("try:"))
    assert set(range(release + 1, guard + 1)) <= unsafe


def test_unsafe_lines_cover_try_lines_and_finally_clauses():
    import linecache

    source = textwrap.dedent("""\
        x = 1
        try:
            y = 2
        finally:
            # cleanup
            z = 3
            w = 4
        v = 5
        try: a = 1
        finally: b = 2
        u = 6
        def f():
            try:
                pass
            except Exception:
                pass
            finally:
                if x:
                    t = 1
            return 1
        """)
    name = "<pyrepl3-test-unsafe-lines>"
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    try:
        # try lines, finally clauses, and the statement before a try (x = 1,
        # v = 5: a resource taken there is not protected yet)
        assert cancellation._unsafe_lines(name) == {1, 2, 4, 5, 6, 7, 8, 9, 10, 13, 17, 18, 19}
    finally:
        linecache.cache.pop(name, None)
        cancellation._unsafe_lines_cache.pop(name, None)


@pytest.mark.parametrize("where", ["main", "worker"])
def test_cancel_before_the_cells_code_starts(quiet, where):
    """A cancel that lands while IPython is still preparing the cell (here: a
    pre_run_cell hook after the extension's) stops the cell when its code
    starts, even if that code is a loop with no call and no new line."""
    ip = quiet
    hits = []  # IPython reports a failing hook and goes on: asserted below

    def cancel_now(info):
        execution = pyrepl3_ext.get_state(ip).current_execution()
        if execution is not None and execution.id.startswith("pre"):
            hits.append((execution.id, pyrepl3_ext.cancel(ip, execution.id, "test cancel")))

    ip.events.register("pre_run_cell", cancel_now)
    try:
        for n in range(3):
            code = "import json\njson.dumps([1])\nwhile True: pass"  # imports: calls in between
            if where == "main":
                result = pyrepl3_ext.run_cell(ip, code, execution_id=f"pre{n}")
            else:
                thread, out = run_in_thread(ip, code, f"pre{n}")
                thread.join(WAIT)
                assert not thread.is_alive(), "worker cell was not cancelled"
                result = out["result"]
            assert hits[-1:] == [(f"pre{n}", True)]
            assert_cancelled(result, f"pre{n}")
    finally:
        ip.events.unregister("pre_run_cell", cancel_now)
    assert pyrepl3_ext.run_cell(ip, "1 + 1").result == 2


@pytest.mark.parametrize("where", ["main", "worker"])
def test_no_second_cancel_while_ipython_prints_the_traceback(ip, started, where):
    """Printing a cancelled cell's traceback can take longer than the grace
    period; the level-triggered re-cancel must not fire inside it."""
    calls = []
    config = pyrepl3_ext.get_state(ip).config
    grace = config.cancel_grace
    config.cancel_grace = 0.05
    real = ip.showtraceback  # IPython's formatter, with the extension's wrappers
    held = ip.__dict__.get("showtraceback")

    def slow_showtraceback(*args, **kwargs):
        calls.append(sys.exc_info()[0])
        real(*args, **kwargs)
        threading.Event().wait(10 * config.cancel_grace)  # printing outlasts the grace

    ip.showtraceback = slow_showtraceback
    try:
        code = "_started.set()\nwhile True:\n    pass"
        if where == "main":
            canceller, _ = cancel_when_started(ip, started, "tb1")
            result = pyrepl3_ext.run_cell(ip, code, execution_id="tb1")
            canceller.join(WAIT)
        else:
            thread, out = run_in_thread(ip, code, "tb1")
            assert started.wait(WAIT)
            assert pyrepl3_ext.cancel(ip, "tb1", "test cancel") is True
            thread.join(WAIT)
            result = out["result"]
    finally:
        if held is None:
            del ip.showtraceback
        else:
            ip.showtraceback = held
        config.cancel_grace = grace
    assert_cancelled(result, "tb1")
    assert len(calls) == 1, calls


WALKER = textwrap.dedent("""
    import gc, sys, threading, time
    from pyrepl3_ext.cancellation.safepoints import _cell_code_on_stack
    from pyrepl3_ext.cancellation.scope import _foreign_stack
    from pyrepl3_ext.cancellation.unwinding import _deeper_than

    sys.setrecursionlimit(100_000)
    sys.setswitchinterval(0.0005)

    class Finalizable:
        def __del__(self):
            time.sleep(0)  # a finalizer that hands the GIL over

    def recurse(n, stop):
        if n == 0:
            garbage = Finalizable()
            garbage.cycle = garbage  # left for the collector
        if n < 20_000 and not stop:
            recurse(n + 1, stop)

    def target(stop):
        while not stop:
            recurse(0, stop)

    walks = 0
    for _ in range(8):
        stop = []
        thread = threading.Thread(target=target, args=(stop,))
        thread.start()
        end = time.monotonic() + 0.25
        while time.monotonic() < end:
            with _foreign_stack(thread.ident) as frame:
                _deeper_than(frame, 10_000)
                del frame
            _cell_code_on_stack(thread.ident)
            walks += 1
            time.sleep(0.001)
        stop.append(1)
        thread.join()
    assert gc.isenabled()
    print("walks", walks)
""")


def test_walking_a_recursing_threads_stack_from_another_thread_is_memory_safe():
    """The canceller walks the target thread's stack (how deep, where the
    cell's code is).  Each ``f_back`` makes a frame object; a collection
    started by that allocation can run a finalizer that hands the GIL to the
    target, which pops the frame being made: on 3.11 a segfault (CI, a
    cancel of a deep recursion).  This harness, walking without the pause,
    crashed 3.11 within a second in 9 runs of 9; the walkers must survive
    it on every version and leave the collector on."""
    done = subprocess.run([sys.executable, "-c", WALKER], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert int(done.stdout.split()[-1]) > 8


def test_reading_thread_frames_leaves_the_collector_as_it_was():
    """3.10/3.11 read other threads' frames with the collector off (CPython
    gh-106883); it must come back on, and stay off for a host that turned
    it off."""
    import gc

    assert gc.isenabled()
    frames = cancellation._thread_frames()
    assert threading.get_ident() in frames and gc.isenabled()
    gc.disable()
    try:
        cancellation._thread_frames()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_deadlines_set_on_a_registered_loops_thread_run_on_that_loop():
    """The protocol server's loop registers itself (timers.use_loop): a
    cancel it arms sets its grace re-arm as the loop's own timer, so no
    timer thread wakes to compete for the GIL with the cell being reached.
    Anywhere else, and once that loop has stopped, the timer thread runs it."""
    import asyncio

    from pyrepl3_ext.cancellation import timers

    ran: dict = {}

    async def main():
        done = asyncio.Event()
        timers.use_loop(asyncio.get_running_loop())

        def fire():
            ran["on"] = threading.current_thread().name
            done.set()

        timers._TIMER.call_at(time.monotonic() + 0.01, fire)
        await asyncio.wait_for(done.wait(), WAIT)

    asyncio.run(main())
    assert ran["on"] == threading.current_thread().name
    fired = threading.Event()
    timers._TIMER.call_at(time.monotonic() + 0.01, lambda: (
        ran.__setitem__("after", threading.current_thread().name), fired.set()))
    assert fired.wait(WAIT)
    assert ran["after"] == "pyrepl3-cancel-timer"
