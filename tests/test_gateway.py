"""The gateway (``pyrepl3_ext/scaleout/gateway.py``) in front of two local node servers.

Each node is a real ``pyrepl3 serve --tcp --isolation process`` child; the
client is ``pyrepl3_ext.client`` on the gateway's unix socket, so what is
checked is what a client of ``pyrepl3 serve --placement ray`` sees.
"""

from __future__ import annotations

import asyncio

import pytest

from pyrepl3_ext import protocol as P
from pyrepl3_ext.client import Client, ClientError
from pyrepl3_ext.scaleout.gateway import NODE_LOST, Gateway

from pyrepl3_ext.scaleout.gateway import serving_unix

from .gateway_harness import ProcessPlacement, socket_path
from .polling import async_wait_until

pytestmark = pytest.mark.heavy


@pytest.fixture
def placement(tmp_path):
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    nodes = ProcessPlacement(2, str(snapshots), str(tmp_path / "snapshot.key"))
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def gateway(placement, tmp_path):
    logs: list[str] = []
    path = socket_path(tmp_path)
    with serving_unix(Gateway(placement, log=logs.append), path) as gw:
        gw.test_path = path
        gw.test_logs = logs
        yield gw


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


def types(events):
    return [e["type"] for e in events]


def test_sessions_are_spread_and_behave_as_on_one_server(gateway, placement):
    async def main():
        async with await Client.connect_unix(gateway.test_path) as client:
            sessions = [await client.create_session(f"s{n}") for n in range(4)]
            listed = (await client.call("session.list"))["sessions"]
            assert sorted(s["session"] for s in listed) == sessions
            assert {s["node"] for s in listed} == {"node0", "node1"}
            assert all(s["isolation"] == "process" for s in listed)
            # cells in every session at once, each with its own namespace
            runs = [client.run(s, f"import os\nname = {s!r}\nprint(name)\nos.getpid()",
                               execution_id=f"{s}-e1") for s in sessions]
            results = await asyncio.gather(*runs)
            pids = set()
            for s, (response, events) in zip(sessions, results):
                assert response["status"] == "ok", response
                assert types(events) == ["started", "output", "result", "finished"]
                assert [e["seq"] for e in events] == [0, 1, 2, 3]
                assert events[1]["text"] == f"{s}\n"
                pids.add(events[2]["data"]["text/plain"])
            assert len(pids) == 4  # a process per session
            value = await client.call("namespace.get", session="s2", name="name")
            assert value["repr"] == "'s2'"
            # cancel a busy loop on a node
            execution = client.execute("s1", "while True:\n    pass")
            started = await anext(aiter(execution))
            assert started["type"] == "started"
            assert await execution.cancel("stop") is True
            response = await execution.response()
            assert response["status"] == "cancelled" and response["error"]["kind"] == "cancelled"
            # input() answered over the gateway
            execution = client.execute("s3", "answer = input('? ')\nanswer * 2")
            async for event in execution:
                if event["type"] == "input_requested":
                    await client.reply_input("s3", event["input_id"], "ab")
            assert (await execution.response())["status"] == "ok"
            assert execution.events[-2]["data"]["text/plain"] == "'abab'"
            # errors are the node's own
            with pytest.raises(ClientError) as info:
                await client.call("namespace.get", session="s0", name="missing")
            assert info.value.code == P.UNKNOWN_NAME
            with pytest.raises(ClientError) as info:
                await client.call("namespace.get", session="nope", name="x")
            assert info.value.code == P.UNKNOWN_SESSION
            with pytest.raises(ClientError) as info:
                await client.create_session("s0")
            assert info.value.code == P.INVALID_PARAMS and "in use" in info.value.message
            with pytest.raises(ClientError) as info:
                await client.create_session(isolation="in-process")
            assert info.value.code == P.INVALID_PARAMS
            assert (await client.call("session.close", session="s0")) == {"closed": True}
            assert sorted(s["session"] for s in (await client.call("session.list"))["sessions"]) \
                == sessions[1:]
            info = await client.call("server.info")
            assert info["placement"]["kind"] == "test" and info["isolation"] == "process"
    run(main())
    assert sum(placement.held.values()) == 3  # the closed session's reservation went back


def test_a_client_that_leaves_has_its_executions_cancelled_on_the_node(gateway):
    async def main():
        async with await Client.connect_unix(gateway.test_path) as client:
            session = await client.create_session("left")
        leaving = await Client.connect_unix(gateway.test_path)
        execution = leaving.execute(session, "import time\nwhile True:\n    time.sleep(0.01)")
        assert (await anext(aiter(execution)))["type"] == "started"
        await leaving.close()
        async with await Client.connect_unix(gateway.test_path) as client:
            while (await client.call("session.info", session=session))["busy"]:
                await asyncio.sleep(0.02)
            response, _ = await client.run(session, "1 + 1")
            assert response["status"] == "ok"
    run(main())


def test_a_lost_node_loses_only_its_sessions_and_one_comes_back_from_its_snapshot(
        gateway, placement):
    async def main():
        async with await Client.connect_unix(gateway.test_path) as client:
            notes: list[tuple[str, dict]] = []
            client.on_notification = lambda method, params: notes.append((method, params))
            sessions = [await client.create_session(f"n{i}") for i in range(4)]
            where = {s["session"]: s["node"]
                     for s in (await client.call("session.list"))["sessions"]}
            doomed = [s for s in sessions if where[s] == "node0"]
            spared = [s for s in sessions if where[s] == "node1"]
            assert doomed and spared
            kept = doomed[0]
            await client.run(kept, "kept = {'answer': 42}")
            await client.call("snapshot.take", session=kept, name="before")
            await client.call("snapshot.save", session=kept, name="before", file=f"{kept}-snap")
            hanging = client.execute(doomed[-1], "import time\ntime.sleep(600)")
            assert (await anext(aiter(hanging)))["type"] == "started"
            placement.kill("node0")
            response = await hanging.response()
            assert response["status"] == "error" and response["error"]["kind"] == NODE_LOST
            assert types(hanging.events) == ["started", "error", "finished"]
            assert [e["seq"] for e in hanging.events] == [0, 1, 2]
            await async_wait_until(lambda: len(notes) >= len(doomed), "session.lost")
            assert sorted(p["session"] for m, p in notes if m == "session.lost") == sorted(doomed)
            assert all(p["kind"] == NODE_LOST and "node0" in p["message"] for _m, p in notes)
            for s in doomed:
                with pytest.raises(ClientError) as info:
                    await client.run(s, "1")
                assert info.value.code == P.SESSION_LOST
                assert info.value.data == {"kind": NODE_LOST}
                described = await client.call("session.info", session=s)
                assert described["lost"]["kind"] == NODE_LOST
            for s in spared:
                response, events = await client.run(s, "2 + 2")
                assert response["status"] == "ok" and events[1]["data"]["text/plain"] == "4"
            restored = await client.call("session.restart", session=kept, file=f"{kept}-snap")
            assert restored["node"] == "node1" and restored["session"] == kept
            response, events = await client.run(kept, "kept['answer']")
            assert events[1]["data"]["text/plain"] == "42"
            listed = {s["session"]: s for s in (await client.call("session.list"))["sessions"]}
            assert listed[kept]["node"] == "node1" and "lost" not in listed[kept]
            assert all("lost" in listed[s] for s in doomed if s != kept)
    run(main())
    assert any("node0 was lost" in line for line in gateway.test_logs)


def _serve(*args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pyrepl3_ext.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_ray_placement_refuses_an_isolation_flag_and_a_bad_cpu_share():
    done = _serve("--stdio", "--placement", "ray", "--isolation", "process")
    assert done.returncode == 2 and "--isolation does not apply" in done.stderr
    done = _serve("--stdio", "--placement", "ray", "--session-cpus", "0")
    assert done.returncode == 2 and "--session-cpus must be positive" in done.stderr


def test_ray_placement_without_ray_says_how_to_get_it():
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("Ray is installed here (the scaleout session): the gateway runs instead")
    done = _serve("--stdio", "--placement", "ray")
    assert done.returncode == 2 and "pip install 'pyrepl3[ray]'" in done.stderr


def test_events_are_relayed_complete_and_in_order_whatever_the_execution_id(gateway):
    async def main():
        async with await Client.connect_unix(gateway.test_path) as client:
            session = await client.create_session("chatty")
            for execution_id in ("plain-id", 'we"ird\\id \u00e9'):
                response, events = await client.run(
                    session, "for i in range(20000):\n    print(i)", execution_id=execution_id)
                assert response["status"] == "ok"
                assert [e["seq"] for e in events] == list(range(len(events)))
                assert {e["execution_id"] for e in events} == {execution_id}
                text = "".join(e.get("text", "") for e in events if e["type"] == "output")
                assert text == "".join(f"{i}\n" for i in range(20000))
    run(main())


def test_a_client_that_does_not_read_holds_back_its_cell_not_the_gateways_memory(gateway):
    import json

    limit = gateway.limits.max_buffer_bytes
    lines = 60000  # 2,000 characters each: 120 MB of output, far more than every buffer

    async def main():
        # a small read-ahead: asyncio stops reading the socket once 128 KiB wait
        reader, writer = await asyncio.open_unix_connection(gateway.test_path,
                                                            limit=2 ** 16)

        def send(id_, method, **params):
            writer.write(P.encode({"jsonrpc": "2.0", "id": id_, "method": method,
                                   "params": params}))

        send(1, "session.create", session_id="slow")
        assert json.loads(await reader.readline())["result"]["session"] == "slow"
        send(2, "execute", session="slow", execution_id="flood",
             code=f"for i in range({lines}):\n    print(str(i).rjust(2000, '.'))")
        async with await Client.connect_unix(gateway.test_path) as other:
            # the cell runs, then waits: the gateway stopped reading the node for
            # this client, and its own buffer for the client stays bounded
            await async_wait_until(lambda: _buffered(gateway) > limit // 2, "the flood")
            for _ in range(20):
                await asyncio.sleep(0.05)
                assert _buffered(gateway) < limit + 2 * 262144
            assert (await other.call("session.info", session="slow"))["running"] == "flood"
            # another session on the same node is not slowed by it
            other_session = await other.create_session("quick")
            response, _ = await other.run(other_session, "1 + 1")
            assert response["status"] == "ok"
        outputs = 0
        while True:
            message = json.loads(await reader.readline())
            if message.get("id") == 2:
                break
            if message["params"]["event"]["type"] == "output":
                outputs += 1
        assert message["result"]["status"] == "ok" and outputs == lines
        writer.close()
    run(main())


def _buffered(gateway) -> int:
    return max((c.writer.transport.get_write_buffer_size() for c in list(gateway.connections)
                if not c.closed), default=0)
