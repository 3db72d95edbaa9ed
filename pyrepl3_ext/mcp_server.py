"""The MCP server: pyrepl3 sessions as tools an LLM agent can call.

``pyrepl3 serve --mcp`` (stdio) or ``pyrepl3 serve --mcp --http 127.0.0.1:PORT``
(the SDK's streamable HTTP transport, loopback only, bearer token). Built on
the official ``mcp`` SDK (``pip install 'pyrepl3[mcp]'``); it calls the same
engine API as the JSON-RPC server (``server.py``) and nothing below it.

Why a second server: an agent reads tool descriptions and text results, not
event streams. So ``execute`` waits for the cell and answers with one text
(output, then the result or the error, long output cut with a note of how
much was dropped), sends MCP progress notifications while the cell runs,
asks ``input()`` through MCP elicitation when the client offers it (else it
returns and the agent answers with ``send_input``), and a cancelled MCP
request cancels its cell. What a session may do (security policy, the cell
timeout ceiling, isolation, resource limits) is the operator's choice, made
on the command line; no tool takes it as an argument.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import signal
import threading
import time
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from .errors import ConcurrencyUnsupported, NamespaceError, SessionBusy, SessionClosed, SessionLost


@dataclasses.dataclass
class Settings:
    """The operator's choices (``pyrepl3 serve --mcp`` flags), fixed for the server's life."""

    #: security preset of every session (None: the extension's default, ``trusted``)
    policy: str | None = None
    #: default cell timeout in seconds, and the most an agent may ask for (None: no limit)
    timeout: float | None = None
    #: where sessions live: ``in-process`` or ``process``
    isolation: str = "in-process"
    #: process sessions' resource limits (``engine.limits.Limits``) and confinement
    limits: Any = None
    confine: bool | None = None
    kill_grace: float = 3.0
    #: the longest text a tool returns; longer output keeps its head and tail
    max_output_chars: int = 20_000
    #: how many sessions may be open at once
    max_sessions: int = 8
    #: seconds between progress notifications while a cell runs
    progress_interval: float = 1.0


class InputAnswer(BaseModel):
    """What an MCP client's elicitation form returns for a cell's ``input()``."""

    text: str = Field(description="the line the program reads (without the newline)")


def truncate(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters: its head and its tail (where
    errors and final results usually are) with a note of what was dropped."""
    if len(text) <= limit:
        return text
    head = limit // 3
    tail_start = len(text) - (limit - head)
    # cut at line ends when one is near, so no line is shown in part
    newline = text.rfind("\n", 0, head)
    if newline > head // 2:
        head = newline + 1
    newline = text.find("\n", tail_start, tail_start + (limit - head) // 2)
    if newline != -1:
        tail_start = newline + 1
    dropped = text[head:tail_start]
    return (f"{text[:head]}[... {len(dropped):,} characters ({dropped.count(chr(10)):,} "
            f"lines) of output dropped here; print less, or keep large data in a "
            f"variable and inspect parts of it ...]\n{text[tail_start:]}")


class Run:
    """One execution as the agent sees it: its events, gathered from the cell's
    thread into the loop, and rendered as text in pieces (``render`` returns
    what arrived since the previous call)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, session: Any):
        self.loop = loop
        self.session = session
        #: events from the cell's thread not yet taken by the loop; the loop is
        #: woken once per batch, not once per event (a printing loop makes many)
        self._inbox: list[dict] = []
        self._inbox_lock = threading.Lock()
        self._wake_scheduled = False
        self.arrived = asyncio.Event()
        self.handle: Any = None
        self.execution_id = ""
        self.t0 = time.monotonic()
        self.output: list[tuple[str, str]] = []  # (stream, text) since the last render
        self.lines = 0
        self.last_line = ""
        self.waiting_input: dict | None = None
        self.outcome: dict | None = None  # the result or error event
        self.execution_count: int | None = None
        self.finished: dict | None = None
        self.done = False

    # the cell's thread
    def on_event(self, event: dict) -> None:
        with self._inbox_lock:
            self._inbox.append(event)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        self.loop.call_soon_threadsafe(self._wake)

    def on_done(self, _handle: Any) -> None:
        self.on_event({"type": "_done"})

    # the loop
    def _wake(self) -> None:
        with self._inbox_lock:
            self._wake_scheduled = False
        self.arrived.set()

    def drain(self) -> list[dict]:
        """The events that arrived since the last call, in order."""
        self.arrived.clear()
        with self._inbox_lock:
            batch, self._inbox = self._inbox, []
        return batch

    def put_back(self, events: list[dict]) -> None:
        """Events of a batch not handled yet (the wait returned for input)."""
        if events:
            with self._inbox_lock:
                self._inbox[:0] = events
            self.arrived.set()

    def take(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "started":
            self.execution_count = event.get("execution_count")
        elif kind == "output":
            text = event.get("text", "")
            if text:
                self.output.append((event.get("stream", "stdout"), text))
                self.lines += text.count("\n")
                stripped = text.rstrip("\n").rsplit("\n", 1)[-1]
                if stripped:
                    self.last_line = stripped[:200]
            if event.get("dropped"):
                self.output.append(("note", f"[{event['dropped']:,} characters of "
                                            f"{event.get('stream', 'output')} were dropped "
                                            f"by the session's output limit]\n"))
        elif kind == "display":
            self.output.append(("display", _display_text(event.get("data") or {})))
        elif kind == "input_requested":
            self.waiting_input = event
        elif kind in ("result", "error"):
            self.outcome = event
        elif kind == "finished":
            self.finished = event

    def render(self, limit: int) -> str:
        """What happened since the last render, as text for an LLM."""
        parts: list[str] = []
        body = _join_output(self.output)
        self.output = []
        if self.done:
            status = (self.finished or {}).get("status") or _status_of(self.handle)
            head = f"[{status}]"
            count = (self.outcome or {}).get("execution_count") or self.execution_count
            if count is not None:
                head += f" In[{count}]"
            head += f" {time.monotonic() - self.t0:.2f} s"
            parts.append(head)
        if body:
            parts.append(truncate(body, limit * 2 // 3) if self.outcome else truncate(body, limit))
        outcome = self.outcome if self.done else None
        if outcome is not None and outcome["type"] == "result":
            text = _display_text(outcome.get("data") or {})
            parts.append(f"Out[{outcome.get('execution_count')}]: " +
                         truncate(text, max(limit // 3, 200)))
        elif outcome is not None:
            kind = outcome.get("kind", "exception")
            lines = "".join(outcome.get("traceback") or []).rstrip("\n")
            title = {"timeout": "The cell was stopped: it ran past its timeout.",
                     "cancelled": "The cell was cancelled.",
                     "security": "The session's security policy refused this.",
                     "syntax": "The cell did not compile."}.get(kind, "The cell raised an exception.")
            text = f"{title}\n{lines or (outcome.get('ename', '') + ': ' + outcome.get('evalue', ''))}"
            if outcome.get("rollback"):
                text += f"\n(transaction rolled back: {_short(outcome['rollback'])})"
            parts.append(truncate(text, max(limit // 3, 400)))
        elif self.done and self.handle is not None:
            error = _error_of(self.handle)
            if error is not None:
                parts.append(f"{error['ename']}: {error['evalue']}")
        if not self.done and self.waiting_input is not None:
            req = self.waiting_input
            kind = "a password (getpass)" if req.get("password") else "a line (input())"
            parts.append(f"[waiting for input] The cell asks for {kind} with the prompt "
                         f"{req.get('prompt', '')!r}. Answer with send_input(session="
                         f"{self.session.id!r}, text=...), or cancel it with "
                         f"cancel(session={self.session.id!r}).")
        return "\n".join(parts) if parts else "[ok] (no output)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + "..."


def _display_text(data: dict) -> str:
    text = data.get("text/plain")
    others = [k for k in data if k != "text/plain"]
    if text is None:
        text = ""
    if others:
        text += ("\n" if text else "") + f"[also shown as {', '.join(sorted(others))}; " \
                                          f"not included here]"
    return text


def _join_output(chunks: list[tuple[str, str]]) -> str:
    """Output chunks in order; stderr and displays marked where they start."""
    out: list[str] = []
    previous = "stdout"
    for stream, text in chunks:
        if stream != previous and stream in ("stderr", "display"):
            if out and not out[-1].endswith("\n"):
                out.append("\n")
            out.append(f"[{stream}]\n")
        elif stream == "stdout" and previous in ("stderr", "display"):
            if out and not out[-1].endswith("\n"):
                out.append("\n")
            out.append("[stdout]\n")
        out.append(text if stream != "display" else text + "\n")
        if stream != "note":
            previous = stream
    return "".join(out).rstrip("\n")


def _status_of(handle: Any) -> str:
    from .server import _status

    try:
        return _status(handle.result(0))[0]
    except BaseException:  # noqa: BLE001 - the engine failed the execution
        return "error"


def _error_of(handle: Any) -> dict | None:
    from .server import _status

    try:
        return _status(handle.result(0))[1]
    except BaseException as exc:  # noqa: BLE001
        return {"ename": type(exc).__name__, "evalue": str(exc)}


class ToolFailure(ToolError):
    """A tool call the agent can fix (unknown session, busy, ...): the SDK answers
    it as an error result carrying this message."""


class Service:
    """The sessions of one MCP server and the tools that drive them."""

    def __init__(self, engine: Any, settings: Settings):
        self.engine = engine
        self.settings = settings
        #: session id -> the run that returned to the agent while its cell still
        #: runs (waiting for input), so send_input and cancel can continue it
        self.pending: dict[str, Run] = {}
        self._lock = threading.Lock()

    # -- sessions ------------------------------------------------------------
    def session(self, session_id: str) -> Any:
        try:
            session = self.engine.get_session(session_id)
        except KeyError:
            open_ids = [s.id for s in self.engine.sessions if not s.closed]
            raise ToolFailure(f"There is no session {session_id!r}. Open sessions: "
                              f"{', '.join(open_ids) or 'none'} (create_session makes one).") \
                from None
        return session

    def create_session(self) -> str:
        from traitlets import TraitError
        from traitlets.config import Config

        open_count = sum(1 for s in self.engine.sessions if not s.closed)
        if open_count >= self.settings.max_sessions:
            raise ToolFailure(f"This server allows {self.settings.max_sessions} open sessions "
                              f"and {open_count} are open: close one first (close_session).")
        config = Config()
        config.PyREPL3.output_tee = False  # the tools return the output
        if self.settings.timeout is not None:
            config.PyREPL3.cell_timeout = float(self.settings.timeout)
        if self.settings.policy is not None:
            config.PyREPL3.security_policy = self.settings.policy
        try:
            session = self.engine.create_session(config=config)
        except (ValueError, TraitError, RuntimeError, SessionLost) as exc:
            raise ToolFailure(f"The session could not start: {exc}") from None
        try:
            session.serve_input()
        except BaseException:
            session.close()
            raise
        return session.id

    def describe(self, session: Any) -> str:
        state = "busy" if session.busy else "idle"
        lost = getattr(session, "lost", None)
        if lost is not None:
            state = f"lost ({lost['kind']}: {lost['message']})"
        if session.id in self.pending:
            state = "waiting for input"
        return (f"{session.id}: {state}, {getattr(session, 'isolation', 'in-process')}, "
                f"{self.settings.policy or 'trusted'} policy")

    # -- executions ----------------------------------------------------------
    def start(self, session: Any, code: str, timeout: float | None,
              transaction: bool) -> Run:
        ceiling = self.settings.timeout
        if timeout is not None and timeout <= 0:
            raise ToolFailure("timeout must be a positive number of seconds.")
        if ceiling is not None and (timeout is None or timeout > ceiling):
            timeout = ceiling
        if session.id in self.pending:
            raise ToolFailure(f"Session {session.id!r} is still running a cell that waits for "
                              f"input: answer it with send_input or stop it with cancel.")
        run = Run(asyncio.get_running_loop(), session)
        try:
            run.handle = session.execute(code, timeout=timeout, transaction=transaction or None,
                                         on_event=run.on_event, wait=False, queue=False)
        except SessionBusy:
            raise ToolFailure(f"Session {session.id!r} is running another cell; wait for it "
                              f"or cancel it.") from None
        except ConcurrencyUnsupported as exc:
            raise ToolFailure(f"Another session is running a cell and this IPython runs one "
                              f"session at a time: {exc}") from None
        except (SessionClosed, SessionLost) as exc:
            raise ToolFailure(f"Session {session.id!r} cannot run cells: {exc}") from None
        run.execution_id = run.handle.execution_id
        run.handle.add_done_callback(run.on_done)
        return run

    async def wait(self, run: Run, ctx: Context | None) -> str:
        """Follow ``run`` until it ends, or until its cell waits for input that only
        the agent can give (no elicitation); cancelling this call cancels the cell."""
        session = run.session
        elicit = ctx is not None and _can_elicit(ctx)
        interval = self.settings.progress_interval
        next_report = time.monotonic() + interval
        progress = 0
        try:
            while True:
                with anyio.move_on_after(max(0.0, next_report - time.monotonic())):
                    await run.arrived.wait()
                batch = run.drain()
                for index, event in enumerate(batch):
                    if event["type"] == "_done":
                        for late in run.drain():  # nothing follows _done but be sure
                            run.take(late)
                        run.done = True
                        self._forget(run)
                        return run.render(self.settings.max_output_chars)
                    run.take(event)
                    if event["type"] != "input_requested":
                        continue
                    if not elicit:
                        run.put_back(batch[index + 1:])
                        with self._lock:
                            self.pending[session.id] = run
                        return run.render(self.settings.max_output_chars)
                    run.waiting_input = None
                    answer = await ctx.elicit(  # type: ignore[union-attr]
                        f"The code running in session {session.id} asks: "
                        f"{event.get('prompt') or '(no prompt)'}", InputAnswer)
                    text = answer.data.text if answer.action == "accept" else None
                    session.reply_input(event["input_id"], text)
                if ctx is not None and time.monotonic() >= next_report:
                    progress += 1
                    note = (f"running for {time.monotonic() - run.t0:.0f} s, "
                            f"{run.lines} lines of output")
                    if run.last_line:
                        note += f"; last: {run.last_line}"
                    await ctx.report_progress(progress, None, note)
                    next_report = time.monotonic() + interval
        except anyio.get_cancelled_exc_class():
            session.cancel(run.execution_id, "the MCP request was cancelled")
            self._forget(run)
            raise

    def _forget(self, run: Run) -> None:
        with self._lock:
            if self.pending.get(run.session.id) is run:
                del self.pending[run.session.id]

    def reply(self, session: Any, text: str | None) -> Run:
        with self._lock:
            run = self.pending.get(session.id)
        if run is None or run.waiting_input is None:
            raise ToolFailure(f"No cell in session {session.id!r} is waiting for input.")
        request, run.waiting_input = run.waiting_input, None
        with self._lock:
            self.pending.pop(session.id, None)
        if not session.reply_input(request["input_id"], text):
            raise ToolFailure("That input request is gone (the cell was cancelled or timed out).")
        return run


def _can_elicit(ctx: Context) -> bool:
    try:
        caps = ctx.client_capabilities
    except (AttributeError, ValueError):
        return False
    elicitation = getattr(caps, "elicitation", None) if caps is not None else None
    return elicitation is not None and getattr(elicitation, "form", elicitation) is not None


INSTRUCTIONS = """\
pyrepl3 runs Python in persistent IPython sessions. Create a session, run code
in it with execute (state persists between calls, like a notebook), read
variables, snapshot and restore the namespace. A cell that runs too long is
stopped by its timeout; cancel stops a cell at once. Output, the value of the
last expression (Out[n]) and tracebacks come back as text; long output is cut
in the middle with a note. IPython syntax works (%magics, !shell where the
policy allows, top-level await)."""


def build(engine: Any, settings: Settings | None = None) -> MCPServer:
    """The MCP server for ``engine`` with every tool registered."""
    from ._version import __version__

    settings = settings or Settings()
    service = Service(engine, settings)
    mcp = MCPServer("pyrepl3", version=__version__, instructions=INSTRUCTIONS)
    limit = settings.max_output_chars
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False)

    @mcp.tool()
    def create_session() -> str:
        """Start a new Python (IPython) session and return its id. Variables,
        imports and definitions persist across execute calls in the same
        session. Sessions are independent of each other."""
        session_id = service.create_session()
        timeout = f"{settings.timeout:g} s" if settings.timeout else "none"
        return (f"Session {session_id!r} is ready (policy: {settings.policy or 'trusted'}, "
                f"isolation: {settings.isolation}, cell timeout: {timeout}).")

    @mcp.tool()
    async def close_session(session: str) -> str:
        """Close a session: stop its running cell and discard its variables."""
        target = service.session(session)
        with service._lock:
            service.pending.pop(target.id, None)
        await anyio.to_thread.run_sync(target.close)
        return f"Session {session!r} is closed."

    @mcp.tool(annotations=read_only)
    def list_sessions() -> str:
        """List the open sessions and whether each is idle, busy or waiting for input."""
        sessions = [s for s in engine.sessions if not s.closed]
        if not sessions:
            return "No open sessions (create_session makes one)."
        return "\n".join(service.describe(s) for s in sessions)

    @mcp.tool()
    async def execute(session: str, code: str, ctx: Context,
                      timeout: float | None = None, transaction: bool = False) -> str:
        """Run Python code (an IPython cell) in a session and return what it
        printed, then the value of its last expression as Out[n], or the error
        with its traceback. The first line says [ok], [error] or [cancelled].
        timeout: stop the cell after this many seconds (the server's limit
        applies when it is shorter or when none is given). transaction: if the
        cell fails, undo its changes to the session's variables. If the code
        calls input(), you are asked for the line, or this returns [waiting for
        input] and send_input answers it."""
        run = service.start(service.session(session), code, timeout, transaction)
        return await service.wait(run, ctx)

    @mcp.tool()
    async def send_input(session: str, ctx: Context, text: str = "",
                         end_of_input: bool = False) -> str:
        """Answer the input() (or getpass) of a cell that returned [waiting for
        input], then wait for the cell like execute does and return the rest of
        its output. end_of_input=true makes input() raise EOFError instead."""
        run = service.reply(service.session(session), None if end_of_input else text)
        return await service.wait(run, ctx)

    @mcp.tool()
    async def cancel(session: str) -> str:
        """Stop the cell running in a session (it ends with [cancelled]; the
        session and its variables stay)."""
        target = service.session(session)
        running = target.running
        if running is None:
            return f"Session {session!r} is not running a cell."
        report = target.cancel_report(running, "cancelled by the agent")
        with service._lock:
            run = service.pending.pop(target.id, None)
        if run is not None:
            return await service.wait(run, None)
        detail = report.get("detail")
        return (f"Cancel sent to the running cell ({report.get('state', 'sent')}"
                f"{': ' + detail if detail else ''}); the execute call running it "
                f"returns [cancelled].")

    @mcp.tool(annotations=read_only)
    async def list_variables(session: str) -> str:
        """List a session's variables: name, type and a short repr of each."""
        target = service.session(session)
        variables = await anyio.to_thread.run_sync(lambda: target.variables(max_repr=100))
        if not variables:
            return "No variables."
        return truncate("\n".join(f"{v['name']}: {v['type'].removeprefix('builtins.')} = "
                                  f"{v['repr']}" for v in variables), limit)

    @mcp.tool(annotations=read_only)
    async def get_variable(session: str, name: str) -> str:
        """Show one variable of a session: its type and its repr (long reprs are cut)."""
        target = service.session(session)
        try:
            described = await anyio.to_thread.run_sync(
                lambda: target.variable(name, max_repr=limit))
        except (KeyError, LookupError) as exc:
            raise ToolFailure(f"Session {session!r} has no variable {name!r}.") from exc
        return f"{name}: {described['type'].removeprefix('builtins.')} = {described['repr']}"

    @mcp.tool()
    async def take_snapshot(session: str, name: str) -> str:
        """Save a deep copy of the session's variables under a name, to come back
        to with restore_snapshot (e.g. before a risky step)."""
        target = service.session(session)
        try:
            info = await anyio.to_thread.run_sync(lambda: target.take_snapshot(name))
        except NamespaceError as exc:
            raise ToolFailure(str(exc)) from None
        names = info.get("names") if isinstance(info, dict) else None
        count = len(names) if isinstance(names, (list, tuple, set)) else None
        return f"Snapshot {name!r} taken" + (f" ({count} variables)." if count is not None
                                             else ".")

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=True))
    async def restore_snapshot(session: str, name: str) -> str:
        """Put the session's variables back as they were when the snapshot was
        taken (variables created since are removed)."""
        target = service.session(session)
        try:
            info = await anyio.to_thread.run_sync(lambda: target.restore_snapshot(name))
        except NamespaceError as exc:
            raise ToolFailure(str(exc)) from None
        restored = info.get("restored", []) if isinstance(info, dict) else []
        removed = info.get("removed", []) if isinstance(info, dict) else []
        return (f"Snapshot {name!r} restored: {len(restored)} variables back"
                + (f", removed {', '.join(removed)}" if removed else "") + ".")

    return mcp


class _TokenGate:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body",
                            "body": b"pyrepl3: missing or wrong bearer token\n"})
                return
        await self.app(scope, receive, send)


def run(settings: Settings, *, http: tuple[str, int] | None = None,
        token: str | None = None) -> int:
    """Serve MCP on stdio (``http`` None) or streamable HTTP on a loopback
    address with ``token``, until the client goes away or a signal; then close
    every session."""
    from .cancellation.handoff import shorten_switch_interval
    from .engine import Engine

    # the loop reading a cancel must get the GIL from a computing in-process
    # cell at once, as in the JSON-RPC server (cancellation/handoff.py)
    shorten_switch_interval()
    engine = Engine(isolation=settings.isolation, kill_grace=settings.kill_grace,
                    limits=settings.limits, confine=settings.confine)
    if settings.isolation == "process":
        engine.warm_up()
    mcp = build(engine, settings)
    try:
        if http is None:
            # SIGTERM ends the server like the end of stdin does: sessions closed
            signal.signal(signal.SIGTERM, _interrupt)
            anyio.run(mcp.run_stdio_async)
        else:
            import uvicorn

            host, port = http
            app = _TokenGate(mcp.streamable_http_app(host=host), token or "")
            config = uvicorn.Config(app, host=host, port=port, log_level="warning")
            anyio.run(uvicorn.Server(config).serve)
    except KeyboardInterrupt:
        pass
    finally:
        closed = engine.close(timeout=settings.kill_grace + 2.0)
    if not closed:
        from .server import leave_now

        leave_now()  # an in-process cell blocked where no cancel reaches it
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
