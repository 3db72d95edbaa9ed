"""Load: many sessions x many executions over concurrent clients of one real
server; not one event lost, duplicated or out of order."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from pyrepl3_ext import _compat
from pyrepl3_ext.client import Client, ServerProcess

#: costly and not about the IPython version (tests/conftest.py)
pytestmark = pytest.mark.heavy

PATCHED = _compat.is_patched_build()
#: the patched build runs sessions concurrently: 32 sessions x 1,000 executions;
#: stock IPython runs one session's cell at a time, so there the clients take
#: turns (a smaller run of the same checks)
SESSIONS, EXECUTIONS = (32, 1000) if PATCHED else (4, 100)


def check_execution(index: int, response: dict, events: list[dict]) -> list[str]:
    problems = []
    if response.get("status") != "ok":
        problems.append(f"status {response.get('status')}: {response.get('error')}")
    if [e["seq"] for e in events] != list(range(len(events))):
        problems.append(f"seq not gapless/ordered: {[e['seq'] for e in events]}")
    kinds = [e["type"] for e in events]
    if not kinds or kinds[0] != "started" or kinds[-1] != "finished" or kinds.count("finished") != 1:
        problems.append(f"bad sequence {kinds}")
    if "result" in kinds:
        result_at = kinds.index("result")
        if any(k == "output" for k in kinds[result_at:]):
            problems.append(f"output after the result: {kinds}")
        if events[result_at]["data"]["text/plain"] != str(index):
            problems.append(f"wrong result {events[result_at]['data']}")
    else:
        problems.append(f"no result: {kinds}")
    outputs = "".join(e["text"] for e in events if e["type"] == "output")
    if outputs and outputs != f"line {index}\n":
        problems.append(f"wrong output {outputs!r}")
    return problems


@pytest.mark.timeout(900)
def test_sessions_times_executions_lose_nothing():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "load.sock")
        with ServerProcess("--unix", path):
            turn = asyncio.Lock() if not PATCHED else None

            async def one_client(k: int) -> list[str]:
                async with await Client.connect_unix(path) as client:
                    session = await client.create_session(f"load{k}")
                    problems = []
                    for i in range(EXECUTIONS):
                        code = f"print('line {i}')\n{i}"
                        if turn is None:
                            response, events = await client.run(session, code)
                        else:
                            async with turn:
                                response, events = await client.run(session, code)
                        problems += [f"client {k} execution {i}: {p}"
                                     for p in check_execution(i, response, events)]
                    await client.close_session(session)
                    return problems

            async def main() -> list[str]:
                results = await asyncio.gather(*(one_client(k) for k in range(SESSIONS)))
                return [p for r in results for p in r]

            problems = asyncio.run(main())
            assert problems == [], problems[:20]
