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
