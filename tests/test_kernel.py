"""The extension inside a real Jupyter kernel (ipykernel driven by jupyter_client)."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _execute(client, code: str) -> dict:
    """Run ``code`` and return the reply content plus the iopub messages it caused."""
    msg_id = client.execute(code, stop_on_error=False)  # as in test_kernelspec.run
    reply = client.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=60)
    outputs = []
    while True:
        msg = client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
        outputs.append(msg)
    return {"reply": reply["content"], "iopub": outputs}


@contextlib.contextmanager
def running_kernel():
    """A real ipykernel (this interpreter, this checkout importable) and a
    ready client; shut down afterwards."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    km.start_kernel(env=env, extra_arguments=["--HistoryManager.enabled=False"])
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        yield client
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def test_events_from_a_real_kernel(tmp_path):
    log = tmp_path / "kernel-events.jsonl"
    with running_kernel() as client:
        setup = _execute(client, "import sys; sys.executable")
        assert setup["reply"]["status"] == "ok"
        # the kernel runs the same interpreter as the tests
        result = [m for m in setup["iopub"] if m["msg_type"] == "execute_result"]
        assert json.loads(result[0]["content"]["data"]["text/plain"].replace("'", '"')) \
            == sys.executable
        load = _execute(client, f"%load_ext pyrepl3_ext\n%config PyREPL3.event_log = {str(log)!r}")
        assert load["reply"]["status"] == "ok", load
        ok = _execute(client, "21 * 2")
        err = _execute(client, "raise ValueError('in kernel')")
        syn = _execute(client, "def broken(:")
        awaited = _execute(client, "import asyncio\nawait asyncio.sleep(0)\n'awaited'")
        assert ok["reply"]["status"] == "ok"
        assert err["reply"]["status"] == "error"
        assert syn["reply"]["status"] == "error"
        assert awaited["reply"]["status"] == "ok"
        _execute(client, "%config PyREPL3.event_log = ''")

    events = [json.loads(line) for line in log.read_text().splitlines()]
    by_id: dict[str, list[dict]] = {}
    for e in events:
        by_id.setdefault(e["execution_id"], []).append(e)
    runs = list(by_id.values())
    # the four cells after the log was opened, then the cell that closes it
    assert [r[0]["code"] for r in runs[:4]] == [
        "21 * 2", "raise ValueError('in kernel')", "def broken(:",
        "import asyncio\nawait asyncio.sleep(0)\n'awaited'"]
    assert len(runs) == 5  # the last one closed the log while running
    for r in runs[:4]:
        assert [e["seq"] for e in r] == list(range(len(r)))
        assert r[0]["type"] == "started" and r[-1]["type"] == "finished"
    assert [e["type"] for e in runs[0]] == ["started", "result", "finished"]
    assert runs[0][1]["data"]["text/plain"] == "42"
    assert runs[0][0]["execution_count"] == ok["reply"]["execution_count"]
    assert runs[1][1]["kind"] == "exception" and runs[1][1]["evalue"] == "in kernel"
    assert runs[2][1]["kind"] == "syntax"
    assert runs[3][0]["mode"] == "async"
    assert runs[3][1]["data"]["text/plain"] == "'awaited'"


def test_output_and_display_in_a_real_kernel(tmp_path):
    """In ipykernel the frontend still gets its stream/display messages (the
    routing stream tees into the kernel's OutStream) and the events carry
    the same output, including a thread's."""
    log = tmp_path / "kernel-io.jsonl"
    with running_kernel() as client:
        load = _execute(client, f"%load_ext pyrepl3_ext\n%config PyREPL3.event_log = {str(log)!r}")
        assert load["reply"]["status"] == "ok", load
        cell = _execute(client, "import threading, sys\nprint('from the cell')\n"
                                "t = threading.Thread(target=lambda: print('from a thread'))\n"
                                "t.start(); t.join()\nprint('to stderr', file=sys.stderr)\n"
                                "from IPython.display import display, HTML\n"
                                "display(HTML('<i>shown</i>'))")
        assert cell["reply"]["status"] == "ok"
        _execute(client, "%config PyREPL3.event_log = ''")
    streamed = "".join(m["content"]["text"] for m in cell["iopub"] if m["msg_type"] == "stream")
    assert "from the cell\n" in streamed and "from a thread\n" in streamed
    assert "to stderr\n" in streamed
    assert any(m["msg_type"] == "display_data" and "text/html" in m["content"]["data"]
               for m in cell["iopub"])
    events = [json.loads(line) for line in log.read_text().splitlines()]
    run = [e for e in events if e["execution_id"] == events[0]["execution_id"]]
    assert "".join(e["text"] for e in run if e["type"] == "output"
                   and e["stream"] == "stdout") == "from the cell\nfrom a thread\n"
    assert [e["text"] for e in run if e["type"] == "output" and e["stream"] == "stderr"] \
        == ["to stderr\n"]
    shown = [e for e in run if e["type"] == "display"]
    assert len(shown) == 1 and shown[0]["data"]["text/html"] == "<i>shown</i>"


def test_is_complete_on_directive_cells():
    """jupyter console sends ``is_complete`` on every Enter: a cell that opens
    with a directive gets a reply (it used to get none: IndexError in the kernel)."""
    with running_kernel() as client:
        assert _execute(client, "%load_ext pyrepl3_ext")["reply"]["status"] == "ok"
        for code, expected in (("%%timeout 5", "incomplete"), ("%%transaction\n", "incomplete"),
                               ("%%timeout 5\nx = 1\n", "complete")):
            msg_id = client.is_complete(code)
            reply = client.get_shell_msg(timeout=30)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = client.get_shell_msg(timeout=30)
            assert reply["msg_type"] == "is_complete_reply"
            assert reply["content"]["status"] == expected, (code, reply["content"])


def test_silent_execute_refuses_a_directive():
    """Jupyter ``silent: true`` runs no pre_run_cell: a directive there is
    refused with an error reply instead of being dropped without a word."""
    with running_kernel() as client:
        assert _execute(client, "%load_ext pyrepl3_ext")["reply"]["status"] == "ok"
        msg_id = client.execute("%%timeout 5\nquietly = 1", silent=True)
        reply = client.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = client.get_shell_msg(timeout=60)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "DirectiveNotApplied"
        check = _execute(client, "'quietly' in dir()")
        result = [m for m in check["iopub"] if m["msg_type"] == "execute_result"]
        assert result[0]["content"]["data"]["text/plain"] == "False"
