"""The acceptance scenarios of the earlier implementation (research note
``pyrepl3-capsule.md``, section 7) that apply to an in-process engine, run
through ``Engine``/``Session`` with the events a host sees.  Scenarios other
files already cover are named at the end."""

from __future__ import annotations

import threading

import pytest
from traitlets.config import Config

import pyrepl3_ext
from pyrepl3_ext import CellCancelled, Engine

WAIT = 30


@pytest.fixture
def session():
    config = Config()
    config.PyREPL3.output_tee = False
    with Engine(config=config) as engine:
        yield engine.create_session()


def execute(session, code, **kw):
    events: list[dict] = []
    result = session.execute(code, on_event=events.append, **kw)
    return result, events


def kinds(events):
    return [e["type"] for e in events]


def stdout(events):
    return "".join(e["text"] for e in events if e["type"] == "output" and e["stream"] == "stdout")


# -- output ordering and chunking -------------------------------------------------

def test_a_100kb_line_then_the_result(session):
    result, events = execute(session, "print('x' * 100_000)\n7")
    assert result.result == 7
    assert stdout(events) == "x" * 100_000 + "\n"
    assert kinds(events).index("result") > max(i for i, k in enumerate(kinds(events))
                                               if k == "output")


def test_carriage_return_progress_updates_arrive_and_the_result_comes_last(session):
    code = ("import sys\nfor i in range(50):\n"
            "    sys.stdout.write(f'\\rProgress {i}/50'); sys.stdout.flush()\n'done'")
    result, events = execute(session, code)
    texts = [e["text"] for e in events if e["type"] == "output"]
    assert any("Progress 49/50" in t for t in texts)
    assert kinds(events)[-2:] == ["result", "finished"]
    assert "".join(texts).count("\r") == 50


def test_stdout_and_stderr_interleaving_is_preserved(session):
    code = "import sys\nfor i in range(5):\n    print('out', i)\n    print('err', i, file=sys.stderr)"
    _, events = execute(session, code)
    seen = [(e["stream"], e["text"]) for e in events if e["type"] == "output"]
    expected = []
    for i in range(5):
        expected += [("stdout", f"out {i}\n"), ("stderr", f"err {i}\n")]
    assert seen == expected


def test_rapid_prints_all_arrive_and_more_than_a_mebibyte_is_delivered(session):
    session.shell.run_line_magic("config", "PyREPL3.output_chunk_size = 65536")
    _, events = execute(session, "for i in range(10):\n    print(i)")
    assert stdout(events) == "".join(f"{i}\n" for i in range(10))
    _, events = execute(session, "print('y' * (2 * 1024 * 1024 - 1))")
    chunks = [e for e in events if e["type"] == "output"]
    assert sum(len(e["text"]) for e in chunks) == 2 * 1024 * 1024
    # chunks of 64 KiB (set above): 2 MiB arrives as 32 chunks
    assert len(chunks) == 32


def test_chunking_of_carriage_returns_and_long_lines(session):
    _, events = execute(session, "import sys\nsys.stdout.write('Old\\rNew\\n')")
    assert [e["text"] for e in events if e["type"] == "output"] == ["Old", "\rNew\n"]
    session.shell.run_line_magic("config", "PyREPL3.output_chunk_size = 100")
    _, events = execute(session, "print('z' * 250)")
    assert [len(e["text"]) for e in events if e["type"] == "output"] == [100, 100, 51]


def test_cleanup_output_of_a_cancelled_loop_is_delivered_before_the_error(session):
    handle = session.execute(
        "try:\n    _gate.set()\n    while True:\n        pass\nfinally:\n    print('cleaned up')",
        wait=False, on_event=(events := []).append)
    session.shell.user_ns["_gate"] = gate = threading.Event()
    assert gate.wait(WAIT)
    assert handle.cancel("stop") is True
    result = handle.result(WAIT)
    assert isinstance(result.error_in_exec, CellCancelled)
    order = kinds(events)
    assert stdout(events) == "cleaned up\n"
    assert order.index("error") > order.index("output") and "result" not in order


# -- cancellation -------------------------------------------------------------------

def test_idle_and_double_cancel(session):
    assert session.cancel("nothing-runs") is False
    session.shell.user_ns["_gate"] = gate = threading.Event()
    handle = session.execute("_gate.set()\nwhile True:\n    pass", wait=False)
    assert gate.wait(WAIT)
    assert handle.cancel() is True
    assert isinstance(handle.result(WAIT).error_in_exec, CellCancelled)
    assert handle.cancel() is False  # over: a second cancel finds nothing


def test_code_that_swallows_the_cancel_is_cancelled_again(session):
    session.shell.user_ns["_gate"] = gate = threading.Event()
    code = ("swallowed = 0\n_gate.set()\nwhile True:\n    try:\n        while True:\n"
            "            pass\n    except BaseException:\n        swallowed += 1\n"
            "        if swallowed >= 2:\n            raise\n")
    handle = session.execute(code, wait=False)
    assert gate.wait(WAIT)
    handle.cancel()
    # the cancel comes back after each swallow (cancel_grace) until the cell
    # lets it through; a cell that swallows it for ever is not stopped in
    # process (docs/cancellation.md, "what cannot be interrupted")
    assert isinstance(handle.result(WAIT).error_in_exec, CellCancelled)


def test_an_await_sleep_is_cancelled_promptly_and_background_tasks_survive(session):
    execute(session, "import asyncio\nticks = []\nasync def ticker():\n"
                     "    while True:\n        ticks.append(1)\n        await asyncio.sleep(0.01)\n"
                     "bg = asyncio.get_running_loop().create_task(ticker())\nawait asyncio.sleep(0)")
    session.shell.user_ns["_waiting"] = waiting = threading.Event()
    # an hour: only the cancel ends it within WAIT (result() raises otherwise)
    handle = session.execute("_waiting.set()\nawait asyncio.sleep(3600)", wait=False)
    assert waiting.wait(WAIT)
    assert handle.cancel() is True
    result = handle.result(WAIT)
    assert isinstance(result.error_in_exec, CellCancelled)
    before = len(session.shell.user_ns["ticks"])
    result, _ = execute(session, "await asyncio.sleep(0.1)\nbg.done()")
    assert result.result is False and len(session.shell.user_ns["ticks"]) > before


# -- namespace -----------------------------------------------------------------------

def test_underscore_history_shifts_and_none_does_not(session):
    for value in (1, 2, None, 3, 4):
        execute(session, repr(value))
    ns = session.shell.user_ns
    assert (ns["_"], ns["__"], ns["___"]) == (4, 3, 2)


def test_the_namespace_dict_is_stable_and_definitions_persist(session):
    ns = session.shell.user_ns
    execute(session, "import math\ndef area(r):\n    return math.pi * r * r\n"
                     "class Box:\n    size = 3")
    result, _ = execute(session, "round(area(Box.size), 2)")
    assert result.result == 28.27 and session.shell.user_ns is ns
    pyrepl3_ext.set_variable(session.shell, "host_value", 5)
    assert execute(session, "host_value * 2")[0].result == 10


def test_a_trailing_expression_is_evaluated_once(session):
    execute(session, "calls = []\ndef f():\n    calls.append(1)\n    return len(calls)")
    result, events = execute(session, "f()")
    assert result.result == 1 and session.shell.user_ns["calls"] == [1]
    assert [e["data"]["text/plain"] for e in events if e["type"] == "result"] == ["1"]


def test_checkpoint_round_trip(session):
    execute(session, "x = 100\ny = [1, 2, 3]")
    pyrepl3_ext.take_snapshot(session.shell, "cp")
    execute(session, "x = 0\ny.append(4)\nextra = 1")
    pyrepl3_ext.restore_snapshot(session.shell, "cp", clear=False)
    assert execute(session, "(x, y)")[0].result == (100, [1, 2, 3])
    assert "extra" in session.shell.user_ns
    pyrepl3_ext.restore_snapshot(session.shell, "cp", clear=True)
    assert "extra" not in session.shell.user_ns


# -- async cells ------------------------------------------------------------------------

@pytest.mark.parametrize("code, value", [
    ("[await asyncio.sleep(0, i) for i in range(3)]", [0, 1, 2]),
    ("f'{await asyncio.sleep(0, 5)}'", "5"),
    ("str(await asyncio.sleep(0, 6))", "6"),
    ("out = []\nasync def agen():\n    yield 1\n    yield 2\n"
     "async for v in agen():\n    out.append(v)\nout", [1, 2]),
    ("import contextlib\n@contextlib.asynccontextmanager\nasync def cm():\n    yield 7\n"
     "async with cm() as v:\n    pass\nv", 7),
    ("a = await asyncio.sleep(0, 1)\nb = await asyncio.sleep(0, 2)\na + b", 3),
])
def test_await_in_every_position(session, code, value):
    execute(session, "import asyncio")
    result, events = execute(session, code)
    assert result.error_in_exec is None and result.result == value
    assert events[0]["mode"] == "async"
    assert session.shell.user_ns["_"] == value


def test_await_errors_and_no_coroutine_leaks(session):
    execute(session, "import asyncio")
    result, _ = execute(session, "f = lambda: await asyncio.sleep(0)")
    assert isinstance(result.error_before_exec, SyntaxError)
    result, _ = execute(session, "await 1")
    assert isinstance(result.error_in_exec, TypeError)
    import inspect

    assert not [k for k, v in session.shell.user_ns.items() if inspect.iscoroutine(v)]


def test_functions_of_an_async_cell_bind_the_live_globals(session):
    execute(session, "import asyncio\nbase = 1\ndef get():\n    return base\n"
                     "await asyncio.sleep(0)")
    execute(session, "base = 2")
    assert execute(session, "get()")[0].result == 2


def test_an_async_cell_timeout(session):
    result, events = execute(session, "import asyncio\nawait asyncio.sleep(10)", timeout=0.2)
    assert result.error_in_exec.kind == "timeout"
    assert [e for e in events if e["type"] == "error"][0]["kind"] == "timeout"


# Covered elsewhere: cancel during input(), input in the second cell, two
# prompts answered by id, prompts with newline/tab/emoji, empty reply,
# timeout, shutdown while waiting and no waiter leaks (test_input_request.py);
# stale cancels and cancel storms from many threads (test_cancellation.py);
# concurrent host writes and rollback on failure (test_namespace.py);
# oversize and malformed frames (test_server.py, test_server_fuzz.py).
# Not applicable in process: session pools, process restarts, hard kills.
