"""The ``pyrepl3`` command: versions, help, and IPython with the extension loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import IPython
import pytest

import pyrepl3_ext


def run_cli(*args: str, ipythondir=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if ipythondir is not None:
        env["IPYTHONDIR"] = str(ipythondir)  # never the developer's own profile
    return subprocess.run([sys.executable, "-m", "pyrepl3_ext.cli", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_version_names_pyrepl3_ipython_and_python():
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert f"pyrepl3 {pyrepl3_ext.__version__}" in out.stdout
    assert f"IPython {IPython.__version__}" in out.stdout
    assert f"Python {sys.version.split()[0]}" in out.stdout


def test_help_explains_the_pass_through():
    out = run_cli("--help")
    assert out.returncode == 0
    assert out.stdout.startswith("usage: pyrepl3")
    assert "ipython --help" in out.stdout


def test_ipython_runs_with_the_extension_loaded(tmp_path):
    out = run_cli("--no-banner", "-c",
                  "import pyrepl3_ext.extension as e; "
                  "print('state:', e.get_state(get_ipython()) is not None); "
                  "get_ipython().run_line_magic('pyrepl3', '')",
                  ipythondir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "state: True" in out.stdout
    assert f"pyrepl3_ext {pyrepl3_ext.__version__}" in out.stdout


@pytest.mark.skipif(os.environ.get("PYREPL3_EXPECT_BUILD") != "patched",
                    reason="only where `upstream.py install` made this venv (nox -s patched)")
def test_the_installed_pyrepl3_command_is_the_patched_ipython(tmp_path):
    # the README's first command: `python3 upstream/upstream.py install && pyrepl3`
    script = os.path.join(os.path.dirname(sys.executable), "pyrepl3")
    env = dict(os.environ, IPYTHONDIR=str(tmp_path))
    out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "+pyrepl3." in out.stdout and "(patched" in out.stdout, out.stdout
    out = subprocess.run([script, "--no-banner", "-c",
                          "import IPython, pyrepl3_ext.extension as e; "
                          "print(IPython.__version__, e.get_state(get_ipython()) is not None)"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    version, loaded = out.stdout.split()[-2:]
    assert "+pyrepl3." in version and loaded == "True", out.stdout


def test_the_banner_says_it_is_pyrepl3_and_a_users_own_wins(tmp_path):
    def session(*args: str) -> str:
        env = dict(os.environ, IPYTHONDIR=str(tmp_path))
        return subprocess.run([sys.executable, "-m", "pyrepl3_ext.cli", "--simple-prompt",
                               "--HistoryManager.hist_file=:memory:", *args], input="exit\n",
                              capture_output=True, text=True, timeout=120, env=env).stdout

    assert f"pyrepl3 {pyrepl3_ext.__version__} (" in session()
    mine = session("--InteractiveShell.banner2=my own banner")
    assert "my own banner" in mine and "pyrepl3 " not in mine
    (tmp_path / "profile_default").mkdir(exist_ok=True)  # the first sessions made it
    (tmp_path / "profile_default" / "ipython_config.py").write_text(
        "c.InteractiveShell.banner2 = 'from my config'\n")
    mine = session()
    assert "from my config" in mine and "pyrepl3 " not in mine
