"""``upstream/upstream.py`` without network: hash checks, series handling, diffs.

The tool is a stdlib script, not part of the package; it is loaded from its path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "upstream" / "upstream.py"

needs_patch_tools = pytest.mark.skipif(
    shutil.which("patch") is None or shutil.which("diff") is None,
    reason="needs the `patch` and `diff` programs")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("pyrepl3_upstream_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_pin_file_names_the_pinned_release(tool):
    # the expected values come from the pin file itself (read here as text,
    # without the tool's parser), not from a copy that goes stale on a re-pin
    text = (ROOT / "upstream" / "ipython.toml").read_text()
    expected = dict(re.findall(r'^(version|sdist|sha256) = "([^"]*)"$', text, re.M))
    assert set(expected) == {"version", "sdist", "sha256"}
    pin = tool.read_pin()
    assert pin["version"] == expected["version"]
    assert pin["sdist"] == expected["sdist"] == f"ipython-{expected['version']}.tar.gz"
    assert pin["sha256"] == expected["sha256"] and len(pin["sha256"]) == 64


def test_fallback_pin_parser_agrees_with_tomllib(tool):
    tomllib = pytest.importorskip("tomllib")
    text = tool.PIN_FILE.read_text()
    assert tool._parse_simple_toml(text) == tomllib.loads(text)


def test_bad_pin_is_refused(tool, tmp_path):
    bad = tmp_path / "pin.toml"
    bad.write_text('[ipython]\nversion = "9.18.1"\nsdist = "x.tar.gz"\nsha256 = "abc"\n')
    with pytest.raises(tool.UpstreamError, match="sha256 must be 64"):
        tool.read_pin(bad)


def test_sha256_mismatch_is_refused_with_a_clear_message(tool, tmp_path):
    path = tmp_path / "ipython-0.0.tar.gz"
    path.write_bytes(b"not the release")
    wrong = "0" * 64
    with pytest.raises(tool.UpstreamError) as info:
        tool.verify_sha256(path, wrong)
    message = str(info.value)
    assert "sha256 mismatch for ipython-0.0.tar.gz" in message
    assert wrong in message and hashlib.sha256(b"not the release").hexdigest() in message
    tool.verify_sha256(path, hashlib.sha256(b"not the release").hexdigest())  # the right one passes


def test_download_with_wrong_hash_leaves_nothing_behind(tool, tmp_path, capsys):
    source = tmp_path / "src.tar.gz"
    source.write_bytes(b"x" * 5000)
    dest = tmp_path / "downloads" / "ipython-0.0.tar.gz"
    with pytest.raises(tool.UpstreamError, match="sha256 mismatch"):
        tool.download(source.as_uri(), dest, "f" * 64)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []
    good = hashlib.sha256(b"x" * 5000).hexdigest()
    assert tool.download(source.as_uri(), dest, good) == dest
    assert dest.read_bytes() == b"x" * 5000
    assert "100%" in capsys.readouterr().out  # progress is printed


def test_series_naming_a_missing_patch_stops_with_its_name(tool, tmp_path):
    (tmp_path / "0001-here.patch").write_text("Description: x\n")
    (tmp_path / "series").write_text("# comment\n0001-here.patch\n0002-missing.patch\n")
    with pytest.raises(tool.UpstreamError, match=r"series:3: patch 0002-missing.patch is listed"):
        tool.read_series(tmp_path)


def test_empty_lines_and_comments_in_series_are_ignored(tool, tmp_path):
    (tmp_path / "a.patch").write_text("")
    (tmp_path / "series").write_text("\n# x\na.patch  # the first\n")
    assert [p.name for p in tool.read_series(tmp_path)] == ["a.patch"]


@needs_patch_tools
def test_diff_then_apply_round_trip_and_a_failing_patch_is_named(tool, tmp_path):
    old = make_tree(tmp_path / "old", {"pkg/a.py": "one\ntwo\nthree\n", "pkg/b.py": "b\n"})
    new = make_tree(tmp_path / "new", {"pkg/a.py": "one\n2\nthree\n", "pkg/b.py": "b\n",
                                       "pkg/c.py": "new file\n"})
    diff = tool.diff_trees(old, new)
    assert "--- a/pkg/a.py\n+++ b/pkg/a.py\n" in diff
    assert "\t" not in diff  # no timestamps: refresh output is stable
    patches = tmp_path / "patches"
    patches.mkdir()
    good = patches / "0001-good.patch"
    good.write_text("Description: change a, add c\nForwarded: not-yet\nLast-Update: 2000-01-01\n\n" + diff)
    bad = patches / "0002-bad.patch"
    bad.write_text("Description: expects other text\n\n"
                   "--- a/pkg/b.py\n+++ b/pkg/b.py\n@@ -1 +1 @@\n-not b\n+c\n")

    tree = shutil.copytree(old, tmp_path / "tree")
    with pytest.raises(tool.UpstreamError, match="patch 0002-bad.patch does not apply"):
        tool.apply_series(tree, [good, bad], quiet=True)
    assert (tree / "pkg" / "a.py").read_text() == "one\n2\nthree\n"
    assert (tree / "pkg" / "c.py").read_text() == "new file\n"
    assert (tree / "pkg" / "b.py").read_text() == "b\n"  # the failing patch touched nothing
    assert (tree / tool.APPLIED_MARKER).read_text() == "0001-good.patch\n"


def test_refresh_keeps_the_header_and_updates_last_update(tool):
    text = "Description: d\n more\nForwarded: not-yet\nLast-Update: 2000-01-01\n\n--- a/x\n+++ b/x\n"
    header, diff = tool.split_header(text)
    assert header.startswith("Description: d\n more\n") and diff.startswith("--- a/x")
    updated = tool.update_last_update(header, "2030-02-03")
    assert "Last-Update: 2030-02-03" in updated and "2000-01-01" not in updated
    assert "Forwarded: not-yet" in updated


def test_local_version_counts_the_patches(tool):
    pin = {"version": "9.18.1", "local_label": "pyrepl3"}
    assert tool.local_version(pin, [Path("a"), Path("b")]) == "9.18.1+pyrepl3.2"


def test_stamp_version_sets_the_local_label(tool, tmp_path):
    tree = make_tree(tmp_path, {
        "IPython/core/release.py": '_version_extra = ".dev"\n_version_extra = ""  # full\n',
        "setupbase.py": "re.compile(r'^(\\d+)(\\.dev\\d*)?$')\n"})
    tool.stamp_version(tree, "9.18.1+pyrepl3.1")
    assert '_version_extra = "+pyrepl3.1"' in (tree / "IPython/core/release.py").read_text()
    assert "(\\+[A-Za-z0-9.]+)?$'" in (tree / "setupbase.py").read_text()


def test_bad_input_is_an_error_not_a_traceback(tool, capsys):
    assert tool.main(["refresh", "9999-no-such.patch"]) == 1
    assert "9999-no-such.patch is not in patches/series" in capsys.readouterr().err
    assert tool.main(["apply", "--upto", "9999-no-such.patch"]) == 1
    assert "--upto 9999-no-such.patch: not in patches/series" in capsys.readouterr().err
    with pytest.raises(tool.UpstreamError, match="not a release version"):
        tool.published_sdist("9.x; rm -rf")


# -- install: the target Python is checked before anything is built ------------------

def _fake_python(tmp_path: Path, **answer) -> str:
    """An executable that answers the install probe as a given Python would."""
    import json
    import stat

    found = {"venv": False, "managed": False, "pip": True, "version": [3, 12], **answer}
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\necho '{json.dumps(found)}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize("answer, words", [
    ({"managed": True}, "externally-managed-environment"),
    ({"pip": False}, "has no pip"),
    ({"version": [3, 8]}, "needs 3.10 or newer"),
])
def test_install_refuses_a_python_pip_cannot_install_into(tool, tmp_path, monkeypatch,
                                                         answer, words):
    """Refused before the download and the build, saying to use a venv."""
    import argparse

    started = []
    monkeypatch.setattr(tool, "cmd_apply", lambda args: started.append("apply"))
    monkeypatch.setattr(tool, "cmd_build", lambda args: started.append("build"))
    monkeypatch.delenv("PIP_BREAK_SYSTEM_PACKAGES", raising=False)
    with pytest.raises(tool.UpstreamError) as refused:
        tool.cmd_install(argparse.Namespace(python=_fake_python(tmp_path, **answer)))
    assert words in str(refused.value)
    if words != "needs 3.10 or newer":
        assert "python3 -m venv .venv" in str(refused.value)
    assert started == []


def test_install_accepts_a_venv_even_on_a_managed_base(tool, tmp_path):
    tool.check_target(_fake_python(tmp_path, managed=True, venv=True))


@pytest.mark.skipif(not Path("/usr/lib/python3/dist-packages").is_dir()
                    or not Path("/usr/bin/python3").exists(),
                    reason="no Debian-managed /usr/bin/python3 here")
def test_install_refuses_the_real_debian_python(tool):
    import subprocess

    marker = subprocess.run(["/usr/bin/python3", "-c", "import sysconfig, os; print(os.path."
                             "exists(os.path.join(sysconfig.get_path('stdlib'), "
                             "'EXTERNALLY-MANAGED')))"], capture_output=True, text=True)
    if marker.stdout.strip() != "True":
        pytest.skip("/usr/bin/python3 is not marked externally managed")
    with pytest.raises(tool.UpstreamError, match="externally-managed-environment"):
        tool.check_target("/usr/bin/python3")


def test_readme_install_command_uses_a_venv():
    """The README's install line must work as written on a Python the OS
    manages: it creates a venv and runs the tool with the venv's Python."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Install and run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.strip().split("&&")]
    assert commands[0] == "python3 -m venv .venv"
    assert commands[1].startswith(".venv/bin/python upstream/upstream.py install")
    assert commands[2] == ".venv/bin/pyrepl3"
