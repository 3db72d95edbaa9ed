"""Behaviour that only the patched IPython build has (``patches/``).

Skipped on stock IPython.  Run against the patched wheel with
``nox -s patched`` (see docs/upstream.md).
"""

from __future__ import annotations

import builtins
import sys
import threading

import pytest

from pyrepl3_ext._compat import is_patched_build
from tests.crosstalk import race

pytestmark = pytest.mark.skipif(
    not is_patched_build(),
    reason="needs the pyrepl3-patched IPython build (nox -s patched); stock IPython has one "
           "process-wide current shell",
)

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from traitlets.config import Config  # noqa: E402

CELLS_PER_SHELL = 300

#: What a cell records: the shell each way of asking for "the current shell"
#: returns, from the cell itself and from a thread it starts in its context.
PROBE_CELL = """\
import IPython, contextvars, threading
from IPython.core.interactiveshell import InteractiveShell as _IS
_probe.append(("get_ipython", IPython.get_ipython()))
_probe.append(("instance", _IS.instance()))
_probe.append(("initialized", _IS.initialized()))
_t = threading.Thread(target=contextvars.copy_context().run,
                      args=(lambda: _probe.append(("thread", IPython.get_ipython())),))
_t.start(); _t.join()
"""


@pytest.fixture
def two_shells():
    """Two non-singleton shells with in-memory history; process state restored after."""
    saved = (sys.modules.get("__main__"), sys.displayhook, sys.excepthook,
             sys.stdout, sys.stderr, builtins.__dict__.get("get_ipython"))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shells = [InteractiveShell(config=config) for _ in range(2)]
    try:
        yield shells
    finally:
        for shell in shells:
            close = getattr(shell, "close", None)  # patch 0003
            if close is not None:
                close()
        main, sys.displayhook, sys.excepthook, sys.stdout, sys.stderr, gi = saved
        if main is not None:
            sys.modules["__main__"] = main
        if gi is None:
            builtins.__dict__.pop("get_ipython", None)
        else:
            builtins.get_ipython = gi


def test_is_patched_build():
    import IPython
    from IPython.core import getipython

    assert is_patched_build()
    assert getipython.PYREPL3_MULTI_SHELL is True
    assert "+pyrepl3." in IPython.__version__


def test_outside_any_cell_the_singleton_answers():
    from IPython.core.getipython import current_shell, get_ipython

    assert current_shell.get() is None
    if InteractiveShell.initialized():
        assert get_ipython() is InteractiveShell.instance()
    else:
        assert get_ipython() is None


def test_concurrent_shells_each_see_their_own(two_shells):
    """Two shells run cells at once from two threads; every probe must name its own shell."""
    barrier = threading.Barrier(len(two_shells))
    failures: list[str] = []

    def drive(shell):
        shell.user_ns["_probe"] = probe = []
        barrier.wait()
        for i in range(CELLS_PER_SHELL):
            result = shell.run_cell(PROBE_CELL, store_history=False)
            if not result.success:
                failures.append(f"cell {i}: {result.error_before_exec or result.error_in_exec!r}")
        shell.user_ns["_probe_done"] = probe

    race(*[(drive, (s,)) for s in two_shells])

    assert failures == []
    for shell in two_shells:
        probe = shell.user_ns["_probe_done"]
        assert len(probe) == 4 * CELLS_PER_SHELL
        expected = {"get_ipython": shell, "instance": shell, "initialized": True, "thread": shell}
        wrong = [(kind, seen) for kind, seen in probe if seen is not expected[kind]]
        assert wrong == [], f"{len(wrong)} probes saw another shell, e.g. {wrong[:3]}"


def test_run_cell_async_sets_the_current_shell(two_shells):
    import asyncio

    from IPython.core.getipython import current_shell

    shell = two_shells[0]
    shell.user_ns["_seen"] = seen = []
    code = "import IPython; _seen.append(IPython.get_ipython())"
    result = asyncio.run(shell.run_cell_async(
        code, store_history=False, transformed_cell=shell.transform_cell(code)))
    assert result.success
    assert seen == [shell]
    assert current_shell.get() is None  # reset after the cell


def test_current_shell_is_reset_after_a_failing_cell(two_shells):
    from IPython.core.getipython import current_shell

    result = two_shells[1].run_cell("1/0", store_history=False)
    assert not result.success
    assert current_shell.get() is None


def test_instance_of_another_class_is_not_redirected(two_shells):
    """Only ``instance()`` of a class the current shell belongs to is redirected."""
    from IPython.core.getipython import current_shell

    class OtherShell(InteractiveShell):
        pass

    shell = two_shells[0]
    token = current_shell.set(shell)
    try:
        assert InteractiveShell.instance() is shell
        assert InteractiveShell.initialized()
        # OtherShell falls back to the singleton (inherited ``_instance``), if any.
        assert OtherShell.initialized() is (InteractiveShell._instance is not None)
    finally:
        current_shell.reset(token)


def test_a_thread_started_without_the_context_falls_back(two_shells):
    """Threads inherit the cell's shell only through ``copy_context().run`` (Python < 3.14)."""
    shell = two_shells[0]
    shell.user_ns["_seen"] = seen = []
    code = ("import IPython, threading\n"
            "_t = threading.Thread(target=lambda: _seen.append(IPython.get_ipython()))\n"
            "_t.start(); _t.join()\n")
    if sys.version_info >= (3, 14) and getattr(sys.flags, "thread_inherit_context", 0):
        pytest.skip("threads inherit the context on this interpreter")
    assert shell.run_cell(code, store_history=False).success
    fallback = InteractiveShell.instance() if InteractiveShell.initialized() else None
    assert seen == [fallback]



_MISSING = object()
_SHARED_BUILTINS = ("get_ipython", "exit", "quit", "_")

#: A cell that checks ``builtins.get_ipython()`` (what code outside the cell's
#: namespace sees), calls ``sys.excepthook`` the way GUI toolkits do every
#: 10th cell, and ends in an expression value tagged with its shell and index.
DISPATCH_CELL = """\
import builtins as _b, sys as _s
_bad_builtin += _b.get_ipython() is not _me
if {i} % 10 == 0:
    try:
        raise ValueError("{tag}-hook-{i}")
    except ValueError:
        _s.excepthook(*_s.exc_info())
if {i} % 10 == 5:
    raise KeyError("{tag}-raise-{i}")
("{tag}", {i})
"""


def _shared_process_state():
    return (sys.displayhook, sys.excepthook,
            {name: builtins.__dict__.get(name, _MISSING) for name in _SHARED_BUILTINS})


def test_concurrent_shells_keep_their_own_hooks(two_shells):
    """Values, tracebacks and builtins.get_ipython() of two racing shells stay with their shell."""
    before = _shared_process_state()
    shown = {id(shell): [] for shell in two_shells}
    for shell in two_shells:
        # Record instead of printing: who showed which exception.
        shell.showtraceback = (lambda exc_tuple=None, *a, _seen=shown[id(shell)], **k:
                               _seen.append(str((exc_tuple or sys.exc_info())[1])))
    barrier = threading.Barrier(len(two_shells))
    mismatches: dict[str, list] = {"result": [], "_": [], "Out": [], "error": [], "crash": []}

    def drive(shell, tag):
        shell.user_ns.update(_me=shell, _bad_builtin=0)
        barrier.wait()
        try:
            for i in range(CELLS_PER_SHELL):
                result = shell.run_cell(DISPATCH_CELL.format(tag=tag, i=i), store_history=True)
                if i % 10 == 5:
                    if f"{tag}-raise-{i}" not in str(result.error_in_exec):
                        mismatches["error"].append((tag, i, result.error_in_exec))
                    continue
                expected = (tag, i)
                if result.result != expected:
                    mismatches["result"].append((tag, i, result.result))
                if shell.user_ns.get("_") != expected:
                    mismatches["_"].append((tag, i, shell.user_ns.get("_")))
                if shell.user_ns["Out"].get(result.execution_count) != expected:
                    mismatches["Out"].append((tag, i, result.execution_count))
        except BaseException as exc:  # e.g. KeyError from a racing builtins trap
            mismatches["crash"].append((tag, repr(exc)))

    race(*[(drive, (s, tag)) for s, tag in zip(two_shells, "AB")])

    counts = {kind: len(found) for kind, found in mismatches.items()}
    for shell, tag in zip(two_shells, "AB"):
        counts[f"builtins.get_ipython {tag}"] = shell.user_ns["_bad_builtin"]
        expected_shown = sorted(
            [f"'{tag}-raise-{i}'" for i in range(5, CELLS_PER_SHELL, 10)]
            + [f"{tag}-hook-{i}" for i in range(0, CELLS_PER_SHELL, 10)])
        counts[f"tracebacks {tag}"] = len(set(shown[id(shell)]) ^ set(expected_shown))
    wrong = {kind: n for kind, n in counts.items() if n}
    examples = {kind: found[:3] for kind, found in mismatches.items() if found}
    assert wrong == {}, f"mismatch counts {wrong}; examples {examples}"
    assert _shared_process_state() == before  # nothing left installed, nothing lost


def test_hooks_are_dispatchers_only_while_shared(two_shells):
    """One active shell installs its own hooks (as before); two share one dispatcher."""
    before = _shared_process_state()
    a, b = two_shells
    with a.builtin_trap, a.display_trap:
        assert sys.displayhook is a.displayhook
        assert builtins.get_ipython() is a
        assert "exit" not in builtins.__dict__ and "quit" not in builtins.__dict__
        with b.builtin_trap, b.display_trap:
            dispatcher = sys.displayhook
            assert dispatcher is not a.displayhook and dispatcher is not b.displayhook
            assert builtins.get_ipython() is b  # outside any cell: the latest holder
            with a.builtin_trap, a.display_trap:  # nesting counts, installs nothing new
                assert sys.displayhook is dispatcher
            assert a.display_trap.is_active and b.display_trap.is_active
        assert not b.display_trap.is_active
        assert sys.displayhook is a.displayhook
        assert builtins.get_ipython() is a
    assert not a.display_trap.is_active
    assert _shared_process_state() == before


# --- patches 0003-0008: close, history, __main__, autoawait, streams, process-wide magics


def test_crosstalk_counters_are_all_zero():
    """Issue 4's counter test: 16 shells x 500 cells racing (PYREPL3_CROSSTALK=SxC
    to resize); every cross-talk counter of every shell is 0, nothing is left on
    ``sys``/``builtins`` once the shells are closed."""
    from tests.crosstalk import run_crosstalk, size_from_env, table

    counts, left = run_crosstalk(*size_from_env("16x500"))
    print("\n" + table(counts, left))
    wrong = {(tag, name): n for tag, row in counts.items() for name, n in row.items() if n}
    assert wrong == {}
    assert left == []


def _config():
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    return config


def test_closed_shell_is_garbage_collected():
    import gc
    import weakref

    from IPython.core import getipython

    before = _shared_process_state(), sys.modules.get("__main__")
    shells = [InteractiveShell(config=_config()) for _ in range(3)]
    for shell in shells:
        assert shell.run_cell("class A: pass\nA()", store_history=True).success
    refs = [weakref.ref(s) for s in shells]
    shells[1].close()
    shells[1].close()  # twice is harmless
    for shell in (shells[0], shells[2]):
        shell.close()
    del shells, shell
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert (_shared_process_state(), sys.modules.get("__main__")) == before
    assert getipython.current_shell.get() is None


def test_close_unregisters_atexit_and_stops_the_history_thread(tmp_path):
    import atexit

    config = Config()
    config.HistoryManager.hist_file = str(tmp_path / "h.sqlite")
    shell = InteractiveShell(config=config)
    thread = shell.history_manager.save_thread
    assert thread is not None and thread.is_alive()
    calls = []
    real_register = atexit.unregister
    try:
        atexit.unregister = lambda f: (calls.append(f), real_register(f))
        shell.close()
    finally:
        atexit.unregister = real_register
    assert shell.atexit_operations in calls
    assert not thread.is_alive()
    assert shell.history_manager is None


def test_history_outputs_are_per_shell():
    a, b = (InteractiveShell(config=_config()) for _ in range(2))
    try:
        a.run_cell("print('from a')", store_history=True)
        assert a.history_manager.outputs is not b.history_manager.outputs
        assert "from a" not in str(dict(b.history_manager.outputs))
        b.history_manager.reset()
        assert "from a" in str(dict(a.history_manager.outputs))
    finally:
        a.close()
        b.close()


def test_a_second_shell_on_the_same_history_file_keeps_it_in_memory(tmp_path):
    config = Config()
    config.HistoryManager.hist_file = str(tmp_path / "h.sqlite")
    a = InteractiveShell(config=config)
    b = InteractiveShell(config=config)
    try:
        assert str(a.history_manager.hist_file) == str(tmp_path / "h.sqlite")
        assert str(b.history_manager.hist_file) == ":memory:"
    finally:
        a.close()
        b.close()
    config.HistoryManager.secondary_in_memory = False  # the old behaviour, on request
    c = InteractiveShell(config=config)
    d = InteractiveShell(config=config)
    try:
        assert str(d.history_manager.hist_file) == str(tmp_path / "h.sqlite")
    finally:
        c.close()
        d.close()


def test_history_thread_survives_a_locked_database(tmp_path):
    import sqlite3

    path = tmp_path / "h.sqlite"
    config = Config()
    config.HistoryManager.hist_file = str(path)
    config.HistoryManager.connection_options = {"timeout": 0}  # fail at once when locked
    shell = InteractiveShell(config=config)
    try:
        hm = shell.history_manager
        # observe the saving thread's writes (the instance attribute shadows
        # the method; the thread looks it up on each save)
        failed, saved = threading.Event(), threading.Event()
        writeout = hm.writeout_cache

        def observed(*args, **kwargs):
            try:
                writeout(*args, **kwargs)
            except sqlite3.OperationalError:
                failed.set()
                raise
            saved.set()

        hm.writeout_cache = observed
        lock = sqlite3.connect(str(path), isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        for i in range(5):
            shell.run_cell(f"x{i} = {i}", store_history=True)
        failed.clear()  # a write attempted after the five cells, while locked
        assert failed.wait(30), "the saving thread never tried to write"
        assert hm.save_thread.is_alive()
        # nothing was dropped: the five lines wait in the cache
        assert [source for _, source, _ in hm.db_input_cache] == [f"x{i} = {i}" for i in range(5)]
        saved.clear()
        lock.execute("COMMIT")
        lock.close()
        assert saved.wait(30), "the saving thread never wrote after the lock went"
        with sqlite3.connect(str(path)) as db:
            stored = db.execute("SELECT source FROM history WHERE session = ? ORDER BY line",
                                (hm.session_number,)).fetchall()
        assert [s for (s,) in stored] == [f"x{i} = {i}" for i in range(5)]
    finally:
        shell.close()


MAIN_CELL = """\
import dataclasses, inspect, pickle, sys, typing
@dataclasses.dataclass
class Point:
    x: int
    y: "int" = 0
def shift(p: "Point", by: "int") -> "Point":
    return Point(p.x + by, p.y)
_report = (
    pickle.loads(pickle.dumps(Point(1, 2))) == Point(1, 2),
    typing.get_type_hints(shift) == {"p": Point, "by": int, "return": Point},
    "return Point(p.x + by" in inspect.getsource(shift),
    sys.modules["__main__"].Point is Point,
    sys.modules["__main__"].__dict__ is globals(),
)
"""


def test_main_module_answers_for_each_shell(two_shells):
    """Classes defined in any shell pickle, and typing/dataclasses/inspect find them."""
    for shell in two_shells + two_shells:  # alternate, neither is the last built
        assert shell.run_cell(MAIN_CELL, store_history=True).success
        assert shell.user_ns["_report"] == (True,) * 5


def test_main_module_is_the_shells_own_while_alone():
    before = sys.modules.get("__main__")
    shell = InteractiveShell(config=_config())
    try:
        others = [s for s in _open_shells() if s is not shell]
        if not others:
            assert sys.modules["__main__"] is shell.user_module
    finally:
        shell.close()
    assert sys.modules.get("__main__") is before


def _open_shells():
    from IPython.core import interactiveshell

    return [s for s in interactiveshell._open_shells.values() if not s._closed]


def test_concurrent_top_level_await_cells(two_shells):
    failures = []

    def drive(shell):
        for i in range(40):
            result = shell.run_cell(f"import asyncio\nawait asyncio.sleep(0)\n{i}",
                                    store_history=False)
            if result.result != i:
                failures.append(result.error_in_exec or result.error_before_exec)

    race(*[(drive, (s,)) for s in two_shells])
    assert failures == []


def test_capture_output_keeps_the_stream_objects(two_shells):
    from IPython.utils.capture import capture_output

    out, err, hook = sys.stdout, sys.stderr, sys.displayhook
    with capture_output(shell=two_shells[0]) as cap:
        assert sys.stdout is out and sys.stderr is err
        print("to the capture")
        two_shells[0].run_cell("print('cell'); 7", store_history=True)
    assert cap.stdout.splitlines()[0] == "to the capture"
    assert "cell" in cap.stdout and "Out[" in cap.stdout
    assert "write" not in vars(sys.stdout)
    assert sys.displayhook is hook


def test_capture_inside_a_cell_captures_that_cells_value(two_shells):
    shell = two_shells[0]
    code = ("from IPython.utils.capture import capture_output\n"
            "with capture_output() as _cap:\n"
            "    print('inner')\n"
            "    import sys; sys.displayhook(41)\n"
            "_inner = _cap\n"
            "42\n")
    result = shell.run_cell(code, store_history=True)
    assert result.success and result.result == 42  # the trap's own hook is back
    inner = shell.user_ns["_inner"]
    assert inner.stdout == "inner\n"
    assert [o.data["text/plain"] for o in inner.outputs] == ["41"]


def test_process_wide_magics_are_refused_in_secondary_shells(two_shells, tmp_path):
    import os

    from IPython.core.error import UsageError

    secondary = [s for s in two_shells if s.is_secondary]
    assert secondary  # at least the later of the two
    shell = secondary[-1]
    cwd = os.getcwd()
    for line, what in ((f"cd {tmp_path}", "%cd"), ("env PYREPL3_X=1", "environment variable"),
                       ("reset -f --aggressive", "%reset --aggressive")):
        with pytest.raises(UsageError, match=what):
            name, _, arg = line.partition(" ")
            shell.run_line_magic(name, arg)
    assert os.getcwd() == cwd and "PYREPL3_X" not in os.environ
    assert shell.run_line_magic("env", "PATH") == os.environ["PATH"]  # reading is fine


def test_timeit_gc_switch_is_serialized(two_shells):
    import gc

    assert gc.isenabled()
    race(*[(s.run_line_magic, ("timeit", "-n 200 -r 3 -q sum(range(50))")) for s in two_shells])
    assert gc.isenabled()
