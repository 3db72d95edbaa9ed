"""Capabilities: files confined to a root, custom ones, opaque and unforgeable facades."""

from __future__ import annotations

import copy
import os
import pickle
import sys

import pytest

import pyrepl3_ext
from pyrepl3_ext.errors import SecurityError
from pyrepl3_ext.security import CustomCapability, FilesCapability

from .helpers import audits, run, session, value

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="openat/O_NOFOLLOW")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("SECRET")
    return root, outside


def test_files_basic_operations(tree):
    root, _ = tree
    files = FilesCapability(str(root))
    assert files._read("a.txt") == "alpha"
    assert files._read("./sub//b.txt") == "beta"
    assert files._list() == ["a.txt", "sub"]
    assert files._list("sub") == ["b.txt"]
    assert files._write("new.txt", "x" * 3) == 3
    assert files._append("new.txt", b"yz") == 2
    assert files._read_bytes("new.txt") == b"xxxyz"
    files._write("new.txt", "short")
    assert files._read("new.txt") == "short"  # truncated on write
    files._mkdir("d")
    assert files._exists("d") and not files._exists("nope")
    files._delete("new.txt")
    assert not (root / "new.txt").exists()


@pytest.mark.parametrize("path, message", [
    ("../outside/secret", "'..' could leave the granted root"),
    ("sub/../../outside/secret", "'..' could leave the granted root"),
    ("/etc/passwd", "absolute path"),
])
def test_files_refuses_paths_leaving_the_root(tree, path, message):
    files = FilesCapability(str(tree[0]))
    with pytest.raises(SecurityError, match=message):
        files._read(path)


def test_files_refuses_nul_and_non_str_paths(tree):
    files = FilesCapability(str(tree[0]))
    with pytest.raises(ValueError, match="NUL"):
        files._read("a\x00b")
    with pytest.raises(TypeError, match="paths must be str"):
        files._read(b"a.txt")


def test_files_refuses_symlinks_at_any_depth(tree):
    root, outside = tree
    os.symlink(outside / "secret", root / "link")
    os.symlink(outside, root / "dirlink")
    files = FilesCapability(str(root))
    with pytest.raises(SecurityError, match="symbolic link"):
        files._read("link")
    with pytest.raises(SecurityError, match="symbolic link or not a directory"):
        files._read("dirlink/secret")
    with pytest.raises(SecurityError, match="symbolic link"):
        files._write("link", "overwrite")
    assert (outside / "secret").read_text() == "SECRET"


def test_files_is_immune_to_a_directory_swapped_for_a_symlink(tree):
    """The race realpath-then-open loses: checked path, then swapped component."""
    root, outside = tree
    files = FilesCapability(str(root))
    assert files._read("sub/b.txt") == "beta"
    os.rename(root / "sub", root / "sub.old")
    os.symlink(outside, root / "sub")
    with pytest.raises(SecurityError):
        files._read("sub/secret")


def test_files_refuses_special_files_and_hard_links(tree):
    root, outside = tree
    os.mkfifo(root / "fifo")
    files = FilesCapability(str(root))
    with pytest.raises(SecurityError, match="not a regular file"):
        files._read("fifo")
    os.link(outside / "secret", root / "hard")
    with pytest.raises(SecurityError, match="several hard links"):
        files._write("hard", "overwrite")
    assert (outside / "secret").read_text() == "SECRET"
    # reads too: the link is the outside file under a name inside the root
    for read in (files._read, files._read_bytes):
        with pytest.raises(SecurityError, match="several hard links"):
            read("hard")
    (root / "deep").mkdir()
    os.link(outside / "secret", root / "deep" / "also")
    with pytest.raises(SecurityError, match="several hard links"):
        files._read("deep/also")


def test_files_read_only_and_size_limit(tree):
    files = FilesCapability(str(tree[0]), read_only=True, max_bytes=3)
    with pytest.raises(SecurityError, match="read-only"):
        files._write("x", "y")
    with pytest.raises(SecurityError, match="larger than the 3 bytes"):
        files._read("a.txt")


def test_files_is_bound_to_the_directory_not_the_path(tree, tmp_path):
    root, _ = tree
    files = FilesCapability(str(root))
    os.rename(root, tmp_path / "moved")
    os.makedirs(root)
    (root / "a.txt").write_text("impostor")
    assert files._read("a.txt") == "alpha"


# -- the facade cells see ---------------------------------------------------------

@pytest.fixture
def granted(ip, tree):
    pyrepl3_ext.set_policy(ip, "restricted")
    facade = pyrepl3_ext.grant(ip, "files", FilesCapability(str(tree[0])))
    return ip, facade


def test_facade_is_opaque_and_unforgeable(granted):
    _, files = granted
    assert repr(files) == "<capability 'files'>"
    with pytest.raises(TypeError, match="granted by the host"):
        type(files)("/")
    with pytest.raises(TypeError, match="granted by the host"):
        type("Sub", (type(files),), {})
    with pytest.raises(AttributeError, match="read-only"):
        files.extra = 1
    with pytest.raises(AttributeError, match="read-only"):
        files._root = "/"
    assert not hasattr(files, "__dict__")
    assert not hasattr(files, "_root") and not hasattr(files, "_within")
    for name in files.__dir__():
        method = getattr(files, name)
        assert method.__globals__ == {"__builtins__": {}}
    for attack in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            attack(files)


def test_every_call_is_audited(granted, events):
    ip, _ = granted
    mine, _ = run(ip, events, "files.read('a.txt')\nfiles.list()")
    calls = audits(mine, "capability_call")
    assert [(c["capability"], c["method"], c["outcome"]) for c in calls] == [
        ("files", "read", "ok"), ("files", "list", "ok")]
    assert calls[0]["args"] == ["'a.txt'"]
    mine, error = run(ip, events, "files.read('../x')")
    assert error["kind"] == "security"
    assert audits(mine, "capability_call")[0]["outcome"] == "error"


def test_arguments_are_frozen_before_host_code_runs(granted, events):
    ip, files = granted
    ran = []

    class Sneaky(str):
        def __fspath__(self):
            ran.append("fspath")
            return "../outside/secret"

    with pytest.raises(TypeError, match="plain data"):
        files.read(Sneaky("a.txt"))
    with pytest.raises(TypeError, match="plain data"):
        files.read(object())
    assert ran == []


def test_revocation_makes_the_capability_inert(granted, events):
    ip, files = granted
    assert value(ip, events, "keep = files\nkeep.read('a.txt')") == "'alpha'"
    assert pyrepl3_ext.revoke(ip, "files") is True
    assert "files" not in ip.user_ns
    mine, error = run(ip, events, "keep.read('a.txt')")
    assert error["kind"] == "security" and "was revoked by the host" in error["evalue"]
    assert audits(mine, "capability_call")[0]["outcome"] == "refused"


def test_host_exceptions_reach_the_cell_without_host_frames(granted):
    _, files = granted
    with pytest.raises(FileNotFoundError) as info:
        files.read("missing.txt")
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_custom_capability_with_schema(ip, events):
    received = []

    def lookup(query, limit=10):
        received.append((query, limit))
        return [f"{query}-{i}" for i in range(limit)]

    pyrepl3_ext.set_policy(ip, "restricted")
    pyrepl3_ext.grant(ip, "search", CustomCapability(
        lookup, {"query": str, "limit": int}, optional=("limit",)))
    assert value(ip, events, "search('q', limit=2)") == "['q-0', 'q-1']"
    assert value(ip, events, "search('z')") .startswith("['z-0'")
    assert received == [("q", 2), ("z", 10)]
    for code, message in [("search(1)", "argument 'query' must be str, got int"),
                          ("search('q', limit='2')", "argument 'limit' must be int"),
                          ("search()", "missing argument 'query'"),
                          ("search('q', other=1)", "unexpected argument 'other'"),
                          ("search('q', 1, 2)", "at most 2 positional")]:
        _, error = run(ip, events, code)
        assert error["ename"] == "TypeError" and message in error["evalue"], error


def test_custom_capability_validates_its_schema():
    with pytest.raises(TypeError, match="must be callable"):
        CustomCapability(42)
    with pytest.raises(TypeError, match="type or tuple of types"):
        CustomCapability(len, {"x": "str"})


def test_capability_names_are_protected_in_user_ns(granted, events):
    ip, files = granted
    for code in ("files = 1", "del files", "import json as files"):
        _, error = run(ip, events, code)
        assert error["kind"] == "security" and "rebinding or deleting 'files'" in error["evalue"]
    assert ip.user_ns["files"] is files


def test_trusted_sessions_get_injected_names_restored_after_the_cell(ip, events, tree):
    facade = pyrepl3_ext.grant(ip, "files", FilesCapability(str(tree[0])))
    mine, error = run(ip, events, "files = 'replaced'")
    assert error is None and ip.user_ns["files"] is facade
    restored = audits(mine, "restored")
    assert restored and restored[0]["names"] == ["files"]
    assert session(ip).log[-1]["layer"] == "namespace"


def test_granting_again_revokes_the_previous_grant(ip, tree):
    first = pyrepl3_ext.grant(ip, "files", FilesCapability(str(tree[0])))
    second = pyrepl3_ext.grant(ip, "files", FilesCapability(str(tree[0])))
    assert ip.user_ns["files"] is second
    with pytest.raises(SecurityError, match="revoked"):
        first.read("a.txt")


def test_grant_validates_names(ip, tree):
    for bad in ("_hidden", "not valid", ""):
        with pytest.raises(ValueError, match="public identifiers"):
            pyrepl3_ext.grant(ip, bad, FilesCapability(str(tree[0])))
    with pytest.raises(TypeError, match="not a capability implementation"):
        pyrepl3_ext.grant(ip, "x", object())


def test_policy_grants_only_listed_capabilities(ip, events, tree):
    pyrepl3_ext.grant(ip, "files", FilesCapability(str(tree[0])))
    pyrepl3_ext.grant(ip, "echo", CustomCapability(lambda text: text, {"text": str}))
    pyrepl3_ext.set_policy(ip, pyrepl3_ext.security.SecurityPolicy.preset(
        "restricted").replace(granted_capabilities={"echo"}))
    assert "files" not in ip.user_ns
    assert value(ip, events, "echo('hi')") == "'hi'"
    pyrepl3_ext.set_policy(ip, "restricted")
    assert "files" in ip.user_ns and "echo" in ip.user_ns
