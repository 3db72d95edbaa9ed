"""The OS confinement layer (pyrepl3_ext/engine/confine.py), attacked for real.

Every test confines a fresh child interpreter (never pytest's own process:
confinement cannot be undone) which then tries what hostile code would and
prints what happened as JSON.  A child loads confine.py by file path (it is
standard library only), except the IPython one, which imports the package
the way the worker does.  Tests skip only where probe() says the kernel
lacks the feature.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFINE_PY = ROOT / "pyrepl3_ext" / "engine" / "confine.py"


def _load_confine():
    """confine.py itself, without the package __init__ (which imports IPython)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_pyrepl3_confine_under_test", CONFINE_PY)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_confine_module = _load_confine()

PROBE = _confine_module.probe()
pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="OS confinement is Linux only"),
              pytest.mark.heavy]  # costly and not about the IPython version (tests/conftest.py)
needs_landlock = pytest.mark.skipif(PROBE["landlock_abi"] == 0, reason="kernel has no Landlock")
needs_seccomp = pytest.mark.skipif(not (PROBE["seccomp"] and PROBE["seccomp_arch"]),
                                   reason="no seccomp filter support for this kernel/arch")
needs_netns = pytest.mark.skipif(not PROBE["netns"], reason="cannot create a network namespace")
needs_root = pytest.mark.skipif(not PROBE["root"], reason="the uid drop needs root")

# The child's prelude: load confine, then `attempt(name, fn)` records a result or an error.
PRELUDE = """
import importlib.util, json, os, sys
_spec = importlib.util.spec_from_file_location("confine", {confine_py!r})
confine = sys.modules["confine"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(confine)
out = {{}}
def attempt(name, fn):
    try:
        value = fn()
        out[name] = {{"ok": value if isinstance(value, (int, float, str, list, dict, bool, type(None))) else repr(value)}}
    except BaseException as e:
        out[name] = {{"error": type(e).__name__, "errno": getattr(e, "errno", None), "msg": str(e)}}
"""

EPILOGUE = """
print("\\n@@RESULT@@" + json.dumps({"report": report, "out": out}, default=str))
"""


def run_child(body: str, *, python: str = sys.executable, user: int | None = None,
              timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``body`` (after the prelude) in a fresh interpreter; return the finished process."""
    code = PRELUDE.format(confine_py=str(CONFINE_PY)) + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "COV_"))}
    env["PYTHONPATH"] = str(ROOT)
    kwargs = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    return subprocess.run([python, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd="/", **kwargs)


def confined(body: str, **kwargs) -> dict:
    """Run a child that must print a result; return {"report": ..., "out": ...}."""
    proc = run_child(textwrap.dedent(body) + EPILOGUE, **kwargs)
    marker = "@@RESULT@@"
    if proc.returncode != 0 or marker not in proc.stdout:
        pytest.fail(f"child failed (rc={proc.returncode}):\nstdout:\n{proc.stdout}\n"
                    f"stderr:\n{proc.stderr}")
    return json.loads(proc.stdout.split(marker, 1)[1])


def refused(result: dict, *errors: str) -> bool:
    return result.get("error") in (errors or ("PermissionError",))


# --- the default spec: one child attacks, the tests read what it saw ----------------------------

HOSTILE = r"""
import asyncio, ctypes, signal, socket, subprocess, threading, time
tmp = sys.argv_tmp
before_modules = {m: m in sys.modules for m in ("_decimal", "_sqlite3", "_ssl", "_hashlib", "_json")}
parent_netns = os.readlink("/proc/self/ns/net")
report = confine.apply(confine.ConfineSpec(writable=(tmp + "/scratch",)))
out["modules_before"] = {"ok": before_modules}
out["netns_changed"] = {"ok": os.readlink("/proc/self/ns/net") != parent_netns}

# filesystem
attempt("read_canary", lambda: open(tmp + "/outside/canary.txt").read())
attempt("list_canary_dir", lambda: os.listdir(tmp + "/outside"))
attempt("read_via_proc_root", lambda: open("/proc/self/root" + tmp + "/outside/canary.txt").read())
attempt("read_shadow", lambda: open("/etc/shadow").read())
attempt("read_ssh_key", lambda: open(tmp + "/home/.ssh/id_ed25519").read())
attempt("list_root_home", lambda: os.listdir("/root"))
attempt("read_other_process", lambda: open("/proc/1/environ").read())
attempt("list_proc", lambda: os.listdir("/proc"))
attempt("write_outside", lambda: open(tmp + "/outside/new.txt", "w").write("x"))
attempt("write_into_read_path", lambda: open(os.path.dirname(os.__file__) + "/evil.py", "w").write("x"))
def scratch():
    d = tmp + "/scratch"
    with open(d + "/a.txt", "w") as f:
        f.write("hello")
    os.mkdir(d + "/sub")
    os.rename(d + "/a.txt", d + "/sub/b.txt")
    text = open(d + "/sub/b.txt").read()
    os.unlink(d + "/sub/b.txt")
    os.rmdir(d + "/sub")
    return text
attempt("scratch", scratch)
attempt("write_dev_null", lambda: open("/dev/null", "w").write("x"))
attempt("chmod_scratch", lambda: (open(tmp + "/scratch/m", "w").close(), os.chmod(tmp + "/scratch/m", 0o600)))
attempt("proc_self_status", lambda: {l.split(":")[0]: l.split(":")[1].strip() for l in open("/proc/self/status")})

# processes
attempt("execv", lambda: os.execv("/bin/sh", ["sh", "-c", "true"]))
attempt("subprocess_run", lambda: subprocess.run(["true"]).returncode)
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)[1]
attempt("fork", fork)
def thread():
    seen = []
    t = threading.Thread(target=lambda: seen.append(threading.get_ident()))
    t.start(); t.join()
    return len(seen) == 1 and seen[0] != threading.get_ident()
attempt("thread", thread)
def signal_own_main_thread():
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    main = threading.get_ident()
    t = threading.Thread(target=lambda: signal.pthread_kill(main, signal.SIGUSR1))
    t.start(); t.join()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getpid(), 0)
    return got == [1]
attempt("signal_own_main_thread", signal_own_main_thread)
attempt("signal_parent", lambda: os.kill(os.getppid(), 0))
attempt("signal_init", lambda: os.kill(1, 0))
attempt("signal_process_group", lambda: os.kill(0, 0))

# network
attempt("socket_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
attempt("socket_unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
attempt("socket_netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("socketpair", lambda: [s.close() for s in socket.socketpair()] and True)
attempt("asyncio_run", lambda: asyncio.run(asyncio.sleep(0)))
attempt("net_dev", lambda: [l.split(":")[0].strip() for l in open("/proc/self/net/dev").readlines()[2:]])

# C extensions loaded after confinement (dlopen maps them PROT_EXEC)
attempt("import_json", lambda: __import__("json").loads("[1]"))
attempt("import_decimal", lambda: str(__import__("decimal").Decimal(1) / 7))
attempt("import_sqlite3", lambda: __import__("sqlite3").connect(":memory:").execute("select 41+1").fetchone()[0])
attempt("import_ssl", lambda: __import__("ssl").create_default_context().verify_mode.name)
attempt("import_hashlib", lambda: __import__("hashlib").sha256(b"abc").hexdigest()[:8])
attempt("ctypes_callback", lambda: ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)(41))

# raw system calls the filter must refuse (errno) for whatever libc wrapper or none
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": dict(unshare=272, ptrace=101, mount=165, bpf=321, personality=135, setuid=105,
                     keyctl=250, perf_event_open=298, kexec_load=246, init_module=175),
      "aarch64": dict(unshare=97, ptrace=117, mount=40, bpf=280, personality=92, setuid=146,
                      keyctl=219, perf_event_open=241, kexec_load=104, init_module=105)}[confine._arch()]
nr.update(io_uring_setup=425, clone3=435, open_tree=428, fsopen=430, userfaultfd=nr.get("userfaultfd", 323 if confine._arch() == "x86_64" else 282))
def raw(name, *args):
    res = libc.syscall(ctypes.c_long(nr[name]), *[ctypes.c_long(a) for a in args])
    return {"ret": res, "errno": ctypes.get_errno() if res < 0 else 0}
attempt("sys_unshare_user", lambda: raw("unshare", 0x10000000))
attempt("sys_ptrace_attach_parent", lambda: raw("ptrace", 16, os.getppid(), 0, 0))
attempt("sys_mount", lambda: raw("mount", 0, 0, 0, 0, 0))
attempt("sys_bpf", lambda: raw("bpf", 0, 0, 0))
attempt("sys_io_uring_setup", lambda: raw("io_uring_setup", 8, 0))
attempt("sys_clone3", lambda: raw("clone3", 0, 0))
attempt("sys_personality_no_aslr", lambda: raw("personality", 0x0040000))
attempt("sys_personality_query", lambda: raw("personality", 0xFFFFFFFF))
attempt("sys_setuid", lambda: raw("setuid", 0))
attempt("sys_keyctl", lambda: raw("keyctl", 0, 0, 0))
attempt("sys_perf_event_open", lambda: raw("perf_event_open", 0, 0, -1, -1, 0))
attempt("sys_userfaultfd", lambda: raw("userfaultfd", 0))
attempt("sys_open_tree", lambda: raw("open_tree", -100, 0, 0))
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("confine")
    (tmp / "outside").mkdir()
    (tmp / "outside" / "canary.txt").write_text("CANARY-SECRET")
    (tmp / "home" / ".ssh").mkdir(parents=True)
    (tmp / "home" / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (tmp / "scratch").mkdir()
    result = confined(f"sys.argv_tmp = {str(tmp)!r}\n" + HOSTILE)
    result["tmp"] = str(tmp)
    return result


def out(hostile: dict, name: str) -> dict:
    return hostile["out"][name]


@needs_landlock
@pytest.mark.parametrize("name", ["read_canary", "list_canary_dir", "read_via_proc_root",
                                  "read_shadow", "read_ssh_key", "list_root_home",
                                  "read_other_process", "list_proc", "write_outside",
                                  "write_into_read_path"])
def test_files_outside_the_allowed_paths_are_refused(hostile, name):
    assert refused(out(hostile, name)), out(hostile, name)
    assert out(hostile, name)["errno"] == 13  # EACCES: Landlock, not a missing file


@needs_landlock
def test_the_canary_exists_for_the_parent(hostile):
    """Guards the refusal test: the canary really is there to be stolen."""
    assert (Path(hostile["tmp"]) / "outside" / "canary.txt").read_text() == "CANARY-SECRET"


@needs_landlock
def test_the_writable_directory_works(hostile):
    assert out(hostile, "scratch") == {"ok": "hello"}
    assert out(hostile, "write_dev_null") == {"ok": 1}


def test_metadata_changes_follow_the_uid(hostile):
    """As uid 0 seccomp refuses chmod (Landlock does not cover it); as another uid DAC does."""
    uid_applied = hostile["report"]["uid"]["applied"]
    assert refused(out(hostile, "chmod_scratch")) != uid_applied


@needs_seccomp
@pytest.mark.parametrize("name", ["execv", "subprocess_run", "fork"])
def test_new_processes_are_refused(hostile, name):
    assert refused(out(hostile, name)), out(hostile, name)


def test_threads_and_signals_within_the_process_work(hostile):
    assert out(hostile, "thread") == {"ok": True}
    assert out(hostile, "signal_own_main_thread") == {"ok": True}


@needs_seccomp
@pytest.mark.parametrize("name", ["signal_parent", "signal_init", "signal_process_group"])
def test_signals_to_other_processes_are_refused(hostile, name):
    assert refused(out(hostile, name)), out(hostile, name)


@needs_seccomp
@pytest.mark.parametrize("name", ["socket_inet", "socket_unix", "socket_netlink"])
def test_sockets_are_refused(hostile, name):
    assert refused(out(hostile, name)), out(hostile, name)


def test_socketpair_and_asyncio_still_work(hostile):
    assert out(hostile, "socketpair") == {"ok": True}
    assert out(hostile, "asyncio_run") == {"ok": None}


@needs_netns
def test_network_namespace_has_only_a_down_loopback(hostile):
    assert out(hostile, "netns_changed") == {"ok": True}
    assert out(hostile, "net_dev") == {"ok": ["lo"]}
    assert hostile["report"]["netns"]["detail"]["interfaces"] == {"lo": "down"}


def test_status_matches_the_report(hostile):
    status = out(hostile, "proc_self_status")["ok"]
    report = hostile["report"]
    assert status["NoNewPrivs"] == "1" and report["no_new_privs"]["applied"]
    detail = report["capabilities"]["detail"]
    for key in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
        assert detail[key] == status[key]
        if key != "CapBnd" or "bounding" not in detail:  # the bounding set needs CAP_SETPCAP
            assert int(status[key], 16) == 0, key
    if PROBE["root"]:
        assert "bounding" not in detail and int(status["CapBnd"], 16) == 0
    assert int(status["Uid"].split()[0]) == report["uid"]["detail"]["to"]
    if PROBE["seccomp"] and PROBE["seccomp_arch"]:
        assert status["Seccomp"] == "2" and report["seccomp"]["applied"]
    if PROBE["root"] and PROBE["unprivileged_uid"] is None:
        assert "uid" in [d["layer"] for d in report["degraded"]]


def test_report_is_complete_and_honest(hostile):
    report = hostile["report"]
    for layer in _confine_module.LAYERS:
        assert isinstance(report[layer]["applied"], bool), layer
    not_applied = {layer for layer in _confine_module.LAYERS if not report[layer]["applied"]}
    degraded = {d["layer"] for d in report["degraded"]}
    assert not_applied <= degraded  # nothing skipped silently
    assert degraded - not_applied <= {"landlock"}  # only Landlock applies with ABI gaps
    assert all(d["reason"] for d in report["degraded"])
    assert json.loads(json.dumps(report)) == report
    if PROBE["landlock_abi"]:
        assert report["landlock"]["detail"]["skipped"] == []


@pytest.mark.parametrize("name", ["import_json", "import_decimal", "import_sqlite3",
                                  "import_hashlib", "ctypes_callback"])
def test_c_extensions_load_after_confinement(hostile, name):
    assert "ok" in out(hostile, name), out(hostile, name)


def test_extensions_were_really_loaded_after_confinement(hostile):
    """Landlock's EXECUTE right is not needed for dlopen: these were not loaded before apply."""
    before = out(hostile, "modules_before")["ok"]
    assert not before["_decimal"] and not before["_sqlite3"]


def test_ssl_loads_if_present(hostile):
    result = out(hostile, "import_ssl")
    if result.get("error") == "ModuleNotFoundError":
        pytest.skip("this interpreter has no ssl module")
    assert result == {"ok": "CERT_REQUIRED"}


@needs_seccomp
@pytest.mark.parametrize("name,expected_errno", [
    ("sys_unshare_user", 1), ("sys_ptrace_attach_parent", 1), ("sys_mount", 1), ("sys_bpf", 1),
    ("sys_io_uring_setup", 1), ("sys_clone3", 38), ("sys_personality_no_aslr", 1),
    ("sys_setuid", 1), ("sys_keyctl", 1), ("sys_perf_event_open", 1), ("sys_userfaultfd", 1),
    ("sys_open_tree", 1)])
def test_raw_syscalls_are_refused(hostile, name, expected_errno):
    assert out(hostile, name) == {"ok": {"ret": -1, "errno": expected_errno}}


@needs_seccomp
def test_personality_query_is_allowed(hostile):
    assert out(hostile, "sys_personality_query")["ok"]["ret"] >= 0


# --- other specs ----------------------------------------------------------------------------------

@needs_seccomp
def test_subprocesses_when_allowed(tmp_path):
    result = confined(f"""
        import subprocess, threading
        report = confine.apply(confine.ConfineSpec(writable=({str(tmp_path)!r},), subprocesses=True))
        attempt("subprocess_run", lambda: subprocess.run(["true"]).returncode)
        attempt("subprocess_output", lambda: subprocess.run(["sh", "-c", "echo hi"], capture_output=True, text=True).stdout)
        def fork():
            pid = os.fork()
            if pid == 0:
                os._exit(7)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        attempt("fork", fork)
        def execv_in_child():
            pid = os.fork()
            if pid == 0:
                try:
                    os.execv("/bin/sh", ["sh", "-c", "exit 3"])
                finally:
                    os._exit(99)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        attempt("execv", execv_in_child)
        def posix_spawn():  # glibc's posix_spawn tries clone3 first: ENOSYS must make it fall back
            pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 5"], {{}})
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        attempt("posix_spawn", posix_spawn)
        def kill_child():
            p = subprocess.Popen(["sleep", "30"])
            p.kill()
            return p.wait()
        attempt("kill_child", kill_child)
        attempt("thread", lambda: (threading.Thread(target=lambda: None).start(), True)[1])
        attempt("read_canary_via_cat", lambda: subprocess.run(["cat", "/etc/shadow"], capture_output=True).returncode)
        attempt("unshare_via_clone", lambda: subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode)
    """)
    o = result["out"]
    assert o["subprocess_run"] == {"ok": 0}
    assert o["subprocess_output"] == {"ok": "hi\n"}
    assert o["fork"] == {"ok": 7}
    assert o["execv"] == {"ok": 3}
    assert o["posix_spawn"] == {"ok": 5}
    assert o["kill_child"] == {"ok": -signal.SIGKILL}
    assert o["thread"] == {"ok": True}
    if PROBE["landlock_abi"]:
        assert o["read_canary_via_cat"]["ok"] != 0  # children inherit every layer
    assert o["unshare_via_clone"]["ok"] != 0


@needs_seccomp
def test_network_when_allowed():
    result = confined("""
        import socket
        report = confine.apply(confine.ConfineSpec(network=True))
        attempt("socket_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
        attempt("socket_unix", lambda: socket.socket(socket.AF_UNIX).close())
        attempt("fork", lambda: os.fork())
    """)
    assert result["out"]["socket_inet"] == {"ok": None}
    assert result["out"]["socket_unix"] == {"ok": None}
    assert refused(result["out"]["fork"])
    assert result["report"]["netns"] == {"applied": False, "detail": "network allowed by the spec"}
    assert "netns" not in {d["layer"] for d in result["report"]["degraded"]}


def test_kept_descriptors_survive_and_others_close():
    result = confined("""
        keep_r, keep_w = os.pipe()
        other = os.open("/dev/null", os.O_RDONLY)
        report = confine.apply(confine.ConfineSpec(), keep_fds=(keep_r, keep_w))
        os.write(keep_w, b"ping")
        out["channel"] = {"ok": os.read(keep_r, 4).decode()}
        attempt("other", lambda: os.fstat(other))
        def is_open(fd):
            try:
                return os.fstat(fd) is not None
            except OSError:
                return False
        # the listing's own directory descriptor is closed again by the time we look
        out["fds"] = {"ok": [fd for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")) if is_open(fd)]}
        out["pipe"] = {"ok": [keep_r, keep_w]}
    """)
    o = result["out"]
    assert o["channel"] == {"ok": "ping"}
    assert o["other"]["error"] == "OSError" and o["other"]["errno"] == 9
    assert result["report"]["fds"]["detail"]["kept"] == [0, 1, 2] + o["pipe"]["ok"]
    assert o["fds"]["ok"] == [0, 1, 2] + o["pipe"]["ok"]


@needs_landlock
@needs_seccomp
def test_ipython_runs_after_confinement(tmp_path):
    """The worker's order: import IPython and make the shell, then confine, then run cells."""
    body = f"""
        os.environ["IPYTHONDIR"] = {str(tmp_path / "ipython")!r}
        from traitlets.config import Config
        from IPython.core.interactiveshell import InteractiveShell
        from pyrepl3_ext.engine import confine as package_confine
        cfg = Config()
        cfg.HistoryManager.hist_file = ":memory:"
        shell = InteractiveShell(config=cfg)
        report = package_confine.apply(package_confine.ConfineSpec(writable=({str(tmp_path)!r},)))
        out["modules"] = {{"ok": len(sys.modules)}}
        def cell(code):
            result = shell.run_cell(code)
            return [result.success, repr(result.error_in_exec)]
        attempt("assign", lambda: cell("x = 1"))
        out["x"] = {{"ok": shell.user_ns.get("x")}}
        attempt("await", lambda: cell("import asyncio\\nawait asyncio.sleep(0)\\ny = 2"))
        out["y"] = {{"ok": shell.user_ns.get("y")}}
        attempt("hostile_cell", lambda: cell("import os\\nstatus = os.system('true')"))
        out["status"] = {{"ok": shell.user_ns.get("status")}}
        attempt("hostile_open", lambda: cell("open('/etc/passwd').read()"))
    """
    result = confined(body)
    o = result["out"]
    assert o["assign"] == {"ok": [True, "None"]} and o["x"] == {"ok": 1}
    assert o["await"] == {"ok": [True, "None"]} and o["y"] == {"ok": 2}
    assert o["hostile_cell"]["ok"][0] is True and o["status"]["ok"] != 0  # system() fails, no raise
    assert o["hostile_open"]["ok"][0] is False and "PermissionError" in o["hostile_open"]["ok"][1]


def test_apply_refuses_a_second_thread():
    result = confined("""
        import threading
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        attempt("apply", lambda: confine.apply(confine.ConfineSpec()))
        stop.set(); t.join()
        out["nnp"] = {"ok": [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1]}
        report = None
    """)
    assert result["out"]["apply"]["error"] == "RuntimeError"
    assert "2" in result["out"]["apply"]["msg"] and "thread" in result["out"]["apply"]["msg"]
    assert result["out"]["nnp"] == {"ok": "0"}  # refused before anything was applied


MISSING = {
    "landlock": {"landlock_abi": 0},
    "seccomp": {"seccomp": False},
    "netns": {"netns": False},
    "uid": {"root": True, "unprivileged_uid": None, "unprivileged_gid": None},
}


@pytest.mark.parametrize("layer", sorted(MISSING))
def test_required_missing_layer_raises_and_changes_nothing(layer):
    result = confined(f"""
        real_probe = confine.probe
        def fake_probe():
            info = real_probe()
            info.update({MISSING[layer]!r})
            return info
        confine.probe = fake_probe
        fds_before = sorted(os.listdir("/proc/self/fd"))
        spare = os.open("/dev/null", os.O_RDONLY)
        attempt("apply", lambda: confine.apply(confine.ConfineSpec(required=frozenset({{{layer!r}}}))))
        out["spare_open"] = {{"ok": os.fstat(spare) is not None}}
        out["nnp"] = {{"ok": [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1]}}
        report = None
    """)
    o = result["out"]
    assert o["apply"]["error"] == "ConfinementUnavailable"
    assert o["apply"]["msg"].startswith(f"{layer}: ")
    assert o["spare_open"] == {"ok": True} and o["nnp"] == {"ok": "0"}


def test_a_missing_writable_directory_is_refused_before_anything(tmp_path):
    result = confined(f"""
        attempt("apply", lambda: confine.apply(confine.ConfineSpec(writable=({str(tmp_path / "nope")!r},))))
        out["nnp"] = {{"ok": [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1]}}
        report = None
    """)
    assert result["out"]["apply"]["error"] == "FileNotFoundError"
    assert result["out"]["nnp"] == {"ok": "0"}


@pytest.mark.parametrize("layer", ["landlock", "seccomp"])
def test_missing_layer_not_required_is_a_reported_degradation(layer):
    result = confined(f"""
        real_probe = confine.probe
        def fake_probe():
            info = real_probe()
            info.update({MISSING[layer]!r})
            return info
        confine.probe = fake_probe
        report = confine.apply(confine.ConfineSpec())
        attempt("execv", lambda: os.execv("/bin/true", ["true"]))
        out["seccomp_mode"] = {{"ok": [l for l in open("/proc/self/status") if l.startswith("Seccomp:")][0].split()[1]}}
    """)
    report, o = result["report"], result["out"]
    assert report[layer]["applied"] is False
    assert layer in {d["layer"] for d in report["degraded"]}
    if layer == "seccomp":
        assert o["seccomp_mode"] == {"ok": "0"}
        if PROBE["landlock_abi"]:
            # the other layer still holds: no EXECUTE right anywhere, so exec fails with EACCES
            assert o["execv"]["error"] == "PermissionError" and o["execv"]["errno"] == 13
    else:
        assert o["execv"]["errno"] == 1  # seccomp's EPERM, Landlock being off


@needs_landlock
@pytest.mark.parametrize("abi", range(1, 8))
def test_every_landlock_abi_confines_and_reports_its_gaps(abi, tmp_path):
    """An older ABI on this kernel is what an older kernel offers: same walls, named gaps."""
    if abi > PROBE["landlock_abi"]:
        pytest.skip(f"kernel offers Landlock ABI {PROBE['landlock_abi']} < {abi}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "canary").write_text("secret")
    (tmp_path / "scratch").mkdir()
    result = confined(f"""
        real_probe = confine.probe
        def fake_probe():
            info = real_probe()
            info["landlock_abi"] = {abi}
            return info
        confine.probe = fake_probe
        report = confine.apply(confine.ConfineSpec(writable=({str(tmp_path / "scratch")!r},)))
        attempt("canary", lambda: open({str(tmp_path / "outside" / "canary")!r}).read())
        attempt("scratch", lambda: open({str(tmp_path / "scratch" / "f")!r}, "w").write("abc"))
        attempt("dev_null", lambda: open("/dev/null", "w").write("x"))
        out["seccomp"] = {{"ok": [l for l in open("/proc/self/status") if l.startswith("Seccomp:")][0].split()[1]}}
    """)
    report, o = result["report"], result["out"]
    assert report["landlock"]["applied"] and report["landlock"]["detail"]["abi"] == abi
    assert report["landlock"]["detail"]["skipped"] == []
    assert refused(o["canary"]) and o["scratch"] == {"ok": 3} and o["dev_null"] == {"ok": 1}
    gaps = " ".join(d["reason"] for d in report["degraded"] if d["layer"] == "landlock")
    assert ("truncate" in gaps) == (abi < 3) and ("ioctl" in gaps) == (abi < 5)
    assert report["landlock"]["detail"]["handled_net"] == (3 if abi >= 4 else 0)
    assert report["landlock"]["detail"]["scoped"] == (3 if abi >= 6 else 0)
    if PROBE["seccomp"] and PROBE["seccomp_arch"]:
        assert o["seccomp"] == {"ok": "2"}


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown layer"):
        _confine_module.ConfineSpec(required=frozenset({"selinux"}))
    with pytest.raises(ValueError, match="netns"):
        _confine_module.ConfineSpec(network=True, required=frozenset({"netns"}))


def test_probe_has_no_side_effects_and_sane_types():
    def state():
        return os.getuid(), set(os.listdir("/proc/self/fd")), set(os.listdir("/proc/self/task"))

    uid, fds, threads = state()
    info = _confine_module.probe()
    uid_after, fds_after, threads_after = state()
    # nothing new (threads of earlier tests may end meanwhile: no equality)
    assert uid_after == uid
    assert fds_after <= fds, fds_after - fds
    assert threads_after <= threads, threads_after - threads
    assert isinstance(info["seccomp"], bool) and isinstance(info["landlock_abi"], int)
    assert isinstance(info["netns"], bool) and info["root"] == (os.geteuid() == 0)
    assert info["unprivileged_uid"] is None or isinstance(info["unprivileged_uid"], int)
    assert isinstance(info["missing"], list)
    assert json.loads(json.dumps(info)) == info


def test_default_read_paths_exist_and_cover_the_interpreter():
    paths = _confine_module.default_read_paths()
    assert all(os.path.exists(p) for p in paths) and len(paths) == len(set(paths))
    assert sys.prefix in paths and "/proc/self" in paths and "" not in paths
    assert "/usr/bin" not in paths and "/etc/ssl" not in paths
    assert "/usr/bin" in _confine_module.default_read_paths(subprocesses=True)


# --- the filter's own correctness -----------------------------------------------------------------

@pytest.mark.skipif(PROBE["libseccomp"] is None, reason="libseccomp is not installed to compare")
@pytest.mark.parametrize("arch", sorted(_confine_module._SYSCALLS))
def test_syscall_numbers_match_libseccomp(arch):
    lib = ctypes.CDLL(PROBE["libseccomp"])
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
    token = _confine_module.AUDIT_ARCH[arch]
    unknown, wrong = set(), {}
    for name, number in _confine_module._SYSCALLS[arch].items():
        theirs = lib.seccomp_syscall_resolve_name_arch(token, name.encode())
        if theirs < 0:
            unknown.add(name)
        elif theirs != number:
            wrong[name] = (number, theirs)
    assert wrong == {}
    # only syscalls newer than libseccomp 2.5.4 (Linux 6.6+) may be missing from its tables
    assert unknown <= {"fchmodat2", "setxattrat", "removexattrat", "open_tree_attr", "file_setattr"}


@needs_seccomp
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x32 and i386 ABIs exist on x86_64 only")
def test_foreign_syscall_abis_kill_the_process():
    x32 = run_child("""
        import ctypes
        confine.apply(confine.ConfineSpec())
        ctypes.CDLL(None).syscall(ctypes.c_long(0x40000000 | 39))  # x32 getpid
        print("survived")
    """)
    assert x32.returncode == -signal.SIGSYS and "survived" not in x32.stdout
    i386 = run_child("""
        import ctypes, mmap
        # mov eax, 20 (i386 getpid); int 0x80; ret
        code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
        assert fn() == os.getpid()  # works before confinement
        confine.apply(confine.ConfineSpec())
        fn()
        print("survived")
    """)
    assert i386.returncode == -signal.SIGSYS and "survived" not in i386.stdout, i386.stderr


def test_assembler_rejects_out_of_range_jumps():
    program = [("jeq", 1, "far", None)] + [("ret", 0)] * 300 + [("label", "far"), ("ret", 0)]
    with pytest.raises(ValueError, match="out of range"):
        _confine_module._assemble(program)


# --- the uid drop and an unprivileged start, with an interpreter others can read ------------------

def _world_readable_python() -> str | None:
    """A system interpreter (3.10+) whose files a uid that owns nothing can read."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(candidate):
            continue
        check = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info >= (3, 10))"],
            capture_output=True, text=True)
        if check.stdout.strip() == "True":
            probe = subprocess.run(
                [candidate, "-c", PRELUDE.format(confine_py=str(CONFINE_PY))
                 + "print(confine.probe()['unprivileged_uid'])"], capture_output=True, text=True,
                env={"PATH": os.environ.get("PATH", "")})
            if probe.stdout.strip() not in ("", "None"):
                return candidate
    return None


SYSTEM_PYTHON = _world_readable_python() if sys.platform == "linux" else None
needs_system_python = pytest.mark.skipif(
    SYSTEM_PYTHON is None, reason="no interpreter here is readable by an unprivileged uid")


@pytest.fixture
def world_tmp():
    """A temporary directory every uid can traverse (pytest's own is mode 0700)."""
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="confine-"))
    path.chmod(0o755)
    (path / "canary").write_text("secret")
    (path / "canary").chmod(0o644)
    yield path
    shutil.rmtree(path)


@needs_root
@needs_system_python
def test_root_drops_to_the_unprivileged_uid(world_tmp):
    scratch = world_tmp / "scratch"
    scratch.mkdir(mode=0o700)
    result = confined(f"""
        import json, socket, decimal
        report = confine.apply(confine.ConfineSpec(writable=({str(scratch)!r},)))
        out["ids"] = {{"ok": [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()]}}
        attempt("write", lambda: open({str(scratch)!r} + "/f", "w").write("x"))
        attempt("setuid_back", lambda: os.setuid(0))
        attempt("status", lambda: {{l.split(":")[0]: l.split(":")[1].strip() for l in open("/proc/self/status")}})
        attempt("import_sqlite3", lambda: __import__("sqlite3").connect(":memory:").execute("select 1").fetchone()[0])
        attempt("chmod_own_file", lambda: os.chmod({str(scratch)!r} + "/f", 0o600))
        attempt("canary", lambda: open({str(world_tmp / "canary")!r}).read())
    """, python=SYSTEM_PYTHON)
    report, o = result["report"], result["out"]
    uid = report["probe"]["unprivileged_uid"]
    assert report["uid"]["applied"] and report["uid"]["detail"]["to"] == uid != 0
    assert o["ids"]["ok"][:2] == [uid, uid] and o["ids"]["ok"][3] == []
    assert report["uid"]["detail"]["chowned"] == [str(scratch)]
    assert o["write"] == {"ok": 1}
    assert o["chmod_own_file"] == {"ok": None}  # not uid 0: seccomp leaves metadata to DAC
    assert refused(o["setuid_back"])
    assert int(o["status"]["ok"]["CapEff"], 16) == 0 and int(o["status"]["ok"]["CapBnd"], 16) == 0
    assert o["import_sqlite3"] == {"ok": 1}
    if PROBE["landlock_abi"]:
        assert refused(o["canary"])  # readable by file mode: Landlock is what refuses it
    assert report["degraded"] == []


@needs_root
@needs_system_python
def test_uid_drop_is_skipped_when_the_scratch_would_be_unreachable(tmp_path):
    """pytest's tmp_path sits under a 0700 directory: dropping would lock the session out."""
    result = confined(f"""
        report = confine.apply(confine.ConfineSpec(writable=({str(tmp_path)!r},)))
        attempt("write", lambda: open({str(tmp_path)!r} + "/f", "w").write("x"))
    """, python=SYSTEM_PYTHON)
    report = result["report"]
    assert report["uid"]["applied"] is False
    assert report["uid"]["detail"]["unreachable"] == [str(tmp_path)]
    assert [d["layer"] for d in report["degraded"]] == ["uid"]
    assert "not reachable" in report["degraded"][0]["reason"]
    assert result["out"]["write"] == {"ok": 1}


@needs_root
@needs_system_python
def test_required_uid_with_an_unreachable_scratch_raises_before_anything(tmp_path):
    result = confined(f"""
        attempt("apply", lambda: confine.apply(confine.ConfineSpec(
            writable=({str(tmp_path)!r},), required=frozenset({{"uid"}}))))
        out["uid"] = {{"ok": os.getuid()}}
        out["nnp"] = {{"ok": [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1]}}
        report = None
    """, python=SYSTEM_PYTHON)
    o = result["out"]
    assert o["apply"]["error"] == "ConfinementUnavailable" and o["apply"]["msg"].startswith("uid: ")
    assert str(tmp_path) in o["apply"]["msg"]
    assert o["uid"] == {"ok": 0} and o["nnp"] == {"ok": "0"}


@needs_root
@needs_system_python
def test_an_unprivileged_process_confines_itself(world_tmp):
    """No capabilities at the start: namespaces come from a user namespace, NNP enables the rest."""
    nobody = PROBE["unprivileged_uid"] if PROBE["unprivileged_uid"] is not None else 65534
    canary = str(world_tmp / "canary")
    result = confined(f"""
        import socket
        attempt("canary_before", lambda: open({canary!r}).read())
        parent_netns = os.readlink("/proc/self/ns/net")
        report = confine.apply(confine.ConfineSpec())
        attempt("canary", lambda: open({canary!r}).read())
        attempt("socket", lambda: socket.socket())
        attempt("fork", lambda: os.fork())
        out["uid"] = {{"ok": os.getuid()}}
        out["netns_changed"] = {{"ok": os.readlink("/proc/self/ns/net") != parent_netns}}
    """, python=SYSTEM_PYTHON, user=nobody)
    report, o = result["report"], result["out"]
    assert o["uid"] == {"ok": nobody} and o["canary_before"] == {"ok": "secret"}
    assert report["uid"]["applied"] and report["capabilities"]["applied"]
    if PROBE["landlock_abi"]:
        assert report["landlock"]["applied"] and refused(o["canary"])
    if PROBE["seccomp"] and PROBE["seccomp_arch"]:
        assert refused(o["socket"]) and refused(o["fork"])
    if report["netns"]["applied"]:
        assert report["netns"]["detail"]["user_namespace"] and o["netns_changed"] == {"ok": True}
    assert {d["layer"] for d in report["degraded"]} <= {"netns", "ipcns"}
