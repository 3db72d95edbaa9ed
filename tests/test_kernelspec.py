"""``pyrepl3 kernel install``: the installed kernelspec run by jupyter_client and nbclient."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "pyrepl3-test"


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The kernelspec installed by the CLI under a temporary prefix, on JUPYTER_PATH."""
    prefix = tmp_path_factory.mktemp("prefix")
    done = subprocess.run([sys.executable, "-m", "pyrepl3_ext.cli", "kernel", "install",
                           "--prefix", str(prefix), "--name", NAME, "--policy", "guarded",
                           "--timeout", "45"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = prefix / "share" / "jupyter"
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(data)
    try:
        yield data / "kernels" / NAME
    finally:
        if old is None:
            del os.environ["JUPYTER_PATH"]
        else:
            os.environ["JUPYTER_PATH"] = old


def test_the_spec_is_listed_and_says_what_it_runs(kernels):
    spec = json.loads((kernels / "kernel.json").read_text())
    assert spec["argv"][:3] == [sys.executable, "-m", "pyrepl3_ext.kernelspec"]
    assert "--ext=pyrepl3_ext" in spec["argv"]
    assert "--PyREPL3.security_policy=guarded" in spec["argv"]
    assert "--PyREPL3.cell_timeout=45" in spec["argv"]
    listed = subprocess.run([sys.executable, "-m", "jupyter_client.kernelspecapp", "list",
                             "--json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert NAME in json.loads(listed.stdout)["kernelspecs"]


@contextlib.contextmanager
def running(name: str):
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=name)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    km.start_kernel(env=env, extra_arguments=["--HistoryManager.enabled=False"])
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        yield km, client
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def reply_of(client, msg_id: str) -> dict:
    reply = client.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=60)
    return reply["content"]


def run(client, code: str) -> tuple[dict, list[dict]]:
    # stop_on_error=False: a failing cell must not make ipykernel abort the
    # requests that reach it while it reports the error (the next check
    # would read "aborted" on a loaded machine, a test of ipykernel's queue)
    msg_id = client.execute(code, stop_on_error=False)
    reply = reply_of(client, msg_id)
    outputs = []
    while True:
        msg = client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return reply, outputs
        outputs.append(msg)


def value(client, expression: str) -> str:
    reply, outputs = run(client, expression)
    assert reply["status"] == "ok", reply
    return [m for m in outputs if m["msg_type"] == "execute_result"][0]["content"]["data"][
        "text/plain"]


def test_kernel_from_the_spec(kernels):
    with running(NAME) as (km, client):
        # the extension is loaded with the spec's settings
        reply, outputs = run(client, "%pyrepl3")
        assert reply["status"] == "ok", reply
        shown = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
        assert "PyREPL3.cell_timeout = 45.0" in shown
        assert "PyREPL3.security_policy = 'guarded'" in shown
        reply, _ = run(client, "get_ipython().extension_manager")
        assert reply["status"] == "error" and "refused" in reply["evalue"]  # guarded, at work
        assert value(client, "6 * 7") == "42"

        # a directive's first line waits for its body
        msg_id = client.is_complete("%%timeout 5")
        assert reply_of(client, msg_id)["status"] == "incomplete"
        msg_id = client.is_complete("x = 1")
        assert reply_of(client, msg_id)["status"] == "complete"

        # %%timeout stops a cell past its time; the kernel goes on
        reply, outputs = run(client, "%%timeout 0.5\nimport time\nfor _ in range(600):\n"
                                     "    time.sleep(0.1)")
        assert reply["status"] == "error" and reply["ename"] == "CellTimeout", reply
        assert value(client, "'alive'") == "'alive'"

        # input() goes to the frontend through the stdin channel
        msg_id = client.execute("name = input('who? ')", allow_stdin=True, stop_on_error=False)
        request = client.get_stdin_msg(timeout=60)
        assert request["msg_type"] == "input_request"
        assert request["content"]["prompt"] == "who? "
        client.input("Ada")
        assert reply_of(client, msg_id)["status"] == "ok"
        assert value(client, "name") == "'Ada'"

        # an interrupt from the frontend stops a busy cell
        msg_id = client.execute("print('spinning', flush=True)\nwhile True:\n    pass",
                                stop_on_error=False)
        while True:  # wait until the cell's own code runs (not just its execute_input)
            msg = client.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                break
        km.interrupt_kernel()
        reply = reply_of(client, msg_id)
        assert reply["status"] == "error" and reply["ename"] in ("KeyboardInterrupt",
                                                                 "CellCancelled"), reply
        assert value(client, "'still alive'") == "'still alive'"


def test_notebook_with_a_timeout_cell_runs_under_nbclient(kernels):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    # the notebook names the kernel, as one saved from Jupyter does
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {
        "name": NAME, "display_name": "pyrepl3", "language": "python"}})
    nb.cells = [
        nbformat.v4.new_code_cell("total = sum(range(10))\nprint('total', total)"),
        nbformat.v4.new_code_cell("%%timeout 0.5\nimport time\nfor _ in range(600):\n"
                                  "    time.sleep(0.1)",
                                  metadata={"tags": ["raises-exception"]}),
        nbformat.v4.new_code_cell("total * 2"),
        nbformat.v4.new_code_cell("%pyrepl3"),
    ]
    client = nbclient.NotebookClient(nb, timeout=120,
                                     resources={"metadata": {"path": ROOT}})
    client.execute()
    assert nb.cells[0].outputs[0]["text"] == "total 45\n"
    error = nb.cells[1].outputs[-1]
    assert error["output_type"] == "error" and error["ename"] == "CellTimeout"
    assert nb.cells[2].outputs[0]["data"]["text/plain"] == "90"
    # it ran on the installed spec: its settings are the session's
    assert "PyREPL3.cell_timeout = 45.0" in nb.cells[3].outputs[0]["text"]
