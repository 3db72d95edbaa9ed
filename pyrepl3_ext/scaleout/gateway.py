"""The gateway: one ``pyrepl3 serve`` endpoint whose sessions live on other nodes.

Each node runs an ordinary pyrepl3 server with process sessions (put there
by the placement: ``ray_placement.py``).  The gateway holds no session: it
places a new one through the :class:`Placement`, remembers which node has
it (a *route*), and forwards every request about it to that node's server.
What a session does, and every error it can give, is therefore exactly what
a single server does; the gateway adds only what needs the whole cluster:
placement, ``session.list`` across nodes, and node loss.

Invariants:

* **Per client, per node, one connection** (a *link*).  A client's requests
  reach a node in the order the client sent them (requests for a node whose
  link is still opening wait in the link's backlog, in order), and the
  node's ``execution.event`` notifications are written to the client as
  they arrive, byte for byte, so ``seq`` order and gaplessness are the
  node's.  When the client reads too slowly the link stops reading from the
  node, so that node's server makes the client's cells wait (its own
  backpressure) and nobody else is slowed.  When the client goes, its links
  close and each node cancels that client's executions, as one server does.
* **Node loss is decided once per node**: when the gateway's own link to a
  node ends, or a client's link to it cannot be used, the placement is asked
  whether the node is gone and why.  Then every session routed there is
  ``lost`` (kind ``node_lost``, with the placement's cause), each client
  gets one ``session.lost`` notification per session, every execution in
  flight there gets an ``error`` and a ``finished`` event continuing its
  ``seq`` and its response, every other request in flight its error, and
  the sessions' reservations are released.  Sessions on other nodes are not
  touched.  ``session.restart`` places a lost session on a live node under
  the same id and settings, restoring a snapshot file when given one.
* The gateway never blocks its loop: placement calls run on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import threading
import time
from typing import Any, Callable, Coroutine, Iterator, Protocol

from .. import protocol as P
from ..events import lost_outcome
from ..server import _DEFERRED, Connection, Limits, Server, serve_until_stopped


@dataclasses.dataclass(frozen=True)
class Node:
    """Where one node's pyrepl3 server listens (``key``: the placement's name for it)."""

    key: str
    host: str
    port: int
    token: str


class PlacementError(Exception):
    """No node can take the session (the message says why)."""


class Reservation(Protocol):
    """What a placement holds for one session on one node."""

    node: Node

    def release(self) -> None: ...


class Placement(Protocol):
    """Where sessions go.  Every method but ``nodes`` may block: the gateway
    calls them off its loop.  The three attributes are what ``server.info``
    reports of an engine."""

    concurrent: bool
    isolation: str
    #: the ceiling of every session's limits (``--limits``), or None
    limits: Any

    def nodes(self) -> list[Node]:
        """The nodes known to host sessions now (no waiting: called on the loop)."""

    def reserve(self, session_id: str, limits: dict | None) -> Reservation:
        """Choose a node for a session with these limits and hold its resources
        there; :class:`PlacementError` when no node can."""

    def failure(self, node: Node) -> str | None:
        """Why ``node`` is gone, or None when it is alive."""

    def describe(self) -> dict:
        """For ``server.info``."""

    def close(self) -> None:
        """Stop every node's server (their sessions end) and let go of the cluster."""


#: ``error.kind`` and ``session.lost`` kind of a session whose node is gone
NODE_LOST = "node_lost"
#: how every node's server starts an ``execution.event`` line (``protocol.encode``:
#: compact, keys in the order ``notification`` gives them)
_EVENT = b'{"jsonrpc":"2.0","method":"execution.event","params":{'


class _Route:
    """One session: where it lives, how it was created, whether it is lost."""

    __slots__ = ("id", "params", "node", "reservation", "state", "lost")

    def __init__(self, session_id: str, params: dict):
        self.id = session_id
        #: the ``session.create`` params, to create it again after a node loss
        self.params = params
        self.node: Node | None = None
        self.reservation: Reservation | None = None
        #: "placing" (not usable yet), "open", "lost" (its node is gone)
        self.state = "placing"
        self.lost: dict | None = None


class _Forwarded:
    """An ``execute`` in flight on a link: what a node loss must answer."""

    __slots__ = ("session", "request_id", "conn", "events", "sent_at")

    def __init__(self, session: str, request_id: Any, conn: Connection):
        self.session = session
        self.request_id = request_id
        self.conn = conn
        #: events relayed so far: the next one's ``seq``
        self.events = 0
        self.sent_at = time.monotonic()


class _RemoteSession:
    """Stands in a client connection's ``executions`` for a forwarded execute, so
    the server's own disconnect and shutdown logic cancels it on its node."""

    running = None  # unknown here; the node orders its own cancels

    def __init__(self, link: "_Link", session_id: str):
        self.link = link
        self.id = session_id

    def cancel(self, execution_id: str, reason: str) -> None:
        self.link.send_soon("cancel", {"session": self.id, "execution_id": execution_id,
                                       "reason": reason})

    def reply_input(self, input_id: str, text: str | None) -> None:
        params: dict = {"session": self.id, "input_id": input_id}
        params.update({"eof": True} if text is None else {"text": text})
        self.link.send_soon("input.reply", params)


class _Link:
    """One connection to one node's server: the gateway's own (``conn`` None),
    or the one that carries a client's requests to that node."""

    def __init__(self, gateway: "Gateway", node: Node, conn: Connection | None):
        self.gateway = gateway
        self.node = node
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.open = False
        self.closed = False
        self._ids = itertools.count(1)
        #: request id on the node -> called with the node's response
        self.pending: dict[int, Callable[[dict], None]] = {}
        #: execution id -> an execute in flight
        self.forwarded: dict[str, _Forwarded] = {}
        #: (message, answered) waiting for the connection to open, in order
        self._backlog: list[tuple[dict, Callable[[dict], None] | None]] = []
        self._writer: asyncio.StreamWriter | None = None
        self.task = self.loop.create_task(self._run())

    # -- sending (on the loop) -------------------------------------------------
    def send(self, method: str, params: dict,
             answered: Callable[[dict], None] | None = None) -> None:
        """Send a request; ``answered(response)`` when the node answers (or the
        link fails: then with an error response made here)."""
        message = {"jsonrpc": P.JSONRPC, "id": next(self._ids), "method": method,
                   "params": params}
        if self.closed:
            if answered is not None:
                answered(self.gateway._link_error(self, message["id"]))
            return
        if not self.open:
            self._backlog.append((message, answered))
            return
        self._write(message, answered)

    def _write(self, message: dict, answered: Callable[[dict], None] | None) -> None:
        self.pending[message["id"]] = answered or _ignore
        assert self._writer is not None
        self._writer.write(P.encode(message))

    def send_soon(self, method: str, params: dict) -> None:
        """``send`` from any thread, answer ignored (cancels of a leaving client)."""
        try:
            if self.gateway._on_loop():
                self.send(method, params)
            else:
                self.loop.call_soon_threadsafe(self.send, method, params)
        except RuntimeError:  # the loop is closed: the node ends these itself
            pass

    async def call(self, method: str, params: dict) -> Any:
        """A request of the gateway's own: its result, or its error raised."""
        future = self.loop.create_future()
        self.send(method, params, lambda m: future.done() or future.set_result(m))
        response = await future
        if "error" in response:
            error = response["error"]
            raise P.RPCError(error["code"], error["message"], error.get("data"))
        return response["result"]

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - already closed
                pass
        if not self.open:
            self.task.cancel()

    # -- the connection ----------------------------------------------------------
    async def _run(self) -> None:
        try:
            reader, self._writer = await _connect(self.node)
            self.open = True
            backlog, self._backlog = self._backlog, []
            for message, answered in backlog:
                self._write(message, answered)
            await self._read(reader)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.closed = True
            self.open = False
            if self._writer is not None:
                try:
                    self._writer.close()
                except Exception:  # noqa: BLE001
                    pass
            await self.gateway._link_ended(self)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Relay what the node sends.  Events go to the client as the bytes the
        node wrote, a chunk's worth in one write; only their execution id is
        read (to count them), and only other messages are parsed."""
        conn = self.conn
        rest = b""
        while True:
            chunk = await reader.read(262144)
            if not chunk:
                return
            data = rest + chunk
            end = data.rfind(b"\n") + 1
            rest = data[end:]
            relay: list[bytes] = []
            start = 0
            while start < end:
                stop = data.index(b"\n", start) + 1
                if data.startswith(_EVENT, start):
                    self._count(data, start, stop)
                    relay.append(data[start:stop])
                else:
                    if relay and conn is not None:  # keep the node's order
                        conn.write(b"".join(relay))
                    relay = []
                    self._message(json.loads(data[start:stop]))
                start = stop
            if relay and conn is not None and not conn.closed:
                conn.write(b"".join(relay))
                if conn._draining:  # the client reads slowly: so do we
                    await conn._drained.wait()

    def _count(self, data: bytes, start: int, stop: int) -> None:
        """One more event of its execution (its ``seq``: the count, gapless from 0)."""
        key = data.find(b'"execution_id":"', start, stop)
        close = data.find(b'"', key + 16, stop) if key >= 0 else -1
        raw = data[key + 16:close] if close > 0 else b"\\"
        if b"\\" in raw:  # an escaped id: the slow, exact way
            execution_id = json.loads(data[start:stop])["params"]["execution_id"]
        else:
            execution_id = raw.decode("utf-8", "replace")
        forwarded = self.forwarded.get(execution_id)
        if forwarded is not None:
            forwarded.events += 1

    def _message(self, message: dict) -> None:
        method = message.get("method")
        if method is None:
            answered = self.pending.pop(message.get("id"), None)
            if answered is not None:
                answered(message)
        elif method == "execution.event":  # not as the node encodes them: still relayed
            params = message["params"]
            forwarded = self.forwarded.get(params["execution_id"])
            if forwarded is not None:
                forwarded.events += 1
            if self.conn is not None:
                self.conn.send(message)
        elif self.conn is None:
            self.gateway._node_notification(self.node, method, message.get("params") or {})

    def fail(self, message: str, lost: bool) -> None:
        """Answer everything in flight on this (ended) link."""
        pending, self.pending = self.pending, {}
        backlog, self._backlog = self._backlog, []
        forwarded, self.forwarded = self.forwarded, {}
        for execution_id, run in forwarded.items():
            if lost:
                self.gateway._report_lost_execution(run, execution_id, message)
        for node_id, answered in pending.items():
            answered(self.gateway._link_error(self, node_id, message, lost))
        for request, answered in backlog:
            if answered is not None:
                answered(self.gateway._link_error(self, request["id"], message, lost))


def _ignore(_message: dict) -> None:
    pass


async def _connect(node: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``node``'s server, authenticated (``ConnectionError`` if refused)."""
    reader, writer = await asyncio.open_connection(node.host, node.port, limit=2 ** 31 - 1)
    try:
        writer.write(P.encode({"jsonrpc": P.JSONRPC, "id": 0, "method": "auth",
                               "params": {"token": node.token}}))
        answer = json.loads(await reader.readline() or b"null")
        if not isinstance(answer, dict) or "result" not in answer:
            raise ConnectionError(f"node {node.key} refused the gateway: {answer!r}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


class Gateway(Server):
    """Serves the protocol for sessions placed on nodes by ``placement``.

    The transports, authentication, limits, framing and shutdown are the
    server's (``server.py``); the handlers that concern a session forward.
    ``engine`` is the placement, which only :meth:`close` uses.
    """

    def __init__(self, placement: Placement, *, token: str | None = None,
                 limits: Limits | None = None, log: Callable[[str], None] | None = None,
                 node_timeout: float = 10.0):
        super().__init__(placement, token=token, limits=limits, log=log)
        self.placement = placement
        #: how long a node may not answer while the placement calls it alive
        self.node_timeout = node_timeout
        self._routes: dict[str, _Route] = {}
        #: (client connection or None, node key) -> link
        self._links: dict[tuple[Connection | None, str], _Link] = {}
        #: node key -> the task deciding whether it is gone (once per node)
        self._verdicts: dict[str, asyncio.Task] = {}
        #: node key -> why it is gone
        self.lost_nodes: dict[str, str] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.handlers.update({
            "server.info": self._info,
            "session.create": self._session_create, "session.close": self._session_close,
            "session.restart": self._session_restart, "session.list": self._session_list,
            "session.info": self._session_info,
        })
        for method in ("execute", "cancel", "input.reply", "namespace.get", "namespace.set",
                       "namespace.delete", "namespace.list", "snapshot.take",
                       "snapshot.restore", "snapshot.delete", "snapshot.save",
                       "snapshot.load"):
            self.handlers[method] = self._forward
        missing = set(P.METHODS) - set(self.handlers)
        assert not missing, f"methods without a handler: {missing}"

    # -- plumbing ------------------------------------------------------------------
    def _on_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _link(self, conn: Connection | None, node: Node) -> _Link:
        link = self._links.get((conn, node.key))
        if link is None or link.closed:
            link = self._links[(conn, node.key)] = _Link(self, node, conn)
        return link

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _deferred(self, conn: Connection, request: P.Request, coro: Coroutine) -> Any:
        """Answer ``request`` with what ``coro`` returns (or raises), later."""
        async def answer() -> None:
            try:
                message = self.response_to(request, await coro)
            except Exception as exc:  # noqa: BLE001 - one response per request, always
                message = self.response_to(request, error=exc)
            if not request.is_notification and not conn.closed:
                conn.send(message)

        self._spawn(answer())
        return _DEFERRED

    async def _blocking(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, call, *args)

    def _route(self, params: dict, *, lost_ok: bool = False) -> _Route:
        route = self._routes.get(params["session"])
        if route is None or route.state == "placing":
            raise P.RPCError(P.UNKNOWN_SESSION, f"no open session {params['session']!r}")
        if route.state == "lost" and not lost_ok:
            assert route.lost is not None
            raise P.RPCError(P.SESSION_LOST, f"session {route.id!r} is lost "
                                             f"({route.lost['message']}); session.restart "
                                             f"places it on another node",
                             {"kind": route.lost["kind"]})
        return route

    # -- handlers --------------------------------------------------------------------
    def _info(self, conn: Connection, request: P.Request) -> dict:
        return {**super()._info(conn, request), "placement": self.placement.describe(),
                "lost_nodes": dict(self.lost_nodes)}

    def _forward(self, conn: Connection, request: P.Request) -> Any:
        """Every request about one session: to its node, over this client's link."""
        route = self._route(request.params)
        assert route.node is not None
        link = self._link(conn, route.node)
        params = request.params
        if request.method != "execute":
            link.send(request.method, params, lambda m: self._relay(conn, request, m))
            return _DEFERRED
        execution_id = params.get("execution_id") or os.urandom(8).hex()
        params = {**params, "execution_id": execution_id}
        link.forwarded[execution_id] = _Forwarded(route.id, request.id, conn)
        with conn._lock:
            conn.executions[execution_id] = (_RemoteSession(link, route.id), None, request.id)

        def answered(message: dict) -> None:
            link.forwarded.pop(execution_id, None)
            with conn._lock:
                mine = conn.executions.pop(execution_id, None) is not None
            if mine:  # else answered already (the server's shutdown)
                self._relay(conn, request, message)

        link.send("execute", params, answered)
        return _DEFERRED

    @staticmethod
    def _relay(conn: Connection, request: P.Request, message: dict) -> None:
        if request.is_notification or conn.closed:
            return
        message["id"] = request.id
        conn.send(message)

    def _session_create(self, conn: Connection, request: P.Request) -> Any:
        params = dict(request.params)
        if params.get("isolation", "process") != "process":
            raise P.RPCError(P.INVALID_PARAMS, "isolation: every session of a gateway runs in "
                                               "a process of its own on a node (\"process\")")
        session_id = params.get("session_id") or os.urandom(6).hex()
        if session_id in self._routes:
            raise P.RPCError(P.INVALID_PARAMS, f"session id {session_id!r} is in use")
        params["session_id"] = session_id
        params["isolation"] = "process"
        route = self._routes[session_id] = _Route(session_id, params)
        return self._deferred(conn, request, self._place(route))

    async def _place(self, route: _Route, snapshot_file: str | None = None) -> dict:
        """Reserve a node for ``route``, create the session there and, with
        ``snapshot_file``, restore that file into it.  On failure a new
        session is forgotten and a lost one stays lost."""
        try:
            reservation = await self._blocking(self.placement.reserve, route.id,
                                               route.params.get("limits"))
        except PlacementError as exc:
            self._unplace(route)
            raise P.RPCError(P.NOT_AVAILABLE, f"the session could not be placed: {exc}") from None
        except BaseException:
            self._unplace(route)
            raise
        node = reservation.node
        link = self._link(None, node)
        try:
            answer = await link.call("session.create", route.params)
            restored = None
            if snapshot_file is not None:
                restored = await link.call("snapshot.load", {"session": route.id,
                                                             "file": snapshot_file,
                                                             "restore": True})
        except BaseException:
            self._unplace(route)
            await self._blocking(reservation.release)
            if node.key in self.lost_nodes:
                raise P.RPCError(P.NOT_AVAILABLE, f"the node chosen for the session was lost "
                                                  f"({self.lost_nodes[node.key]}): try again")
            raise
        route.node, route.reservation, route.state, route.lost = node, reservation, "open", None
        answer = {**answer, "node": node.key}
        if restored is not None:
            answer["restored"] = restored
        return answer

    def _unplace(self, route: _Route) -> None:
        if route.lost is not None:
            route.state = "lost"
        else:
            self._drop(route)

    def _drop(self, route: _Route) -> None:
        if self._routes.get(route.id) is route:
            del self._routes[route.id]

    def _session_close(self, conn: Connection, request: P.Request) -> Any:
        route = self._route(request.params, lost_ok=True)
        if route.state == "lost":
            self._drop(route)
            return {"closed": True}

        async def close() -> dict:
            assert route.node is not None
            result = await self._link(conn, route.node).call("session.close", request.params)
            if result.get("closed"):
                self._drop(route)
                if route.reservation is not None:
                    await self._blocking(route.reservation.release)
            return result

        return self._deferred(conn, request, close())

    def _session_restart(self, conn: Connection, request: P.Request) -> Any:
        route = self._route(request.params, lost_ok=True)
        params = request.params
        if route.state != "lost":
            return self._forward(conn, request)
        if "snapshot" in params:
            raise P.RPCError(P.INVALID_PARAMS, f"session {route.id!r} was lost with its node, "
                                               f"and its durable snapshots with it: restore a "
                                               f"snapshot file (file) instead")
        route.state = "placing"
        return self._deferred(conn, request, self._place(route, params.get("file")))

    def _session_info(self, conn: Connection, request: P.Request) -> Any:
        route = self._route(request.params, lost_ok=True)
        if route.state == "lost":
            return self._describe_lost(route)

        async def info() -> dict:
            assert route.node is not None
            answer = await self._link(conn, route.node).call("session.info", request.params)
            return {**answer, "node": route.node.key}

        return self._deferred(conn, request, info())

    @staticmethod
    def _describe_lost(route: _Route) -> dict:
        assert route.lost is not None and route.node is not None
        return {"session": route.id, "busy": False, "running": None, "isolation": "process",
                "lost": dict(route.lost), "execution_count": None, "node": route.node.key}

    def _session_list(self, conn: Connection, request: P.Request) -> Any:
        async def listing() -> dict:
            nodes = {r.node.key: r.node for r in self._routes.values()
                     if r.state == "open" and r.node is not None}
            answers = await asyncio.gather(
                *(self._link(None, node).call("session.list", {}) for node in nodes.values()),
                return_exceptions=True)
            sessions = []
            for node, answer in zip(nodes.values(), answers):
                if isinstance(answer, BaseException):
                    continue  # lost meanwhile: its sessions are listed as lost below
                for described in answer["sessions"]:
                    route = self._routes.get(described.get("session"))
                    if route is not None and route.state == "open":
                        sessions.append({**described, "node": node.key})
            sessions += [self._describe_lost(r) for r in self._routes.values()
                         if r.state == "lost"]
            return {"sessions": sessions}

        return self._deferred(conn, request, listing())

    # -- node loss ---------------------------------------------------------------------
    def _node_notification(self, node: Node, method: str, params: dict) -> None:
        """A notification on the gateway's own link: a worker on the node died."""
        if method == "session.lost":
            self._broadcast(P.notification(method, {**params, "node": node.key}))

    def _broadcast(self, message: dict) -> None:
        for conn in list(self.connections):
            if conn.authenticated and not conn.closed:
                conn.send(message)

    async def _link_ended(self, link: _Link) -> None:
        if self._links.get((link.conn, link.node.key)) is link:
            del self._links[(link.conn, link.node.key)]
        if self._closing or (link.conn is not None and link.conn.closed):
            link.fail("the gateway is closing", lost=False)
            return
        cause = await self._verdict(link.node)
        if cause is None:
            link.fail(f"the connection to node {link.node.key} closed", lost=False)
            if link.conn is None and not self._closing:
                self._link(None, link.node)  # keep watching a node that is alive
        else:
            link.fail(cause, lost=True)

    def _verdict(self, node: Node) -> "asyncio.Future[str | None]":
        """Whether ``node`` is gone (its cause) or alive (None), decided once."""
        if node.key in self.lost_nodes:
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            done.set_result(self.lost_nodes[node.key])
            return done
        task = self._verdicts.get(node.key)
        if task is None or (task.done() and task.result() is None):
            task = self._verdicts[node.key] = self._spawn(self._decide(node))
        return task

    async def _decide(self, node: Node) -> str | None:
        """The placement's word, checked against the node's server: a node the
        placement still calls alive but whose server does not answer for
        ``node_timeout`` seconds is gone too (the placement notices late)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.node_timeout
        while True:
            try:
                failure = await self._blocking(self.placement.failure, node)
            except Exception as exc:  # noqa: BLE001 - the placement could not tell
                failure = f"the placement could not reach it: {exc}"
            if failure is not None:
                break
            if await self._answers(node):
                return None
            if loop.time() > deadline:
                failure = (f"its server at {node.host}:{node.port} has not answered for "
                           f"{self.node_timeout:g} s")
                break
            await asyncio.sleep(0.1)
        cause = f"node {node.key} was lost: {failure}"
        self.lost_nodes[node.key] = cause
        self.log(cause)
        lost = {"kind": NODE_LOST, "message": cause}
        releases = []
        for route in list(self._routes.values()):
            if route.node is not None and route.node.key == node.key and route.state == "open":
                route.state, route.lost = "lost", dict(lost)
                if route.reservation is not None:
                    releases.append(route.reservation.release)
                self._broadcast(P.notification("session.lost", {
                    "session": route.id, "kind": NODE_LOST, "message": cause,
                    "node": node.key}))
        for (conn, key), link in list(self._links.items()):
            if key == node.key:
                link.close()
        for release in releases:
            try:
                await self._blocking(release)
            except Exception as exc:  # noqa: BLE001 - the node is gone either way
                self.log(f"releasing a reservation on lost node {node.key} failed: {exc!r}")
        return cause

    async def _answers(self, node: Node) -> bool:
        """Whether the node's server accepts a connection and the token now."""
        try:
            _reader, writer = await asyncio.wait_for(_connect(node), 2.0)
        except (OSError, ValueError, asyncio.TimeoutError):
            return False
        writer.close()
        return True

    def _report_lost_execution(self, run: _Forwarded, execution_id: str, cause: str) -> None:
        """The node cannot say how this execution ended: the gateway says it,
        as a process session says it of a worker that died."""
        conn = run.conn
        with conn._lock:
            mine = conn.executions.pop(execution_id, None) is not None
        if not mine or conn.closed:
            return
        for event in lost_outcome(execution_id, run.session, run.events, NODE_LOST, cause,
                                  "error", time.monotonic() - run.sent_at):
            conn.send(P.notification("execution.event", {
                "session": run.session, "execution_id": execution_id, "event": event}))
        if run.request_id is not None:
            conn.send(P.response(run.request_id, {
                "execution_id": execution_id, "status": "error", "execution_count": None,
                "error": {"ename": "SessionLost", "evalue": cause, "kind": NODE_LOST}}))

    def _link_error(self, link: _Link, request_id: Any, message: str | None = None,
                    lost: bool = False) -> dict:
        if lost:
            error = P.RPCError(P.SESSION_LOST, message or "the node was lost",
                               {"kind": NODE_LOST})
        else:
            error = P.RPCError(P.INTERNAL_ERROR, message or
                               f"the connection to node {link.node.key} is closed")
        return P.error_response(request_id, error)

    # -- lifetime ----------------------------------------------------------------------
    def connection_ended(self, conn: Connection) -> None:
        # the client is gone: its links close, and each node cancels what
        # the client still had running there
        for (owner, _key), link in list(self._links.items()):
            if owner is conn:
                link.close()

    def _started(self) -> None:
        super()._started()
        for node in self.placement.nodes():
            self._link(None, node)  # watch every node from the start

    async def shutdown(self, reason: str = "server shutdown", grace: float = 5.0) -> None:
        """The server's graceful shutdown (the nodes cancel and answer what is in
        flight), then every link closes."""
        await super().shutdown(reason, grace)
        self._closing = True
        links = list(self._links.values())
        for link in links:
            link.close()
        await asyncio.gather(*(link.task for link in links), return_exceptions=True)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop the nodes' servers, and with them their sessions."""
        self._closing = True
        for conn in list(self.connections):
            conn._lost()
        self.placement.close()
        return True


def run(placement: Placement, transport: str, address: str | None = None, *,
        token: str | None = None, limits: Limits | None = None,
        shutdown_grace: float = 5.0) -> int:
    """Serve a gateway until EOF (stdio) or SIGINT/SIGTERM (``pyrepl3 serve
    --placement ray``); the placement's nodes stop with it."""
    return serve_until_stopped(Gateway(placement, token=token, limits=limits), transport,
                               address, shutdown_grace)


@contextlib.contextmanager
def serving_unix(gateway: Gateway, path: str, *, grace: float = 5.0) -> Iterator[Gateway]:
    """``gateway`` on a unix socket at ``path``, its loop on a thread of this
    process (a host embedding the gateway; the tests and the benchmark); on
    exit, shut down gracefully and stop the nodes."""
    loop = asyncio.new_event_loop()
    listening = threading.Event()
    serve: list[asyncio.Task] = []
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        serve.append(loop.create_task(gateway.serve_unix(path, ready=lambda _p: listening.set())))
        try:
            loop.run_until_complete(serve[0])
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            failure.append(exc)
            listening.set()

    thread = threading.Thread(target=run, name="pyrepl3-gateway", daemon=True)
    thread.start()
    listening.wait()
    try:
        if failure:
            raise failure[0]
        yield gateway
    finally:
        if not failure:
            asyncio.run_coroutine_threadsafe(gateway.shutdown("the host is done", grace),
                                             loop).result()
            loop.call_soon_threadsafe(serve[0].cancel)
        thread.join()
        loop.close()
        gateway.close()
