"""``pyrepl3 serve --mcp`` end to end, driven by the MCP SDK's own client.

Every test starts the real server as a child process (``python -m
pyrepl3_ext.cli serve --mcp ...``) and talks to it over stdio (one test over
the streamable HTTP transport), the way an agent's MCP client does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("mcp", reason="the MCP SDK is not installed (pip install 'pyrepl3[mcp]')")

import anyio  # noqa: E402  (the SDK's dependency)
import mcp.types as types  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

# a server process per test; about the service, not the IPython release: once per Python
pytestmark = pytest.mark.heavy

TOOLS = {"create_session", "close_session", "list_sessions", "execute", "send_input",
         "cancel", "list_variables", "get_variable", "take_snapshot", "restore_snapshot"}


def serve(*flags: str, elicit=None, body) -> None:
    """Run ``body(client)`` against a fresh ``pyrepl3 serve --mcp FLAGS`` over stdio."""
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "pyrepl3_ext.cli", "serve", "--mcp", *flags],
                                   env={"PYTHONPATH": os.pathsep.join(sys.path)})

    async def main() -> None:
        with open(os.devnull, "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write, elicitation_callback=elicit) as client:
                    await client.initialize()
                    await body(client)

    anyio.run(main)


def text(result: types.CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def call(client: ClientSession, tool: str, **arguments) -> str:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text(result)
    return text(result)


async def new_session(client: ClientSession) -> str:
    answer = await call(client, "create_session")
    return answer.split("'")[1]


async def wait_idle(client: ClientSession, session: str) -> None:
    """Poll list_sessions until ``session`` is idle (pytest-timeout bounds it)."""
    while f"{session}: idle" not in await call(client, "list_sessions"):
        await anyio.sleep(0.05)


def test_tools_are_described_and_take_no_operator_settings():
    async def body(client):
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description and len(tool.description) > 30, tool.name
            # the operator chooses these on the command line, never the agent
            assert not {"policy", "isolation", "limits", "confine"} & set(
                tool.input_schema.get("properties", {})), tool.name
        assert {"session", "code", "timeout", "transaction"} <= set(
            tools["execute"].input_schema["properties"])

    serve(body=body)


def test_execute_renders_output_result_and_error():
    async def body(client):
        s = await new_session(client)
        answer = await call(client, "execute", session=s,
                            code="import sys\nprint('hello')\nprint('oops', file=sys.stderr)\n6 * 7")
        first, rest = answer.split("\n", 1)
        assert first.startswith("[ok] In[1]")
        assert "hello" in rest and "[stderr]\noops" in rest
        assert "Out[1]: 42" in rest
        answer = await call(client, "execute", session=s,
                            code="def f():\n    return 1 / 0\nf()")
        assert answer.startswith("[error]")
        assert "ZeroDivisionError: division by zero" in answer
        assert "return 1 / 0" in answer  # the traceback, with the cell's own line
        # a transaction undoes the failing cell's assignments
        answer = await call(client, "execute", session=s, code="a = 1")
        answer = await call(client, "execute", session=s, code="a = 2\nraise ValueError('no')",
                            transaction=True)
        assert "rolled back" in answer
        assert await call(client, "get_variable", session=s, name="a") == "a: int = 1"
        sessions = await call(client, "list_sessions")
        assert f"{s}: idle" in sessions
        assert "is closed" in await call(client, "close_session", session=s)
        assert "No open sessions" in await call(client, "list_sessions")
        result = await client.call_tool("execute", {"session": s, "code": "1"})
        assert result.is_error and f"no session {s!r}" in text(result)

    serve(body=body)


def test_long_output_is_cut_with_a_note_of_what_was_dropped():
    async def body(client):
        s = await new_session(client)
        answer = await call(client, "execute", session=s,
                            code="for i in range(20000):\n    print(f'line {i:05d}')\n'end'")
        assert len(answer) < 5000  # --max-output-chars 3000, plus the status and notes
        assert "line 00000" in answer and "line 19999" in answer  # head and tail kept
        assert "line 10000" not in answer
        dropped = int(answer.split("[... ")[1].split(" characters")[0].replace(",", ""))
        assert dropped > 200_000 - 3000
        assert "Out[1]: 'end'" in answer

    serve("--max-output-chars", "3000", body=body)


def test_request_cancellation_cancels_the_cell_and_progress_is_reported():
    async def body(client):
        s = await new_session(client)
        progress: list[str] = []
        started = anyio.Event()

        async def on_progress(value, total, message):
            progress.append(message or "")
            started.set()

        async def run_forever():
            await client.call_tool("execute", {
                "session": s, "code": "n = 0\nprint('spinning')\nwhile True:\n    n += 1"},
                progress_callback=on_progress)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run_forever)
            await started.wait()  # a progress notification arrived: the cell is running
            tasks.cancel_scope.cancel()  # the client sends notifications/cancelled
        assert any("running for" in m for m in progress)
        assert any("spinning" in m for m in progress)  # the last line of output
        await wait_idle(client, s)
        count = await call(client, "get_variable", session=s, name="n")
        assert int(count.split("= ")[1]) > 0
        # the session lives on after the cancel
        assert "Out[2]: 'still here'" in await call(client, "execute", session=s,
                                                     code="'still here'")

    serve(body=body)


def test_cancel_tool_stops_a_busy_loop():
    async def body(client):
        s = await new_session(client)
        answers: list[str] = []

        async def run_forever():
            answers.append(await call(client, "execute", session=s,
                                      code="while True:\n    pass"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run_forever)
            while "busy" not in await call(client, "list_sessions"):
                await anyio.sleep(0.02)
            assert "Cancel sent" in await call(client, "cancel", session=s)
        assert answers[0].startswith("[cancelled]")
        assert "The cell was cancelled." in answers[0]
        assert "CellCancelled" in answers[0]
        assert "not running a cell" in await call(client, "cancel", session=s)

    serve(body=body)


def test_input_is_asked_through_elicitation_when_the_client_offers_it():
    asked: list[str] = []

    async def elicit(context, params):
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"text": "Ada"})

    async def body(client):
        s = await new_session(client)
        answer = await call(client, "execute", session=s,
                            code="name = input('your name? ')\nprint('hi', name)")
        assert answer.startswith("[ok]") and "hi Ada" in answer
        assert asked and "your name? " in asked[0]

    serve(elicit=elicit, body=body)


def test_input_is_answered_with_send_input_without_elicitation():
    async def body(client):
        s = await new_session(client)
        answer = await call(client, "execute", session=s,
                            code="print('before')\na = input('first? ')\nb = input('second? ')\n"
                                 "print('got', a, b)\na + b")
        assert "before" in answer and "[waiting for input]" in answer and "'first? '" in answer
        assert "waiting for input" in await call(client, "list_sessions")
        refused = await client.call_tool("execute", {"session": s, "code": "1"})
        assert refused.is_error and "waits for input" in text(refused)
        answer = await call(client, "send_input", session=s, text="x")
        assert "'second? '" in answer
        answer = await call(client, "send_input", session=s, text="y")
        assert answer.startswith("[ok]") and "got x y" in answer and "Out[1]: 'xy'" in answer
        wrong = await client.call_tool("send_input", {"session": s, "text": "z"})
        assert wrong.is_error and "waiting for input" in text(wrong)
        answer = await call(client, "execute", session=s, code="input()")
        answer = await call(client, "send_input", session=s, end_of_input=True)
        assert answer.startswith("[error]") and "EOFError" in answer

    serve(body=body)


def test_variables_and_snapshots():
    async def body(client):
        s = await new_session(client)
        await call(client, "execute", session=s, code="x = [1, 2, 3]\ntext = 'abc'")
        listing = await call(client, "list_variables", session=s)
        assert "x: list = [1, 2, 3]" in listing and "text: str = 'abc'" in listing
        assert "Snapshot 'before' taken" in await call(client, "take_snapshot", session=s,
                                                       name="before")
        await call(client, "execute", session=s, code="x.append(4)\ny = 1")
        restored = await call(client, "restore_snapshot", session=s, name="before")
        assert "removed y" in restored
        assert await call(client, "get_variable", session=s, name="x") == "x: list = [1, 2, 3]"
        missing = await client.call_tool("get_variable", {"session": s, "name": "y"})
        assert missing.is_error and "no variable 'y'" in text(missing)
        unknown = await client.call_tool("restore_snapshot", {"session": s, "name": "nope"})
        assert unknown.is_error and "nope" in text(unknown)

    serve(body=body)


def test_operator_flags_set_policy_and_the_timeout_ceiling():
    async def body(client):
        s = await new_session(client)
        answer = await call(client, "execute", session=s, code="import os")
        assert answer.startswith("[error]") and "security policy" in answer
        # the agent may not ask for more time than the operator allows
        answer = await call(client, "execute", session=s,
                            code="while True:\n    pass", timeout=3600)
        assert answer.startswith("[cancelled]") and "past its timeout" in answer

    serve("--policy", "restricted", "--timeout", "1", body=body)


def test_process_isolation_is_the_operators_choice():
    async def body(client):
        s = await new_session(client)
        assert f"{s}: idle, process, trusted policy" in await call(client, "list_sessions")
        answers: list[str] = []

        async def sleep_long():
            answers.append(await call(client, "execute", session=s,
                                      code="import time\nprint('sleeping')\ntime.sleep(3600)"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sleep_long)
            while "busy" not in await call(client, "list_sessions"):
                await anyio.sleep(0.02)
            await call(client, "cancel", session=s)
        assert answers[0].startswith("[cancelled]") and "sleeping" in answers[0]
        assert "Out[2]: 4" in await call(client, "execute", session=s, code="2 + 2")

    serve("--isolation", "process", body=body)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_http_transport_needs_the_token():
    import httpx2
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pyrepl3_ext.cli", "serve", "--mcp", "--http",
         f"127.0.0.1:{port}", "--token", "s3cret"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in server.stderr.readline()
        url = f"http://127.0.0.1:{port}/mcp"
        while True:  # until uvicorn accepts connections (pytest-timeout bounds it)
            try:
                refused = httpx2.post(url, json={})
                break
            except httpx2.ConnectError:
                time.sleep(0.05)
        assert refused.status_code == 401
        assert httpx2.post(url, json={}, headers={"Authorization": "Bearer nope"}
                           ).status_code == 401

        async def main() -> None:
            http = create_mcp_http_client(headers={"Authorization": "Bearer s3cret"})
            async with http, streamable_http_client(url, http_client=http) as (read, write):
                async with ClientSession(read, write) as client:
                    await client.initialize()
                    s = await new_session(client)
                    assert "Out[1]: 3" in await call(client, "execute", session=s, code="1 + 2")

        anyio.run(main)
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stderr.close()


def test_http_refuses_a_non_loopback_address():
    done = subprocess.run([sys.executable, "-m", "pyrepl3_ext.cli", "serve", "--mcp",
                           "--http", "0.0.0.0:8765"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr
