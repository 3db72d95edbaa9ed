"""SecurityPolicy presets, custom policies, and how a shell gets one."""

from __future__ import annotations

import pytest

import pyrepl3_ext
from pyrepl3_ext.security import SecurityPolicy

from .helpers import run, session


def test_presets():
    trusted = SecurityPolicy.preset("trusted")
    assert not trusted.enforcing
    guarded = SecurityPolicy.preset("guarded")
    assert guarded.audit and guarded.ast_guard and not guarded.allow_shell_escapes
    assert guarded.allowed_modules is None  # imports stay free
    restricted = SecurityPolicy.preset("restricted")
    assert restricted.sanitize_builtins and restricted.allowed_modules is not None
    assert "open" in restricted.denied_builtins and "eval" in restricted.denied_builtins
    assert restricted.magic_allowed("time") and not restricted.magic_allowed("run")
    assert not restricted.magic_allowed("bash") and not restricted.magic_allowed("env")


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown security policy preset 'sandbox'"):
        SecurityPolicy.preset("sandbox")


def test_custom_policy_is_a_modified_copy():
    base = SecurityPolicy.preset("restricted")
    custom = base.replace(allowed_magics={"time", "env"}, allow_network=True)
    assert custom.name == "restricted+custom"
    assert custom.allowed_magics == frozenset({"time", "env"})
    assert custom.magic_allowed("env") and custom.allow_network
    assert base.allow_network is False  # frozen, unchanged


def test_shell_escape_magics_follow_the_shell_escape_setting():
    policy = SecurityPolicy.preset("restricted").replace(
        allowed_magics={"bash", "time"})
    assert not policy.magic_allowed("bash")
    assert policy.replace(allow_shell_escapes=True).magic_allowed("bash")


def test_default_is_trusted_and_set_policy_applies(ip, events):
    assert pyrepl3_ext.get_policy(ip).name == "trusted"
    assert run(ip, events, "import os")[1] is None
    pyrepl3_ext.set_policy(ip, "restricted")
    assert pyrepl3_ext.get_policy(ip).name == "restricted"
    _, error = run(ip, events, "import os")
    assert error["kind"] == "security"
    pyrepl3_ext.set_policy(ip, SecurityPolicy.preset("restricted").replace(
        allowed_modules={"os": frozenset({"sep"})}))
    assert run(ip, events, "import os\nos.sep")[1] is None
    pyrepl3_ext.set_policy(ip, "trusted")
    assert ip.user_ns["__builtins__"] is __import__("builtins")


def test_policy_from_config_and_percent_config(shell):
    shell.config.PyREPL3.security_policy = "guarded"
    try:
        pyrepl3_ext.load_ipython_extension(shell)
        try:
            assert session(shell).policy.name == "guarded"
            shell.run_line_magic("config", "PyREPL3.security_policy = 'restricted'")
            assert session(shell).policy.name == "restricted"
        finally:
            pyrepl3_ext.unload_ipython_extension(shell)
    finally:
        del shell.config.PyREPL3["security_policy"]


def test_files_root_setting_grants_files(shell, tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    shell.config.PyREPL3.files_root = str(tmp_path)
    try:
        pyrepl3_ext.load_ipython_extension(shell)
        try:
            assert shell.run_cell("files.read('a.txt')").result == "hello"
        finally:
            pyrepl3_ext.unload_ipython_extension(shell)
        assert "files" not in shell.user_ns
    finally:
        del shell.config.PyREPL3["files_root"]
