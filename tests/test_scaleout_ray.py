"""Sessions on a Ray cluster through the gateway: a 3-node cluster simulated on this machine.

``ray.cluster_utils.Cluster`` starts a head and three worker nodes, each a
raylet of its own; ``RayPlacement`` puts a node host on each; a client talks
to the gateway only.  Removing a node kills its raylet and every process on
it, as a machine's death would.  Runs in nox's ``scaleout`` session, which
installs Ray (``pip install pyrepl3[ray]``); elsewhere it is skipped.
"""

from __future__ import annotations

import asyncio

import pytest

ray = pytest.importorskip("ray", reason="Ray is installed by nox's scaleout session "
                                        "(pip install 'pyrepl3[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

from pyrepl3_ext import protocol as P  # noqa: E402
from pyrepl3_ext.client import Client, ClientError  # noqa: E402
from pyrepl3_ext.scaleout.gateway import NODE_LOST, Gateway, serving_unix  # noqa: E402
from pyrepl3_ext.scaleout.ray_placement import RayPlacement  # noqa: E402

from .gateway_harness import socket_path  # noqa: E402
from .polling import async_wait_until  # noqa: E402

SESSIONS = 30


@pytest.fixture(scope="module")
def cluster():
    # sessions ask for 0.1 CPU each: a node with one CPU holds ten of them, so
    # thirty sessions need all three nodes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1, memory=8 * 2 ** 30) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


def test_thirty_sessions_on_three_nodes_survive_the_loss_of_one(cluster, tmp_path):
    cluster, nodes = cluster
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    placement = RayPlacement(None, session_cpus=0.1, reserve_timeout=2.0, host_options={
        "session_limits": {"memory": "256M"}, "snapshot_dir": str(snapshots),
        "snapshot_key_file": str(tmp_path / "snapshot.key")})
    assert len(placement.nodes()) == 3
    path = socket_path(tmp_path)

    async def main():
        async with await Client.connect_unix(path) as client:
            notes: list[tuple[str, dict]] = []
            client.on_notification = lambda method, params: notes.append((method, params))
            ids = await asyncio.gather(*(client.create_session(f"r{n}")
                                         for n in range(SESSIONS)))
            listed = (await client.call("session.list"))["sessions"]
            where = {s["session"]: s["node"] for s in listed}
            assert sorted(where) == sorted(ids)
            per_node = {key: [s for s in ids if where[s] == key] for key in set(where.values())}
            assert len(per_node) == 3 and all(len(v) == 10 for v in per_node.values())

            # a cell in every session at once
            results = await asyncio.gather(*(client.run(s, f"me = {s!r}\nimport os\nos.getpid()")
                                             for s in ids))
            assert all(response["status"] == "ok" for response, _ in results)
            assert len({events[1]["data"]["text/plain"] for _, events in results}) == SESSIONS

            # a busy loop on a node, cancelled from here
            victim_key = where[ids[0]]
            busy = client.execute(ids[0], "while True:\n    pass")
            assert (await anext(aiter(busy)))["type"] == "started"
            assert await busy.cancel("enough") is True
            assert (await busy.response())["status"] == "cancelled"

            # one session of the node about to die keeps a snapshot file
            doomed = per_node[victim_key]
            kept = doomed[1]
            await client.run(kept, "state = list(range(5))")
            await client.call("snapshot.take", session=kept, name="s")
            await client.call("snapshot.save", session=kept, name="s", file="kept")
            hanging = client.execute(doomed[2], "import time\ntime.sleep(600)")
            assert (await anext(aiter(hanging)))["type"] == "started"

            cluster.remove_node(next(n for n in nodes if n.node_id == victim_key))

            response = await hanging.response()
            assert response["status"] == "error" and response["error"]["kind"] == NODE_LOST
            assert types(hanging.events) == ["started", "error", "finished"]
            await async_wait_until(lambda: len(lost(notes)) >= len(doomed), "session.lost")
            assert sorted(lost(notes)) == sorted(doomed)
            assert all(p["kind"] == NODE_LOST for m, p in notes if m == "session.lost")
            for s in doomed:
                with pytest.raises(ClientError) as info:
                    await client.call("namespace.get", session=s, name="me")
                assert info.value.code == P.SESSION_LOST

            # every other session answers every request
            others = [s for s in ids if s not in doomed]
            results = await asyncio.gather(*(client.run(s, "me") for s in others))
            assert [events[1]["data"]["text/plain"] for _, events in results] \
                == [repr(s) for s in others]
            values = await asyncio.gather(*(client.call("namespace.get", session=s, name="me")
                                            for s in others))
            assert [v["repr"] for v in values] == [repr(s) for s in others]

            # the lost session with a snapshot comes back on a live node; the live
            # nodes are full (ten sessions each) until one of theirs closes
            with pytest.raises(ClientError) as info:
                await client.call("session.restart", session=kept, file="kept")
            assert info.value.code == P.NOT_AVAILABLE and "room" in info.value.message
            assert await client.call("session.close", session=others[0]) == {"closed": True}
            restored = await client.call("session.restart", session=kept, file="kept")
            assert restored["node"] != victim_key
            response, events = await client.run(kept, "sum(state)")
            assert events[1]["data"]["text/plain"] == "10"
            info = await client.call("server.info")
            assert victim_key in info["lost_nodes"]

    with serving_unix(Gateway(placement), path):
        run(main())


def test_the_command_serves_a_gateway_on_the_cluster(cluster, tmp_path):
    from pyrepl3_ext.client import ServerProcess

    cluster, _nodes = cluster
    path = socket_path(tmp_path)
    with ServerProcess("--unix", path, "--placement", "ray", "--ray-address", cluster.address,
                       "--snapshot-dir", str(tmp_path), "--limits", "memory=128M",
                       timeout=180) as server:
        async def main():
            async with await Client.connect_unix(path) as client:
                info = await client.call("server.info")
                assert info["placement"]["kind"] == "ray" and info["placement"]["nodes"]
                session = await client.create_session()
                response, events = await client.run(session, "import os\nos.getpid() > 0")
                assert events[1]["data"]["text/plain"] == "True"
                assert (await client.call("session.info", session=session))["node"] \
                    in info["placement"]["nodes"]
        run(main())
    assert server.process.returncode == 0, "".join(server.log)


def lost(notes):
    return [p["session"] for m, p in notes if m == "session.lost"]


def types(events):
    return [e["type"] for e in events]
