"""A small asyncio client for ``pyrepl3 serve`` (the protocol in ``protocol.py``).

::

    async with await Client.spawn_stdio() as client:     # or connect_tcp / connect_unix
        session = await client.create_session()
        run = client.execute(session, "name = input('who? ')\\nprint('hi', name)")
        async for event in run:
            if event["type"] == "input_requested":
                await client.reply_input(session, event["input_id"], "ada")
            elif event["type"] == "output":
                print(event["text"], end="")
        print((await run.response())["status"])

Execution ids are chosen by the client (a random hex id when not given), so
events can be routed to their execution before the server's response
arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from typing import Any, AsyncIterator, Callable

from . import protocol as P


class ServerProcess:
    """``pyrepl3 serve`` on a socket as a child process (tests, benchmarks,
    hosts that want the server out of their own process).

    Waits until the server listens; its stderr is read on a thread (kept:
    the last 200 lines in ``log``) so a chatty server never blocks on a full
    pipe.  ``address`` is what it listens on (``host:port`` or the path).
    """

    def __init__(self, *args: str, python: str | None = None, env: dict | None = None,
                 timeout: float = 60.0, cwd: str | None = None):
        import collections
        import subprocess
        import threading

        self.log: "collections.deque[str]" = collections.deque(maxlen=200)
        self.process = subprocess.Popen(
            [python or sys.executable, "-m", "pyrepl3_ext.cli", "serve", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env, cwd=cwd)
        listening = threading.Event()
        self.address = ""

        def pump() -> None:
            assert self.process.stderr is not None
            with self.process.stderr:  # closed at the server's exit, not left to the gc
                for line in self.process.stderr:
                    self.log.append(line)
                    if not listening.is_set() and "listening on" in line:
                        self.address = line.split("listening on", 1)[1].split(None, 1)[1].strip()
                        listening.set()
            listening.set()  # exited

        self._pump = threading.Thread(target=pump, name="pyrepl3-server-stderr", daemon=True)
        self._pump.start()
        if not listening.wait(timeout) or not self.address:
            self.stop()
            raise RuntimeError("pyrepl3 serve did not start:\n" + "".join(self.log))

    def stop(self, timeout: float = 60.0) -> int:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        code = self.process.wait()
        self._pump.join(timeout)  # its end of the pipe is closed once it read the rest
        return code

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ClientError(Exception):
    """A JSON-RPC error response: ``code``, ``message``, ``data``."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.data = data


class RemoteExecution:
    """One ``execute`` request: iterate its events, then await its response."""

    def __init__(self, client: "Client", session: str, execution_id: str):
        self.client = client
        self.session = session
        self.execution_id = execution_id
        self.events: list[dict] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._response: asyncio.Future = asyncio.get_running_loop().create_future()

    def _event(self, event: dict) -> None:
        self.events.append(event)
        self._queue.put_nowait(event)

    def _done(self, response: "dict | ClientError") -> None:
        if not self._response.done():
            if isinstance(response, ClientError):
                self._response.set_exception(response)
            else:
                self._response.set_result(response)
        self._queue.put_nowait(None)  # ends the iteration

    def __aiter__(self) -> AsyncIterator[dict]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    async def response(self) -> dict:
        """The ``execute`` response (status, execution_count, error); raises
        :class:`ClientError` when the request was refused."""
        return await self._response

    async def cancel(self, reason: str = "cancelled by the client") -> bool:
        result = await self.client.call("cancel", session=self.session,
                                        execution_id=self.execution_id, reason=reason)
        return bool(result["cancelled"])


class Client:
    """One connection to a pyrepl3 server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 process: asyncio.subprocess.Process | None = None):
        self._reader = reader
        self._writer = writer
        self.process = process
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future] = {}
        self._executions: dict[str, RemoteExecution] = {}
        #: session id -> the ``session.lost`` notification's params, for sessions
        #: whose process died (until restarted with :meth:`restart_session`)
        self.lost: dict[str, dict] = {}
        #: called with (method, params) for every notification but execution events
        self.on_notification: Callable[[str, dict], None] | None = None
        self._closed = False
        self._reading = asyncio.get_running_loop().create_task(self._read())

    # -- connecting --------------------------------------------------------------
    @classmethod
    async def spawn_stdio(cls, *args: str, python: str | None = None,
                          env: dict | None = None) -> "Client":
        """Start ``pyrepl3 serve --stdio`` as a child process and talk to it."""
        process = await asyncio.create_subprocess_exec(
            python or sys.executable, "-m", "pyrepl3_ext.cli", "serve", "--stdio", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=env, limit=2 ** 31 - 1)
        assert process.stdout is not None and process.stdin is not None
        return cls(process.stdout, process.stdin, process)

    @classmethod
    async def connect_tcp(cls, host: str, port: int, token: str) -> "Client":
        reader, writer = await asyncio.open_connection(host, port, limit=2 ** 31 - 1)
        client = cls(reader, writer)
        await client.call("auth", token=token)
        return client

    @classmethod
    async def connect_unix(cls, path: str, token: str | None = None) -> "Client":
        reader, writer = await asyncio.open_unix_connection(path, limit=2 ** 31 - 1)
        client = cls(reader, writer)
        if token is not None:
            await client.call("auth", token=token)
        return client

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- the wire ------------------------------------------------------------------
    async def _read(self) -> None:
        error = ClientError(-1, "the connection closed")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if "id" in message and ("result" in message or "error" in message):
                    future = self._pending.pop(message["id"], None)
                    if future is not None and not future.done():
                        if "error" in message:
                            err = message["error"]
                            future.set_exception(ClientError(err["code"], err["message"],
                                                             err.get("data")))
                        else:
                            future.set_result(message["result"])
                elif message.get("method") == "execution.event":
                    params = message["params"]
                    run = self._executions.get(params["execution_id"])
                    if run is not None:
                        run._event(params["event"])
                elif "method" in message and "id" not in message:
                    params = message.get("params") or {}
                    if message["method"] == "session.lost":
                        self.lost[params.get("session")] = params
                    if self.on_notification is not None:
                        self.on_notification(message["method"], params)
        except (ConnectionError, ValueError) as exc:
            error = ClientError(-1, f"the connection failed: {exc}")
        finally:
            self._closed = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
            for run in list(self._executions.values()):
                run._done(error)
            self._executions.clear()

    async def _send(self, message: dict) -> None:
        if self._closed:
            raise ClientError(-1, "the connection is closed")
        self._writer.write(P.encode(message))
        await self._writer.drain()

    async def call(self, method: str, **params: Any) -> Any:
        """Send a request and wait for its result (raises :class:`ClientError`)."""
        id_ = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[id_] = future
        await self._send({"jsonrpc": P.JSONRPC, "id": id_, "method": method, "params": params})
        return await future

    # -- the API -------------------------------------------------------------------
    async def create_session(self, session_id: str | None = None, **options: Any) -> str:
        params = dict(options)
        if session_id is not None:
            params["session_id"] = session_id
        return (await self.call("session.create", **params))["session"]

    async def restart_session(self, session: str) -> None:
        """A fresh process for a lost process session (``session.restart``)."""
        await self.call("session.restart", session=session)
        self.lost.pop(session, None)

    async def close_session(self, session: str) -> None:
        await self.call("session.close", session=session)

    def execute(self, session: str, code: str, *, execution_id: str | None = None,
                **options: Any) -> RemoteExecution:
        """Send ``execute``; returns at once.  Iterate the result for events."""
        execution_id = execution_id or os.urandom(8).hex()
        run = RemoteExecution(self, session, execution_id)
        self._executions[execution_id] = run
        id_ = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[id_] = future

        def finished(f: asyncio.Future) -> None:
            self._executions.pop(execution_id, None)
            run._done(f.exception() or f.result())  # type: ignore[arg-type]

        future.add_done_callback(finished)
        asyncio.get_running_loop().create_task(self._send({
            "jsonrpc": P.JSONRPC, "id": id_, "method": "execute",
            "params": {"session": session, "code": code, "execution_id": execution_id,
                       **options}}))
        return run

    async def run(self, session: str, code: str, **options: Any) -> tuple[dict, list[dict]]:
        """Execute and wait: ``(response, events)``."""
        execution = self.execute(session, code, **options)
        events = [event async for event in execution]
        return await execution.response(), events

    async def cancel(self, session: str, execution_id: str, reason: str | None = None) -> bool:
        params = {"session": session, "execution_id": execution_id}
        if reason is not None:
            params["reason"] = reason
        return bool((await self.call("cancel", **params))["cancelled"])

    async def reply_input(self, session: str, input_id: str, text: str | None = None, *,
                          eof: bool = False) -> bool:
        params: dict = {"session": session, "input_id": input_id}
        if eof:
            params["eof"] = True
        else:
            params["text"] = text if text is not None else ""
        return bool((await self.call("input.reply", **params))["delivered"])

    async def close(self) -> None:
        # the transport is ours to close even when the server closed first
        # (the reader then marked the connection closed): else it is left to
        # the gc, with a ResourceWarning
        self._closed = True
        if not self._writer.is_closing():
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001
                pass
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        try:
            await asyncio.wait_for(self._reading, 5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._reading.cancel()
