"""Per-execution output: stdout/stderr writes and ``display()`` become events.

Several cells may run at once in different threads (the patched build), so
``sys.stdout`` is never swapped per cell.  Instead one *routing stream* per
channel is installed process-wide when the first shell loads the extension
and removed when the last one unloads.  A write is attributed through the
writing thread:

* every thread has a current capture (a thread-local); ``before_cell`` of
  this component sets it to the execution's :class:`_Capture`,
  ``after_cell`` puts the previous one back (cells nest);
* a thread started while a capture is current inherits it:
  ``threading.Thread.start`` is wrapped (only while the extension is loaded
  somewhere) so the new thread begins with its starter's capture;
* a thread whose inherited execution has finished (a pool thread started
  by an earlier cell) writes to its session's execution running now, if
  any; otherwise its text only goes to the terminal.  Never to another
  session.

The routing stream always forwards to the stream it replaced (``tee``, so a
terminal user sees output as usual) unless ``c.PyREPL3.output_tee`` is off,
and, while somebody subscribes to the session's events, cuts the text into
``output`` events: whole lines, a ``\\r`` starting a new segment (progress
bars), lines longer than ``output_chunk_size`` split, and the partial line
flushed on ``flush()``, before ``input()``/``display()`` and at the end of
the cell.  Events are emitted in the writing thread under the session's
``emit_lock``, so each execution's chunks keep the order of the writes and
all of them precede the cell's ``result``/``error``.

Floods: past ``output_limit`` characters an execution's further output is
dropped (``drop``) or only its last ``output_tail`` characters are kept and
delivered at the end (``tail``).  Either way an ``output`` event with a
``dropped`` count says how much is missing.  Details and numbers:
``docs/io.md``.
"""

from __future__ import annotations

import collections
import io
import sys
import threading
from typing import Any

from . import _compat
from .extension import Component, InstancePatches

_CHANNELS = ("stdout", "stderr")
_OTHER = {"stdout": "stderr", "stderr": "stdout"}


class _Local(threading.local):
    """Per-thread routing state (class attributes are every thread's defaults)."""

    #: the capture this thread's writes go to
    cap: "_Capture | None" = None
    #: > 0 while IPython itself writes what is reported otherwise (result
    #: repr, traceback, the text form of a display): tee only, no event
    suppress = 0
    #: True while this thread runs our event dispatch: a subscriber's own
    #: prints go to the real stream, never back into the events
    emitting = False


_tls = _Local()

# Process-wide installation (shared by every shell that loaded the extension).
_install_lock = threading.Lock()
_users = 0
_routers: dict[str, "_RoutingStream"] = {}
_original_thread_start = None


def routed_capture() -> "_Capture | None":
    """The open capture the calling thread's output goes to, if any."""
    cap = _tls.cap
    if cap is not None and cap.closed:
        cap = cap.component.fallback()
    return cap


# -- the routing stream ---------------------------------------------------------

class _RoutingStream(io.TextIOBase):
    """Replaces ``sys.stdout``/``sys.stderr`` once; routes writes by thread.

    Everything that is not writing text (``fileno``, ``isatty``, ``buffer``,
    ``encoding``...) is the replaced stream's, so ``input()`` keeps using
    readline on a terminal and libraries probing the stream see the real one.
    """

    def __init__(self, channel: str, downstream: Any):
        super().__init__()
        self.channel = channel
        self.downstream = downstream
        #: False once the last shell unloaded but something was installed on
        #: top of us (we cannot take ourselves out of the chain): forward only
        self.routing = True

    # -- writing -----------------------------------------------------------
    def write(self, s):
        tls = _tls
        cap = tls.cap
        if cap is None or tls.emitting or not self.routing:
            down = self.downstream
            return down.write(s) if down is not None else len(s)
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if cap.closed:
            component = cap.component
            cap = component.fallback()
            if cap is None:
                component.unattributed_chars += len(s)
                down = self.downstream
                return down.write(s) if down is not None else len(s)
        listening = cap.bus._subscribers
        if (cap.tee or not listening) and self.downstream is not None:
            # output_tee=False only spares the terminal text that events carry
            self.downstream.write(s)
        if listening and not tls.suppress:
            cap.write(self.channel, s)
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        cap = routed_capture() if self.routing and not _tls.emitting else None
        if cap is not None and cap.bus._subscribers:
            cap.flush(this_thread=True)
        down = self.downstream
        if down is not None and not getattr(down, "closed", False):
            down.flush()

    # -- the replaced stream's properties ----------------------------------
    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def isatty(self) -> bool:
        try:
            return bool(self.downstream.isatty())
        except Exception:  # noqa: BLE001 - no downstream, or a closed one
            return False

    def fileno(self) -> int:
        if self.downstream is None:
            raise io.UnsupportedOperation("fileno")
        return self.downstream.fileno()

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        """Closing ``sys.stdout`` must not close the terminal under other sessions."""

    @property
    def encoding(self):
        return getattr(self.downstream, "encoding", "utf-8") or "utf-8"

    @property
    def errors(self):
        return getattr(self.downstream, "errors", "strict")

    @property
    def newlines(self):
        return None

    def __getattr__(self, name: str):
        # only reached for names the class does not define (buffer, mode,
        # name, reconfigure, line_buffering...)
        if name.startswith("__") or self.__dict__.get("downstream") is None:
            raise AttributeError(name)
        return getattr(self.downstream, name)

    def __repr__(self) -> str:
        return f"<pyrepl3 routing {self.channel} over {self.downstream!r}>"


def _thread_start(self, *args, **kwargs):
    """``Thread.start`` while loaded: the new thread inherits its starter's capture."""
    cap = _tls.cap
    if cap is not None:
        inherited = cap
        own = self.__dict__.get("run")
        run = self.run

        def run_with_capture():
            _tls.cap = inherited
            try:
                run()
            finally:
                _tls.cap = None
                if own is None:
                    self.__dict__.pop("run", None)
                else:
                    self.run = own

        self.run = run_with_capture
        try:
            return _original_thread_start(self, *args, **kwargs)
        except BaseException:
            if own is None:
                self.__dict__.pop("run", None)
            else:
                self.run = own
            raise
    return _original_thread_start(self, *args, **kwargs)


def _acquire_process_hooks() -> None:
    global _users, _original_thread_start
    with _install_lock:
        _users += 1
        if _users > 1:
            _reinstall_if_restored()
            return
        for channel in _CHANNELS:
            router = _RoutingStream(channel, getattr(sys, channel))
            _routers[channel] = router
            setattr(sys, channel, router)
        _original_thread_start = threading.Thread.start
        threading.Thread.start = _thread_start


def _release_process_hooks() -> None:
    global _users, _original_thread_start
    with _install_lock:
        _users -= 1
        if _users > 0:
            return
        for channel, router in list(_routers.items()):
            if getattr(sys, channel) is router:
                setattr(sys, channel, router.downstream)
            router.routing = False  # if still reachable, it only forwards
        _routers.clear()
        if threading.Thread.start is _thread_start:
            threading.Thread.start = _original_thread_start
        _original_thread_start = None


def _reinstall_if_restored() -> None:
    """Put a router back if someone restored the very stream it replaced.

    pytest's capture, ``contextlib.redirect_stdout`` opened before the load
    and similar save/restore pairs do that; any other replacement is the
    user's choice and is left alone.
    """
    for channel, router in _routers.items():
        if getattr(sys, channel) is router.downstream and router.downstream is not None:
            setattr(sys, channel, router)


# -- one execution's output -----------------------------------------------------

class _Capture:
    """The output state of one execution: partial lines, counts, the tail."""

    # One is created per cell: only what every cell needs is set per
    # instance; the flood state exists once the limit is crossed.
    over = False
    closed = False
    delivered = 0
    tail_chars = 0
    overflow_chunks = 0
    dropped: dict | None = None
    tail: "collections.deque | None" = None

    def __init__(self, component: "OutputCapture", execution: Any):
        self.component = component
        self.execution = execution
        self.bus = component.state.bus
        self.lock = self.bus.emit_lock  # one order per session: seq and chunks agree
        self.tee = component.tee
        self.chunk = component.chunk_size
        self.limit = component.limit
        self.tail_mode = component.overflow == "tail"
        self.tail_size = component.tail_size
        #: (thread id, channel) -> the partial line that thread has written
        self.partial: dict[tuple[int, str], str] = {}
        self.prev: "_Capture | None" = None

    # -- chunking ------------------------------------------------------------
    def write(self, channel: str, text: str) -> None:
        # Partial lines are kept per thread: print() is two writes (text, end),
        # and threads printing at once must not splice their lines together.
        tid = threading.get_ident()
        with self.lock:
            if self.closed:
                return
            partial = self.partial
            if partial:
                other = (tid, _OTHER[channel])
                if other in partial:
                    # keep the interleaving a terminal shows
                    self._deliver(other[1], partial.pop(other))
            key = (tid, channel)
            pending = partial.pop(key, "")
            buf = pending + text if pending else text
            if "\r" not in buf and len(buf) <= self.chunk:
                # the two common shapes: print's text before its end, and
                # whole lines
                if "\n" not in text:
                    if len(buf) < self.chunk:
                        partial[key] = buf
                        return
                elif buf[-1] == "\n":
                    self._deliver_one(channel, buf)
                    return
            # cut points as (begin, end) ranges of buf: slicing happens once,
            # per chunk, so a 1 MB write is not copied whole again
            pieces = []
            start = 0
            if "\r" in buf:
                i = buf.find("\r")
                last = len(buf) - 1
                while i != -1 and i < last:
                    # a \r not ending a \r\n starts a new segment (progress bars)
                    if buf[i + 1] != "\n" and i > start:
                        pieces.append((start, i))
                        start = i
                    i = buf.find("\r", i + 1)
            newline = buf.rfind("\n", start)
            if newline >= 0:
                pieces.append((start, newline + 1))
                start = newline + 1
            size = self.chunk
            left = len(buf) - start
            if left >= size > 0:
                cut = start + left - left % size
                pieces.append((start, cut))
                start = cut
            if start < len(buf):
                partial[key] = buf[start:] if start else buf
            for begin, end in pieces:
                self._deliver(channel, buf, begin, end)

    def flush(self, this_thread: bool = False) -> None:
        """Emit partial lines: the calling thread's (``flush()``) or all of them
        (``input()``, ``display()``, the end of the cell)."""
        with self.lock:
            if self.closed or not self.partial:
                return
            if this_thread:
                tid = threading.get_ident()
                keys = [k for k in self.partial if k[0] == tid]
            else:
                keys = list(self.partial)
            for key in keys:
                self._deliver(key[1], self.partial.pop(key))

    def _deliver(self, channel: str, text: str, begin: int = 0, end: int | None = None) -> None:
        """Deliver ``text[begin:end]`` in pieces of at most ``output_chunk_size``."""
        if end is None:
            end = len(text)
        size = self.chunk
        if begin == 0 and end == len(text) and end <= size:
            self._deliver_one(channel, text)
            return
        for k in range(begin, end, size):
            self._deliver_one(channel, text[k:min(k + size, end)])

    def _deliver_one(self, channel: str, text: str) -> None:
        limit = self.limit
        if not self.over:
            if not limit or self.delivered + len(text) <= limit:
                self.delivered += len(text)  # the common case: under the limit
                self._emit(channel, text)
                return
            # this chunk crosses the limit: deliver what fits, the rest overflows
            self.over = True
            self.dropped = {"stdout": 0, "stderr": 0}
            self.tail = collections.deque()
            room = limit - self.delivered
            if room > 0:
                self._emit(channel, text[:room])
                self.delivered += room
                text = text[room:]
        # over the limit
        self.overflow_chunks += 1
        if self.overflow_chunks % 64 == 1:
            # IPython 9's own copy of the cell's output must not grow either
            self.component.bound_ipython_history(max(self.limit, 1),
                                                 self.execution.execution_count)
        if self.tail_mode and self.tail_size > 0:
            self.tail.append((channel, text))
            self.tail_chars += len(text)
            excess = self.tail_chars - self.tail_size
            while excess > 0:
                old_channel, old = self.tail[0]
                if len(old) <= excess:
                    self.tail.popleft()
                    self.tail_chars -= len(old)
                    self.dropped[old_channel] += len(old)
                    excess -= len(old)
                else:
                    self.tail[0] = (old_channel, old[excess:])
                    self.tail_chars -= excess
                    self.dropped[old_channel] += excess
                    excess = 0
        else:
            self.dropped[channel] += len(text)

    def _emit(self, channel: str, text: str, **extra: Any) -> None:
        tls = _tls
        outer = tls.emitting  # a subscriber may display(), nesting an emit
        tls.emitting = True
        try:
            self.execution.emit("output", stream=channel, text=text, **extra)
        finally:
            tls.emitting = outer

    def emit_event(self, kind: str, fields: dict) -> dict | None:
        """Emit a ``display``/``input_requested`` after the partial lines so far."""
        with self.lock:
            if self.closed:
                return None
            self.flush()
            tls = _tls
            outer = tls.emitting
            tls.emitting = True
            try:
                return self.execution.emit(kind, **fields)
            finally:
                tls.emitting = outer

    def close(self) -> None:
        """Flush, report what a flood dropped, deliver the kept tail; then no more."""
        with self.lock:
            if self.closed:
                return
            if self.partial:
                self.flush()
            if self.over:
                self.component.bound_ipython_history(max(self.limit, 1),
                                                     self.execution.execution_count)
                for channel in _CHANNELS:
                    if self.dropped[channel]:
                        self._emit(channel, "", dropped=self.dropped[channel])
                for channel, text in self.tail:
                    self._emit(channel, text)
                self.tail.clear()
            self.closed = True



# -- the component ---------------------------------------------------------------

class OutputCapture(Component):
    """Per-shell: captures of running executions, IPython's own writers marked."""

    name = "io_capture"
    needs_listener = True  # output is captured only into events somebody reads

    def __init__(self, state: Any):
        super().__init__(state)
        self._open: list[_Capture] = []
        self._patches = InstancePatches()
        self._hooked = False
        #: characters written by threads of this session while none of its
        #: cells ran (they reached the terminal only)
        self.unattributed_chars = 0
        self.tee = True
        self.chunk_size = 65536
        self.limit = 0
        self.overflow = "tail"
        self.tail_size = 65536

    _TRAITS = ("output_tee", "output_chunk_size", "output_limit", "output_overflow",
               "output_tail")

    def attach(self) -> None:
        config = self.state.config
        self._read_config()
        config.observe(self._on_config, names=list(self._TRAITS))
        _acquire_process_hooks()
        self._hooked = True
        shell = self.state.shell
        self._patches.wrap(shell.display_pub, "publish", self._publish_wrapper)
        self._patches.wrap(shell.display_pub, "clear_output", self._clear_output_wrapper)
        for obj, name in ((shell.displayhook, "write_output_prompt"),
                          (shell.displayhook, "write_format_data"),
                          (shell.displayhook, "finish_displayhook"),
                          (shell, "showtraceback"), (shell, "showsyntaxerror")):
            self._patches.wrap(obj, name, _suppressed)

    def _read_config(self) -> None:
        config = self.state.config
        self.tee = config.output_tee
        self.chunk_size = config.output_chunk_size
        self.limit = config.output_limit
        self.overflow = config.output_overflow
        self.tail_size = config.output_tail

    def _on_config(self, change: dict) -> None:
        self._read_config()

    def detach(self) -> None:
        self.state.config.unobserve(self._on_config, names=list(self._TRAITS))
        for cap in list(self._open):
            try:
                cap.close()
            except Exception as exc:  # noqa: BLE001 - unload must finish
                self.state.report_internal_error("io_capture.detach", exc)
        self._open.clear()
        cap = _tls.cap
        while cap is not None and cap.component is self:
            cap = cap.prev
        _tls.cap = cap
        self._patches.undo()
        if self._hooked:
            _release_process_hooks()
            self._hooked = False

    # per cell
    def before_cell(self, execution: Any) -> None:
        if not self.state.bus._subscribers:
            # Nobody listens (no subscriber, no event log): the cell's output
            # goes to the terminal exactly as without the extension, and
            # nothing is built per cell.  A subscriber added while a cell
            # runs gets output events from the next cell on.
            return
        routers = _routers
        if routers and (sys.stdout is not routers.get("stdout")
                        or sys.stderr is not routers.get("stderr")):
            _reinstall_if_restored()
        cap = _Capture(self, execution)
        execution.extras["io"] = cap
        tls = _tls
        cap.prev = tls.cap
        tls.cap = cap
        self._open.append(cap)  # atomic; fallback() only reads the last item

    def after_cell(self, execution: Any, result: Any) -> None:
        cap = execution.extra("io")
        if cap is None:
            return
        try:
            cap.close()
        finally:
            open_ = self._open
            if open_ and open_[-1] is cap:
                open_.pop()
            else:
                try:
                    open_.remove(cap)
                except ValueError:
                    pass
            if _tls.cap is cap:
                _tls.cap = cap.prev

    def bound_ipython_history(self, max_chars: int, execution_count: int | None) -> None:
        shell = self.state._shell_ref()
        if shell is None:
            return
        try:
            _compat.bound_output_history(shell, max_chars, execution_count)
        except Exception as exc:  # noqa: BLE001 - IPython internals may change
            self.state.report_internal_error("io_capture.bound_ipython_history", exc)

    def fallback(self) -> "_Capture | None":
        """Where a thread of a finished execution writes: the session's running one."""
        try:
            return self._open[-1]
        except IndexError:
            return None

    # display publisher
    def _publish_wrapper(self, original):
        def publish(data, metadata=None, *args, **kwargs):
            cap = routed_capture()
            if cap is None:
                return original(data, metadata, *args, **kwargs)
            if cap.bus._subscribers and not _tls.suppress:
                fields = {"data": _plain(data), "metadata": _plain(metadata or {})}
                transient = kwargs.get("transient")
                if transient:
                    fields["transient"] = _plain(transient)
                if kwargs.get("update"):
                    fields["update"] = True
                cap.emit_event("display", fields)
            # the publisher's own rendering (text on a terminal, a message in
            # a kernel) is what the terminal user sees: tee only
            _tls.suppress += 1
            try:
                return original(data, metadata, *args, **kwargs)
            finally:
                _tls.suppress -= 1
        return publish

    def _clear_output_wrapper(self, original):
        def clear_output(wait=False):
            cap = routed_capture()
            if cap is not None and cap.bus._subscribers and not _tls.suppress:
                cap.emit_event("display", {"data": {}, "metadata": {}, "clear": True,
                                        "wait": bool(wait)})
            _tls.suppress += 1
            try:
                return original(wait)
            finally:
                _tls.suppress -= 1
        return clear_output


def _suppressed(original):
    """Wrap one of IPython's writers whose text is reported as another event."""
    def wrapper(*args, **kwargs):
        _tls.suppress += 1
        try:
            return original(*args, **kwargs)
        finally:
            _tls.suppress -= 1
    return wrapper


def _plain(value: Any) -> Any:
    """A shallow copy of a mime bundle / metadata dict (the publisher may mutate it)."""
    if isinstance(value, dict):
        return dict(value)
    return value
