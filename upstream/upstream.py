#!/usr/bin/env python3
"""Fetch the pinned IPython sdist, apply ``patches/series``, build the patched wheel.

Stdlib only, so it runs before anything is installed.  Everything it
downloads or unpacks lives in ``upstream/_work/`` (git-ignored): upstream
source is never committed, only the pin (``upstream/ipython.toml``) and the
patches.

    python upstream/upstream.py fetch              # download + verify + unpack the pin
    python upstream/upstream.py apply [--upto NAME] # fresh unpack, then the series
    python upstream/upstream.py refresh NAME       # rewrite NAME from the edited tree
    python upstream/upstream.py build              # wheel into upstream/_work/dist/
    python upstream/upstream.py check 9.17.0 ...   # which patches apply to other releases
    python upstream/upstream.py install            # apply + build, then pip install the
                                                   # wheel and pyrepl3 (the README's command)

Layout under ``_work/``: ``downloads/`` (verified sdists), ``pristine/`` (the
pinned release, unpacked, never edited), ``ipython-<version>/`` (the working
tree: pristine + applied patches; edit it, then ``refresh``), ``dist/``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PIN_FILE = HERE / "ipython.toml"
PATCHES = ROOT / "patches"
WORK = HERE / "_work"
SIMPLE_INDEX = "https://pypi.org/simple/{project}/"
#: Written into the working tree: the patches applied to it, in order.
APPLIED_MARKER = ".pyrepl3-applied"
#: Never part of a patch.
DIFF_EXCLUDES = ("__pycache__", "*.pyc", "*.orig", "*.rej", "*.egg-info",
                 "build", "dist", APPLIED_MARKER)


class UpstreamError(Exception):
    """A problem the user can fix; printed without a traceback."""


# -- pin --------------------------------------------------------------------

def read_pin(path: Path = PIN_FILE) -> dict:
    """The ``[ipython]`` table of the pin file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UpstreamError(f"cannot read pin file {path}: {exc}") from None
    try:
        import tomllib
    except ImportError:  # Python 3.10: the pin file only uses `key = "string"`
        data = _parse_simple_toml(text)
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UpstreamError(f"{path}: invalid TOML: {exc}") from None
    pin = data.get("ipython")
    if not isinstance(pin, dict):
        raise UpstreamError(f"{path}: missing [ipython] table")
    for key in ("version", "sdist", "sha256"):
        if not isinstance(pin.get(key), str) or not pin[key]:
            raise UpstreamError(f"{path}: [ipython] needs a string {key!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", pin["sha256"]):
        raise UpstreamError(f"{path}: sha256 must be 64 lowercase hex digits")
    return pin


def _parse_simple_toml(text: str) -> dict:
    data: dict = {}
    table = data
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            table = data.setdefault(line[1:-1].strip(), {})
            continue
        key, sep, value = line.partition("=")
        value = value.strip()
        if not sep or not (value.startswith('"') and value.endswith('"')):
            raise UpstreamError(f"pin file: cannot parse line {line!r}")
        table[key.strip()] = value[1:-1]
    return data


# -- download and verify ------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Refuse ``path`` unless its sha256 is ``expected``."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise UpstreamError(
            f"sha256 mismatch for {path.name}: expected {expected}, got {actual}; "
            "refusing to use it (deleted; re-run to download again)")


def published_sdist(version: str, project: str = "ipython") -> tuple[str, str, str]:
    """``(filename, url, sha256)`` of the sdist PyPI publishes for ``version``.

    Uses the simple index's JSON form (PEP 691), which carries the hashes.
    """
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*([a-z]+[0-9]*)?", version):
        raise UpstreamError(f"not a release version: {version!r}")
    request = urllib.request.Request(
        SIMPLE_INDEX.format(project=project),
        headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            index = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UpstreamError(f"cannot read the PyPI index for {project}: {exc}") from None
    wanted = f"{project}-{version}.tar.gz"
    for entry in index.get("files", []):
        if entry.get("filename") == wanted:
            sha = entry.get("hashes", {}).get("sha256")
            if not sha:
                raise UpstreamError(f"PyPI publishes no sha256 for {wanted}")
            return wanted, entry["url"], sha
    raise UpstreamError(f"PyPI has no sdist {wanted} (is {version} a released {project} version?)")


def download(url: str, dest: Path, expected_sha256: str) -> Path:
    """Download ``url`` to ``dest`` (reused if already there and verified)."""
    if dest.exists():
        try:
            verify_sha256(dest, expected_sha256)
            print(f"using cached {dest.name} (sha256 ok)")
            return dest
        except UpstreamError:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last_shown = 0, -1
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                done += len(block)
                if total:
                    pct = done * 100 // total
                    if pct // 10 != last_shown:
                        last_shown = pct // 10
                        print(f"  {dest.name}: {pct:3d}% of {total / 1e6:.1f} MB", flush=True)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise UpstreamError(f"download of {url} failed: {exc}") from None
    try:
        verify_sha256(partial, expected_sha256)
    except UpstreamError:
        partial.unlink()
        raise
    partial.replace(dest)
    print(f"  {dest.name}: sha256 ok")
    return dest


def unpack(sdist: Path, dest: Path) -> Path:
    """Unpack ``sdist`` so that its single top folder becomes ``dest`` (replaced)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # old Pythons: refuse absolute or escaping member names
                for member in tar.getmembers():
                    name = Path(member.name)
                    if name.is_absolute() or ".." in name.parts or member.issym() or member.islnk():
                        raise UpstreamError(f"{sdist.name}: unsafe member {member.name!r}")
                tar.extractall(tmp)
        tops = list(Path(tmp).iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            raise UpstreamError(f"{sdist.name}: expected one top-level folder")
        tops[0].rename(dest)
    return dest


def fetch_pinned(pin: dict) -> Path:
    """The verified pinned sdist in ``_work/downloads/``."""
    dest = WORK / "downloads" / pin["sdist"]
    url = pin.get("url")
    if not url:
        _, url, published = published_sdist(pin["version"])
        if published != pin["sha256"]:
            raise UpstreamError(
                f"PyPI's sha256 for {pin['sdist']} ({published}) differs from the pin ({pin['sha256']})")
    return download(url, dest, pin["sha256"])


# -- patches ------------------------------------------------------------------

def read_series(patches_dir: Path = PATCHES) -> list[Path]:
    """The patches named in ``series``, in order; a missing one is an error naming it."""
    series = patches_dir / "series"
    if not series.exists():
        raise UpstreamError(f"no series file at {series}")
    result = []
    for lineno, line in enumerate(series.read_text(encoding="utf-8").splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = patches_dir / name
        if not path.is_file():
            raise UpstreamError(f"{series}:{lineno}: patch {name} is listed but does not exist")
        result.append(path)
    return result


def _patch(tree: Path, patch_file: Path, dry_run: bool) -> subprocess.CompletedProcess:
    cmd = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch",
           "-d", str(tree), "-i", str(patch_file)]
    if dry_run:
        cmd.append("--dry-run")
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UpstreamError("the `patch` program is not installed") from None


def apply_patch(tree: Path, patch_file: Path) -> None:
    """Apply one patch; if any hunk fails, the tree is left untouched and we stop naming it."""
    check = _patch(tree, patch_file, dry_run=True)
    if check.returncode != 0:
        detail = (check.stdout + check.stderr).strip()
        raise UpstreamError(f"patch {patch_file.name} does not apply to {tree.name}:\n{detail}")
    done = _patch(tree, patch_file, dry_run=False)
    if done.returncode != 0:
        raise UpstreamError(f"patch {patch_file.name} failed on {tree.name}:\n{done.stdout}{done.stderr}")


def apply_series(tree: Path, patches: list[Path], *, quiet: bool = False) -> None:
    marker = tree / APPLIED_MARKER
    applied: list[str] = []
    for patch_file in patches:
        apply_patch(tree, patch_file)
        applied.append(patch_file.name)
        marker.write_text("".join(n + "\n" for n in applied), encoding="utf-8")
        if not quiet:
            print(f"applied {patch_file.name}")
    if not patches:
        marker.write_text("", encoding="utf-8")


def split_header(patch_text: str) -> tuple[str, str]:
    """``(DEP-3 header, diff)`` of a patch file."""
    match = re.search(r"^(diff |--- )", patch_text, re.MULTILINE)
    if not match:
        return patch_text, ""
    return patch_text[:match.start()], patch_text[match.start():]


def diff_trees(old: Path, new: Path) -> str:
    """A ``-p1`` unified diff from ``old`` to ``new`` (stable: no timestamps)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(old, Path(tmp) / "a")
        os.symlink(new, Path(tmp) / "b")
        cmd = ["diff", "-ruN"]
        for pattern in DIFF_EXCLUDES:
            cmd += ["-x", pattern]
        proc = subprocess.run(cmd + ["a/", "b/"], cwd=tmp, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise UpstreamError(f"diff failed: {proc.stderr.strip()}")
    lines = []
    for line in proc.stdout.splitlines(keepends=True):
        if line.startswith("diff -ruN"):
            continue
        if line.startswith(("--- ", "+++ ")):
            line = line.split("\t", 1)[0].rstrip("\n") + "\n"
            line = line.replace(" a//", " a/").replace(" b//", " b/")
        lines.append(line)
    return "".join(lines)


def update_last_update(header: str, today: str) -> str:
    if re.search(r"^Last-Update:", header, re.MULTILINE):
        return re.sub(r"^Last-Update:.*$", f"Last-Update: {today}", header, flags=re.MULTILINE)
    return header.rstrip("\n") + f"\nLast-Update: {today}\n\n"


# -- commands -----------------------------------------------------------------

def pristine_tree(pin: dict) -> Path:
    """``_work/pristine/ipython-<version>``, unpacked from the verified sdist if needed."""
    path = WORK / "pristine" / f"ipython-{pin['version']}"
    if not (path / "IPython").is_dir():
        unpack(fetch_pinned(pin), path)
    return path


def working_tree(pin: dict) -> Path:
    return WORK / f"ipython-{pin['version']}"


def cmd_fetch(args: argparse.Namespace) -> None:
    pin = read_pin()
    sdist = fetch_pinned(pin)
    tree = unpack(sdist, working_tree(pin))
    pristine_tree(pin)
    print(f"unpacked {sdist.name} into {tree.relative_to(ROOT)}")


def cmd_apply(args: argparse.Namespace) -> None:
    pin = read_pin()
    patches = read_series()
    if args.upto:
        names = [p.name for p in patches]
        if args.upto not in names:
            raise UpstreamError(f"--upto {args.upto}: not in patches/series ({', '.join(names) or 'empty'})")
        patches = patches[:names.index(args.upto) + 1]
    tree = unpack(fetch_pinned(pin), working_tree(pin))
    apply_series(tree, patches)
    print(f"{len(patches)} patch(es) applied in {tree.relative_to(ROOT)}")


def cmd_refresh(args: argparse.Namespace) -> None:
    pin = read_pin()
    patches = read_series()
    names = [p.name for p in patches]
    if args.name not in names:
        raise UpstreamError(f"{args.name} is not in patches/series ({', '.join(names) or 'empty'})")
    tree = working_tree(pin)
    marker = tree / APPLIED_MARKER
    if not marker.exists():
        raise UpstreamError(f"{tree} is not a tree made by `apply`; run `apply --upto {args.name}` first")
    applied = marker.read_text(encoding="utf-8").split()
    index = names.index(args.name)
    # The tree holds the patches before NAME plus NAME itself, or (a new
    # patch being written) just the ones before it.
    if applied not in (names[:index + 1], names[:index]):
        raise UpstreamError(
            f"the working tree has {', '.join(applied) or 'no patches'} applied; to refresh "
            f"{args.name} it must hold the patches up to it: run `apply --upto {args.name}`, "
            "edit, then refresh")
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        base = Path(tmp) / tree.name
        shutil.copytree(pristine_tree(pin), base)
        apply_series(base, patches[:index], quiet=True)
        diff = diff_trees(base, tree)
    if not diff:
        raise UpstreamError(f"the working tree has no changes for {args.name}; not writing an empty patch")
    target = patches[index]
    header, _ = split_header(target.read_text(encoding="utf-8"))
    today = datetime.date.today().isoformat()
    header = update_last_update(header, today) if header.strip() else (
        "Description: TODO describe this change\nForwarded: not-yet\n"
        f"Last-Update: {today}\n\n")
    target.write_text(header + diff, encoding="utf-8")
    # The tree now holds NAME too: the next new patch can be written on top.
    marker.write_text("\n".join(names[:index + 1]) + "\n", encoding="utf-8")
    changed = sum(1 for line in diff.splitlines()
                  if line[:1] in "+-" and not line.startswith(("+++", "---")))
    print(f"refreshed {target.relative_to(ROOT)} ({changed} changed lines)")


def local_version(pin: dict, patches: list[Path]) -> str:
    return f"{pin['version']}+{pin.get('local_label', 'pyrepl3')}.{len(patches)}"


def stamp_version(tree: Path, version: str) -> None:
    """Make IPython report ``version`` (its release.py is where setuptools reads it)."""
    release = tree / "IPython" / "core" / "release.py"
    text = release.read_text(encoding="utf-8")
    base, _, label = version.partition("+")
    new, count = re.subn(r'^_version_extra = "".*$', f'_version_extra = "+{label}"',
                         text, flags=re.MULTILINE)
    if count != 1:
        raise UpstreamError(f"{release}: cannot find the `_version_extra = \"\"` line to stamp")
    release.write_text(new, encoding="utf-8")
    # IPython's build refuses any version that is not a plain release; let a
    # local label through (only in the build copy, never in a patch).
    setupbase = tree / "setupbase.py"
    if setupbase.exists():
        text = setupbase.read_text(encoding="utf-8")
        text = text.replace(r"(\.dev\d*)?$'", r"(\.dev\d*)?(\+[A-Za-z0-9.]+)?$'")
        setupbase.write_text(text, encoding="utf-8")


def cmd_build(args: argparse.Namespace) -> None:
    pin = read_pin()
    patches = read_series()
    tree = working_tree(pin)
    marker = tree / APPLIED_MARKER
    applied = marker.read_text(encoding="utf-8").split() if marker.exists() else None
    if applied != [p.name for p in patches]:
        raise UpstreamError(f"{tree} does not have the whole series applied; run `apply` first")
    import importlib.util
    if importlib.util.find_spec("pip") is None:
        raise UpstreamError(f"building needs pip, which {sys.executable} does not have")
    version = local_version(pin, patches)
    dist = WORK / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        build_tree = Path(tmp) / tree.name
        shutil.copytree(tree, build_tree, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "build", "*.egg-info"))
        stamp_version(build_tree, version)
        print(f"building IPython {version} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                               "--wheel-dir", str(dist), str(build_tree)])
    if proc.returncode != 0:
        raise UpstreamError("pip wheel failed (see its output above)")
    wheels = sorted(dist.glob(f"ipython-{version}-*.whl"))
    if not wheels:
        raise UpstreamError(f"pip wheel succeeded but no ipython-{version} wheel is in {dist}")
    print(f"built {wheels[-1].relative_to(ROOT)}")


#: run by the target Python: may pip install into it? (PEP 668, pip present)
_PROBE = ("import importlib.util, json, os, sys, sysconfig; print(json.dumps({"
          "'venv': sys.prefix != getattr(sys, 'base_prefix', sys.prefix), "
          "'managed': os.path.exists(os.path.join(sysconfig.get_path('stdlib'), "
          "'EXTERNALLY-MANAGED')), 'pip': importlib.util.find_spec('pip') is not None, "
          "'version': list(sys.version_info[:2])}))")


def check_target(python: str) -> None:
    """Refuse, before anything is downloaded or built, a Python that pip
    cannot install into: one its OS manages (PEP 668, e.g. Debian's
    ``/usr/bin/python3``: pip stops with ``externally-managed-environment``
    after the build), one without pip, one too old.  The message says what
    to do instead (a virtual environment)."""
    hint = ("create a virtual environment and install there:\n"
            "    python3 -m venv .venv && .venv/bin/python upstream/upstream.py install\n"
            "then run .venv/bin/pyrepl3 (on Debian/Ubuntu, `sudo apt install python3-venv` "
            "if python3 -m venv fails), or pass --python PATH naming a venv's python")
    try:
        probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True,
                               timeout=120)
        found = json.loads(probe.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise UpstreamError(f"cannot run {python} to check it: {exc}") from None
    if tuple(found.get("version", (0, 0))) < (3, 10):
        raise UpstreamError(f"{python} is Python {'.'.join(map(str, found['version']))}; "
                            f"pyrepl3 needs 3.10 or newer")
    if found.get("managed") and not found.get("venv") \
            and os.environ.get("PIP_BREAK_SYSTEM_PACKAGES", "").lower() not in ("1", "true",
                                                                                 "yes"):
        raise UpstreamError(f"{python} is managed by the operating system (PEP 668: pip "
                            f"would stop with externally-managed-environment); " + hint)
    if not found.get("pip"):
        raise UpstreamError(f"{python} has no pip; " + hint)


def cmd_install(args: argparse.Namespace) -> None:
    """The patched IPython and pyrepl3 into one Python, from a clean checkout.

    Always a fresh unpack + the whole series + a build, so what gets installed
    is exactly the committed patches; pip is given the wheel and the project
    together, so the project's ``ipython`` requirement is met by the wheel.
    The target is checked first (:func:`check_target`).
    """
    python = args.python or sys.executable
    check_target(python)
    cmd_apply(argparse.Namespace(upto=None))
    cmd_build(argparse.Namespace())
    version = local_version(read_pin(), read_series())
    wheel = sorted((WORK / "dist").glob(f"ipython-{version}-*.whl"))[-1]
    print(f"installing {wheel.name} and pyrepl3 into {python} ...", flush=True)
    proc = subprocess.run([python, "-m", "pip", "install", "--force-reinstall", "--no-deps",
                           str(wheel)])
    if proc.returncode == 0:
        # then the project and every other dependency (IPython's own ones
        # included), resolved against the patched IPython now installed
        proc = subprocess.run([python, "-m", "pip", "install", str(wheel), str(ROOT)])
    if proc.returncode != 0:
        raise UpstreamError("pip install failed (see its output above)")
    check = subprocess.run([python, "-c", "import IPython; print(IPython.__version__)"],
                           capture_output=True, text=True)
    if check.stdout.strip() != version:
        raise UpstreamError(f"{python} imports IPython {check.stdout.strip() or '?'} "
                            f"instead of {version}: another IPython shadows it "
                            f"({check.stderr.strip()[-300:]})")
    command = Path(python).parent / "pyrepl3"  # the script pip put beside that python
    print(f"installed IPython {version} (patched) and pyrepl3: run "
          f"{command if command.exists() else 'pyrepl3'}")


def _failed_hunks(patch_output: str) -> str:
    """``file: hunk N, ...`` from the output of a failed ``patch --dry-run``."""
    current, failed = "?", {}
    for line in patch_output.splitlines():
        if line.startswith(("checking file ", "patching file ")):
            current = line.split(" file ", 1)[1].strip()
        elif "FAILED" in line and line.startswith("Hunk #"):
            failed.setdefault(current, []).append(line.split()[1].lstrip("#"))
        elif "can't find file" in line:
            failed.setdefault("(missing file)", [])
    if not failed:
        return patch_output.splitlines()[0]
    return "; ".join(f"{path}: hunk {', '.join(hunks)} failed" if hunks else path
                     for path, hunks in failed.items())


def check_version(version: str, patches: list[Path]) -> list[tuple[str, bool, str]]:
    """Try the series on ``version``: ``(patch, applies, detail)`` for each patch.

    Patches are applied cumulatively; one that fails is skipped so the ones
    after it are still tried.
    """
    filename, url, sha = published_sdist(version)
    sdist = download(url, WORK / "downloads" / filename, sha)
    rows = []
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        tree = unpack(sdist, Path(tmp) / f"ipython-{version}")
        for patch_file in patches:
            try:
                apply_patch(tree, patch_file)
            except UpstreamError as exc:
                rows.append((patch_file.name, False, _failed_hunks(str(exc))))
            else:
                rows.append((patch_file.name, True, ""))
    return rows


def cmd_check(args: argparse.Namespace) -> None:
    patches = read_series()
    if not patches:
        raise UpstreamError("patches/series is empty: nothing to check")
    WORK.mkdir(parents=True, exist_ok=True)
    summary = []
    for version in args.versions:
        try:
            rows = check_version(version, patches)
        except UpstreamError as exc:
            print(f"ipython {version}: ERROR {exc}")
            summary.append((version, None))
            continue
        ok = sum(1 for _, applies, _ in rows if applies)
        print(f"ipython {version}: {ok}/{len(rows)} patches apply")
        for name, applies, detail in rows:
            print(f"  {'ok  ' if applies else 'FAIL'} {name}" + (f"  ({detail})" if detail else ""))
        summary.append((version, ok == len(rows)))
    print("summary: " + ", ".join(
        f"{v}={'all apply' if s else ('error' if s is None else 'some fail')}" for v, s in summary))
    errors = [v for v, s in summary if s is None]
    if errors:
        raise UpstreamError(f"could not check {', '.join(errors)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upstream.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download, verify and unpack the pinned sdist").set_defaults(func=cmd_fetch)
    p = sub.add_parser("apply", help="fresh unpack, then apply patches/series in order")
    p.add_argument("--upto", metavar="NAME", help="stop after this patch (to edit it, then refresh)")
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("refresh", help="regenerate one patch from the edited working tree")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_refresh)
    sub.add_parser("build", help="build the patched wheel into upstream/_work/dist/").set_defaults(func=cmd_build)
    p = sub.add_parser("install", help="apply + build, then pip install the patched IPython "
                                       "and pyrepl3 into a Python (default: this one)")
    p.add_argument("--python", metavar="PATH", help="the Python to install into")
    p.set_defaults(func=cmd_install)
    p = sub.add_parser("check", help="report which patches apply to other IPython releases")
    p.add_argument("versions", nargs="+", metavar="VERSION")
    p.set_defaults(func=cmd_check)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UpstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
