"""Engine API and hybrid executor: sessions, order, busy policy, cancel, close, routing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest
from traitlets.config import Config

from pyrepl3_ext import (CellCancelled, CellTimeout, ConcurrencyUnsupported, Engine,
                         SessionBusy, SessionClosed)
from pyrepl3_ext._compat import is_patched_build

from .polling import wait_until

WAIT = 30  # upper bound on waits: a failure, never a timing assertion
BLOCK = "_gate.wait(30)\n'unblocked'"  # a cell that waits for the test


def _config() -> Config:
    config = Config()
    config.InteractiveShell.xmode = "Plain"  # cheap tracebacks for cancelled cells
    config.InteractiveShell.colors = "nocolor" if sys.version_info >= (3, 11) and \
        __import__("IPython").version_info[0] >= 9 else "NoColor"
    return config


@pytest.fixture
def engine():
    eng = Engine(config=_config())
    try:
        yield eng
    finally:
        assert eng.close(timeout=WAIT)


@pytest.fixture
def session(engine):
    s = engine.create_session()
    s.shell.user_ns["_gate"] = threading.Event()
    return s


def cancel_error(result):
    """The ``CellCancelled`` of a cancelled cell.

    A cancel that lands as IPython enters the cell's code is reported by
    IPython as ``error_before_exec`` (the code never ran), later ones as
    ``error_in_exec``; both are the same outcome for a host.
    """
    return result.error_in_exec or result.error_before_exec


def running(session):
    return lambda: session.running is not None and \
        session._executor.running is not None and session._executor.running.started


# -- basics -------------------------------------------------------------------

def test_execute_returns_the_result_and_only_its_own_events(session):
    events, other = [], []
    first = session.execute("x = 20\nx + 22", execution_id="e-1", on_event=events.append)
    assert first.result == 42 and first.success
    assert first.pyrepl3_execution_id == "e-1"
    assert [e["type"] for e in events] == ["started", "result", "finished"]
    assert {e["execution_id"] for e in events} == {"e-1"}
    assert events[0]["mode"] == "thread" and events[0]["session"] == session.id
    second = session.execute("x * 2", on_event=other.append)
    assert second.result == 40 and second.execution_count == first.execution_count + 1
    assert [e["type"] for e in other] == ["started", "result", "finished"]
    assert len(events) == 3  # the first execution's callback saw nothing more
    assert second.pyrepl3_execution_id.startswith(session.id)
    # nothing stays subscribed once no execution has a callback
    assert not session._state.bus.active


def test_sync_cells_run_on_the_session_thread_not_the_callers(session):
    result = session.execute("import threading\nthreading.current_thread().name")
    assert result.result == f"pyrepl3-session-{session.id}"
    assert session.execute("import threading\nthreading.current_thread().name").result == \
        result.result  # one worker per session, reused


def test_sessions_have_their_own_namespaces(engine):
    a, b = engine.create_session("a"), engine.create_session("b")
    a.execute("name = 'a'")
    b.execute("name = 'b'")
    assert a.execute("name").result == "a" and b.execute("name").result == "b"
    assert a.shell is not b.shell and a.shell.user_ns is not b.shell.user_ns
    assert engine.get_session("a") is a and set(engine.sessions) == {a, b}
    with pytest.raises(ValueError, match="already open"):
        engine.create_session("a")


def test_an_errors_and_syntax_errors_are_results(session):
    events = []
    result = session.execute("1/0", on_event=events.append)
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    assert events[-2]["type"] == "error" and events[-2]["kind"] == "exception"
    result = session.execute("def (:")
    assert isinstance(result.error_before_exec, SyntaxError)
    assert session.execute("'still fine'").result == "still fine"


def test_a_failing_event_callback_does_not_break_the_cell(session, capfd):
    def broken(event):
        raise RuntimeError("host bug")

    assert session.execute("1 + 1", on_event=broken).result == 2
    assert session.execute("2 + 2", on_event=broken).result == 4
    assert "on_event callback" in capfd.readouterr().err


# -- order and busy policy ----------------------------------------------------

def test_cells_run_one_at_a_time_in_arrival_order(session):
    session.execute("import time\nlog = []\nactive = [0]\npeak = [0]")
    cell = ("active[0] += 1; peak[0] = max(peak[0], active[0]); log.append({n})\n"
            "time.sleep(0.002)\nactive[0] -= 1")
    handles = [session.execute(cell.format(n=n), wait=False) for n in range(25)]
    for h in handles:
        assert h.result(WAIT).success
    assert session.execute("log").result == list(range(25))
    assert session.execute("peak[0]").result == 1


def test_submissions_from_many_threads_all_run_once(session):
    session.execute("hits = []")
    barrier = threading.Barrier(6)

    def client(k):
        barrier.wait()
        for i in range(10):
            assert session.execute(f"hits.append(({k}, {i}))").success

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    hits = session.execute("hits").result
    assert sorted(hits) == [(k, i) for k in range(6) for i in range(10)]
    for k in range(6):  # each client's cells in its own order
        assert [i for kk, i in hits if kk == k] == list(range(10))


def test_busy_session_queues_or_refuses_as_the_caller_chooses(session):
    gate = session.shell.user_ns["_gate"]
    blocker = session.execute(BLOCK, wait=False)
    wait_until(running(session), "the blocking cell")
    with pytest.raises(SessionBusy, match="queue=True"):
        session.execute("'refused'", queue=False)
    queued = session.execute("'queued'", wait=False, queue=True)
    assert not queued.done()
    gate.set()
    assert blocker.result(WAIT).result == "unblocked"
    assert queued.result(WAIT).result == "queued"
    assert session.execute("'idle again'", queue=False).result == "idle again"


def test_engine_default_busy_policy():
    strict = Engine(config=_config(), queue=False)
    try:
        s = strict.create_session()
        s.shell.user_ns["_gate"] = gate = threading.Event()
        h = s.execute(BLOCK, wait=False)
        wait_until(running(s))
        with pytest.raises(SessionBusy):
            s.execute("1")
        assert not s.execute("1", wait=False, queue=True).done()
        gate.set()
        assert h.result(WAIT).success
    finally:
        assert strict.close(WAIT)


def test_duplicate_execution_id_is_refused_while_pending(session):
    gate = session.shell.user_ns["_gate"]
    h = session.execute(BLOCK, execution_id="dup", wait=False)
    with pytest.raises(ValueError, match="already queued or running"):
        session.execute("1", execution_id="dup", wait=False)
    gate.set()
    h.result(WAIT)
    assert session.execute("1", execution_id="dup").result == 1  # free again


# -- cancel and timeout ------------------------------------------------------

def test_cancel_running_and_queued_executions(session):
    session.execute("ran = []")
    events = []
    h = session.execute("while True: pass", wait=False,
                        execution_id="long", on_event=events.append)
    queued = session.execute("ran.append(1)", wait=False, execution_id="later")
    wait_until(running(session))
    assert session.cancel("later", "not needed")
    assert queued.result(WAIT).error_before_exec.reason == "not needed"
    assert isinstance(queued.result().error_before_exec, CellCancelled)
    assert h.cancel("stop it")
    err = cancel_error(h.result(WAIT))
    assert isinstance(err, CellCancelled) and err.execution_id == "long"
    assert events[-1]["type"] == "finished" and events[-1]["status"] == "cancelled"
    assert session.execute("ran").result == []
    assert not session.cancel("long") and not session.cancel("never-existed")


def test_cancel_right_after_submit_never_lets_the_cell_run(session):
    session.execute("ran = []")
    for i in range(20):  # lands before, during or after the cell's start
        h = session.execute("ran.append(1)\nwhile True: pass", wait=False)
        session.cancel(h.execution_id)
        assert not h.result(WAIT).success
    assert session.execute("ran").result == []
    assert session.execute("'usable'").result == "usable"


def test_a_cancel_between_leaving_the_queue_and_the_cells_start_stops_it(session, monkeypatch):
    """The window the race above rarely hits, held open: the cancel lands
    after the job left the queue and before the cell's cancel scope exists
    (it finds no scope to mark); the cell must still never run."""
    import pyrepl3_ext

    session.execute("ran = []")
    real_run_cell = pyrepl3_ext.run_cell
    reports = []

    def run_cell(shell, code, *, execution_id, **kwargs):
        reports.append(session.cancel_report(execution_id, "in the window"))
        return real_run_cell(shell, code, execution_id=execution_id, **kwargs)

    monkeypatch.setattr(pyrepl3_ext, "run_cell", run_cell)
    result = session.execute("ran.append(1)")
    monkeypatch.setattr(pyrepl3_ext, "run_cell", real_run_cell)
    assert reports and reports[0]["state"] == "pending", reports
    assert isinstance(cancel_error(result), CellCancelled), result
    assert session.execute("ran").result == []


def test_timeout_cancels_the_cell_and_the_session_goes_on(session):
    events = []
    result = session.execute("while True: pass", timeout=0.2, on_event=events.append)
    assert isinstance(cancel_error(result), CellTimeout)
    assert events[-2]["kind"] == "timeout"
    assert session.execute("'next'").result == "next"


def test_timeout_counts_from_the_cells_start_not_from_submission(session):
    # The queued cell waits behind a blocker for twice its own timeout, then
    # runs for a fifth of it: long enough for a deadline counted from
    # submission (expired before the cell starts) to land, with most of a
    # deadline counted from its start to spare.  (An instant cell let the
    # wrong count pass: it ended before the stale cancel arrived.)
    timeout = 1.0
    blocker = session.execute(f"import time\ntime.sleep({2 * timeout})\n'blocker'", wait=False)
    queued = session.execute(f"import time\ntime.sleep({timeout / 5})\n'made it'",
                             timeout=timeout, wait=False)
    assert blocker.result(WAIT).result == "blocker"
    result = queued.result(WAIT)
    assert result.success, cancel_error(result)
    assert result.result == "made it"


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="needs the main thread to receive SIGINT")
def test_caller_interrupted_while_waiting_cancels_the_cell(session):
    import signal

    def press_ctrl_c():
        wait_until(running(session))
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t = threading.Thread(target=press_ctrl_c)
    try:
        t.start()
        with pytest.raises(KeyboardInterrupt):
            session.execute("while True: pass")
    finally:
        t.join()
        signal.signal(signal.SIGINT, previous)
    wait_until(lambda: not session.busy, "the abandoned cell to be cancelled")
    assert session.execute("'alive'").result == "alive"


# -- close --------------------------------------------------------------------

def test_close_cancels_the_running_cell_and_refuses_work(engine):
    s = engine.create_session()
    h = s.execute("while True: pass", wait=False)
    queued = s.execute("'never'", wait=False)
    wait_until(running(s))
    assert s.close(WAIT)
    assert isinstance(cancel_error(h.result(WAIT)), CellCancelled)
    assert isinstance(queued.result(WAIT).error_before_exec, CellCancelled)
    assert s.closed and s not in engine.sessions
    with pytest.raises(SessionClosed):
        s.execute("1")
    with pytest.raises(SessionClosed):
        s.shell  # noqa: B018 - released
    assert s.close() is True  # idempotent
    assert not s._executor.thread.is_alive()


def test_close_without_any_cell_and_engine_close_closes_all():
    eng = Engine(config=_config())
    sessions = [eng.create_session() for _ in range(3)]
    sessions[0].execute("1")
    assert eng.close(WAIT) and eng.close(WAIT)
    assert all(s.closed for s in sessions) and eng.sessions == []
    with pytest.raises(SessionClosed):
        eng.create_session()


def test_context_managers_close():
    with Engine(config=_config()) as eng:
        with eng.create_session() as s:
            assert s.execute("2 + 2").result == 4
        assert s.closed
        other = eng.create_session()
    assert other.closed


def test_the_hosts_main_module_is_left_alone(engine):
    """Cell classes pickle; on stock the host's ``__main__`` is untouched
    between cells (the session's module is lent during its cells).  On the
    patched build, while several shells live, ``__main__`` is 0005's router
    to the current shell's module, by design."""
    main = sys.modules["__main__"]
    s = engine.create_session()
    if not is_patched_build():
        assert sys.modules["__main__"] is main
    result = s.execute("class Point:\n    pass\nimport pickle\n"
                       "type(pickle.loads(pickle.dumps(Point()))) is Point")
    assert result.result is True
    if not is_patched_build():
        assert sys.modules["__main__"] is main
    s.close()
    if not is_patched_build():
        assert sys.modules["__main__"] is main


def test_a_closed_session_releases_its_shell(engine):
    import gc
    import weakref

    s = engine.create_session()
    s.execute("x = [1] * 1000\nx[0]")
    s.execute("import asyncio\nawait asyncio.sleep(0)")
    ref = weakref.ref(s.shell)
    assert s.close(WAIT)
    del s
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]


# -- routing: sync cells on the thread, await cells on a loop -------------------

def test_await_cell_runs_on_the_sessions_loop(session):
    events = []
    result = session.execute("import asyncio\nawait asyncio.sleep(0)\n'awaited'",
                             on_event=events.append)
    assert result.result == "awaited" and events[0]["mode"] == "async"
    name = session.execute("import threading\nawait asyncio.sleep(0)\n"
                           "threading.current_thread().name").result
    assert name == f"pyrepl3-session-{session.id}"


def test_tasks_spawned_by_a_cell_run_between_cells(session):
    session.execute("import asyncio, threading\nticks = []\nstop = threading.Event()\n"
                    "async def tick():\n    while not stop.is_set():\n"
                    "        ticks.append(1)\n        await asyncio.sleep(0.001)\n"
                    "task = asyncio.get_running_loop().create_task(tick())\n"
                    "await asyncio.sleep(0)")
    ns = session.shell.user_ns
    wait_until(lambda: len(ns["ticks"]) > 5, "the spawned task to run while idle")
    assert session.execute("stop.set()\nawait task\ntask.done()").result is True


def test_sync_cell_can_call_asyncio_run(session):
    # no loop runs in the worker during a sync cell, as in plain Python
    result = session.execute("import asyncio\nasync def f():\n    return 5\nasyncio.run(f())")
    assert result.result == 5


def test_await_cell_is_cancelled(session):
    h = session.execute("import asyncio\nawait asyncio.sleep(60)", wait=False)
    wait_until(running(session))
    time.sleep(0.05)
    assert h.cancel("enough")
    assert isinstance(cancel_error(h.result(WAIT)), CellCancelled)
    assert session.execute("'after'").result == "after"


def test_async_api_keeps_the_host_loop_responsive(session):
    async def main():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.time())
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        events = []
        result = await session.execute_async("import time\ntime.sleep(0.3)\n'slept'",
                                             on_event=events.append)
        task.cancel()
        start, end = events[0]["ts"], events[-1]["ts"]
        return result, events, [t for t in ticks if start < t < end]

    result, events, during = asyncio.run(main())
    assert result.result == "slept" and events[0]["mode"] == "thread"
    assert during, "the host loop did not tick while the sync cell ran"


def test_async_api_runs_await_cells_on_the_host_loop(session):
    async def main():
        loop = asyncio.get_running_loop()
        session.shell.user_ns["host_future"] = fut = loop.create_future()
        loop.call_later(0.05, fut.set_result, "from the host")
        events = []
        result = await session.execute_async("await host_future", on_event=events.append)
        other = await session.execute_async("await asyncio.sleep(0)\n1",
                                            async_on_host=False, on_event=events.append)
        return result, other, events

    session.execute("import asyncio")
    result, other, events = asyncio.run(main())
    assert result.result == "from the host" and other.result == 1
    assert [e["mode"] for e in events if e["type"] == "started"] == ["async-host", "async"]


def test_cancelling_the_awaiting_task_cancels_the_cell(session):
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(session.execute_async("while True: pass"), 0.2)

    asyncio.run(main())
    wait_until(lambda: not session.busy, "the abandoned cell to be cancelled")
    assert session.execute("'next'").result == "next"


def test_timeouts_cancel_await_cells_on_either_loop(session):
    session.execute("import asyncio")
    on_session_loop = session.execute("await asyncio.sleep(30)", timeout=0.2)
    assert isinstance(cancel_error(on_session_loop), CellTimeout)

    async def main():
        return await session.execute_async("await asyncio.sleep(30)", timeout=0.2)

    on_host_loop = asyncio.run(main())
    assert isinstance(cancel_error(on_host_loop), CellTimeout)
    assert session.execute("await asyncio.sleep(0)\n'fine'").result == "fine"


def test_async_context_managers():
    async def main():
        async with Engine(config=_config()) as eng:
            async with eng.create_session() as s:
                assert (await s.execute_async("3 * 3")).result == 9
            assert s.closed
            return eng

    eng = asyncio.run(main())
    assert eng.sessions == []


def test_a_cell_cannot_wait_for_its_own_session(session):
    session.shell.user_ns["me"] = session
    result = session.execute("me.execute('1')")
    assert isinstance(result.error_in_exec, RuntimeError)
    assert "wait for itself" in str(result.error_in_exec)
    h = session.execute("h = me.execute('2', wait=False)")
    assert h.success and session.execute("h.result(30).result").result == 2


# -- regressions of the earlier implementation (Capsule) ---------------------

@pytest.mark.parametrize("prefix", ["", "import asyncio\nawait asyncio.sleep(0)\n"])
def test_last_expression_is_evaluated_exactly_once(session, prefix):
    session.execute("calls = []\ndef f():\n    calls.append(1)\n    return len(calls)")
    result = session.execute(prefix + "a = 1\nb = 2\nf()")
    assert result.result == 1
    assert session.execute("len(calls)").result == 1


def test_huge_result_does_not_wedge_the_session(session, capsys):
    events = []
    result = session.execute("'x' * 50_000_000", on_event=events.append)
    capsys.readouterr()  # IPython printed Out[n]; drop it
    assert len(result.result) == 50_000_000
    assert [e["type"] for e in events] == ["started", "result", "finished"]
    assert len(events[1]["data"]["text/plain"]) >= 50_000_000
    assert session.execute("'next'").result == "next"


def test_closures_over_names_of_the_same_async_cell(session):
    code = ("import asyncio\nx = 41\n"
            "def f():\n    return x + 1\n"
            "await asyncio.sleep(0)\n"
            "[f() + y - y for y in range(2)] + [x for _ in range(1)]")
    assert session.execute(code).result == [42, 42, 41]
    assert session.execute("f()").result == 42


# -- stock: one session at a time --------------------------------------------

@pytest.mark.skipif(is_patched_build(), reason="the patched build runs sessions concurrently")
def test_stock_refuses_concurrent_sessions_with_a_clear_message(engine):
    a, b = engine.create_session("a"), engine.create_session("b")
    a.shell.user_ns["_gate"] = gate = threading.Event()
    h = a.execute(BLOCK, wait=False)
    wait_until(running(a))
    with pytest.raises(ConcurrencyUnsupported) as info:
        b.execute("1")
    message = str(info.value)
    assert "'a'" in message and "patched" in message and "nox -s patched" in message
    assert a.execute("'same session queues'", wait=False)  # its own queue is fine
    gate.set()
    assert h.result(WAIT).success
    wait_until(lambda: not a.busy)
    assert b.execute("'b runs now'").result == "b runs now"


@pytest.mark.skipif(is_patched_build(), reason="stock behaviour")
def test_stock_sessions_one_after_another_stay_isolated(engine):
    a, b = engine.create_session(), engine.create_session()
    for i in range(5):
        a.execute(f"v = {i}")
        b.execute(f"v = {-i}")
    assert a.execute("v").result == 4 and b.execute("v").result == -4
    assert a.execute("len(Out)").result == b.execute("len(Out)").result


def test_the_first_session_of_a_shell_less_process_is_the_current_shell():
    code = """if True:
        import IPython
        from IPython.core.interactiveshell import InteractiveShell
        from pyrepl3_ext import Engine
        from pyrepl3_ext._compat import is_patched_build
        probe = "import IPython\\nIPython.get_ipython() is get_ipython()"
        with Engine() as engine:
            first, second = engine.create_session(), engine.create_session()
            assert first.execute(probe).result is True
            # stock: a secondary session's IPython.get_ipython() is the
            # singleton (documented limit); the patched build answers right
            assert second.execute(probe).result is is_patched_build()
            assert first.singleton is not is_patched_build()
        assert not InteractiveShell.initialized()
        with Engine() as engine:  # the singleton's place is free again
            assert engine.create_session().execute(probe).result is True
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=WAIT,
                   stdout=subprocess.DEVNULL)


# -- import cost --------------------------------------------------------------

def test_importing_the_package_does_not_import_the_engine():
    code = ("import sys, pyrepl3_ext\n"
            "assert 'pyrepl3_ext.engine' not in sys.modules\n"
            "assert 'pyrepl3_ext.engine.executor' not in sys.modules\n"
            "pyrepl3_ext.Engine\n"
            "assert 'pyrepl3_ext.engine' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=WAIT)


def test_a_session_closes_from_any_thread(engine):
    """Hosts close sessions from their own threads (the protocol server does);
    IPython 8's history database refused that (sqlite same-thread check)."""
    s = engine.create_session()
    assert s.execute("print('x')\n41 + 1").result == 42
    errors = []

    def close():
        try:
            s.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    closer = threading.Thread(target=close)
    closer.start()
    closer.join(WAIT)
    assert errors == [] and s.closed
    # the last unload happened off the main thread, which cannot touch signal
    # handlers: the main thread puts the previous one back
    from pyrepl3_ext import cancellation

    cancellation._SIGNAL.tidy()


_ECHO_SCRIPT = """
import sys
from traitlets.config import Config
from pyrepl3_ext import Engine
config = None
if sys.argv[1] == "tee":
    config = Config()
    config.PyREPL3.output_tee = True
heard = []
with Engine(config=config) as engine:
    s = engine.create_session()
    s.execute("print('printed-by-cell')\\n6 * 7", on_event=heard.append)
    s.execute("1 / 0", on_event=heard.append)
sys.stderr.write(repr(sorted({e["type"] for e in heard})))
"""


@pytest.mark.parametrize("mode", ["default", "tee"])
def test_engine_sessions_do_not_echo_on_the_hosts_stdout(mode):
    """An embedded engine reports output as events: by default nothing of a
    listened-to cell (print, Out[n], the traceback) lands on the host's
    stdout; ``output_tee = True`` in the engine's config brings the echo back."""
    proc = subprocess.run([sys.executable, "-c", _ECHO_SCRIPT, mode], capture_output=True,
                          text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    assert "'output'" in proc.stderr and "'error'" in proc.stderr  # the events carry it
    echoed = ("printed-by-cell" in proc.stdout, "Out[1]" in proc.stdout,
              "ZeroDivisionError" in proc.stdout)
    assert echoed == ((False,) * 3 if mode == "default" else (True,) * 3), proc.stdout
