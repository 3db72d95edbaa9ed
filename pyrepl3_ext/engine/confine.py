"""OS confinement of a session worker process (Linux).

A worker that runs untrusted code calls :func:`apply` once, in the forked
worker, after IPython and the shell exist and before the first untrusted
cell, while the process has exactly one thread.  Afterwards the process
holds nothing worth stealing (no inherited descriptors, no capabilities)
and has no way out (no network, no other files, no new programs, no
kernel attack surface it does not need).  ``docs/isolation-confine.md``
explains every layer, the order and the limits.

This module is standard library only (ctypes) and must stay importable
without IPython or the rest of the package: the tests load it by file path
into a system interpreter to exercise the uid drop.

Invariants:

* :func:`probe` has no side effects; :func:`apply` never pretends: a layer
  is reported ``applied`` only after the kernel accepted it, and every
  layer that was skipped or only partly applied appears in ``degraded``
  with its reason, unless it is named in ``ConfineSpec.required``, in which
  case :class:`ConfinementUnavailable` is raised instead.
* The order of the layers is fixed (:data:`LAYERS`): each later layer
  removes something an earlier one needs (the comment on ``LAYERS``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = [
    "ConfinementUnavailable", "ConfineSpec", "LAYERS", "probe", "default_read_paths", "apply",
]


class ConfinementUnavailable(RuntimeError):
    """A layer named in ``ConfineSpec.required`` cannot be applied here.

    The message starts with the layer name and says why.
    """


#: Every layer, in the order :func:`apply` runs them.  Why this order:
#: fds first (nothing opened before confinement survives it); the namespaces while
#: CAP_SYS_ADMIN is still held and before seccomp denies unshare(); no_new_privs before
#: Landlock and seccomp, which need it once capabilities are gone; Landlock needs no
#: privilege after that; the uid and capabilities step after everything that needs a
#: capability (unshare, chown, securebits, the bounding set); seccomp last, because it
#: denies unshare, setuid and the rest the earlier layers call, and it is built for the
#: final uid (metadata rules) and pid (signal fence).
LAYERS = ("fds", "netns", "ipcns", "no_new_privs", "landlock", "uid", "capabilities", "seccomp")


@dataclass(frozen=True)
class ConfineSpec:
    """What a confined session may do; everything else is denied.

    ``required`` names layers (from :data:`LAYERS`) that must apply, else
    :func:`apply` raises :class:`ConfinementUnavailable`; a missing layer
    not named there is skipped and reported as a degradation.
    """

    writable: tuple[str, ...] = ()
    readable: tuple[str, ...] = ()
    network: bool = False
    subprocesses: bool = False
    #: may fork copies of itself (checkpoints), never exec: copies inherit every
    #: layer; bound them with a pids limit.  Signals are then scoped by Landlock
    #: (ABI 6+), since a copy has a pid of its own the seccomp fence cannot name.
    fork: bool = False
    required: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.required) - set(LAYERS)
        if unknown:
            raise ValueError(f"unknown layer(s) in required: {sorted(unknown)}; known: {LAYERS}")
        if self.network and "netns" in self.required:
            raise ValueError("netns cannot be required when network=True (no namespace is made)")


# --- kernel interface -------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    """Turn a libc ``-1``/errno result into OSError naming the call."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _check(_libc.prctl(option, a2, a3, a4, a5), f"prctl({option})")


PR_GET_SECCOMP, PR_SET_SECCOMP = 21, 22
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS, PR_SET_SECUREBITS = 27, 28
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECCOMP_MODE_FILTER = 2
CLONE_NEWIPC, CLONE_NEWNET = 0x08000000, 0x40000000


def _is_64bit_process() -> bool:
    return struct.calcsize("P") == 8


def _arch() -> str | None:
    """The syscall ABI of this process when we have a table for it, else None."""
    machine = platform.machine()
    if not _is_64bit_process():
        return None  # a 32-bit interpreter on a 64-bit kernel uses another syscall table
    return machine if machine in _SYSCALLS else None


# --- probe ------------------------------------------------------------------

def _landlock_abi() -> int:
    """Landlock ABI version the kernel offers (0 = none or disabled)."""
    LANDLOCK_CREATE_RULESET_VERSION = 1
    if not _is_64bit_process():
        return 0
    res = _libc.syscall(ctypes.c_long(_LL_CREATE), None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return int(res) if res > 0 else 0


def _seccomp_available() -> bool:
    """The kernel has seccomp filters with the two actions we use."""
    if _libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        return False  # EINVAL: kernel without CONFIG_SECCOMP
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            actions = f.read().split()
    except OSError:
        return True  # kernels before 4.14 lack the file but have filter mode
    return "errno" in actions and "kill_process" in actions


def _status_fields() -> dict[str, str]:
    """/proc/self/status as a dict (capability sets, NoNewPrivs, Seccomp, uids)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _has_cap(cap: int) -> bool:
    return bool(int(_status_fields().get("CapEff", "0"), 16) >> cap & 1)


CAP_SYS_ADMIN = 21


def _netns_possible() -> bool:
    """Would unshare(CLONE_NEWNET) work?  Decided without trying it.

    With CAP_SYS_ADMIN it does (unless a container's seccomp forbids it,
    which apply() then reports).  Without it, only through a new user
    namespace, which needs user namespaces enabled for unprivileged users.
    """
    if _has_cap(CAP_SYS_ADMIN):
        return True
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return False
    except OSError:
        return False
    try:
        with open("/proc/sys/kernel/unprivileged_userns_clone") as f:
            return int(f.read()) != 0
    except OSError:
        return True  # mainline kernels have no such switch


def _others_can_read(path: str) -> bool:
    """True if a uid that owns nothing (neither owner nor group) can read ``path``.

    Walks every ancestor (search bit) of the path as written and as resolved.
    Only the top of a directory tree is checked, not each file below it.
    """
    for candidate in {os.path.abspath(path), os.path.realpath(path)}:
        parts = candidate.split("/")
        for i in range(1, len(parts)):
            ancestor = "/".join(parts[:i]) or "/"
            try:
                st = os.stat(ancestor)
            except OSError:
                return False
            if not st.st_mode & stat.S_IXOTH:
                return False
        try:
            st = os.stat(candidate)
        except OSError:
            return False
        need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
        if st.st_mode & need != need:
            return False
    return True


def _others_can_search(directory: str) -> bool:
    """True if a uid that owns nothing can reach entries of ``directory`` (search bits)."""
    path = os.path.realpath(directory)
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        try:
            if not os.stat("/".join(parts[:i]) or "/").st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _unprivileged_candidate() -> tuple[int, int]:
    """(uid, gid) of the system's 'nobody', or 65534 when it has none."""
    import pwd
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _interpreter_paths() -> list[str]:
    """What the interpreter must still read after a uid drop."""
    paths = [os.path.realpath(sys.executable)]
    for p in default_read_paths():
        if not (p.startswith("/dev/") or p.startswith("/proc/")):
            paths.append(p)
    return paths


def _unreadable_for_others() -> list[str]:
    return [p for p in _interpreter_paths() if not _others_can_read(p)]


def _find_libseccomp() -> str | None:
    """Where libseccomp.so.2 is (informational: the filter is built here, see the doc)."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64",
              "/usr/lib", "/lib", "/usr/local/lib"):
        path = os.path.join(d, "libseccomp.so.2")
        if os.path.exists(path):
            return path
    return None


def probe() -> dict:
    """What this kernel and process offer; cheap and without side effects.

    Keys: ``seccomp`` (bool), ``seccomp_arch`` (our syscall table's arch or
    None), ``landlock_abi`` (int, 0 = none), ``netns`` (bool), ``root``
    (bool: euid 0), ``unprivileged_uid`` (int or None: a uid that can read
    the interpreter and its libraries, judged from path modes),
    ``unprivileged_gid``, ``libseccomp`` (path or None), ``missing``
    (human-readable list).
    """
    missing = []
    arch = _arch()
    seccomp = _seccomp_available()
    if not seccomp:
        missing.append("seccomp: kernel has no seccomp filter support")
    elif arch is None:
        missing.append(f"seccomp: no syscall table for {platform.machine()} "
                       f"({struct.calcsize('P') * 8}-bit process)")
    abi = _landlock_abi()
    if abi == 0:
        missing.append("landlock: kernel has no Landlock, or it is disabled (lsm= boot option)")
    netns = _netns_possible()
    if not netns:
        missing.append("netns: no CAP_SYS_ADMIN and user namespaces are disabled")
    root = os.geteuid() == 0
    unprivileged_uid = unprivileged_gid = None
    unreadable = _unreadable_for_others()
    if unreadable and root:
        missing.append(f"uid: no unprivileged uid can read the interpreter ({unreadable[0]} is "
                       "not readable by others)")
    if not unreadable:
        unprivileged_uid, unprivileged_gid = _unprivileged_candidate()
    return {
        "seccomp": seccomp, "seccomp_arch": arch, "landlock_abi": abi, "netns": netns,
        "root": root, "unprivileged_uid": unprivileged_uid, "unprivileged_gid": unprivileged_gid,
        "libseccomp": _find_libseccomp(), "missing": missing,
    }


# --- read paths -------------------------------------------------------------

#: Each default path and why a Python worker needs it.
_SYSTEM_READ_PATHS = {
    "/lib": "shared libraries the interpreter and C extensions link (libc, libssl, libffi...)",
    "/lib64": "the dynamic loader and 64-bit libraries on multilib layouts",
    "/usr/lib": "same (merged-/usr layouts), locale archives, OpenSSL's configuration link",
    "/usr/lib64": "same on Fedora-style layouts",
    "/usr/local/lib": "libraries installed locally (a source-built Python's libpython)",
    "/etc/ld.so.cache": "dlopen() of a library by soname looks it up here",
    "/etc/localtime": "time.localtime() and datetime's local timezone",
    "/usr/share/zoneinfo": "zoneinfo.ZoneInfo and TZ=Area/City",
    "/dev/null": "subprocess.DEVNULL and libraries that discard output (also writable)",
    "/dev/urandom": "libraries that read it directly instead of getrandom()",
    "/dev/zero": "libraries that map it for anonymous memory",
    "/proc/self": "this process only (fds, status, maps for tracebacks and introspection); "
                  "other processes' /proc entries stay hidden",
}

#: Only when the spec allows the network: TLS trust and name resolution.
_NETWORK_READ_PATHS = ("/etc/ssl", "/usr/share/ca-certificates", "/etc/resolv.conf", "/etc/hosts",
                       "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf", "/etc/services",
                       "/etc/protocols")

#: Only when the spec allows subprocesses: the programs to run (also executable).
_PROGRAM_PATHS = ("/bin", "/usr/bin", "/usr/local/bin")

#: Files that must stay writable whatever the spec says.
_WRITABLE_DEVICES = ("/dev/null",)


def default_read_paths(*, network: bool = False, subprocesses: bool = False) -> list[str]:
    """What a Python worker needs to read, existing paths only, without duplicates.

    The interpreter's trees (``sys.prefix``, ``base_prefix``, ``exec_prefix``,
    ``base_exec_prefix``, the real executable), every existing ``sys.path``
    entry (not ``''``: the current directory is not granted implicitly), and
    :data:`_SYSTEM_READ_PATHS`; with ``network`` the certificate and resolver
    files, with ``subprocesses`` the program directories.
    """
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.realpath(sys.executable)]
    paths += [p for p in sys.path if p]
    paths += list(_SYSTEM_READ_PATHS)
    if network:
        paths += list(_NETWORK_READ_PATHS)
    if subprocesses:
        paths += list(_PROGRAM_PATHS)
    seen, result = set(), []
    for p in paths:
        p = os.path.abspath(p)
        if p not in seen and os.path.exists(p):
            seen.add(p)
            result.append(p)
    return result


# --- layer: descriptors -----------------------------------------------------

def _open_fds() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))


def _close_fds(keep_fds: Sequence[int]) -> dict:
    """Close every descriptor but 0, 1, 2 and ``keep_fds``."""
    keep = {0, 1, 2} | {int(fd) for fd in keep_fds}
    closed = []
    for fd in _open_fds():
        if fd in keep:
            continue
        try:
            os.close(fd)
            closed.append(fd)
        except OSError as e:
            if e.errno != errno.EBADF:  # EBADF: the listing's own directory descriptor
                raise
    leftover = [fd for fd in _open_fds() if fd not in keep and _is_open(fd)]
    if leftover:
        raise OSError(errno.EBUSY, f"descriptors still open after closing: {leftover}")
    return {"closed": closed, "kept": sorted(fd for fd in keep if _is_open(fd))}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- layer: namespaces ------------------------------------------------------

def _interfaces() -> dict[str, str]:
    """Interfaces of the current network namespace and whether each is up."""
    import fcntl
    import socket
    SIOCGIFFLAGS, IFF_UP = 0x8913, 0x1
    result = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("16sH14x", name.encode(), 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
            result[name] = "up" if flags & IFF_UP else "down"
    return result


CLONE_NEWUSER = 0x10000000


def _unshare(flags: int, what: str) -> dict:
    """unshare() the namespaces in ``flags``, through a user namespace when not privileged.

    Without CAP_SYS_ADMIN the kernel only lets a process create namespaces
    inside a new user namespace of its own; our uid and gid are mapped to
    themselves there so file ownership and ``os.getuid()`` do not change.  The
    capabilities that namespace grants are dropped by the capabilities layer.
    """
    if _has_cap(CAP_SYS_ADMIN):
        _check(_libc.unshare(flags), f"unshare({what})")
        return {}
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(flags | CLONE_NEWUSER), f"unshare(CLONE_NEWUSER|{what})")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return {"user_namespace": True}


def _enter_netns() -> dict:
    """A fresh network namespace: only a loopback, down; abstract unix sockets private."""
    detail = _unshare(CLONE_NEWNET, "CLONE_NEWNET")
    detail["interfaces"] = _interfaces()
    return detail


def _enter_ipcns() -> dict:
    """A fresh IPC namespace: the host's SysV IPC objects and POSIX queues are out of reach."""
    return _unshare(CLONE_NEWIPC, "CLONE_NEWIPC")


# --- layer: Landlock --------------------------------------------------------

# Syscall numbers shared by every architecture with the unified table (x86_64, aarch64...).
_LL_CREATE, _LL_ADD, _LL_RESTRICT = 444, 445, 446

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

#: Rights valid on a rule for a file (not a directory).
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


def _handled_fs(abi: int) -> int:
    """Every filesystem right the kernel's ABI knows: all of them are denied unless granted."""
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _ruleset_attr_size(abi: int) -> int:
    """How much of the attribute struct this ABI reads (fields were appended over time)."""
    return 8 if abi < 4 else 16 if abi < 6 else 24


def _add_path_rule(ruleset_fd: int, path: str, rights: int) -> str | None:
    """Grant ``rights`` beneath ``path``; return why not when the path cannot be opened."""
    LANDLOCK_RULE_PATH_BENEATH = 1
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        return f"{path}: {e.strerror}"
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        attr = _PathBeneathAttr(rights, fd)
        _check(_libc.syscall(ctypes.c_long(_LL_ADD), ctypes.c_int(ruleset_fd),
                             ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(attr),
                             ctypes.c_uint32(0)), f"landlock_add_rule({path})")
    finally:
        os.close(fd)
    return None


def _landlock(spec: ConfineSpec, abi: int, read_paths: list[str]) -> tuple[dict, list[str]]:
    """Restrict the filesystem (and TCP, signals, abstract sockets where the ABI has them).

    Returns the detail and the gaps this ABI leaves (for ``degraded``).
    """
    handled = _handled_fs(abi)
    read_rights = FS_READ_FILE | FS_READ_DIR | (FS_EXECUTE if spec.subprocesses else 0)
    write_rights = handled & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK)
    if not spec.subprocesses:
        write_rights &= ~FS_EXECUTE
    attr = _RulesetAttr(handled, 0, 0)
    gaps = []
    if abi >= 4 and not spec.network:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # no rule: all TCP denied
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    else:
        if spec.network:
            gaps.append(f"Landlock ABI {abi} < 6: abstract unix sockets of the host are reachable "
                        "(network=True keeps the host's network namespace)")
        if spec.subprocesses or spec.fork:
            gaps.append(f"Landlock ABI {abi} < 6: signals to processes outside the sandbox are "
                        "not scoped, and seccomp's signal fence is off with "
                        f"{'subprocesses' if spec.subprocesses else 'fork'}=True")
    if abi < 3:
        gaps.append(f"Landlock ABI {abi} < 3: truncate() is not controlled; files the process "
                    "owns (uid 0: all root files) can be truncated")
    if abi < 5:
        gaps.append(f"Landlock ABI {abi} < 5: ioctl() on device files is not controlled")
    ruleset_fd = _check(_libc.syscall(ctypes.c_long(_LL_CREATE), ctypes.byref(attr),
                                      ctypes.c_size_t(_ruleset_attr_size(abi)), ctypes.c_uint32(0)),
                        "landlock_create_ruleset")
    skipped = []
    try:
        for path in read_paths:
            problem = _add_path_rule(ruleset_fd, path, read_rights)
            if problem:
                skipped.append(problem)
        for path in _WRITABLE_DEVICES:
            problem = _add_path_rule(ruleset_fd, path,
                                     (FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE) & handled)
            if problem:
                skipped.append(problem)
        for path in spec.writable:
            problem = _add_path_rule(ruleset_fd, path, write_rights)
            if problem:
                raise OSError(errno.ENOENT, f"cannot grant the writable path {problem}")
        _check(_libc.syscall(ctypes.c_long(_LL_RESTRICT), ctypes.c_int(ruleset_fd),
                             ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset_fd)
    return {"abi": abi, "handled_fs": handled, "handled_net": attr.handled_access_net,
            "scoped": attr.scoped, "read": read_paths, "write": list(spec.writable),
            "skipped": skipped}, gaps


# --- layer: privileges ------------------------------------------------------

_CAP_VERSION_3 = 0x20080522
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE, SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 6, 1 << 7
#: Root gets no capabilities from exec (NOROOT), the process cannot keep capabilities over a
#: uid change, cannot raise ambient ones, and none of that can be undone (the LOCKED bits).
_SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_KEEP_CAPS_LOCKED
               | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _cap_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def _cap_sets() -> dict[str, str]:
    fields = _status_fields()
    return {k: fields[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def _chown_writable(spec: ConfineSpec, uid: int, gid: int) -> list[str]:
    """Hand the session's writable directories (their top only) to the uid it drops to."""
    changed = []
    for path in spec.writable:
        if os.stat(path).st_uid != uid:
            os.chown(path, uid, gid)
            changed.append(path)
    return changed


def _drop_privileges(spec: ConfineSpec, info: dict, last_cap: int) -> tuple[dict, dict]:
    """The uid step and the capabilities step together: their order interlocks.

    chown needs CAP_CHOWN, the bounding set and securebits CAP_SETPCAP,
    setgroups/setresuid CAP_SETGID/CAP_SETUID: all of it before capset()
    empties the effective set, which comes last.
    """
    CAP_SETPCAP = 8
    uid_detail: dict[str, Any] = {"from": os.geteuid()}
    cap_detail: dict[str, Any] = {}
    target, target_gid = info["unprivileged_uid"], info["unprivileged_gid"]
    dropping = os.geteuid() == 0 and target not in (None, 0)
    unreachable = _unreachable_writable(spec)
    if dropping and unreachable:
        dropping = False  # the session's scratch would be out of reach after the drop
        uid_detail["unreachable"] = unreachable
    if dropping:
        uid_detail["chowned"] = _chown_writable(spec, target, target_gid)
    may_setpcap = _has_cap(CAP_SETPCAP)
    if may_setpcap:
        for cap in range(last_cap + 1):
            _prctl(PR_CAPBSET_DROP, cap)
        _prctl(PR_SET_SECUREBITS, _SECUREBITS)
        cap_detail["securebits"] = hex(_prctl(PR_GET_SECUREBITS))
    else:
        cap_detail["bounding"] = "unchanged (no CAP_SETPCAP); no_new_privs stops exec using it"
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if dropping:
        os.setgroups([])
        os.setresgid(target_gid, target_gid, target_gid)
        os.setresuid(target, target, target)
    _check(_libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), (_CapData * 2)()), "capset")
    uid_detail["to"], uid_detail["gid"] = os.geteuid(), os.getegid()
    sets = _cap_sets()
    cap_detail.update(sets)
    leftover = {k: v for k, v in sets.items()
                if int(v, 16) and not (k == "CapBnd" and not may_setpcap)}
    if leftover:
        raise OSError(errno.EPERM, f"capabilities left after dropping: {leftover}")
    return uid_detail, cap_detail


# --- layer: seccomp ---------------------------------------------------------

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000

#: Syscall numbers per architecture (a name absent from an arch does not exist there).
#: tests/test_confine.py checks every number against libseccomp's own tables.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "socket": 41, "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "kill": 62,
        "ioctl": 16, "ptrace": 101, "syslog": 103, "setuid": 105, "setgid": 106,
        "setreuid": 113, "setregid": 114, "setgroups": 116, "setresuid": 117, "setresgid": 119,
        "setfsuid": 122, "setfsgid": 123, "rt_sigqueueinfo": 129, "uselib": 134,
        "personality": 135, "vhangup": 153, "pivot_root": 155, "adjtimex": 159, "chroot": 161,
        "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
        "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175,
        "delete_module": 176, "quotactl": 179, "tkill": 200, "lookup_dcookie": 212,
        "clock_settime": 227, "tgkill": 234, "kexec_load": 246, "add_key": 248,
        "request_key": 249, "keyctl": 250, "unshare": 272, "rt_tgsigqueueinfo": 297,
        "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
        "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320,
        "bpf": 321, "execveat": 322, "userfaultfd": 323,
        "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "utime": 132,
        "utimes": 235, "fchownat": 260, "fchmodat": 268, "futimesat": 261, "utimensat": 280,
        "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
        "lremovexattr": 198, "fremovexattr": 199,
    },
    "aarch64": {
        "socket": 198, "clone": 220, "execve": 221, "kill": 129, "ioctl": 29, "ptrace": 117,
        "syslog": 116, "setuid": 146, "setgid": 144, "setreuid": 145, "setregid": 143,
        "setgroups": 159, "setresuid": 147, "setresgid": 149, "setfsuid": 151, "setfsgid": 152,
        "rt_sigqueueinfo": 138, "personality": 92, "vhangup": 58, "pivot_root": 41,
        "adjtimex": 171, "chroot": 51, "acct": 89, "settimeofday": 170, "mount": 40,
        "umount2": 39, "swapon": 224, "swapoff": 225, "reboot": 142, "init_module": 105,
        "delete_module": 106, "quotactl": 60, "tkill": 130, "lookup_dcookie": 18,
        "clock_settime": 112, "tgkill": 131, "kexec_load": 104, "add_key": 217,
        "request_key": 218, "keyctl": 219, "unshare": 97, "rt_tgsigqueueinfo": 240,
        "perf_event_open": 241, "fanotify_init": 262, "name_to_handle_at": 264,
        "open_by_handle_at": 265, "clock_adjtime": 266, "setns": 268, "process_vm_readv": 270,
        "process_vm_writev": 271, "kcmp": 272, "finit_module": 273, "kexec_file_load": 294,
        "bpf": 280, "execveat": 281, "userfaultfd": 282,
        "fchmod": 52, "fchmodat": 53, "fchownat": 54, "fchown": 55, "utimensat": 88,
        "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15,
        "fremovexattr": 16,
    },
}
#: Syscalls added after the tables were unified: the same number on every 64-bit arch.
_UNIFIED = {
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440,
    "mount_setattr": 442, "quotactl_fd": 443, "fchmodat2": 452, "setxattrat": 463,
    "removexattrat": 466, "open_tree_attr": 467, "file_setattr": 469,
}
#: The highest syscall number this filter was reviewed against (file_setattr, Linux 6.17).
#: Anything above is newer than the review: ENOSYS, which libc treats as "kernel too old"
#: and falls back from, so new kernel interfaces are not open to sessions by default.
_HIGHEST_REVIEWED = 469
for _table in _SYSCALLS.values():
    _table.update(_UNIFIED)

#: Always EPERM: kernel attack surface and escape hatches a session never needs.
_DENIED_ALWAYS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "process_madvise", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount",
    "fsconfig", "fspick", "mount_setattr", "bpf", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "add_key", "request_key", "keyctl",
    "unshare", "setns", "perf_event_open", "userfaultfd", "reboot", "swapon", "swapoff",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "acct", "quotactl",
    "quotactl_fd", "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm", "syslog",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid",
    "setfsgid", "setgroups", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "uselib", "vhangup", "lookup_dcookie", "fanotify_init", "open_tree_attr",
)
_DENIED_WITHOUT_SUBPROCESSES = ("execve", "execveat", "fork", "vfork", "tkill",
                                "pidfd_send_signal")
#: Metadata changes Landlock does not control: as uid 0 the process owns every root file.
_DENIED_AS_ROOT = ("chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown",
                   "fchownat", "utime", "utimes", "futimesat", "utimensat", "setxattr",
                   "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
                   "setxattrat", "removexattrat", "file_setattr")
#: Signals may only target this process (arg 0 is the target pid/tgid).
_SIGNAL_OWN_PID = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")

CLONE_THREAD = 0x00010000
#: Namespace flags of clone(): never (a new user namespace is a large attack surface).
#: CLONE_NEWTIME (0x80) is absent on purpose: clone() reads its low byte as the exit signal,
#: so that flag exists only for clone3() (ENOSYS here) and unshare() (EPERM here).
_CLONE_NS_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                   | 0x40000000)
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
#: Inode flag ioctls (chattr): the owner may use them on a file opened read-only.
FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR = 0x40086602, 0x401C5820
PERSONALITY_QUERY = 0xFFFFFFFF

SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_OFF_NR, _OFF_ARCH, _OFF_ARG0, _OFF_ARG1 = 0, 4, 16, 24  # struct seccomp_data, little endian


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _assemble(program: list[tuple]) -> list[tuple[int, int, int, int]]:
    """Resolve labels of a tiny BPF assembly into (code, jt, jf, k) instructions.

    Items: ("label", name), ("ld", offset), ("ret", k), and (op, k, true, false) for
    op in jeq/jge/jset where true/false are label names or None (= next instruction).
    """
    labels, index = {}, 0
    for item in program:
        if item[0] == "label":
            labels[item[1]] = index
        else:
            index += 1
    ops = {"jeq": _BPF_JEQ_K, "jge": _BPF_JGE_K, "jset": _BPF_JSET_K}
    out, index = [], 0
    for item in program:
        kind = item[0]
        if kind == "label":
            continue
        if kind == "ld":
            out.append((_BPF_LD_W_ABS, 0, 0, item[1]))
        elif kind == "ret":
            out.append((_BPF_RET_K, 0, 0, item[1]))
        else:
            _, k, true, false = item
            jumps = [0 if target is None else labels[target] - index - 1 for target in (true, false)]
            if not all(0 <= j <= 255 for j in jumps):
                raise ValueError(f"BPF jump out of range at {index}: {jumps}")
            out.append((ops[kind], jumps[0], jumps[1], k))
        index += 1
    return out


def _seccomp_program(spec: ConfineSpec, arch: str, pid: int, uid0: bool) -> tuple[list, dict]:
    """The filter for this spec, and a summary of what it denies (for the report)."""
    table = _SYSCALLS[arch]
    denied = list(_DENIED_ALWAYS)
    if not spec.subprocesses:
        denied += [name for name in _DENIED_WITHOUT_SUBPROCESSES
                   if not (spec.fork and name in ("fork", "vfork"))]
    if not spec.network:
        denied.append("socket")
    if uid0:
        denied += _DENIED_AS_ROOT
    denied_nrs = sorted({table[name] for name in denied if name in table})
    p: list[tuple] = [("ld", _OFF_ARCH), ("jeq", AUDIT_ARCH[arch], None, "kill"), ("ld", _OFF_NR)]
    if arch == "x86_64":
        p.append(("jge", X32_SYSCALL_BIT, "kill", None))  # x32 ABI calls on the x86_64 arch
    p.append(("jge", _HIGHEST_REVIEWED + 1, "enosys", None))
    p += [("jeq", nr, "eperm", None) for nr in denied_nrs]
    p += [("jeq", table["clone3"], "enosys", None), ("jeq", table["clone"], "clone", None),
          ("jeq", table["personality"], "personality", None),
          ("jeq", table["ioctl"], "ioctl", None)]
    fence = not spec.subprocesses and not spec.fork
    if fence:
        p += [("jeq", table[name], "own_pid", None) for name in _SIGNAL_OWN_PID]
    p += [("ret", SECCOMP_RET_ALLOW)]
    # clone: never new namespaces; without subprocesses or fork only threads (CLONE_THREAD set)
    p += [("label", "clone"), ("ld", _OFF_ARG0), ("jset", _CLONE_NS_FLAGS, "eperm", None)]
    if not spec.subprocesses and not spec.fork:
        p += [("jset", CLONE_THREAD, "allow", "eperm")]
    p += [("ret", SECCOMP_RET_ALLOW)]
    # personality: only the query and the default persona (no ASLR switch-off, no READ_IMPLIES_EXEC)
    p += [("label", "personality"), ("ld", _OFF_ARG0), ("jeq", 0, "allow", None),
          ("jeq", PERSONALITY_QUERY, "allow", "eperm")]
    # ioctl: no faking input into a terminal the process inherited; as root no chattr
    p += [("label", "ioctl"), ("ld", _OFF_ARG1), ("jeq", TIOCSTI, "eperm", None)]
    if uid0:
        p += [("jeq", FS_IOC_SETFLAGS, "eperm", None), ("jeq", FS_IOC_FSSETXATTR, "eperm", None)]
    p += [("jeq", TIOCLINUX, "eperm", "allow")]
    if fence:
        p += [("label", "own_pid"), ("ld", _OFF_ARG0), ("jeq", pid, "allow", "eperm")]
    p += [("label", "eperm"), ("ret", SECCOMP_RET_ERRNO | errno.EPERM),
          ("label", "enosys"), ("ret", SECCOMP_RET_ERRNO | errno.ENOSYS),
          ("label", "kill"), ("ret", SECCOMP_RET_KILL_PROCESS),
          ("label", "allow"), ("ret", SECCOMP_RET_ALLOW)]
    summary = {
        "arch": arch, "denied": sorted(n for n in set(denied) if n in table),
        "enosys": ["clone3", f"every number above {_HIGHEST_REVIEWED}"],
        "ioctl": ["TIOCSTI", "TIOCLINUX"] + (["FS_IOC_SETFLAGS", "FS_IOC_FSSETXATTR"] if uid0
                                             else []),
        "clone": ("no namespaces" if spec.subprocesses else
                  "threads and copies of the process, no namespaces, no exec" if spec.fork
                  else "threads only"),
        "signals": f"own pid {pid} only" if fence else "scoped by Landlock",
        "foreign_arch": "kill",
    }
    return _assemble(p), summary


def _install_seccomp(instructions: list[tuple[int, int, int, int]]) -> None:
    filters = (_SockFilter * len(instructions))(*instructions)
    prog = _SockFprog(len(instructions), filters)
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))


# --- apply ------------------------------------------------------------------

def _set_no_new_privs() -> dict:
    """exec can no longer grant privileges (setuid bits, file capabilities)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if _prctl(PR_GET_NO_NEW_PRIVS) != 1:
        raise OSError(errno.EPERM, "no_new_privs did not stick")
    return {}


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _unreachable_writable(spec: ConfineSpec) -> list[str]:
    """Writable paths a uid that owns nothing could not reach (a 0700 ancestor)."""
    return [p for p in spec.writable if not _others_can_search(os.path.dirname(os.path.abspath(p)))]


def _precheck(spec: ConfineSpec, info: dict) -> None:
    """Raise before touching anything when the spec or a required layer cannot work here."""
    for path in spec.writable:
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, "writable path is not a directory", path)
    unreachable = _unreachable_writable(spec) if info["root"] else []
    reasons = {
        "landlock": None if info["landlock_abi"] else "kernel has no Landlock",
        "seccomp": (None if info["seccomp"] and info["seccomp_arch"] else
                    "kernel has no seccomp filters" if not info["seccomp"] else
                    f"no syscall table for {platform.machine()}"),
        "netns": None if info["netns"] else "no CAP_SYS_ADMIN and no user namespaces",
        "ipcns": None if info["netns"] else "no CAP_SYS_ADMIN and no user namespaces",
        "uid": (None if not info["root"] else
                "running as root and no unprivileged uid can read the interpreter"
                if info["unprivileged_uid"] is None else
                f"writable paths unreachable by uid {info['unprivileged_uid']}: {unreachable}"
                if unreachable else None),
    }
    for layer in sorted(spec.required):
        if reasons.get(layer):
            raise ConfinementUnavailable(f"{layer}: {reasons[layer]}")


class _Run:
    """One apply() run: the report being built and the degradation rule."""

    def __init__(self, spec: ConfineSpec):
        self.spec = spec
        self.report: dict[str, Any] = {}
        self.degraded: list[dict[str, str]] = []

    def skip(self, layer: str, reason: str) -> None:
        """A layer that cannot apply: fatal if required, else a named degradation."""
        if layer in self.spec.required:
            raise ConfinementUnavailable(f"{layer}: {reason}")
        self.report[layer] = {"applied": False, "detail": reason}
        self.degraded.append({"layer": layer, "reason": reason})

    def run(self, layer: str, step: Callable[[], dict]) -> bool:
        """Run one layer; an OSError is the kernel refusing it."""
        try:
            detail = step()
        except OSError as e:
            self.skip(layer, f"kernel refused: {e}")
            return False
        self.report[layer] = {"applied": True, "detail": detail}
        return True

    def gap(self, layer: str, reason: str) -> None:
        """A layer that applied but leaves something open on this kernel."""
        self.degraded.append({"layer": layer, "reason": reason})


def apply(spec: ConfineSpec, *, keep_fds: Sequence[int] = ()) -> dict:
    """Confine the calling process for good; returns the JSON-serialisable report.

    Report: one entry per layer of :data:`LAYERS` (``{"applied": bool,
    "detail": ...}``), ``degraded`` (list of ``{"layer", "reason"}``),
    ``probe`` (what :func:`probe` saw) and ``elapsed_ms``.
    Raises RuntimeError if the process has more than one thread (Landlock
    and seccomp would confine the calling thread only), and
    :class:`ConfinementUnavailable` for a required layer that cannot apply.
    """
    started = time.perf_counter()
    threads = _threads()
    if threads != 1:
        raise RuntimeError(f"confine.apply needs a single-threaded process, this one has {threads} "
                           "(Landlock and seccomp would only confine the calling thread)")
    info = probe()
    _precheck(spec, info)
    run = _Run(spec)
    last_cap = _cap_last_cap()  # read now: /proc/sys is out of reach after Landlock
    read_paths = default_read_paths(network=spec.network, subprocesses=spec.subprocesses)
    read_paths += [os.path.abspath(p) for p in spec.readable if os.path.abspath(p) not in read_paths]
    pid = os.getpid()

    run.run("fds", lambda: _close_fds(keep_fds))

    if spec.network:
        run.report["netns"] = {"applied": False, "detail": "network allowed by the spec"}
    elif info["netns"]:
        run.run("netns", _enter_netns)
    else:
        run.skip("netns", "cannot create a network namespace (no CAP_SYS_ADMIN, no user "
                          "namespaces); only seccomp's socket() ban and Landlock's TCP rules "
                          "(ABI 4+) stop the network")
    if info["netns"]:
        run.run("ipcns", _enter_ipcns)
    else:
        run.skip("ipcns", "cannot create an IPC namespace: the host's SysV IPC objects and "
                          "POSIX message queues stay reachable")

    run.run("no_new_privs", _set_no_new_privs)

    if info["landlock_abi"]:
        run.run("landlock", lambda: _landlock_detail(run, spec, info, read_paths))
    else:
        run.skip("landlock", "kernel has no Landlock: the filesystem is limited only by file "
                             "modes" + (" and uid 0 owns every root file" if info["root"] else ""))

    try:
        uid_detail, cap_detail = _drop_privileges(spec, info, last_cap)
    except OSError as e:
        run.skip("capabilities", f"kernel refused: {e}")
        run.skip("uid", "not attempted: the capability step failed")
    else:
        run.report["capabilities"] = {"applied": True, "detail": cap_detail}
        if uid_detail["to"] != 0:
            run.report["uid"] = {"applied": True, "detail": uid_detail}
        else:
            why = ("a writable path is not reachable by uid "
                   f"{info['unprivileged_uid']}: {uid_detail['unreachable']}"
                   if uid_detail.get("unreachable") else
                   "no unprivileged uid can read the interpreter")
            run.skip("uid", f"stayed uid 0 ({why}) with every capability dropped; uid 0 still "
                            "owns root's files, so Landlock and seccomp's metadata rules are "
                            "what keep them safe")
            run.report["uid"]["detail"] = {"reason": run.report["uid"]["detail"], **uid_detail}

    arch = info["seccomp_arch"]
    if info["seccomp"] and arch:
        uid0 = os.geteuid() == 0
        program, summary = _seccomp_program(spec, arch, pid, uid0)
        summary["instructions"] = len(program)
        run.run("seccomp", lambda: (_install_seccomp(program), summary)[1])
    else:
        run.skip("seccomp", "no seccomp filter: exec, fork, socket and the kernel interfaces "
                            "listed in the doc stay open")

    report = dict(run.report)
    report["degraded"] = run.degraded
    report["probe"] = info
    report["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 3)
    return report


def _landlock_detail(run: _Run, spec: ConfineSpec, info: dict, read_paths: list[str]) -> dict:
    detail, gaps = _landlock(spec, info["landlock_abi"], read_paths)
    for reason in gaps:
        run.gap("landlock", reason)
    return detail
