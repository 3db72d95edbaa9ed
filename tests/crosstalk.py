"""Cross-talk counter: many shells run cells concurrently from threads.

Used by ``test_patched.py`` (every counter 0 on the patched build) and by
``test_crosstalk_stock.py`` (the same harness on stock IPython must count
cross-talk, so the patched test can fail).  Size: ``PYREPL3_CROSSTALK``
``=SHELLSxCELLS`` (default 16x500 on the patched build).
"""

from __future__ import annotations

import builtins
import gc
import inspect
import os
import re
import sys
import threading
from collections import Counter

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

from pyrepl3_ext.cancellation import _thread_frames  # sys._current_frames, deadlock-safe

#: Counters, one row per shell, in the order they are printed.
COUNTERS = (
    "ExecutionResult.result", "Out[n]", "_", "capture: own output missing",
    "capture: foreign output", "ns get_ipython()", "IPython.get_ipython()",
    "builtins.get_ipython()", "display() misrouted", "__main__ wrong",
    "pickling a cell class", "traceback label", "history outputs mixed",
    "top-level await failed", "driver crashed",
)

#: Run once per shell before the race: a class to pickle, and the probe each
#: cell calls (a function of the shell's namespace, run inside the cell).
SETUP_CELL = """\
import IPython as _IP, builtins as _b, pickle as _pk, sys as _sys
from IPython.display import display as _display

class Thing:
    def __init__(self, v):
        self.v = v

def _probe(tag, i):
    _c["ns get_ipython()"] += get_ipython() is not _me
    _c["IPython.get_ipython()"] += _IP.get_ipython() is not _me
    _c["builtins.get_ipython()"] += _b.get_ipython() is not _me
    _c["__main__ wrong"] += _sys.modules["__main__"].__dict__ is not globals()
    try:
        t = _pk.loads(_pk.dumps(Thing(i)))
        _c["pickling a cell class"] += not (type(t) is Thing and t.v == i)
    except Exception:
        _c["pickling a cell class"] += 1
    print(f"out-{tag}-{i}")
    _display({"text/plain": f"disp-{tag}-{i}"}, raw=True)
"""

#: One cell: checks what it sees of "its" shell, prints, displays and ends in
#: a value tagged with its shell and index.  ``{extra}`` makes it a
#: top-level-await cell or a raising one.
CELL = """\
_probe("{tag}", {i})
{extra}
("{tag}", {i})
"""
AWAIT = "import asyncio as _a\nawait _a.sleep(0)"
RAISE = 'raise ValueError("boom-{tag}-{i}")'
MARKER = re.compile(r"\b(out|disp|boom)-(S\d+)-(\d+)\b")


def _kind(i: int) -> str:
    if i % 25 == 7:
        return "raise"
    if i % 10 == 3:
        return "await"
    return "plain"


def _process_state() -> dict:
    """What a shell may change in the process and must not leave behind."""
    return {
        "sys.displayhook": sys.displayhook,
        "sys.excepthook": sys.excepthook,
        "sys.stdout": sys.stdout,
        "sys.stderr": sys.stderr,
        "sys.stdout.write": vars(sys.stdout).get("write") if hasattr(sys.stdout, "__dict__") else None,
        "sys.stderr.write": vars(sys.stderr).get("write") if hasattr(sys.stderr, "__dict__") else None,
        "__main__": sys.modules.get("__main__"),
        **{f"builtins.{n}": builtins.__dict__.get(n) for n in ("get_ipython", "_", "exit", "quit")},
        "gc enabled": gc.isenabled(),
    }


def capture_kwargs(shell) -> dict:
    """``capture_output(shell=...)`` where supported (the patched build): the
    driver thread enters the capture outside any cell, where no shell is
    current.  Stock IPython captures the singleton's display instead."""
    params = inspect.signature(capture_output.__init__).parameters
    return {"shell": shell} if "shell" in params else {}


def size_from_env(default: str) -> tuple[int, int]:
    shells, _, cells = os.environ.get("PYREPL3_CROSSTALK", default).partition("x")
    return int(shells), int(cells)


def _in_selector(thread: threading.Thread) -> bool:
    frame = _thread_frames().get(thread.ident)
    return frame is not None and frame.f_code.co_name == "select" \
        and "selectors" in frame.f_code.co_filename


def _unwedge_shared_loop() -> None:
    """Stop stock IPython's process-wide asyncio loop once (thread-safely).

    On stock IPython every shell runs its await cells with
    ``run_until_complete`` on that one loop.  When two threads race there,
    one thread's ``_run_once`` can run the other's task to completion, and
    the ``stop()`` meant for the other thread's ``run_forever`` is consumed
    by its own: the other thread then waits in the selector for ever (it
    hung CI on 3.13).  That is cross-talk too, but a thread that never
    returns cannot be counted: the harness stops the loop so the wedged
    ``run_until_complete`` returns (the patched build gives every thread its
    own loop, and never gets here).
    """
    from IPython.core import async_helpers

    loop = getattr(async_helpers, "_asyncio_event_loop", None)
    if loop is not None and not loop.is_closed():
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass


def race(*jobs):
    """Run each ``(target, args)`` in its own thread, all at once, with a tiny
    switch interval so the threads interleave inside every cell; wait for all.

    A thread seen waiting in an asyncio selector twice in a row, 1 s apart,
    is wedged on the shared loop (``_unwedge_shared_loop``).
    """
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=target, args=args, daemon=True)
                   for target, args in jobs]
        for t in threads:
            t.start()
        seen_waiting: set[int] = set()
        for t in threads:
            while t.is_alive():
                t.join(1.0)
                waiting = {x.ident for x in threads if x.is_alive() and _in_selector(x)}
                if waiting & seen_waiting:
                    _unwedge_shared_loop()
                seen_waiting = waiting
    finally:
        sys.setswitchinterval(old_interval)


def _closing_runner(runner):
    """``runner`` that closes a cell's coroutine it refused before starting it.

    On stock IPython every shell's top-level-await cells share one asyncio
    loop; a second thread's ``run_until_complete`` fails with "This event
    loop is already running" (counted as "top-level await failed") and
    IPython's ``_run_cell`` drops the coroutine unstarted, which Python then
    reports as "coroutine ... was never awaited" wherever it is collected.
    Closing it here keeps that known cross-talk out of the warnings, which
    the test run treats as errors.
    """
    def run(coro):
        try:
            return runner(coro)
        except BaseException:
            coro.close()
            raise

    return run


def run_crosstalk(n_shells: int, n_cells: int) -> tuple[dict[str, Counter], list[str]]:
    """Race ``n_shells`` shells, ``n_cells`` cells each, one thread per shell.

    Returns the counters per shell and the process state left behind after
    the shells are closed (names of what differs from before).  Process
    state is restored afterwards either way.
    """
    # stock IPython creates its shared loop on first use, unlocked: threads racing
    # there each make one, and the ones overwritten are collected unclosed (a
    # ResourceWarning in whichever later test the gc runs).  The loop's sharing
    # is counted below ("top-level await failed"); its creation is not what is
    # measured, so it happens once, before the race.
    from IPython.core.async_helpers import get_asyncio_loop

    get_asyncio_loop()
    before = _process_state()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    config.InteractiveShell.colors = "nocolor"
    config.InteractiveShell.xmode = "Plain"  # the label is the same, the formatting 10x cheaper
    tags = [f"S{k}" for k in range(n_shells)]
    shells = {tag: InteractiveShell(config=config) for tag in tags}
    counts = {tag: Counter({name: 0 for name in COUNTERS}) for tag in tags}
    own_markers: dict[str, set] = {tag: set() for tag in tags}
    for tag, shell in shells.items():
        shell.user_ns.update(_me=shell, _c=counts[tag])
        shell.loop_runner = _closing_runner(shell.loop_runner)
        assert shell.run_cell(SETUP_CELL, store_history=True).success
    barrier = threading.Barrier(n_shells)

    def drive(tag: str) -> None:
        shell, c = shells[tag], counts[tag]
        barrier.wait()
        try:
            for i in range(n_cells):
                kind = _kind(i)
                extra = {"await": AWAIT, "raise": RAISE, "plain": ""}[kind].format(tag=tag, i=i)
                with capture_output(**capture_kwargs(shell)) as cap:
                    result = shell.run_cell(CELL.format(tag=tag, i=i, extra=extra),
                                            store_history=True)
                expected = (tag, i)
                if kind == "await" and not result.success:
                    c["top-level await failed"] += 1
                    continue
                own_markers[tag].add(f"out-{tag}-{i}")
                if kind == "raise":
                    if f"boom-{tag}-{i}" not in str(result.error_in_exec):
                        c["ExecutionResult.result"] += 1
                    if f"Cell In[{result.execution_count}], line " not in cap.stdout:
                        c["traceback label"] += 1
                else:
                    c["ExecutionResult.result"] += result.result != expected
                    c["Out[n]"] += shell.user_ns["Out"].get(result.execution_count) != expected
                    c["_"] += shell.user_ns.get("_") != expected
                seen = list(MARKER.finditer(cap.stdout))  # a traceback quotes the cell's source
                c["capture: own output missing"] += f"out-{tag}-{i}" not in {m.group(0) for m in seen}
                c["capture: foreign output"] += any(m.group(2, 3) != (tag, str(i)) for m in seen)
                shown = [o.data.get("text/plain") for o in cap.outputs]
                c["display() misrouted"] += shown != [f"disp-{tag}-{i}"]
        except BaseException:  # noqa: BLE001 - a racing trap can raise anywhere
            c["driver crashed"] += 1

    race(*[(drive, (tag,)) for tag in tags])

    for tag, shell in shells.items():
        found = Counter()
        for outputs in list(shell.history_manager.outputs.values()):
            for out in outputs:
                for m in MARKER.finditer(str(out.bundle)):
                    found[m.group(2) == tag] += 1
                    if m.group(1) == "out" and m.group(2) == tag:
                        own_markers[tag].discard(m.group(0))
        # foreign markers, plus own prints the history never recorded
        counts[tag]["history outputs mixed"] += found[False] + len(own_markers[tag])

    for shell in shells.values():
        close = getattr(shell, "close", None)  # the patched build's InteractiveShell.close
        if close is not None:
            close()
    after = _process_state()
    left = [name for name in before if after[name] is not before[name] and after[name] != before[name]]
    _restore(before)
    return counts, left


def _restore(state: dict) -> None:
    sys.displayhook = state["sys.displayhook"]
    sys.excepthook = state["sys.excepthook"]
    sys.stdout, sys.stderr = state["sys.stdout"], state["sys.stderr"]
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if hasattr(stream, "__dict__"):
            if state[f"sys.{name}.write"] is None:
                vars(stream).pop("write", None)
            else:
                stream.write = state[f"sys.{name}.write"]
    if state["__main__"] is not None:
        sys.modules["__main__"] = state["__main__"]
    for key, value in state.items():
        if key.startswith("builtins."):
            name = key[len("builtins."):]
            if value is None:
                builtins.__dict__.pop(name, None)
            else:
                builtins.__dict__[name] = value
    if state["gc enabled"]:
        gc.enable()


def table(counts: dict[str, Counter], left: list[str]) -> str:
    """The counters as a text table: one column per shell, plus the total."""
    tags = list(counts)
    head = ["counter"] + tags + ["total"]
    rows = [[name] + [str(counts[t][name]) for t in tags] + [str(sum(counts[t][name] for t in tags))]
            for name in COUNTERS]
    rows.append(["process state left behind"] + [""] * len(tags) + [", ".join(left) or "0"])
    widths = [max(len(r[k]) for r in [head] + rows) for k in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if k else cell.ljust(w)
                               for k, (cell, w) in enumerate(zip(r, widths)))
                     for r in [head] + rows)
