"""Running a gateway in the test's process, and a placement made of local servers.

``ProcessPlacement`` is the gateway's ``Placement`` with each "node" a real
``pyrepl3 serve --tcp --isolation process`` child: the gateway's routing,
forwarding and node-loss handling are tested without a cluster, and a node
dies for real when its process is killed.  ``test_scaleout_ray.py`` runs the
same gateway on Ray.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

from pyrepl3_ext.client import ServerProcess
from pyrepl3_ext.scaleout.gateway import Node, PlacementError


class _Held:
    def __init__(self, placement: "ProcessPlacement", node: Node):
        self.placement = placement
        self.node = node
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            with self.placement._lock:
                self.placement.held[self.node.key] -= 1


class ProcessPlacement:
    """``count`` local servers, sessions placed on the one holding fewest."""

    concurrent = True
    isolation = "process"
    limits = None

    def __init__(self, count: int, snapshot_dir: str, key_file: str):
        self.servers: dict[str, ServerProcess] = {}
        self.node_list: list[Node] = []
        self.held: dict[str, int] = {}
        self.reserved = 0
        self._lock = threading.Lock()
        for n in range(count):
            token = os.urandom(16).hex()
            server = ServerProcess("--tcp", "127.0.0.1:0", "--token", token,
                                   "--isolation", "process", "--snapshot-dir", snapshot_dir,
                                   "--snapshot-key-file", key_file,
                                   "--limits", "memory=1G,output_bytes=1G")
            host, _, port = server.address.rpartition(":")
            node = Node(f"node{n}", host, int(port), token)
            self.servers[node.key] = server
            self.node_list.append(node)
            self.held[node.key] = 0

    def nodes(self) -> list[Node]:
        return [n for n in self.node_list if self.servers[n.key].process.poll() is None]

    def reserve(self, session_id: str, limits: dict | None) -> _Held:
        alive = self.nodes()
        if not alive:
            raise PlacementError("no node is alive")
        with self._lock:
            node = min(alive, key=lambda n: self.held[n.key])
            self.held[node.key] += 1
            self.reserved += 1
        return _Held(self, node)

    def failure(self, node: Node) -> str | None:
        code = self.servers[node.key].process.poll()
        return None if code is None else f"its server exited ({code})"

    def kill(self, key: str) -> None:
        process = self.servers[key].process
        process.kill()  # its fork server then ends every session process
        process.wait()

    def describe(self) -> dict:
        return {"kind": "test", "nodes": [n.key for n in self.nodes()]}

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()


_names = itertools.count()


def socket_path(tmp_path: Any) -> str:
    return str(tmp_path / f"gw{next(_names)}.sock")
