"""MCP server: what an agent waits for, through the MCP SDK's own client.

Run: ``python bench/bench_mcp.py [--samples N] [--cancels N]``.  Starts
``pyrepl3 serve --mcp`` over stdio twice (in-process sessions, and
``--isolation process``), drives each with ``mcp.client`` as an agent's MCP
client does, and measures, alternating between the two servers:

* ``execute`` of ``x = 1``: tool call to tool result;
* a busy loop (``while True: pass``) stopped by the ``cancel`` tool: from
  sending ``cancel`` to the ``execute`` call's result arriving (the figure
  issue 19 holds to the cancel latency goal, docs/cancellation.md);
* the same loop stopped by cancelling the MCP request itself
  (``notifications/cancelled``): from the client's cancel to the session
  being idle again, as ``list_sessions`` reports it (an upper bound: the
  polling adds up to one round trip).

Writes JSON to ``bench/results/``.  Needs ``pip install 'pyrepl3[mcp]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anyio  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

from bench._common import write_results  # noqa: E402

BUSY = "while True:\n    pass"


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_ms": statistics.median(s) * 1e3,
            "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] * 1e3,
            "max_ms": s[-1] * 1e3, "n": len(s)}


def _text(result) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def _call(client: ClientSession, tool: str, **arguments) -> str:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise RuntimeError(f"{tool}: {_text(result)}")
    return _text(result)


async def _until_busy(client: ClientSession, session: str, busy: bool) -> None:
    while (("busy" in await _call(client, "list_sessions")) != busy):
        await anyio.sleep(0.001)


async def _round_trip(client: ClientSession, session: str) -> float:
    t0 = time.perf_counter()
    await _call(client, "execute", session=session, code="x = 1")
    return time.perf_counter() - t0


async def _cancel_by_tool(client: ClientSession, session: str) -> float:
    box: dict = {}

    async def run() -> None:
        box["answer"] = await _call(client, "execute", session=session, code=BUSY)
        box["t1"] = time.perf_counter()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        await _until_busy(client, session, True)
        t0 = time.perf_counter()
        await _call(client, "cancel", session=session)
    if not box["answer"].startswith("[cancelled]"):
        raise RuntimeError(f"the loop was not cancelled: {box['answer'][:200]}")
    return box["t1"] - t0


async def _cancel_by_request(client: ClientSession, session: str) -> float:
    async def run() -> None:
        await client.call_tool("execute", {"session": session, "code": BUSY})

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        await _until_busy(client, session, True)
        t0 = time.perf_counter()
        tasks.cancel_scope.cancel()
    await _until_busy(client, session, False)
    return time.perf_counter() - t0


def measure(samples: int, cancels: int) -> dict:
    """Both servers open at once; each sample alternates between them."""
    servers = {"in-process": [], "process": ["--isolation", "process"]}
    out: dict = {}

    async def main() -> None:
        clients: dict[str, tuple[ClientSession, str]] = {}
        async with contextlib.AsyncExitStack() as stack:
            errlog = stack.enter_context(open(os.devnull, "w"))
            for name, flags in servers.items():
                params = StdioServerParameters(
                    command=sys.executable,
                    args=["-m", "pyrepl3_ext.cli", "serve", "--mcp", *flags],
                    env={"PYTHONPATH": os.pathsep.join(sys.path)})
                read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
                client = await stack.enter_async_context(ClientSession(read, write))
                await client.initialize()
                session = (await _call(client, "create_session")).split("'")[1]
                for _ in range(10):  # warm
                    await _round_trip(client, session)
                clients[name] = (client, session)
            rows: dict[str, list[float]] = {
                f"{kind}, {name}": [] for kind in ("x = 1", "cancel tool", "request cancel")
                for name in servers}
            for i in range(max(samples, cancels)):
                for name, (client, session) in clients.items():
                    if i < samples:
                        rows[f"x = 1, {name}"].append(await _round_trip(client, session))
                    if i < cancels:
                        rows[f"cancel tool, {name}"].append(
                            await _cancel_by_tool(client, session))
                        rows[f"request cancel, {name}"].append(
                            await _cancel_by_request(client, session))
            for key, values in rows.items():
                out[key] = summary(values)

    anyio.run(main)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="x = 1 calls per server")
    parser.add_argument("--cancels", type=int, default=40, help="cancels of each kind per server")
    options = parser.parse_args()
    results = measure(options.samples, options.cancels)
    print("pyrepl3 serve --mcp over stdio, driven by the MCP SDK's client (ms)")
    for name, s in results.items():
        print(f"  {name:<30} p50 {s['p50_ms']:7.2f}  p99 {s['p99_ms']:7.2f}  "
              f"max {s['max_ms']:7.2f}  (n={s['n']})")
    print(f"results: {write_results('mcp', results)}")


if __name__ == "__main__":
    main()
