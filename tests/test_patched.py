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
        main, sys.displayhook, sys.excepthook, sys.stdout, sys.stderr, gi = saved
        if main is not None:
            sys.modules["__main__"] = main
        if gi is None:
            builtins.__dict__.pop("get_ipython", None)
        else:
            builtins.get_ipython = gi


def race(*jobs):
    """Run each ``(target, args)`` in its own thread, all at once, with a tiny
    switch interval so the threads interleave inside every cell; wait for all."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=target, args=args) for target, args in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)


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
