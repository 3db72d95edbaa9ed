"""Per-execution output: stdout/stderr/display become events of the right execution."""

from __future__ import annotations

import io
import sys
import textwrap
import threading

import pytest

import pyrepl3_ext
from pyrepl3_ext import _compat, io_capture
from pyrepl3_ext._compat import is_patched_build

from .conftest import by_execution, hook_snapshot

WAIT = 30  # upper bound on waits: a failure, never a timing assertion


def run(ip, code, **kw):
    return pyrepl3_ext.run_cell(ip, code, **kw)


def outputs(events, stream=None):
    return [e for e in events if e["type"] == "output" and (stream is None or e["stream"] == stream)]


def text_of(events, stream=None):
    return "".join(e["text"] for e in outputs(events, stream))


def types(events):
    return [e["type"] for e in events]


@pytest.fixture
def config(ip):
    """The PyREPL3 configurable of ``ip``; I/O settings restored afterwards."""
    cfg = pyrepl3_ext.get_state(ip).config
    names = ("output_tee", "output_chunk_size", "output_limit", "output_overflow",
             "output_tail")
    saved = {n: getattr(cfg, n) for n in names}
    yield cfg
    for n, v in saved.items():
        setattr(cfg, n, v)


# -- lines, streams, chunks -----------------------------------------------------

def test_prints_become_output_events_before_the_result(ip, events):
    run(ip, "print('one')\nprint('two', 2)\n40 + 2", execution_id="p1")
    evs = by_execution(events, "p1")
    assert types(evs) == ["started", "output", "output", "result", "finished"]
    assert [e["text"] for e in outputs(evs)] == ["one\n", "two 2\n"]
    assert {e["stream"] for e in outputs(evs)} == {"stdout"}
    assert evs[3]["data"]["text/plain"] == "42"  # the result repr is no output event


def test_stdout_and_stderr_keep_their_interleaving(ip, events):
    code = ("import sys\nprint('a', end='')\nprint('b', file=sys.stderr)\n"
            "print('c')\nsys.stderr.write('d')\nprint('e')")
    run(ip, code, execution_id="s1")
    got = [(e["stream"], e["text"]) for e in outputs(by_execution(events, "s1"))]
    assert got == [("stdout", "a"), ("stderr", "b\n"), ("stdout", "c\n"),
                   ("stderr", "d"), ("stdout", "e\n")]


def test_carriage_return_progress_updates(ip, events):
    code = ("for i in range(50):\n    print(f'\\rProgress {i}/50', end='')\n"
            "print()\nprint('Old\\rNew')\nprint('crlf\\r\\nnext')\n'done'")
    run(ip, code, execution_id="r1")
    evs = by_execution(events, "r1")
    texts = [e["text"] for e in outputs(evs)]
    progress = [t for t in texts if "Progress" in t]
    assert progress == [f"\rProgress {i}/50" for i in range(49)] + ["\rProgress 49/50\n"]
    rest = texts[len(progress):]
    assert rest == ["Old", "\rNew\n", "crlf\r\n", "next\n"]  # \r\n is no progress step
    assert types(evs)[-2:] == ["result", "finished"]


def test_partial_line_is_flushed_at_the_end_and_on_flush(ip, events):
    run(ip, "import sys\nprint('a', end='', flush=True)\nprint('b', end='')\n7",
        execution_id="f1")
    evs = by_execution(events, "f1")
    assert types(evs) == ["started", "output", "output", "result", "finished"]
    assert [e["text"] for e in outputs(evs)] == ["a", "b"]


def test_long_lines_are_split_into_chunks(ip, events, config):
    config.output_chunk_size = 100
    run(ip, "print('x' * 250)", execution_id="c1")
    assert [len(e["text"]) for e in outputs(by_execution(events, "c1"))] == [100, 100, 51]
    config.output_chunk_size = 65536
    run(ip, "print('y' * 2 * 1024 * 1024)", execution_id="c2")
    chunks = [e["text"] for e in outputs(by_execution(events, "c2"))]
    assert "".join(chunks) == "y" * 2 * 1024 * 1024 + "\n"
    assert all(len(c) <= 65536 for c in chunks) and len(chunks) == 33
    assert [c.endswith("\n") for c in chunks].count(True) == 1 and chunks[-1].endswith("\n")


def test_rapid_prints_and_a_big_line_all_arrive(ip, events):
    run(ip, "for i in range(10): print(i)\nprint('z' * 100_000)\n'end'", execution_id="b1")
    evs = by_execution(events, "b1")
    assert text_of(evs) == "".join(f"{i}\n" for i in range(10)) + "z" * 100_000 + "\n"
    assert types(evs)[-2:] == ["result", "finished"]


def test_tracebacks_and_result_reprs_are_not_output(ip, events):
    run(ip, "1/0", execution_id="t1")
    run(ip, "'value'", execution_id="t2")
    assert types(by_execution(events, "t1")) == ["started", "error", "finished"]
    assert types(by_execution(events, "t2")) == ["started", "result", "finished"]


def test_writes_of_bytes_are_refused_like_a_text_stream(ip, events, config):
    config.output_tee = False
    result = run(ip, "import sys\nsys.stdout.write(b'x')", execution_id="w1")
    assert isinstance(result.error_in_exec, TypeError)


# -- display ------------------------------------------------------------------

def test_display_becomes_a_display_event_in_order(ip, events):
    code = textwrap.dedent("""\
        from IPython.display import display, HTML, update_display, clear_output
        print('before', end='')
        display(HTML('<b>hi</b>'))
        display({'text/plain': 'raw', 'application/json': {'a': 1}}, raw=True,
                display_id='d1')
        update_display({'text/plain': 'raw2'}, raw=True, display_id='d1')
        clear_output(wait=True)
        print('after')""")
    run(ip, code, execution_id="d1")
    evs = by_execution(events, "d1")
    kinds = [(e["type"], e.get("text")) for e in evs if e["type"] in ("output", "display")]
    assert kinds == [("output", "before"), ("display", None), ("display", None),
                     ("display", None), ("display", None), ("output", "after\n")]
    shown = [e for e in evs if e["type"] == "display"]
    assert shown[0]["data"]["text/html"] == "<b>hi</b>" and "text/plain" in shown[0]["data"]
    assert shown[1]["data"] == {"text/plain": "raw", "application/json": {"a": 1}}
    assert shown[1]["transient"] == {"display_id": "d1"} and not shown[1].get("update")
    assert shown[2]["update"] is True and shown[2]["transient"] == {"display_id": "d1"}
    assert shown[3]["clear"] is True and shown[3]["wait"] is True
    # the terminal rendering of a display (its text/plain) is not an output event
    assert "raw" not in text_of(evs) and "HTML object" not in text_of(evs)


def test_display_from_a_thread_the_cell_started(ip, events):
    code = textwrap.dedent("""\
        import threading
        from IPython.display import display
        t = threading.Thread(target=lambda: display({'text/plain': 'from thread'}, raw=True))
        t.start(); t.join()""")
    run(ip, code, execution_id="d2")
    shown = [e for e in by_execution(events, "d2") if e["type"] == "display"]
    assert [e["data"] for e in shown] == [{"text/plain": "from thread"}]


# -- threads ------------------------------------------------------------------

def test_output_of_threads_the_cell_starts_is_its_own(ip, events):
    code = textwrap.dedent("""\
        import threading
        def work(k):
            for j in range(50):
                print(f't{k} {j}')
            inner = threading.Thread(target=lambda: print(f'inner of t{k}'))
            inner.start(); inner.join()
        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in ts: t.start()
        for j in range(50): print(f'cell {j}')
        for t in ts: t.join()""")
    run(ip, code, execution_id="th1")
    lines = text_of(by_execution(events, "th1")).splitlines()
    assert sorted(lines) == sorted([f"t{k} {j}" for k in range(4) for j in range(50)]
                                   + [f"cell {j}" for j in range(50)]
                                   + [f"inner of t{k}" for k in range(4)])
    for producer in ["cell"] + [f"t{k}" for k in range(4)]:
        mine = [int(l.split()[1]) for l in lines if l.split()[0] == producer]
        assert mine == list(range(50)), producer


def test_thread_of_a_finished_cell_writes_to_the_running_cell(ip, events):
    go, done = threading.Event(), threading.Event()
    ip.user_ns.update(_go=go, _done=done)
    try:
        run(ip, "import threading\n_t = threading.Thread(target=lambda: (_go.wait(), "
                "print('late line'), _done.set()))\n_t.start()", execution_id="late1")
        # a pool-style thread of cell 1 prints while cell 2 runs: cell 2's output
        run(ip, "_go.set(); _done.wait(); _t.join()", execution_id="late2")
        assert text_of(by_execution(events, "late1")) == ""
        assert text_of(by_execution(events, "late2")) == "late line\n"
        assert by_execution(events, "late1")[-1]["type"] == "finished"
    finally:
        ip.user_ns.pop("_go", None)
        ip.user_ns.pop("_done", None)


def test_nothing_after_finished_late_output_is_counted(ip, events, config):
    config.output_tee = False
    go = threading.Event()
    ip.user_ns["_go"] = go
    try:
        run(ip, "import threading\n_t = threading.Thread(target=lambda: (_go.wait(), "
                "print('after the cell')))\n_t.start()", execution_id="n1")
        component = pyrepl3_ext.get_state(ip).io_capture
        before = component.unattributed_chars
        go.set()
        ip.user_ns["_t"].join(WAIT)
        assert component.unattributed_chars - before == len("after the cell\n")
        evs = by_execution(events, "n1")
        assert evs[-1]["type"] == "finished" and text_of(evs) == ""
    finally:
        ip.user_ns.pop("_go", None)


def test_concurrent_threads_and_sequential_cells_never_mix(ip, events):
    """Stock IPython: 8 threads started by one cell, interleaved with the
    cell's own prints, then 8 cells in a row; every chunk in its execution."""
    code = textwrap.dedent("""\
        import sys, threading
        sys.setswitchinterval(1e-5)
        try:
            def work(k):
                for j in range(200):
                    print(f'w{k} {j}')
                    if j % 50 == 0:
                        print(f'e{k} {j}', file=sys.stderr)
            ts = [threading.Thread(target=work, args=(k,)) for k in range(8)]
            for t in ts: t.start()
            for j in range(200): print(f'main {j}')
            for t in ts: t.join()
        finally:
            sys.setswitchinterval(0.005)""")
    run(ip, code, execution_id="many")
    evs = by_execution(events, "many")
    assert all(e["text"].endswith("\n") for e in outputs(evs))  # whole lines only
    lines = text_of(evs, "stdout").splitlines()
    for producer in ["main"] + [f"w{k}" for k in range(8)]:
        mine = [int(l.split()[1]) for l in lines if l.split()[0] == producer]
        assert mine == list(range(200)), producer
    assert len(lines) == 9 * 200
    assert sorted(text_of(evs, "stderr").splitlines()) == sorted(
        f"e{k} {j}" for k in range(8) for j in range(0, 200, 50))
    for n in range(8):
        run(ip, f"for j in range(20): print('seq{n}', j)", execution_id=f"seq{n}")
    for n in range(8):
        assert text_of(by_execution(events, f"seq{n}")) == "".join(
            f"seq{n} {j}\n" for j in range(20))


def test_async_cell_output_including_its_tasks(ip, events):
    code = textwrap.dedent("""\
        import asyncio
        async def child(k):
            await asyncio.sleep(0)
            print(f'task {k}')
        print('before await')
        await asyncio.gather(*(child(k) for k in range(3)))
        print('after await')""")
    run(ip, code, execution_id="as1")
    # and on a host's own event loop
    import asyncio
    asyncio.run(pyrepl3_ext.run_cell_async(ip, code, execution_id="as2"))
    for execution_id in ("as1", "as2"):
        evs = by_execution(events, execution_id)
        assert evs[0]["mode"] == "async" and evs[-1]["type"] == "finished"
        assert text_of(evs) == "before await\ntask 0\ntask 1\ntask 2\nafter await\n"


# -- cancellation and floods ------------------------------------------------------

def test_output_printed_after_a_cancel_is_not_lost(quiet, events):
    ip = quiet
    started = threading.Event()
    ip.user_ns["_started"] = started
    try:
        def canceller():
            assert started.wait(WAIT)
            pyrepl3_ext.cancel(ip, "cx", "stop")

        t = threading.Thread(target=canceller)
        t.start()
        run(ip, "try:\n    print('working')\n    _started.set()\n    while True:\n"
                "        pass\nfinally:\n    print('cleanup', end='')\n", execution_id="cx")
        t.join(WAIT)
        evs = by_execution(events, "cx")
        assert types(evs) == ["started", "output", "output", "error", "finished"]
        assert [e["text"] for e in outputs(evs)] == ["working\n", "cleanup"]
        assert evs[3]["kind"] == "cancelled"
        # and the next cell's output is its own
        run(ip, "print('next')", execution_id="cy")
        assert text_of(by_execution(events, "cy")) == "next\n"
    finally:
        ip.user_ns.pop("_started", None)


def _history_stdout_chars(ip, count, since):
    """Characters of stdout IPython 9 kept under ``count`` in its history,
    in the entries from index ``since`` on (what one cell added)."""
    entries = ip.history_manager.outputs.get(count, [])[since:]
    return sum(len(chunk) for entry in entries if entry.output_type == "out_stream"
               for chunk in entry.bundle["stream"])


@pytest.mark.parametrize("policy", ["tail", "drop"])
def test_flood_is_bounded_and_dropping_is_reported(quiet, events, config, policy):
    """12 MB printed a megabyte at a time against a 5 MB limit: memory stays
    at the limit, the tail (or nothing) past it, and a ``dropped`` count that
    adds up exactly (a fixed amount, not what a deadline let through)."""
    config.output_tee = False
    config.output_limit = 5_000_000
    config.output_overflow = policy
    config.output_tail = 10_000
    ip = quiet
    run(ip, "pass")  # the router is sys.stdout when the flood cell starts (as outside pytest)
    assert isinstance(sys.stdout, io_capture._RoutingStream)
    n = 12
    # IPython's history under this count may hold an earlier cell's output
    # (a test that set the shared shell's count back): only what is new counts
    before = len(ip.history_manager.outputs.get(ip.execution_count, [])) \
        if _compat.HAS_TEED_OUTPUT_HISTORY else 0
    result = run(ip, f"for _ in range({n}):\n    print('x' * 10**6)", execution_id="flood")
    assert result.success
    evs = by_execution(events, "flood")
    assert evs[-1]["type"] == "finished" and evs[-1]["status"] == "ok", evs[-1]
    outs = outputs(evs)
    delivered = sum(len(e["text"]) for e in outs)
    dropped = sum(e.get("dropped", 0) for e in outs)
    report = [e for e in outs if "dropped" in e]
    assert len(report) == 1 and report[0]["text"] == "" and dropped > 0
    assert delivered + dropped == n * (10**6 + 1)
    if policy == "tail":
        assert delivered == 5_000_000 + 10_000
        tail = "".join(e["text"] for e in outs[outs.index(report[0]) + 1:])
        assert len(tail) == 10_000 and set(tail) <= {"x", "\n"}
    else:
        assert delivered == 5_000_000 and outs[-1] is report[0]
    if _compat.HAS_TEED_OUTPUT_HISTORY:
        # IPython 9's own copy of the cell's output is bounded too
        kept = _history_stdout_chars(ip, result.execution_count, before)
        assert 0 < kept <= 5_000_000



@pytest.mark.skipif(not _compat.HAS_TEED_OUTPUT_HISTORY,
                    reason="IPython 9.1+ keeps its own copy of a cell's output")
def test_a_flood_is_bounded_in_ipythons_history_when_it_holds_later_counts(quiet, events,
                                                                          config):
    """The running cell's own copy is the one bounded: the history can hold
    later counts than the running cell's (a shell whose count was set back
    keeps its old entries; CI, a test order that did so), and cutting "the
    latest" entries then left the flood whole."""
    config.output_tee = False
    config.output_limit = 1_000_000
    config.output_overflow = "drop"
    ip = quiet
    run(ip, "pass")
    later = ip.execution_count + 50
    ip.history_manager.outputs[later] = []
    before = len(ip.history_manager.outputs.get(ip.execution_count, []))
    try:
        result = run(ip, "for _ in range(3):\n    print('x' * 10**6)", execution_id="flood-later")
        assert result.success
        kept = _history_stdout_chars(ip, result.execution_count, before)
        assert 0 < kept <= 1_000_000
    finally:
        ip.history_manager.outputs.pop(later, None)

# -- the routing stream -------------------------------------------------------------

def test_terminal_still_sees_the_output_and_unload_restores(shell):
    before = hook_snapshot(shell)
    buf = io.StringIO()
    saved = sys.stdout
    sys.stdout = buf
    try:
        pyrepl3_ext.load_ipython_extension(shell)
        events: list = []
        unsubscribe = pyrepl3_ext.subscribe(shell, events.append)
        assert isinstance(sys.stdout, io_capture._RoutingStream)
        run(shell, "print('seen by both')", execution_id="tee1")
        pyrepl3_ext.get_state(shell).config.output_tee = False
        run(shell, "print('events only')", execution_id="tee2")
        unsubscribe()
        run(shell, "print('nobody listens')")  # tee off spares only what events carry
        pyrepl3_ext.unload_ipython_extension(shell)
        assert sys.stdout is buf
    finally:
        sys.stdout = saved
    assert "seen by both\n" in buf.getvalue() and "events only" not in buf.getvalue()
    assert "nobody listens\n" in buf.getvalue()
    assert text_of(by_execution(events, "tee1")) == "seen by both\n"
    assert text_of(by_execution(events, "tee2")) == "events only\n"
    after = hook_snapshot(shell)
    for snap in (before, after):
        snap["user_ns_keys"] = {k for k in snap["user_ns_keys"] if not k.startswith("_")}
    assert after == before


def test_router_put_back_when_its_stream_is_restored(ip, events):
    router = io_capture._routers["stdout"]
    sys.stdout = router.downstream  # what pytest's capture and save/restore pairs do
    try:
        run(ip, "print('routed again')", execution_id="re1")
        assert sys.stdout is router
        assert text_of(by_execution(events, "re1")) == "routed again\n"
    finally:
        sys.stdout = router


def test_user_redirect_inside_a_cell_is_respected(ip, events):
    run(ip, "import contextlib, io\n_buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(_buf):\n    print('to the buffer')\n"
            "print('to the events')", execution_id="rd1")
    assert ip.user_ns.pop("_buf").getvalue() == "to the buffer\n"
    assert text_of(by_execution(events, "rd1")) == "to the events\n"


def test_ipython_capture_output_still_captures(ip, events):
    """``capture_output`` swaps the streams and the display publisher: what it
    captures is the user's, not an event; the router is back afterwards."""
    # the router is sys.stdout when the cell starts, as outside pytest (the
    # patched build's own context router wraps whatever stream is there then)
    run(ip, "pass")
    run(ip, "from IPython.utils.capture import capture_output\n"
            "from IPython.display import display\n"
            "with capture_output() as _c:\n    print('hidden')\n    display('also hidden')\n"
            "print('visible')", execution_id="co1")
    captured = ip.user_ns.pop("_c")
    assert captured.stdout == "hidden\n" and len(captured.outputs) == 1
    evs = by_execution(events, "co1")
    assert [(e["type"], e.get("text")) for e in evs if e["type"] in ("output", "display")] \
        == [("output", "visible\n")]
    assert sys.stdout is io_capture._routers["stdout"]


def test_a_printing_subscriber_does_not_feed_back(ip, events):
    seen = []

    def noisy(event):
        seen.append(event["type"])
        print("subscriber saw", event["type"])

    unsubscribe = pyrepl3_ext.subscribe(ip, noisy)
    try:
        run(ip, "print('cell line')", execution_id="fb1")
    finally:
        unsubscribe()
    assert text_of(by_execution(events, "fb1")) == "cell line\n"
    assert seen == ["started", "output", "finished"]


def test_no_subscriber_means_no_capture_work(ip, capsys):
    state = pyrepl3_ext.get_state(ip)
    result = run(ip, "print('just the terminal')", execution_id="ns1")
    assert result.error_in_exec is None
    assert state.last_execution.extra("io") is None  # nothing built for the cell
    assert "just the terminal" in capsys.readouterr().out


def test_stream_properties_are_the_replaced_streams(ip):
    router = io_capture._routers["stdout"]
    down = router.downstream
    assert router.encoding == (getattr(down, "encoding", None) or "utf-8")
    assert router.writable() and not router.readable()
    assert router.isatty() == bool(getattr(down, "isatty", lambda: False)())
    router.close()  # closing sys.stdout must not close it for everyone
    assert not router.closed
    router.write("still open\n")


@pytest.mark.skipif(not is_patched_build(), reason="needs the patched IPython build "
                    "(several shells running cells concurrently)")
def test_eight_shells_in_eight_threads_never_mix(ip):
    """Patched build: 8 InteractiveShell()s, each running a cell in its own
    thread at once, each cell printing and starting threads that print."""
    import builtins

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    saved = (sys.modules.get("__main__"), sys.displayhook, sys.excepthook,
             builtins.__dict__.get("get_ipython"))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shells = [InteractiveShell(config=config) for _ in range(8)]
    received: list[list[dict]] = [[] for _ in shells]
    try:
        for shell, sink in zip(shells, received):
            pyrepl3_ext.load_ipython_extension(shell)
            pyrepl3_ext.subscribe(shell, sink.append)
        barrier = threading.Barrier(8)
        code = textwrap.dedent("""\
            import sys, threading
            def work(tag):
                for j in range(100):
                    print(f'{tag} {j}')
            ts = [threading.Thread(target=work, args=(f'S{i}t{k}',)) for k in range(2)]
            _barrier.wait()
            for t in ts: t.start()
            for j in range(100):
                print(f'S{i}main {j}')
                if j % 25 == 0:
                    print(f'S{i}err {j}', file=sys.stderr)
            for t in ts: t.join()""")
        for i, shell in enumerate(shells):
            shell.user_ns.update(_barrier=barrier, i=i)
        results = {}

        def target(i):
            results[i] = pyrepl3_ext.run_cell(shells[i], code, execution_id=f"x{i}")

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            threads = [threading.Thread(target=target, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT * 4)
        finally:
            sys.setswitchinterval(old)
        for i, evs in enumerate(received):
            assert results[i].error_in_exec is None, results[i].error_in_exec
            mine = by_execution(evs, f"x{i}")
            assert mine == evs  # nothing of another session
            assert [e["seq"] for e in mine] == list(range(len(mine)))
            lines = text_of(mine, "stdout").splitlines()
            for producer in (f"S{i}main", f"S{i}t0", f"S{i}t1"):
                got = [int(l.split()[1]) for l in lines if l.split()[0] == producer]
                assert got == list(range(100)), (i, producer)
            assert len(lines) == 300
            assert text_of(mine, "stderr").splitlines() == [f"S{i}err {j}" for j in range(0, 100, 25)]
    finally:
        for shell in shells:
            pyrepl3_ext.unload_ipython_extension(shell)
            shell.close()  # 0003: gives back __main__, the sys hooks, the singleton slot
        assert (sys.modules.get("__main__"), sys.displayhook, sys.excepthook,
                builtins.__dict__.get("get_ipython")) == saved


def test_unload_puts_back_a_hosts_own_showtraceback(shell):
    # a host that replaced shell.showtraceback on the instance (benchmarks,
    # embedders) keeps its replacement across load/unload: it was deleted,
    # so IPython's own formatter came back
    def quiet(*args, **kwargs):
        return None

    shell.showtraceback = quiet
    try:
        pyrepl3_ext.load_ipython_extension(shell)
        assert shell.showtraceback is not quiet  # wrapped while loaded
        pyrepl3_ext.unload_ipython_extension(shell)
        assert shell.__dict__.get("showtraceback") is quiet
    finally:
        shell.__dict__.pop("showtraceback", None)
