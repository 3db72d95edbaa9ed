"""pyrepl3_ext: IPython as a controllable execution engine.

Load it in any IPython 8.12+/9.x shell with ``%load_ext pyrepl3_ext`` (or
``c.InteractiveShellApp.extensions = ["pyrepl3_ext"]``).  Hosts use the
functions below on a shell of their own, or ``Engine`` for sessions the
engine creates (``docs/engine.md``); ``docs/architecture.md`` says where
each capability lives.
"""

from __future__ import annotations

from typing import Any, Callable

from ._version import __version__
from .errors import (CellCancelled, CellTimeout, ConcurrencyUnsupported, NamespaceError,
                     ProtectedName, PyREPL3Error, SecurityError, SessionBusy, SessionClosed,
                     SnapshotNotFound, SnapshotRefused, VariableNotFound)
from .extension import get_state, require_state
from .namespace import (delete_snapshot, delete_variable, get_variable, list_snapshots,
                        list_variables, load_snapshot, restore_snapshot, save_snapshot,
                        set_variable, take_snapshot, update_variables)

__all__ = [
    "__version__", "load_ipython_extension", "unload_ipython_extension",
    "get_state", "subscribe", "run_cell", "run_cell_async", "cancel", "reply_input",
    "CellCancelled", "CellTimeout", "ConcurrencyUnsupported", "PyREPL3Error",
    "SecurityError", "SessionBusy", "SessionClosed", "Engine", "Session",
    "ExecutionHandle", "set_policy", "get_policy", "grant", "revoke",
    # namespace manager (pyrepl3_ext.namespace)
    "get_variable", "set_variable", "update_variables", "delete_variable",
    "list_variables", "take_snapshot", "restore_snapshot", "delete_snapshot",
    "list_snapshots", "save_snapshot", "load_snapshot", "NamespaceError",
    "ProtectedName", "SnapshotNotFound", "SnapshotRefused", "VariableNotFound",
]

#: Names imported on first use, so ``import pyrepl3_ext`` (which every
#: shell loading the extension pays) does not import the engine.
_LAZY = {"Engine": "engine", "Session": "engine", "ExecutionHandle": "engine"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyrepl3_ext' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext pyrepl3_ext``; loading twice is harmless."""
    from . import extension

    extension.load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Called by ``%unload_ext pyrepl3_ext``: removes everything the extension added."""
    from . import extension

    extension.unload(ipython)


def cancel(shell: Any, execution_id: str, reason: str = "cancelled") -> bool:
    """Cancel a running execution of ``shell`` from any thread; True if it hit.

    See :mod:`pyrepl3_ext.cancellation` for the semantics.
    """
    from .cancellation import cancel as _cancel

    return _cancel(shell, execution_id, reason)


def subscribe(shell: Any, callback: Callable[[dict], None], *,
              handles_input: bool = False) -> Callable[[], None]:
    """Call ``callback(event)`` for every execution event of ``shell``.

    Returns a function that unsubscribes.  Callbacks run in the thread that
    produced the event and must be quick; an exception in one is reported
    once and does not affect the cell.

    ``handles_input=True`` declares that this subscriber answers
    ``input_requested`` events with :func:`reply_input`: while such a
    subscriber is subscribed, ``input()``/``getpass`` in the session's cells
    ask the host instead of the terminal (``docs/io.md``).
    """
    state = require_state(shell)
    unsubscribe = state.bus.subscribe(callback)
    if not handles_input:
        return unsubscribe
    inputs = getattr(state, "input_request", None)
    if inputs is None:
        unsubscribe()
        raise RuntimeError("input over the API is unavailable: the input_request "
                           "component did not load (see the internal error reported)")
    release = inputs.add_host()

    def unsubscribe_host() -> None:
        unsubscribe()
        release()

    return unsubscribe_host


def reply_input(shell: Any, input_id: str, text: str | None) -> bool:
    """Answer the ``input_requested`` event ``input_id`` of ``shell``, from any thread.

    ``text`` is what ``input()`` returns (one trailing newline is removed);
    None ends the input (``EOFError`` in the cell).  Returns False when no
    request with that id is waiting (already answered, timed out, cancelled).
    """
    return require_state(shell).input_request.reply(input_id, text)


def _options(execution_id: str | None, timeout: float | None,
             transaction: bool | None, mode: str | None) -> dict:
    options: dict = {}
    if execution_id is not None:
        if not isinstance(execution_id, str) or not execution_id:
            raise ValueError(f"execution_id must be a non-empty string, got {execution_id!r}")
        options["execution_id"] = execution_id
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        options["timeout"] = float(timeout)
    if transaction is not None:
        options["transaction"] = bool(transaction)
    if mode is not None:
        options["mode"] = mode
    return options


def run_cell(shell: Any, code: str, *, execution_id: str | None = None,
             timeout: float | None = None, transaction: bool | None = None,
             store_history: bool = True, silent: bool = False,
             cell_meta: dict | None = None, mode: str | None = None) -> Any:
    """Run ``code`` in ``shell`` like ``shell.run_cell``, with pyrepl3 options.

    ``execution_id`` names the execution in its events (generated when
    omitted); ``timeout`` is a deadline in seconds; ``transaction`` rolls the
    namespace back if the cell fails.  Returns IPython's ``ExecutionResult``,
    with ``pyrepl3_execution_id`` set.
    """
    from . import _compat
    from .extension import _pending_options

    require_state(shell)
    token = _pending_options.set([_options(execution_id, timeout, transaction, mode)])
    try:
        return shell.run_cell(code, store_history=store_history, silent=silent,
                              **_compat.run_cell_kwargs(cell_meta))
    finally:
        _pending_options.reset(token)


async def run_cell_async(shell: Any, code: str, *, execution_id: str | None = None,
                         timeout: float | None = None, transaction: bool | None = None,
                         store_history: bool = True, silent: bool = False,
                         cell_meta: dict | None = None, mode: str | None = None) -> Any:
    """The coroutine form of :func:`run_cell`, for hosts running an event loop.

    Top-level ``await`` in ``code`` runs on the caller's loop.  Note that
    IPython fires ``post_run_cell`` only from the synchronous ``run_cell``;
    this function fires it itself so the execution's events complete.
    """
    from . import _compat
    from .extension import _pending_options

    require_state(shell)
    token = _pending_options.set([_options(execution_id, timeout, transaction, mode)])
    result = None
    try:
        result = await _compat.run_cell_async(shell, code, store_history=store_history,
                                              silent=silent, cell_meta=cell_meta)
    finally:
        _pending_options.reset(token)
        shell.events.trigger("post_execute")
        if not silent:
            shell.events.trigger("post_run_cell", result)
    return result


def set_policy(shell: Any, policy: Any) -> None:
    """Apply a ``SecurityPolicy`` (or a preset name) to ``shell``'s session.

    Takes effect from the next cell; see :mod:`pyrepl3_ext.security`.
    """
    from .security.policy import SecurityPolicy

    require_state(shell).security.session.apply(SecurityPolicy.preset(policy))


def get_policy(shell: Any) -> Any:
    """The ``SecurityPolicy`` in force in ``shell``'s session."""
    return require_state(shell).security.session.policy


def grant(shell: Any, name: str, capability: Any) -> Any:
    """Inject ``capability`` (``FilesCapability``, ``CustomCapability``) as ``name``.

    Returns the opaque object cells see.  Granting a name again revokes the
    previous grant.
    """
    return require_state(shell).security.session.grant(name, capability)


def revoke(shell: Any, name: str) -> bool:
    """Make the capability ``name`` inert and remove it from the namespace."""
    return require_state(shell).security.session.revoke(name)
