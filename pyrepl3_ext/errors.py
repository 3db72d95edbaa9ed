"""Exceptions that pyrepl3 raises into cells or hands to hosts.

They live in one small module with no imports of our own so every other
module (and user code that wants to catch them) can import them cheaply.
"""

from __future__ import annotations


class PyREPL3Error(Exception):
    """Base class for errors the engine reports to the host (never into a cell)."""


class CellCancelled(BaseException):
    """Raised inside a cell that was cancelled or ran past its deadline.

    It derives from ``BaseException`` and not from ``Exception`` so that the
    common ``except Exception:`` in user code does not swallow a cancel, the
    same choice as ``KeyboardInterrupt``, ``asyncio.CancelledError`` and
    trio's ``Cancelled``.  It does not derive from ``KeyboardInterrupt``: a
    host must be able to tell "the user pressed Ctrl-C" from "the engine
    cancelled this execution", and libraries that special-case
    ``KeyboardInterrupt`` (e.g. to print "Interrupted") should not fire.

    ``kind`` is ``"cancelled"`` or ``"timeout"``; it becomes the ``kind`` of
    the execution's ``error`` event.
    """

    def __init__(self, reason: str = "cancelled", kind: str = "cancelled",
                 execution_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.execution_id = execution_id

    def __str__(self) -> str:
        return self.reason

    def _render_traceback_(self) -> list[str]:
        """What IPython shows for a cancelled cell (its hook for exceptions
        that render themselves): the cell's own frames in plain text.

        IPython's context traceback (source scopes highlighted by pygments,
        formatted once for the screen and again for history) takes
        0.1-1.5 s, which a cancel would otherwise wait for; it would also
        show the frame of the engine that raised the exception.
        """
        from IPython import get_ipython

        from .extension import format_traceback

        return "".join(format_traceback(self, get_ipython())).rstrip("\n").split("\n")


class CellTimeout(CellCancelled):
    """A :class:`CellCancelled` caused by a deadline (``kind == "timeout"``)."""

    def __init__(self, reason: str = "deadline exceeded",
                 execution_id: str | None = None):
        super().__init__(reason, kind="timeout", execution_id=execution_id)


class SecurityError(PyREPL3Error):
    """A cell tried something its session's security policy forbids."""


class SessionBusy(PyREPL3Error):
    """An execute request arrived while the session was running a cell
    and the caller asked not to queue."""


class ConcurrencyUnsupported(PyREPL3Error):
    """Concurrent execution was requested on a stock (unpatched) IPython."""


class NamespaceError(PyREPL3Error):
    """A namespace or snapshot request could not be carried out."""


class VariableNotFound(NamespaceError, KeyError):
    """The session has no variable of that name (a ``KeyError`` too)."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else "variable not found"


class SnapshotNotFound(NamespaceError, KeyError):
    """The session has no snapshot of that name (a ``KeyError`` too)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "snapshot not found"


class ProtectedName(NamespaceError, ValueError):
    """A host tried to set or delete one of IPython's own names (``In``, ``_``...)."""


class SnapshotRefused(NamespaceError):
    """A snapshot file failed verification (wrong key, modified, not a snapshot):
    it was not unpickled."""


class SessionClosed(PyREPL3Error):
    """Work was sent to an engine session that is closed (or closing)."""


class CellError(PyREPL3Error):
    """A cell's exception as a session process reported it: the exception
    object stays in that process, its name, message and kind cross."""

    def __init__(self, ename: str, evalue: str, kind: str = "exception"):
        super().__init__(f"{ename}: {evalue}" if evalue else ename)
        self.ename = ename
        self.evalue = evalue
        self.kind = kind


class SessionLost(PyREPL3Error):
    """The session's process ended (crash, limit, kill): ``kind`` names the
    cause (``crashed``, ``oom``, ``cpu_limit``, ``killed``, ``exited``,
    ``failed``); ``session.restart()`` gives it a fresh process."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
