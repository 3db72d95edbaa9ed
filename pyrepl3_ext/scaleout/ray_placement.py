"""Sessions placed on a Ray cluster: the only module of pyrepl3 that imports Ray.

Ray does what we must not write ourselves: placement by resources, knowing
which nodes are alive, and why an actor or a node died.  Two things run on
the cluster:

* one :class:`NodeHost` actor per node that hosts sessions, pinned to its
  node: an ordinary pyrepl3 server (``server.py``) on the node's address,
  whose engine runs every session in a supervised process of its own
  (``engine/``: the same worker, channel, limits and confinement as on one
  machine).  The actor asks for no CPU, so it never competes with sessions;
  when it dies (its node died, or it was killed), its fork server and every
  session process die with it (``forkserver.py``'s invariant);
* one placement group per session, whose single bundle is the session's
  resources: ``session_cpus`` CPUs and its ``memory`` limit as Ray's
  ``memory`` resource.  Ray's scheduler chooses the node; the bundle keeps
  those resources reserved until the session closes or is lost, so Ray
  never places more sessions on a node than it has room for.

Placing a session on a warm node is a placement group (a few milliseconds
on this project's machine: ``bench/bench_scaleout.py``) and a fork.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import (placement_group, placement_group_table,
                                      remove_placement_group)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .gateway import Node, PlacementError


class NodeHost:
    """A pyrepl3 server with process sessions on one node (a Ray actor's body)."""

    def __init__(self, options: dict):
        from ..cancellation.handoff import shorten_switch_interval
        from ..engine import Engine
        from ..engine.limits import Limits as SessionLimits
        from ..server import Limits, Server, new_token

        shorten_switch_interval()
        limits = options.get("session_limits")
        self.engine = Engine(isolation="process", kill_grace=options.get("kill_grace", 3.0),
                             limits=SessionLimits.parse(limits) if limits else None,
                             confine=options.get("confine"))
        self.engine.warm_up()
        self.token = new_token()
        self.server = Server(self.engine, token=self.token,
                             limits=Limits(**options.get("server_limits", {})),
                             files_roots=options.get("files_roots", ()),
                             snapshot_dir=options.get("snapshot_dir"),
                             snapshot_key_file=options.get("snapshot_key_file"),
                             log=lambda text: print(f"[pyrepl3 node] {text}", flush=True))
        self.host = ray.util.get_node_ip_address()
        self.port = 0
        bound = threading.Event()
        failure: list[BaseException] = []

        def ready(_host: str, port: int) -> None:
            self.port = port
            bound.set()

        def serve() -> None:
            try:
                asyncio.run(self.server.serve_tcp(self.host, 0, ready=ready))
            except BaseException as exc:  # noqa: BLE001 - reported to the constructor
                failure.append(exc)
                bound.set()

        threading.Thread(target=serve, name="pyrepl3-node-server", daemon=True).start()
        bound.wait(60)
        if failure or not self.port:
            raise RuntimeError(f"the node's server did not start: {failure[:1]!r}")

    def address(self) -> tuple[str, int, str]:
        return self.host, self.port, self.token

    def ping(self) -> int:
        return os.getpid()


class _Reservation:
    __slots__ = ("node", "group", "_held")

    def __init__(self, node: Node, group: Any, held: set):
        self.node = node
        self.group = group
        #: the placement's groups not yet released (``close`` releases the rest)
        self._held = held
        held.add(group)

    def release(self) -> None:
        try:
            self._held.remove(self.group)
        except KeyError:
            return  # released already, or by the placement's close
        remove_placement_group(self.group)


class RayPlacement:
    """A :class:`~pyrepl3_ext.scaleout.gateway.Placement` on a Ray cluster.

    ``address``: a cluster's (``ray.init``'s meaning: ``"auto"`` or
    ``RAY_ADDRESS``), ``"local"`` to start a Ray of this machine, or None
    when this process is connected already (the tests).
    """

    concurrent = True
    isolation = "process"

    def __init__(self, address: str | None = "auto", *, session_cpus: float = 0.1,
                 host_options: dict | None = None, reserve_timeout: float = 10.0,
                 log: Callable[[str], None] | None = None):
        if session_cpus <= 0:
            raise ValueError(f"session_cpus must be positive, got {session_cpus}")
        self._started_ray = False
        if address is not None and not ray.is_initialized():
            ray.init(address=None if address == "local" else address,
                     log_to_driver=False, configure_logging=False)
            self._started_ray = True
        self.session_cpus = session_cpus
        self.reserve_timeout = reserve_timeout
        self.host_options = dict(host_options or {})
        limits = self.host_options.get("session_limits")
        from ..engine.limits import Limits as SessionLimits

        self.limits = SessionLimits.parse(limits) if limits else None
        self.log = log or (lambda text: None)
        self._lock = threading.Lock()
        #: the placement groups of sessions not yet closed or lost
        self._groups: set = set()
        #: node id -> (actor, Node)
        self._hosts: dict[str, tuple[Any, Node]] = {}
        self._actor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)(NodeHost)
        nodes = [n["NodeID"] for n in ray.nodes()
                 if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        self._start_hosts(nodes)

    def _start_hosts(self, node_ids: list[str]) -> None:
        actors = {node_id: self._actor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            name=None).remote(self.host_options) for node_id in node_ids}
        addresses = ray.get([actor.address.remote() for actor in actors.values()])
        with self._lock:
            for (node_id, actor), (host, port, token) in zip(actors.items(), addresses):
                self._hosts[node_id] = (actor, Node(node_id, host, port, token))
        for node_id in node_ids:
            self.log(f"node {node_id} hosts sessions at {self._hosts[node_id][1].host}:"
                     f"{self._hosts[node_id][1].port}")

    def nodes(self) -> list[Node]:
        with self._lock:
            return [node for _actor, node in self._hosts.values()]

    def reserve(self, session_id: str, limits: dict | None) -> _Reservation:
        bundle: dict[str, float] = {"CPU": self.session_cpus}
        memory = self._memory(limits)
        if memory:
            bundle["memory"] = float(memory)
        group = placement_group([bundle], strategy="STRICT_PACK")
        try:
            ray.get(group.ready(), timeout=self.reserve_timeout)
        except GetTimeoutError:
            remove_placement_group(group)
            raise PlacementError(f"no node has room for {bundle} (waited "
                                 f"{self.reserve_timeout:g} s)") from None
        node_id = placement_group_table(group)["bundles_to_node_id"][0]
        with self._lock:
            known = self._hosts.get(node_id)
        if known is None:  # a node that joined the cluster after we started
            try:
                self._start_hosts([node_id])
            except Exception as exc:  # noqa: BLE001 - the session cannot go there
                remove_placement_group(group)
                raise PlacementError(f"node {node_id} could not start a host: {exc}") from None
            known = self._hosts[node_id]
        return _Reservation(known[1], group, self._groups)

    def _memory(self, limits: dict | None) -> int | None:
        """The session's memory limit in bytes (its own over the ceiling's)."""
        from ..engine.limits import Limits as SessionLimits

        merged = {**(self.limits.as_dict() if self.limits else {}), **(limits or {})}
        try:
            return SessionLimits.parse(merged).memory
        except ValueError as exc:
            raise PlacementError(f"limits: {exc}") from None

    def failure(self, node: Node) -> str | None:
        with self._lock:
            known = self._hosts.get(node.key)
        if known is None:
            return "the node is not one of this gateway's"
        try:
            ray.get(known[0].ping.remote(), timeout=10)
        except RayActorError as exc:
            with self._lock:
                self._hosts.pop(node.key, None)
            return _cause(exc)
        except GetTimeoutError:
            return "the node's host did not answer within 10 s"
        return None

    def describe(self) -> dict:
        return {"kind": "ray", "nodes": [node.key for node in self.nodes()],
                "session_cpus": self.session_cpus}

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        groups = list(self._groups)
        self._groups.clear()
        for group in groups:  # the sessions end with their hosts: so do their bundles
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001 - removed with its node already
                pass
        for actor, _node in hosts:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - gone already
                pass
        if self._started_ray:
            ray.shutdown()


def _cause(exc: BaseException) -> str:
    """Ray's reason for an actor's death, without its listing of ids."""
    text = str(exc)
    for line in text.splitlines():
        if "died because" in line or "node" in line.lower() and "dead" in line.lower():
            return line.strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
