"""Every difference between the IPython releases we support, in one place.

Supported: stock IPython 8.12 .. 9.x (and the patched 9.x build).  Other
modules never test ``IPython.version_info`` themselves; they call a helper
here, so adding a release means reading one file.
"""

from __future__ import annotations

import sys
from typing import Any

import IPython

IPYTHON_VERSION: tuple[int, ...] = tuple(IPython.version_info[:3])
IPYTHON_9 = IPYTHON_VERSION >= (9, 0)

#: 9.8+ increments ``shell.execution_count`` *before* ``pre_run_cell`` fires.
_COUNT_INCREMENTED_BEFORE_PRE_RUN = IPYTHON_VERSION >= (9, 8)
#: 9.16+ accepts ``cell_meta`` in ``run_cell`` and requires ``transformed_cell``
#: in ``run_cell_async``.
HAS_CELL_META = IPYTHON_VERSION >= (9, 16)


def is_patched_build() -> bool:
    """True when running on the pyrepl3-patched IPython (multi-instance shells).

    The patch series marks the build with a local version label and a module
    attribute; we look for either so a rebuilt wheel is recognised.
    """
    if "+pyrepl3" in getattr(IPython, "__version__", ""):
        return True
    from IPython.core import getipython

    return bool(getattr(getipython, "PYREPL3_MULTI_SHELL", False))


def has_protected_names(shell: Any) -> bool:
    """Whether this IPython has patch 0009 (capability-aware ``user_ns``).

    ``InteractiveShell.protected_names`` (refused by ``push``/``del_var``/
    ``reset_selective``/``drop_by_id``, re-injected by ``reset``) and
    ``BuiltinTrap.denied_names`` (the trap installs into a shell's own
    builtins dict).  A feature test, not a version test: any build carrying
    the patch qualifies.
    """
    return isinstance(getattr(shell, "protected_names", None), set) and isinstance(
        getattr(getattr(shell, "builtin_trap", None), "denied_names", None), set)


def execution_count_in_pre_run_cell(shell: Any, info: Any) -> int | None:
    """The ``ExecutionResult.execution_count`` of the cell announced in ``pre_run_cell``.

    9.8+ has already incremented the shell's count for a stored cell; before 9.8,
    IPython leaves ``execution_count`` as None for cells that are not stored.
    """
    store = getattr(info, "store_history", False)
    if not _COUNT_INCREMENTED_BEFORE_PRE_RUN and not store:
        return None
    count = shell.execution_count
    if _COUNT_INCREMENTED_BEFORE_PRE_RUN and store:
        count -= 1
    return count


def transformed_cell(info: Any) -> str | None:
    """``ExecutionInfo.transformed_cell`` (9.2+), else None."""
    return getattr(info, "transformed_cell", None)


def cell_is_async(shell: Any, info: Any) -> bool:
    """Whether IPython will run this cell as a coroutine (top-level await)."""
    raw = info.raw_cell or ""
    if "await" not in raw and "async" not in raw:
        return False  # fast path: the overwhelmingly common case
    if not getattr(shell, "autoawait", False):
        return False
    try:
        transformed = transformed_cell(info)
        if transformed is None:
            transformed = shell.transform_cell(raw)
        return bool(shell.should_run_async(raw, transformed_cell=transformed,
                                           preprocessing_exc_tuple=None))
    except Exception:
        return False


def run_cell_kwargs(cell_meta: dict | None) -> dict:
    """Keyword arguments for ``shell.run_cell`` that this IPython accepts."""
    if cell_meta is not None and HAS_CELL_META:
        return {"cell_meta": cell_meta}
    return {}


async def run_cell_async(shell: Any, raw_cell: str, *, store_history: bool,
                         silent: bool, cell_meta: dict | None = None):
    """``shell.run_cell_async`` with the transform done first (required on 9.16+)."""
    preprocessing_exc_tuple = None
    try:
        transformed = shell.transform_cell(raw_cell)
    except Exception:
        transformed = raw_cell
        preprocessing_exc_tuple = sys.exc_info()
    kwargs: dict = {"transformed_cell": transformed,
                    "preprocessing_exc_tuple": preprocessing_exc_tuple}
    kwargs.update(run_cell_kwargs(cell_meta))
    return await shell.run_cell_async(raw_cell, store_history=store_history,
                                      silent=silent, **kwargs)


def close_shell(shell: Any) -> None:
    """Release a shell the engine created and is done with.

    Builds with ``InteractiveShell.close()`` (the patch series) do it all
    there.  Elsewhere: IPython's own exit operations once (reset the
    namespace, end the history session), and the ``atexit`` registrations
    (the shell's, its ``ScriptMagics``') that would otherwise keep the shell
    alive until the process exits.
    """
    history = getattr(shell, "history_manager", None)
    try:
        close = getattr(shell, "close", None)
        if callable(close):
            close()
            return
        import atexit

        try:
            shell.atexit_operations()
        finally:
            atexit.unregister(shell.atexit_operations)
            # %%script --bg registers its own exit hook on the shell's ScriptMagics
            script = shell.magics_manager.registry.get("ScriptMagics")
            if script is not None:
                try:
                    script.kill_bg_processes()
                finally:
                    atexit.unregister(script.kill_bg_processes)
    finally:
        _close_history(history)


def _close_history(history: Any) -> None:
    """Close a finished shell's history database and saving thread.

    IPython ends the history *session* at exit but leaves the sqlite
    connection to the garbage collector (Python 3.13 warns about it:
    ``ResourceWarning: unclosed database``), and an engine shell is closed
    long before the process exits.
    """
    if history is None:
        return
    thread = getattr(history, "save_thread", None)
    if thread is not None and thread.is_alive() and hasattr(thread, "stop"):
        thread.stop()
    close = getattr(getattr(history, "db", None), "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - already closed, or a DummyDB
            pass

#: 9.1+ ``run_cell`` tees every stdout/stderr write into
#: ``history_manager.outputs`` (``InteractiveShell._tee``), without a bound.
HAS_TEED_OUTPUT_HISTORY = IPYTHON_VERSION >= (9, 1)


def bound_output_history(shell: Any, max_chars: int, execution_count: int | None = None) -> int:
    """Cut IPython's own copy of a cell's stream output to ``max_chars``.

    On 9.1+ a flood (``while True: print(...)``) would otherwise keep every
    write in memory however much pyrepl3 drops.  Keeps the head (what the
    events delivered).  Returns the characters removed; a no-op before 9.1.
    The cell is the one that ran as ``execution_count``; without it, the two
    latest entries.  Not "the latest" when the count is known: the history
    can hold later counts than the running cell's (a shell whose count was
    set back keeps its old entries), and the flood then stayed whole.
    """
    if not HAS_TEED_OUTPUT_HISTORY:
        return 0
    outputs = getattr(getattr(shell, "history_manager", None), "outputs", None)
    if not outputs:
        return 0
    removed = 0
    if execution_count is not None:
        counts: tuple = (execution_count,)
    else:
        latest = max(outputs)
        counts = (latest - 1, latest)
    for count in counts:
        for entry in outputs.get(count, ()):
            if getattr(entry, "output_type", "") not in ("out_stream", "err_stream"):
                continue
            chunks = entry.bundle.get("stream")
            if not isinstance(chunks, list):
                continue
            total = sum(map(len, chunks))
            if total <= max_chars:
                continue
            kept: list[str] = []
            size = 0
            for chunk in chunks:
                if size + len(chunk) >= max_chars:
                    kept.append(chunk[:max_chars - size])
                    break
                kept.append(chunk)
                size += len(chunk)
            chunks[:] = kept
            removed += total - max_chars
    return removed
