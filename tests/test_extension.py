"""Extension core: load/unload, configuration, events, sinks, magics."""

from __future__ import annotations

import base64
import json
import re
import sys
import threading

import pytest

import pyrepl3_ext
from pyrepl3_ext import extension
from pyrepl3_ext.events import EVENT_TYPES

from .conftest import by_execution, hook_snapshot


def run(ip, code, **kw):
    return pyrepl3_ext.run_cell(ip, code, **kw)


def types(events):
    return [e["type"] for e in events]


def assert_well_formed(events):
    """The vocabulary's invariants for one execution's events."""
    assert events, "no events"
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "started"
    assert events[-1]["type"] == "finished"
    outcome = [e for e in events if e["type"] in ("result", "error")]
    assert len(outcome) <= 1
    for e in events:
        assert e["type"] in EVENT_TYPES
        assert {"type", "execution_id", "session", "seq", "ts"} <= set(e)
        json.dumps(e)  # JSON-serialisable as is
    assert len({e["execution_id"] for e in events}) == 1


# -- load / unload ---------------------------------------------------------

def test_unload_restores_everything(shell):
    before = hook_snapshot(shell)
    pyrepl3_ext.load_ipython_extension(shell)
    pyrepl3_ext.load_ipython_extension(shell)  # twice is harmless
    assert extension.get_state(shell) is not None
    shell.run_cell("x_unload_probe = 1", store_history=True)
    pyrepl3_ext.unload_ipython_extension(shell)
    shell.user_ns.pop("x_unload_probe", None)
    after = hook_snapshot(shell)
    # IPython itself adds _iN / _N names to the namespace for each stored cell
    for snap in (before, after):
        snap["user_ns_keys"] = {k for k in snap["user_ns_keys"] if not k.startswith("_")}
    assert after == before
    assert extension.get_state(shell) is None
    pyrepl3_ext.unload_ipython_extension(shell)  # unloading twice is harmless too


def test_load_ext_magic_and_double_load(shell):
    # IPython loads its own magics lazily on first use: warm them up first
    shell.run_line_magic("load_ext", "pyrepl3_ext")
    shell.run_line_magic("reload_ext", "pyrepl3_ext")
    shell.run_line_magic("unload_ext", "pyrepl3_ext")
    before = hook_snapshot(shell)
    shell.run_line_magic("load_ext", "pyrepl3_ext")
    state = extension.get_state(shell)
    shell.run_line_magic("reload_ext", "pyrepl3_ext")
    assert extension.get_state(shell) is not None
    pre = shell.events.callbacks["pre_run_cell"]
    assert sum(1 for cb in pre if getattr(cb, "__self__", None).__class__ is extension.ShellState) == 1
    shell.run_line_magic("unload_ext", "pyrepl3_ext")
    assert extension.get_state(shell) is None
    assert hook_snapshot(shell) == before
    del state


def test_loading_via_ipython_config(tmp_path):
    """``c.InteractiveShellApp.extensions`` and ``c.PyREPL3.*`` in a real profile."""
    import subprocess

    profile = tmp_path / "profile_test"
    profile.mkdir()
    log = tmp_path / "events.jsonl"
    (profile / "ipython_config.py").write_text(
        "c.InteractiveShellApp.extensions = ['pyrepl3_ext']\n"
        f"c.PyREPL3.event_log = {str(log)!r}\n"
        "c.PyREPL3.session_id = 'from-config'\n"
        "c.PyREPL3.cell_timeout = 12.5\n")
    code = ("import pyrepl3_ext; st = pyrepl3_ext.get_state(get_ipython()); "
            "print('TIMEOUT', st.config.cell_timeout)")
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", f"--profile-dir={profile}", "--no-banner",
         "--colors=nocolor", "-c", code],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TIMEOUT 12.5" in proc.stdout
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert types(events) == ["started", "output", "finished"]
    assert events[1]["text"] == "TIMEOUT 12.5\n"
    assert events[0]["session"] == "from-config"
    assert events[0]["code"] == code


def test_pyrepl3_magic_shows_versions_and_settings(ip, capsys):
    import IPython

    ip.run_line_magic("pyrepl3", "")
    out = capsys.readouterr().out
    assert f"pyrepl3_ext {pyrepl3_ext.__version__}" in out
    from pyrepl3_ext import _compat

    build = "patched (multi-shell)" if _compat.is_patched_build() else "stock"
    assert f"IPython {IPython.__version__} ({build})" in out
    assert "PyREPL3.cell_timeout = 0.0" in out
    assert "PyREPL3.event_log = ''" in out


def test_config_magic_and_validation(ip):
    state = extension.get_state(ip)
    ip.run_line_magic("config", "PyREPL3.cell_timeout = 2.5")
    assert state.config.cell_timeout == 2.5
    from traitlets import TraitError

    with pytest.raises(TraitError, match="cell_timeout must be >= 0"):
        state.config.cell_timeout = -1
    # every setting documents itself
    for name, trait in state.config.traits(config=True).items():
        assert trait.help and len(trait.help) > 20, name


# -- events ----------------------------------------------------------------

def test_ok_cell_with_result(ip, events):
    result = run(ip, "40 + 2", execution_id="exec-ok")
    assert result.result == 42 and result.pyrepl3_execution_id == "exec-ok"
    evs = by_execution(events, "exec-ok")
    assert_well_formed(evs)
    assert types(evs) == ["started", "result", "finished"]
    started, res, fin = evs
    assert started["code"] == "40 + 2" and started["mode"] == "sync"
    assert started["execution_count"] == result.execution_count == res["execution_count"]
    assert res["data"]["text/plain"] == "42"
    assert fin["status"] == "ok" and fin["duration"] >= 0
    assert started["session"] == extension.get_state(ip).session_id


def test_statement_cell_has_no_result(ip, events):
    run(ip, "y_stmt = 3", execution_id="stmt")
    assert types(by_execution(events, "stmt")) == ["started", "finished"]


def test_exception_cell(ip, events):
    run(ip, "def boom():\n    raise ValueError('bad value')\nboom()", execution_id="exc")
    evs = by_execution(events, "exc")
    assert_well_formed(evs)
    assert types(evs) == ["started", "error", "finished"]
    err = evs[1]
    assert (err["ename"], err["evalue"], err["kind"]) == ("ValueError", "bad value", "exception")
    text = "".join(err["traceback"])
    assert "boom()" in text and "ValueError: bad value" in text
    assert "interactiveshell.py" not in text  # IPython's own frames are not the user's
    assert evs[2]["status"] == "error"


def test_syntax_error_cell(ip, events):
    run(ip, "def f(:\n    pass", execution_id="syn")
    evs = by_execution(events, "syn")
    assert_well_formed(evs)
    assert evs[1]["kind"] == "syntax" and evs[1]["ename"] == "SyntaxError"
    assert evs[2]["status"] == "error"


def test_keyboard_interrupt_cell(ip, events):
    run(ip, "raise KeyboardInterrupt", execution_id="kbd")
    evs = by_execution(events, "kbd")
    assert_well_formed(evs)
    assert evs[1]["ename"] == "KeyboardInterrupt" and evs[1]["kind"] == "cancelled"
    assert evs[2]["status"] == "cancelled"
    # the next cell runs normally
    assert run(ip, "1 + 1").result == 2


def test_cell_cancelled_exception_maps_to_its_kind(ip, events):
    run(ip, "from pyrepl3_ext import CellTimeout\nraise CellTimeout('took too long')",
        execution_id="to")
    evs = by_execution(events, "to")
    assert evs[1]["kind"] == "timeout" and evs[1]["evalue"] == "took too long"
    assert evs[2]["status"] == "cancelled"


def test_input_rejected_is_security(ip, events):
    import ast

    from IPython.core.error import InputRejected

    class Refuse(ast.NodeTransformer):
        def visit_Name(self, node):
            if node.id == "forbidden":
                raise InputRejected("name 'forbidden' is not allowed")
            return node

    refuse = Refuse()
    ip.ast_transformers.append(refuse)
    try:
        run(ip, "forbidden", execution_id="sec")
    finally:
        ip.ast_transformers.remove(refuse)
    evs = by_execution(events, "sec")
    assert evs[1]["kind"] == "security" and "not allowed" in evs[1]["evalue"]


def test_silent_and_empty_cells_emit_nothing(ip, events):
    run(ip, "z_silent = 1", silent=True)
    ip.run_cell("   \n", store_history=True)
    assert events == []
    run(ip, "z_silent", execution_id="after")
    assert types(by_execution(events, "after")) == ["started", "result", "finished"]


def test_generated_ids_are_unique_and_carry_the_session(ip, events):
    for _ in range(5):
        ip.run_cell("1", store_history=True)
    starts = [e for e in events if e["type"] == "started"]
    ids = [e["execution_id"] for e in starts]
    assert len(set(ids)) == 5
    session = extension.get_state(ip).session_id
    assert all(i.startswith(session) for i in ids)


def test_execution_counts_follow_ipython(ip, events):
    first = run(ip, "1", execution_id="c1")
    second = run(ip, "2", execution_id="c2")
    nohist = run(ip, "3", execution_id="c3", store_history=False)
    counts = {e["execution_id"]: e["execution_count"] for e in events if e["type"] == "started"}
    assert counts["c1"] == first.execution_count
    assert counts["c2"] == second.execution_count == first.execution_count + 1
    assert counts["c3"] == nohist.execution_count


def test_nested_run_cell_gets_its_own_execution(ip, events):
    run(ip, "get_ipython().run_cell('5 * 5')\n'outer'", execution_id="outer")
    outer = by_execution(events, "outer")
    assert_well_formed(outer)
    inner_ids = {e["execution_id"] for e in events} - {"outer"}
    assert len(inner_ids) == 1
    inner = by_execution(events, inner_ids.pop())
    assert_well_formed(inner)
    assert inner[1]["data"]["text/plain"] == "25"
    # IPython's displayhook forgets the outer cell's result object when a nested
    # run_cell ends (displayhook.exec_result = None), so no result event is
    # asserted for the outer cell; it still finishes ok.
    assert outer[-1]["status"] == "ok"


def test_async_cell_mode(ip, events):
    run(ip, "import asyncio\nawait asyncio.sleep(0)\n'done'", execution_id="aw")
    evs = by_execution(events, "aw")
    assert evs[0]["mode"] == "async"
    assert evs[1]["data"]["text/plain"] == "'done'"


def test_run_cell_async_api(ip, events):
    import asyncio

    async def main():
        return await pyrepl3_ext.run_cell_async(
            ip, "import asyncio\nawait asyncio.sleep(0)\n6 * 7", execution_id="api-aw")

    result = asyncio.run(main())
    assert result.result == 42
    assert types(by_execution(events, "api-aw")) == ["started", "result", "finished"]


def test_cell_meta_execution_id(ip, events):
    from pyrepl3_ext import _compat

    if not _compat.HAS_CELL_META:
        pytest.skip("cell_meta needs IPython 9.16+")
    ip.run_cell("8", store_history=True, cell_meta={"pyrepl3": {"execution_id": "meta-id"}})
    assert types(by_execution(events, "meta-id")) == ["started", "result", "finished"]


def test_timeout_directive_is_stripped_and_recorded(ip, events):
    captured = {}

    class Spy(extension.Component):
        name = "spy"

        def before_cell(self, execution):
            captured.update(execution.options)

    state = extension.get_state(ip)
    spy = Spy(state)
    state.add_component(spy)
    try:
        result = run(ip, "%%timeout 7.5\n%%transaction\n1 + 2", execution_id="dir")
    finally:
        state.remove_component(spy)
    assert result.result == 3
    assert captured["timeout"] == 7.5 and captured["transaction"] is True


def test_bad_timeout_directive_is_a_usage_error(ip, events, capsys):
    result = run(ip, "%%timeout soon\n1", execution_id="badt")
    assert result.error_in_exec is not None or result.error_before_exec is not None
    assert "%%timeout expects a number of seconds" in capsys.readouterr().err
    assert by_execution(events, "badt")[-1]["status"] == "error"


def test_run_cell_argument_validation(ip):
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        run(ip, "1", timeout=-3)
    with pytest.raises(ValueError, match="execution_id must be a non-empty string"):
        run(ip, "1", execution_id="")


def test_run_cell_requires_the_extension(shell):
    with pytest.raises(RuntimeError, match="pyrepl3_ext is not loaded"):
        pyrepl3_ext.run_cell(shell, "1")


# -- failures in the extension never break the cell -------------------------

def test_failing_subscriber_is_reported_once(ip, capfd):
    calls = []

    def bad(event):
        calls.append(event["type"])
        raise RuntimeError("subscriber exploded")

    unsubscribe = pyrepl3_ext.subscribe(ip, bad)
    try:
        first = run(ip, "10")
        second = run(ip, "11")
    finally:
        unsubscribe()
    assert (first.result, second.result) == (10, 11)
    assert first.success and second.success
    err = capfd.readouterr().err
    assert err.count("subscriber exploded") == 1
    assert "[pyrepl3_ext] internal error" in err and "the cell was not affected" in err
    assert len(calls) == 6


def test_failing_component_does_not_break_cells(ip, capfd):
    class Broken(extension.Component):
        name = "broken"

        def before_cell(self, execution):
            raise ZeroDivisionError("component failure")

        def after_cell(self, execution, result):
            raise KeyError("after failure")

    state = extension.get_state(ip)
    broken = Broken(state)
    state.add_component(broken)
    received = []
    unsubscribe = pyrepl3_ext.subscribe(ip, received.append)
    try:
        results = [run(ip, f"{i} * 2").result for i in range(3)]
    finally:
        unsubscribe()
        state.remove_component(broken)
    assert results == [0, 2, 4]
    assert types(received).count("finished") == 3
    err = capfd.readouterr().err
    assert err.count("component failure") == 1 and err.count("after failure") == 1


# -- sinks -----------------------------------------------------------------

def test_json_lines_sink_to_file(ip, tmp_path):
    log = tmp_path / "ev.jsonl"
    ip.run_line_magic("config", f"PyREPL3.event_log = {str(log)!r}")
    run(ip, "'x' * 3", execution_id="j1")
    run(ip, "1/0", execution_id="j2")
    ip.run_line_magic("config", "PyREPL3.event_log = ''")  # closes the file
    run(ip, "4", execution_id="j3")
    lines = log.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["execution_id"] for e in events] == ["j1"] * 3 + ["j2"] * 3
    assert_well_formed(events[:3])
    assert_well_formed(events[3:])
    assert events[1]["data"]["text/plain"] == "'xxx'"
    assert events[4]["kind"] == "exception"


def test_json_lines_sink_to_fd(ip, tmp_path):
    import os

    path = tmp_path / "fd.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        ip.run_line_magic("config", f"PyREPL3.event_log = 'fd:{fd}'")
        run(ip, "None", execution_id="fd1")
        ip.run_line_magic("config", "PyREPL3.event_log = ''")
    finally:
        os.close(fd)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert types(events) == ["started", "finished"]


def test_bad_event_log_target_is_a_clear_error(ip):
    from traitlets import TraitError  # noqa: F401 - documents the expected family

    state = extension.get_state(ip)
    with pytest.raises(ValueError, match="expected fd:<integer>"):
        state.config.event_log = "fd:notanumber"


def test_non_json_values_are_made_safe(ip, tmp_path):
    log = tmp_path / "png.jsonl"
    ip.run_line_magic("config", f"PyREPL3.event_log = {str(log)!r}")
    try:
        run(ip, "class R:\n    def _repr_png_(self):\n        return b'\\x89PNG'\nR()",
            execution_id="png")
    finally:
        ip.run_line_magic("config", "PyREPL3.event_log = ''")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    data = events[1]["data"]
    assert "text/plain" in data
    # bytes travel as base64 text (what Jupyter's wire format does for PNG)
    assert base64.b64decode(data["image/png"]) == b"\x89PNG"


def test_subscribers_see_events_in_seq_order_across_threads(ip):
    """Emission from several threads keeps per-execution seq order at every sink."""
    state = extension.get_state(ip)
    seen = []
    unsubscribe = pyrepl3_ext.subscribe(ip, seen.append)
    try:
        from pyrepl3_ext.events import Execution

        ex = Execution("threads", state.session_id, "", "sync", 1, {}, state.bus)
        ex.emit("started", code="", mode="sync", execution_count=1)

        def writer(n):
            for i in range(200):
                ex.emit("output", stream="stdout", text=f"{n}:{i}\n")

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ex.emit("finished", status="ok", duration=0.0)
        assert ex.emit("output", stream="stdout", text="late") is None
        assert ex.dropped_after_finish == 1
    finally:
        unsubscribe()
    assert [e["seq"] for e in seen] == list(range(802))
    with pytest.raises(RuntimeError, match="already has a result or error"):
        ex2 = Execution("two", "s", "", "sync", 1, {}, state.bus)
        seen2 = pyrepl3_ext.subscribe(ip, lambda e: None)
        try:
            ex2.emit("result", data={})
            ex2.emit("error", ename="X")
        finally:
            seen2()


# -- directives and IPython's completeness check (terminal Enter, Jupyter is_complete) --

@pytest.mark.parametrize("text, expected", [
    ("%%timeout 5", "incomplete"),            # Enter after the directive: keep typing
    ("%%timeout 5\n", "incomplete"),
    ("%%transaction", "incomplete"),
    ("%%timeout 5\n%%transaction\n", "incomplete"),
    ("  %%transaction  \n", "incomplete"),
    ("%%timeout 5\nfor i in range(3):\n", "incomplete"),
    ("%%timeout 5\nx = 1\n", "complete"),
    ("%%timeout 5\ndef f(:\n", None),         # None: whatever IPython says of the body
])
def test_check_complete_with_directives(ip, text, expected):
    """IPython's own ``check_complete`` (the terminal's Enter, ipykernel's
    ``is_complete``) on a cell that opens with a directive never raises."""
    if expected is None:
        expected = ip.check_complete(text.split("\n", 1)[1])[0]
    status, _indent = ip.check_complete(text)
    assert status == expected
    status, _indent = ip.input_transformer_manager.check_complete(text)
    assert status == expected


def test_directive_only_cell_is_a_usage_error(ip, events, capsys):
    """A directive with no body is IPython's empty-cell-magic error, not a crash."""
    result = run(ip, "%%timeout 5\n", execution_id="only")
    assert "cell body is empty" in capsys.readouterr().err
    assert type(result.error_in_exec or result.error_before_exec).__name__ == "UsageError"
    assert by_execution(events, "only")[-1]["status"] == "error"


def test_silent_cell_refuses_a_directive(ip, events):
    """IPython runs no pre_run_cell for a silent cell: its directive cannot
    apply, so the cell is refused with a message instead of run without it."""
    ip.user_ns.pop("ran_silently", None)
    result = ip.run_cell("%%timeout 5\nran_silently = True\n", silent=True)
    error = result.error_before_exec
    assert type(error).__name__ == "DirectiveNotApplied"
    assert "do not apply to a silent cell" in str(error)
    assert "ran_silently" not in ip.user_ns
    assert events == []  # silent: still no events
    # the same cell, not silent, runs with its option
    result = run(ip, "%%timeout 5\nran_silently = True\n", execution_id="loud")
    assert result.success and ip.user_ns["ran_silently"] is True
    # a nested silent cell inside a directive cell is refused too
    result = run(ip, "%%timeout 5\nr = get_ipython().run_cell('%%transaction\\nz = 1', "
                     "silent=True)\nkind = type(r.error_before_exec).__name__",
                 execution_id="outer")
    assert ip.user_ns["kind"] == "DirectiveNotApplied"


def test_directive_keeps_line_numbers_and_hides_the_engine(ip, events, capfd):
    """A cancelled cell's traceback names the line as typed (directives
    count), shows only the user's frames and the public exception type."""
    import threading

    code = "%%timeout 0.3\nx = 1\n\nwhile True:\n    x += 1\n"
    done = {}
    worker = threading.Thread(target=lambda: done.update(
        result=run(ip, code, execution_id="tb")))
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    error = by_execution(events, "tb")[-2]
    assert error["type"] == "error" and error["kind"] in ("cancelled", "timeout")
    shown = capfd.readouterr()
    typed = code.splitlines()
    for text in ("".join(error["traceback"]), shown.out + shown.err):
        # each "line N" names the line of what was typed that is quoted under it
        lines = text.splitlines()
        cited = [(int(m.group(1)), lines[i + 1].strip()) for i, line in enumerate(lines)
                 for m in [re.search(r'Cell In\[\d+\], line (\d+)', line)] if m]
        assert cited, text
        for number, source in cited:
            assert typed[number - 1].strip() == source, (number, source, text)
        assert "pyrepl3_ext/" not in text and "_AsyncCellCancelled" not in text
        assert "pyrepl3_ext.errors.Cell" in text


def test_a_cancelled_cells_traceback_keeps_the_frames_and_the_exception_it_interrupted(ip, events):
    """A cancel's traceback is rendered by a lighter path than a general
    one (it is what the cancel's answer waits for); it must still name every
    frame of the user's with its source line, and a cancel that lands while
    the cell handles an exception still shows that exception."""
    code = ("%%timeout 0.3\n"
            "def spin(n):\n"
            "    if n:\n"
            "        return spin(n - 1)\n"
            "    while True:\n"
            "        pass\n"
            "try:\n"
            "    1 / 0\n"
            "except ZeroDivisionError:\n"
            "    spin(2)\n")
    run(ip, code, execution_id="deep-tb")
    error = by_execution(events, "deep-tb")[-2]
    assert error["type"] == "error" and error["kind"] == "timeout", error
    text = "".join(error["traceback"])
    assert "ZeroDivisionError: division by zero" in text, text
    assert "During handling of the above exception" in text, text
    frames = re.findall(r"Cell In\[\d+\], line (\d+)(?:, in ([\w<>]+))?\n\s+(.+)", text)
    cited = [(int(n), name or "<module>", src.strip()) for n, name, src in frames][-5:]
    assert cited[:4] == [
        (8, "<module>", "1 / 0"), (10, "<module>", "spin(2)"),
        (4, "spin", "return spin(n - 1)"), (4, "spin", "return spin(n - 1)")], text
    # stopped in the loop: on either of its lines
    assert cited[4] in [(5, "spin", "while True:"), (6, "spin", "pass")], text

    run(ip, "%%timeout 0.3\nwhile True:\n    pass\n", execution_id="plain-tb")
    plain = "".join(by_execution(events, "plain-tb")[-2]["traceback"])
    assert re.search(r"Cell In\[\d+\], line (2, in <module>\n\s+while True:|3, in <module>\n"
                     r"\s+pass)\n", plain), plain
    assert "^" not in plain, plain  # no caret lines: they cost a parse per frame


def test_the_error_event_names_cells_as_the_terminal_does(ip, events, capfd):
    """``Cell In[N], line L, in f`` in the event, the same words IPython
    prints, not the compiler's ``<ipython-input-N-hash>`` file name."""
    run(ip, "def f():\n    return 1 / 0", execution_id="def")
    result = run(ip, "x = 1\nf()", execution_id="call")
    error = by_execution(events, "call")[-2]
    text = "".join(error["traceback"])
    count = result.execution_count
    assert f"Cell In[{count}], line 2" in text, text
    assert f"Cell In[{count - 1}], line 2, in f" in text, text
    assert "ipython-input" not in text
    shown = capfd.readouterr()
    printed = re.sub(r"\x1b\[[0-9;]*m", "", shown.out + shown.err)  # IPython's colours
    assert f"Cell In[{count - 1}], line 2" in printed, printed


def test_syntax_error_line_counts_the_directive(ip, events):
    result = run(ip, "%%transaction\nx = 1\ny = (\n", execution_id="syn")
    assert isinstance(result.error_before_exec, SyntaxError)
    error = by_execution(events, "syn")[-2]
    assert "line 3" in "".join(error["traceback"]), error["traceback"]


def test_event_log_switched_on_by_a_cell_starts_with_started(ip, tmp_path):
    """The cell that switches the log on began before the log existed: none
    of its events are logged (the log used to open with its bare finished)."""
    log = tmp_path / "late.jsonl"
    run(ip, f"%config PyREPL3.event_log = {str(log)!r}", execution_id="switch")
    run(ip, "1 + 1", execution_id="after")
    ip.run_line_magic("config", "PyREPL3.event_log = ''")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["execution_id"] for e in events] == ["after"] * 3
    assert_well_formed(events)


def test_a_rendered_traceback_is_reused_and_the_error_still_pickles(ip):
    import copy
    import pickle

    result = pyrepl3_ext.run_cell(ip, "def f():\n    1 / 0\nf()")
    error = result.error_in_exec
    first = extension.format_traceback(error, ip)
    again = extension.format_traceback(error, ip)
    assert again == first and again is not first  # a copy: callers may edit theirs
    assert any("Cell In[" in line for line in first)
    # the memo holds no traceback, frame or shell
    assert type(pickle.loads(pickle.dumps(error))) is ZeroDivisionError
    assert type(copy.deepcopy(error)) is ZeroDivisionError
    ip.user_ns["_err"] = error
    reraised = pyrepl3_ext.run_cell(ip, "raise _err").error_in_exec
    assert reraised is error
    assert extension.format_traceback(error, ip) != first  # a new traceback, rendered anew
