"""``input()`` and ``getpass.getpass()`` answered by the host, in any cell or thread.

A session is *driven by a host* while at least one subscriber declared it
answers input (``pyrepl3_ext.subscribe(shell, callback, handles_input=True)``).
Then, in that session's cells and in the threads they start, ``input(prompt)``:

1. flushes the execution's partial output lines, writes the prompt to
   stdout (so it is in the ``output`` events exactly once, before the
   reply), and emits ``input_requested`` (``input_id``, ``prompt``,
   ``password``);
2. blocks until ``pyrepl3_ext.reply_input(shell, input_id, text)``;
   ``text=None`` means end of input and raises ``EOFError``;
   ``c.PyREPL3.input_timeout`` raises ``TimeoutError``; a cancel of the
   cell raises its ``CellCancelled`` at once (``interruptible_wait``);
   the cell ending or the host leaving raises ``EOFError``;
3. echoes the reply and a newline to stdout (``c.PyREPL3.input_echo``;
   only the newline for a password) and returns it.

``builtins.input`` and ``getpass.getpass`` are replaced once per process
(first load) by dispatchers that look up the calling thread's execution on
every call, so nothing is bound to one cell (the earlier implementation's
shim answered "shutting down" from the second cell on).  With no host, or
outside a cell, they call what the module attribute holds now when
something replaced them in turn (ipykernel installs its stdin reader per
request on top of ours; a session under a policy holds our dispatcher in
its own builtins dict and still reaches it), else what they replaced: stock
behaviour.  The last unload puts the originals back.
"""

from __future__ import annotations

import builtins
import getpass
import itertools
import sys
import threading
import time
from typing import Any, Callable

from . import io_capture
from .extension import Component

#: seconds between cancellation checks of a wait in a thread the cell started
#: (the cell's own thread is woken at once by ``interruptible_wait``)
_FOREIGN_THREAD_POLL = 0.05

_install_lock = threading.Lock()
_users = 0
_saved: dict[str, Any] = {}


def _host_component() -> "tuple[InputRequests, Any] | None":
    cap = io_capture.routed_capture()
    if cap is None:
        return None
    component = getattr(cap.component.state, "input_request", None)
    if component is None or not component.hosts:
        return None
    return component, cap


#: The dispatchers replacing ``builtins.input``/``getpass.getpass``.  Their
#: code gets a filename outside this package on purpose: cancellation never
#: raises inside pyrepl3's own frames (they keep its bookkeeping consistent),
#: but these frames hold nothing, and a cell blocked in the *stock* input()
#: they fall back to (a terminal read) must still be interruptible.
_DISPATCHER_SOURCE = """\
def input(prompt=""):
    found = _host_component()
    if found is None:
        current = _builtins.input
        return (_saved["input"] if current is input else current)(prompt)
    component, cap = found
    return component.request(cap, prompt, password=False)


def getpass(prompt="Password: ", stream=None):
    found = _host_component()
    if found is None:
        current = _getpass_module.getpass
        return (_saved["getpass"] if current is getpass else current)(prompt, stream)
    component, cap = found
    return component.request(cap, prompt, password=True, stream=stream)
"""
_dispatchers: dict[str, Any] = {"__name__": __name__, "_host_component": _host_component,
                               "_saved": _saved, "_builtins": builtins,
                               "_getpass_module": getpass}
exec(compile(_DISPATCHER_SOURCE, "<pyrepl3 input dispatcher>", "exec"), _dispatchers)
_input = _dispatchers["input"]
_getpass = _dispatchers["getpass"]
_input.__doc__ = builtins.input.__doc__
_getpass.__doc__ = getpass.getpass.__doc__


def capability() -> Any:
    """The reserved ``input`` capability (``security.capabilities.RESERVED``).

    Policies that remove the ``input`` builtin (``restricted``) let a host
    grant this instead: ``pyrepl3_ext.grant(shell, "input", capability())``
    gives cells ``input(prompt="", password=False)``, asked of the host
    exactly like the builtin (an ``input_requested`` event).
    """
    from .security.capabilities import CustomCapability

    def ask(prompt: str = "", password: bool = False) -> str:
        return getpass(prompt) if password else input(prompt)

    return CustomCapability(ask, {"prompt": str, "password": bool},
                            optional=("prompt", "password"),
                            description="a line of input from the host")


def _acquire_dispatchers() -> None:
    global _users
    with _install_lock:
        _users += 1
        if _users == 1:
            _saved["input"] = builtins.input
            _saved["getpass"] = getpass.getpass
            builtins.input = _input
            getpass.getpass = _getpass


def _release_dispatchers() -> None:
    global _users
    with _install_lock:
        _users -= 1
        if _users > 0:
            return
        if builtins.input is _input:
            builtins.input = _saved["input"]
        if getpass.getpass is _getpass:
            getpass.getpass = _saved["getpass"]
        _saved.clear()


class _Pending:
    __slots__ = ("event", "text", "execution", "why")

    def __init__(self, execution: Any):
        self.event = threading.Event()
        self.text: str | None = None
        self.execution = execution
        self.why = ""


class InputRequests(Component):
    """Per-shell: the hosts answering input and the requests waiting for them."""

    name = "input_request"
    #: idle while no input request waits (after_cell ends leftover ones)
    idle = True

    def __init__(self, state: Any):
        super().__init__(state)
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._hosts = 0
        self._installed = False

    @property
    def hosts(self) -> int:
        """How many subscribers answer input (0: ``input()`` is stock)."""
        return self._hosts

    def attach(self) -> None:
        _acquire_dispatchers()
        self._installed = True

    def detach(self) -> None:
        self._end_all(lambda p: True, "the pyrepl3 extension was unloaded")
        if self._installed:
            _release_dispatchers()
            self._installed = False

    def after_cell(self, execution: Any, result: Any) -> None:
        if self._pending:  # a thread of the cell still waits: its cell is over
            self._end_all(lambda p: p.execution is execution,
                          "the cell that asked for input has finished")

    # -- hosts ---------------------------------------------------------------
    def add_host(self) -> Callable[[], None]:
        """Declare a host answering input; returns the (idempotent) release."""
        with self._lock:
            self._hosts += 1
        released = []

        def release() -> None:
            with self._lock:
                if released:
                    return
                released.append(True)
                self._hosts -= 1
                last = self._hosts == 0
            if last:
                self._end_all(lambda p: True, "the host stopped answering input")

        return release

    def _end_all(self, which, why: str) -> None:
        with self._lock:
            ended = [p for p in self._pending.values() if which(p)]
        for pending in ended:
            pending.why = why
            pending.event.set()  # text stays None: EOFError

    def reply(self, input_id: str, text: str | None) -> bool:
        """Answer ``input_id``; None is end of input.  False if nobody waits for it."""
        if text is not None and not isinstance(text, str):
            raise TypeError(f"reply text must be a str or None, got {type(text).__name__}")
        with self._lock:
            pending = self._pending.pop(input_id, None)
            self.set_idle(not self._pending)
        if pending is None:
            return False
        if text is not None:
            if text.endswith("\r\n"):
                text = text[:-2]
            elif text.endswith("\n"):
                text = text[:-1]
        else:
            pending.why = "the host sent end of input"
        pending.text = text
        pending.event.set()
        return True

    def waiting(self) -> list[str]:
        """Ids of the input requests waiting for a reply."""
        with self._lock:
            return list(self._pending)

    # -- the request -----------------------------------------------------------
    def request(self, cap: Any, prompt: Any, *, password: bool, stream: Any = None) -> str:
        prompt = "" if prompt is None else str(prompt)
        execution = cap.execution
        out = stream if stream is not None else sys.stdout
        cap.flush()  # the execution's partial lines come before the prompt
        if prompt:
            out.write(prompt)
        out.flush()  # the prompt itself is an output event now
        input_id = f"{execution.id}-input-{next(self._ids)}"
        pending = _Pending(execution)
        with self._lock:
            self._pending[input_id] = pending
            self.set_idle(False)
        try:
            sent = cap.emit_event("input_requested", {"input_id": input_id, "prompt": prompt,
                                                      "password": password})
            if sent is None:
                raise EOFError("input(): no host listens to this execution any more")
            manager = getattr(self.state, "cancellation", None)
            scope = manager.scope_of(execution.id) if manager is not None else None
            self._wait(pending, scope, self.state.config.input_timeout)
        finally:
            with self._lock:
                self._pending.pop(input_id, None)
                self.set_idle(not self._pending)
        text = pending.text
        if text is None:
            raise EOFError(pending.why or "end of input")
        if self.state.config.input_echo:
            out.write("\n" if password else text + "\n")
        return text

    @staticmethod
    def _wait(pending: _Pending, scope: Any, timeout: float) -> None:
        try:
            from .cancellation import interruptible_wait
        except ImportError:  # pragma: no cover - cancellation always ships
            def interruptible_wait(event, timeout=None):
                return event.wait(timeout)
        own_thread = scope is None or scope.thread_id == threading.get_ident()
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            step = None if deadline is None else deadline - time.monotonic()
            if step is not None and step <= 0:
                raise TimeoutError(f"no reply to input() within {timeout:g} s "
                                   f"(c.PyREPL3.input_timeout)")
            if not own_thread:
                # a cancel wakes only the cell's own thread: look at its scope
                step = _FOREIGN_THREAD_POLL if step is None else min(step, _FOREIGN_THREAD_POLL)
            woken = interruptible_wait(pending.event, step)
            if scope is not None and scope.cancel_called and pending.text is None:
                # cancelled (also when the cell's end woke a thread of it)
                raise scope.exception()
            if woken:
                return
