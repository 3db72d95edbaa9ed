"""snapshot.save/snapshot.load: a session's namespace kept in signed files of
the operator's directory, across a real restart of the server."""

from __future__ import annotations

import asyncio
import os

import pytest

from pyrepl3_ext import protocol as P
from pyrepl3_ext.client import Client, ClientError, ServerProcess

#: costly and not about the IPython version (tests/conftest.py)
pytestmark = pytest.mark.heavy

WAIT = 60


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env["IPYTHONDIR"] = str(tmp_path / "ipython")  # the per-user key lives here
    return env


@pytest.mark.parametrize("isolation", ["in-process", "process"])
def test_namespace_survives_a_server_restart(tmp_path, isolation):
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    args = ("--unix", str(tmp_path / "s.sock"), "--snapshot-dir", str(snapshots),
            "--isolation", isolation)

    async def first(path):
        async with await Client.connect_unix(path) as client:
            session = await client.create_session("work")
            response, _ = await client.run(session, "import fractions\n"
                                                    "data = {'n': 42, 'f': fractions.Fraction(1, 3)}\n"
                                                    "label = 'kept'")
            assert response["status"] == "ok"
            await client.call("snapshot.take", session=session, name="day1")
            saved = await client.call("snapshot.save", session=session, name="day1",
                                      file="day1-backup")
            assert saved["file"] == "day1-backup"
            assert "path" not in saved["snapshot"]  # the server's paths stay its own

    async def second(path):
        async with await Client.connect_unix(path) as client:
            session = await client.create_session("work")
            with pytest.raises(ClientError) as missing:
                await client.call("namespace.get", session=session, name="label")
            assert missing.value.code == P.UNKNOWN_NAME
            loaded = await client.call("snapshot.load", session=session, file="day1-backup",
                                       restore=True)
            assert loaded["file"] == "day1-backup"
            response, events = await client.run(session, "data['n'], str(data['f']), label")
            assert response["status"] == "ok", response
            result = [e for e in events if e["type"] == "result"][0]
            return result["data"]["text/plain"]

    with ServerProcess(*args, env=_env(tmp_path)) as server:
        asyncio.run(asyncio.wait_for(first(server.address), WAIT))
    assert server.process.returncode == 0
    files = os.listdir(snapshots)
    assert files == ["day1-backup.snapshot"]
    assert os.stat(snapshots / files[0]).st_mode & 0o077 == 0  # owner-only
    with ServerProcess(*args, env=_env(tmp_path)) as server:
        shown = asyncio.run(asyncio.wait_for(second(server.address), WAIT))
    assert shown == "(42, '1/3', 'kept')"


@pytest.mark.parametrize("isolation", ["in-process", "process"])
def test_snapshot_files_are_refused_when_tampered_or_absent(tmp_path, isolation):
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()

    async def main(path):
        async with await Client.connect_unix(path) as client:
            session = await client.create_session("s")
            await client.run(session, "x = 1")
            await client.call("snapshot.take", session=session, name="a")
            await client.call("snapshot.save", session=session, name="a")
            target = snapshots / "a.snapshot"
            data = bytearray(target.read_bytes())
            data[-5] ^= 0xFF
            target.write_bytes(bytes(data))
            with pytest.raises(ClientError) as tampered:
                await client.call("snapshot.load", session=session, file="a")
            assert tampered.value.code == P.INVALID_PARAMS
            assert "failed verification" in tampered.value.message
            with pytest.raises(ClientError) as absent:
                await client.call("snapshot.load", session=session, file="nothing")
            assert absent.value.code == P.UNKNOWN_NAME
            for bad in ("../escape", ".hidden", "a/b"):
                with pytest.raises(ClientError) as escaping:
                    await client.call("snapshot.save", session=session, name="a", file=bad)
                assert escaping.value.code == P.INVALID_PARAMS
            with pytest.raises(ClientError) as unknown:
                await client.call("snapshot.save", session=session, name="never-taken")
            assert unknown.value.code == P.UNKNOWN_NAME

    with ServerProcess("--unix", str(tmp_path / "s.sock"), "--snapshot-dir", str(snapshots),
                       "--isolation", isolation, env=_env(tmp_path)) as server:
        asyncio.run(asyncio.wait_for(main(server.address), WAIT))
    assert sorted(os.listdir(snapshots)) == ["a.snapshot"]


def test_snapshot_files_need_a_directory(tmp_path):
    async def main():
        async with await Client.spawn_stdio(env=_env(tmp_path)) as client:
            session = await client.create_session("s")
            await client.call("snapshot.take", session=session, name="a")
            with pytest.raises(ClientError) as refused:
                await client.call("snapshot.save", session=session, name="a")
            assert refused.value.code == P.NOT_AVAILABLE
            assert "--snapshot-dir" in refused.value.message

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_a_lost_process_session_restarts_from_a_snapshot_file(tmp_path):
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    args = ("--unix", str(tmp_path / "r.sock"), "--snapshot-dir", str(snapshots),
            "--isolation", "process")

    async def main(path):
        async with await Client.connect_unix(path) as client:
            session = await client.create_session("crashy")
            await client.run(session, "kept = [1, 2, 3]")
            await client.call("snapshot.take", session=session, name="s", durable=True)
            await client.call("snapshot.save", session=session, name="s", file="crashy-s")
            response, _ = await client.run(session, "import os\nos._exit(3)")
            assert response["error"]["kind"] == "exited"
            with pytest.raises(ClientError) as both:
                await client.call("session.restart", session=session, snapshot="s",
                                  file="crashy-s")
            assert both.value.code == P.INVALID_PARAMS
            with pytest.raises(ClientError) as absent:
                await client.call("session.restart", session=session, file="no-such-file")
            assert absent.value.code == P.UNKNOWN_NAME
            restarted = await client.call("session.restart", session=session, file="crashy-s")
            assert restarted["session"] == session and "restored" in restarted
            response, events = await client.run(session, "sum(kept)")
            assert [e["data"]["text/plain"] for e in events if e["type"] == "result"] == ["6"]

    with ServerProcess(*args, env=_env(tmp_path)) as server:
        asyncio.run(asyncio.wait_for(main(server.address), WAIT))
