"""Per-session resource limits for sessions that run in a worker process.

Three mechanisms, each where it is strongest:

* **Control groups** (:class:`SessionCgroup`) for what must cover the whole
  session, the worker *and* everything it starts: memory (the kernel's OOM
  killer acts inside the session's group, never on the host or a neighbour),
  the number of tasks (a fork or thread bomb gets ``EAGAIN``), and
  ``kill_all`` (processes that called ``setsid()`` or double-forked are
  still members, so they die with the session).  cgroup v2 and v1 are both
  supported, detected at run time from ``/proc/self/cgroup`` and
  ``/proc/self/mountinfo``; nothing here names a machine's paths.
* **rlimits** (:func:`apply_rlimits`, called in the worker child) for what
  is per process: CPU seconds, open files, file size, and memory only when
  no memory cgroup could be made (a weaker, per-process guard).
* **Parsed here, enforced elsewhere**: ``cell_seconds`` (the supervisor
  kills the worker) and ``output_bytes`` (the I/O layer cuts output).

:func:`explain_exit` turns the worker's death into a short message for the
user, from a fixed vocabulary of kinds (:data:`EXIT_KINDS`).

Invariants:

* every session cgroup lives at ``<own cgroup>/pyrepl3-<supervisor pid>/s-<name>``
  in each hierarchy used; the supervisor's own cgroup is never modified
  except, on v2, enabling the memory and pids controllers for its children;
* a limit is never loosened: rlimit hard values are never raised above
  the current ones, and a cgroup limit that cannot be written is reported
  (``reason``), never assumed;
* a removed :class:`SessionCgroup` leaves no process and no directory;
* signals are sent through pidfds after re-checking membership, so a
  recycled pid outside the session is never hit.

It is a resource guard, not a security boundary: a cell running as root in
the worker can write itself out of any cgroup and raise its rlimits.
"""

from __future__ import annotations

import dataclasses
import errno
import fractions
import hashlib
import logging
import math
import os
import re
import resource
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EXIT_KINDS",
    "Limits",
    "SessionCgroup",
    "apply_rlimits",
    "explain_exit",
    "explain_returncode",
    "format_bytes",
    "join_cgroup",
    "probe",
]

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: Seconds between RLIMIT_CPU's soft limit (SIGXCPU) and its hard limit
#: (SIGKILL): room for a worker that handles SIGXCPU to report before dying.
CPU_GRACE_SECONDS = 2

#: Largest value any byte or count limit may take (rlimits are 64-bit signed).
_MAX_VALUE = (1 << 63) - 1

_BYTE_FIELDS = ("memory", "file_size", "output_bytes")
_SECOND_FIELDS = ("cpu_seconds", "cell_seconds")
_COUNT_FIELDS = ("processes", "open_files")


# ---------------------------------------------------------------------------
# Limits: the value object and its parser


_SIZE_RE = re.compile(
    r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([kmgtp])(?:i?b?)|(b))?\s*$", re.IGNORECASE
)
_SIZE_UNITS = {"k": KiB, "m": MiB, "g": GiB, "t": 1 << 40, "p": 1 << 50}
# Case matters for durations: "2M" is refused rather than read as minutes
# by someone who may have meant a size.
_TIME_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|min|h)?\s*$")
_COUNT_RE = re.compile(r"^\s*[0-9]+\s*$")
_TIME_UNITS = {None: 1, "ms": fractions.Fraction(1, 1000), "s": 1, "m": 60, "min": 60, "h": 3600}


def _bad(key: str, value: Any, what: str) -> ValueError:
    return ValueError(f"Limits: {key} must be {what}; got {value!r}")


def _number(key: str, value: Any, what: str) -> fractions.Fraction:
    """An int or finite float as an exact fraction; bool and others refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, value, what)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(key, value, what)
    return fractions.Fraction(value)


def _parse_bytes(key: str, value: Any) -> int:
    what = "a positive size in bytes, e.g. 536870912, '512M', '2GiB' or '1.5G' (powers of 1024)"
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise _bad(key, value, what)
        number = fractions.Fraction(m.group(1))
        unit = _SIZE_UNITS[m.group(2).lower()] if m.group(2) else 1
        amount = round(number * unit)
    else:
        amount = round(_number(key, value, what))
    if amount <= 0:
        raise _bad(key, value, what)
    if amount > _MAX_VALUE:
        raise _bad(key, value, f"at most {_MAX_VALUE} bytes")
    return amount


def _parse_seconds(key: str, value: Any) -> float:
    what = "a positive duration in seconds, e.g. 30, 2.5, '30s', '2m', '500ms' or '1h'"
    if isinstance(value, str):
        m = _TIME_RE.match(value)
        if not m:
            raise _bad(key, value, what)
        amount = fractions.Fraction(m.group(1)) * _TIME_UNITS[m.group(2)]
    else:
        amount = _number(key, value, what)
    if amount <= 0:
        raise _bad(key, value, what)
    if amount > _MAX_VALUE:
        raise _bad(key, value, f"at most {_MAX_VALUE} seconds")
    return float(amount)


def _parse_count(key: str, value: Any) -> int:
    what = "a positive whole number, e.g. 256"
    if isinstance(value, str):
        if not _COUNT_RE.match(value):
            raise _bad(key, value, what)
        amount = fractions.Fraction(int(value.strip()))
    else:
        amount = _number(key, value, what)
    if amount <= 0 or amount.denominator != 1:
        raise _bad(key, value, what)
    if amount > _MAX_VALUE:
        raise _bad(key, value, f"at most {_MAX_VALUE}")
    return int(amount)


_PARSERS = {
    **{k: _parse_bytes for k in _BYTE_FIELDS},
    **{k: _parse_seconds for k in _SECOND_FIELDS},
    **{k: _parse_count for k in _COUNT_FIELDS},
}


@dataclass(frozen=True)
class Limits:
    """What one session may use; ``None`` for a field means unlimited.

    Fields accept the same spellings as :meth:`parse` and are normalised on
    construction (bytes and counts to ``int``, durations to ``float``), so
    two ``Limits`` that mean the same thing compare equal.  Byte units are
    powers of 1024 whether written ``M``, ``MB`` or ``MiB`` (as in cgroup
    files and ``ulimit``).
    """

    memory: int | None = 2 * GiB
    cpu_seconds: float | None = None
    cell_seconds: float | None = None
    processes: int | None = 256
    open_files: int | None = 1024
    file_size: int | None = 1 * GiB
    output_bytes: int | None = 64 * MiB

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                object.__setattr__(self, field.name, _PARSERS[field.name](field.name, value))

    @classmethod
    def parse(cls, value: Any) -> Limits:
        """``None`` -> defaults; a ``Limits`` as is; a mapping -> defaults
        overridden by its keys (a ``None`` value makes that limit unlimited).

        Raises ``ValueError`` naming the key and the value for anything
        else, and listing the allowed keys for an unknown one.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"Limits: expected None, a Limits or a mapping of limits; got {type(value).__name__} {value!r}"
            )
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise ValueError(
                f"Limits: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
            )
        return cls(**value)

    @classmethod
    def unlimited(cls) -> Limits:
        """Every limit off (``None``)."""
        return cls(**{f.name: None for f in dataclasses.fields(cls)})

    def as_dict(self) -> dict[str, int | float | None]:
        """JSON-ready; ``Limits.parse(l.as_dict()) == l``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def format_bytes(n: int) -> str:
    """``536870912`` -> ``'512 MiB'``; used in messages to the user."""
    for unit, label in ((1 << 40, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            return f"{n // unit} {label}" if n % unit == 0 else f"{n / unit:.1f} {label}"
    return f"{n} bytes"


def _format_seconds(s: float) -> str:
    return f"{s:g} s"


# ---------------------------------------------------------------------------
# rlimits, applied in the worker child


def _lower_rlimit(which: int, soft: int, hard: int) -> tuple[int, int]:
    """Set ``which`` to (soft, hard) without ever raising the current hard limit."""
    _cur_soft, cur_hard = resource.getrlimit(which)
    hard = min(hard, _MAX_VALUE)
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
    soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))
    return soft, hard


def apply_rlimits(limits: Limits, *, memory_fallback: bool) -> dict[str, tuple[int, int]]:
    """Apply the per-process limits to the calling process (the worker).

    Call it in the worker's main thread, before running any cell.  Returns
    ``{"RLIMIT_CPU": (soft, hard), ...}`` for every rlimit it set.

    * ``cpu_seconds`` -> RLIMIT_CPU, soft rounded up to whole seconds, hard
      :data:`CPU_GRACE_SECONDS` later, so SIGXCPU (explained as
      ``cpu_limit``) comes before the kernel's SIGKILL.  It counts this
      process's threads, not its children (each child starts its own count).
    * ``open_files`` -> RLIMIT_NOFILE, soft = hard (a cell cannot raise it
      back); descriptors already open stay open.
    * ``file_size`` -> RLIMIT_FSIZE, with SIGXFSZ ignored so a write past it
      fails with ``OSError(EFBIG)`` instead of killing the worker.
    * ``memory`` -> RLIMIT_DATA, only with ``memory_fallback`` (no memory
      cgroup).  RLIMIT_DATA rather than RLIMIT_AS: since Linux 4.7 it counts
      private writable mappings (the heap and malloc's mmaps, so Python
      raises ``MemoryError``) but not address space merely reserved
      (malloc's per-thread arenas, PROT_NONE guard regions, mapped
      libraries), which makes RLIMIT_AS fail long before memory is used.
      It is per process: children of the worker get their own allowance.
    """
    applied: dict[str, tuple[int, int]] = {}
    if limits.cpu_seconds is not None:
        soft = max(1, math.ceil(limits.cpu_seconds))
        applied["RLIMIT_CPU"] = _lower_rlimit(resource.RLIMIT_CPU, soft, soft + CPU_GRACE_SECONDS)
    if limits.open_files is not None:
        applied["RLIMIT_NOFILE"] = _lower_rlimit(
            resource.RLIMIT_NOFILE, limits.open_files, limits.open_files
        )
    if limits.file_size is not None:
        # CPython ignores SIGXFSZ at start-up, but an embedding host (no
        # signal handlers installed) or earlier code may have put it back
        # to SIG_DFL, which kills.  Only the main thread may change a
        # disposition, so elsewhere insist it is already right.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        elif signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN:
            raise RuntimeError(
                "apply_rlimits: SIGXFSZ is not ignored and only the main thread can ignore it; "
                "call apply_rlimits from the worker's main thread"
            )
        applied["RLIMIT_FSIZE"] = _lower_rlimit(resource.RLIMIT_FSIZE, limits.file_size, limits.file_size)
    if memory_fallback and limits.memory is not None:
        applied["RLIMIT_DATA"] = _lower_rlimit(resource.RLIMIT_DATA, limits.memory, limits.memory)
    return applied


# ---------------------------------------------------------------------------
# Exit explanations

#: The kinds :func:`explain_exit` returns.
EXIT_KINDS = (
    "exited",  # the process exited by itself, with any code (0 included)
    "oom",  # killed by the kernel at the session's memory limit
    "cpu_limit",  # RLIMIT_CPU: SIGXCPU, or SIGKILL at the hard limit
    "file_size",  # SIGXFSZ: wrote past RLIMIT_FSIZE with the signal not ignored
    "cell_timeout",  # the supervisor killed it at cell_seconds
    "crashed",  # a fault signal: SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP
    "killed",  # any other signal (SIGKILL, SIGTERM, ...) from outside
)

_CRASH_SIGNALS = frozenset(
    getattr(signal, name)
    for name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGSYS", "SIGTRAP")
    if hasattr(signal, name)
)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def explain_exit(
    status: int,
    *,
    limits: Limits,
    oom_kills: int,
    cpu_limited: bool = False,
    cell_timeout: bool = False,
) -> tuple[str, str]:
    """``(kind, message)`` for a raw ``waitpid`` status of the worker.

    ``oom_kills`` is :meth:`SessionCgroup.oom_kills` (0 without a memory
    cgroup); ``cpu_limited`` says the supervisor saw the worker's CPU time
    reach ``cpu_seconds`` (a SIGKILL at the hard limit then means
    ``cpu_limit``); ``cell_timeout`` says the supervisor itself killed it at
    ``cell_seconds``.  ``kind`` is one of :data:`EXIT_KINDS`.  Only for
    a process that ended (a stopped status raises ``ValueError``).
    """
    return explain_returncode(
        os.waitstatus_to_exitcode(status),
        limits=limits,
        oom_kills=oom_kills,
        cpu_limited=cpu_limited,
        cell_timeout=cell_timeout,
    )


def explain_returncode(
    returncode: int,
    *,
    limits: Limits,
    oom_kills: int,
    cpu_limited: bool = False,
    cell_timeout: bool = False,
) -> tuple[str, str]:
    """:func:`explain_exit` for ``Popen.returncode`` (``-N`` for signal N)."""
    who = "the session's process"
    if returncode >= 0:
        message = f"{who} exited with code {returncode}"
        if oom_kills:
            message += (
                f" (the kernel had killed {oom_kills} process(es) in the session at its memory limit"
                f"{' of ' + format_bytes(limits.memory) if limits.memory else ''})"
            )
        return "exited", message
    signum = -returncode
    name = _signal_name(signum)
    if cell_timeout:
        limit = f" ({_format_seconds(limits.cell_seconds)})" if limits.cell_seconds else ""
        return "cell_timeout", f"the cell ran past its time limit{limit} and the session was killed ({name})"
    if signum == signal.SIGKILL and oom_kills:
        limit = f" ({format_bytes(limits.memory)})" if limits.memory else ""
        return "oom", f"the session reached its memory limit{limit} and the kernel killed it"
    cpu = f" ({_format_seconds(limits.cpu_seconds)})" if limits.cpu_seconds else ""
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_limited):
        return "cpu_limit", f"the session used its CPU time limit{cpu}: {name}"
    if signum == signal.SIGXFSZ:
        size = f" ({format_bytes(limits.file_size)})" if limits.file_size else ""
        return "file_size", f"the session wrote past its file size limit{size}: {name}"
    if signum in _CRASH_SIGNALS:
        return "crashed", f"{who} died of {name} ({_describe_signal(signum)})"
    return "killed", f"{who} was killed by {name} from outside"


def _describe_signal(signum: int) -> str:
    text = signal.strsignal(signum) or _signal_name(signum)
    return text[:1].lower() + text[1:]


# ---------------------------------------------------------------------------
# Discovery: where this process's cgroups are, from /proc only


@dataclass(frozen=True)
class _Hierarchy:
    """One mounted hierarchy and this process's cgroup in it."""

    version: str  # "v1" or "v2"
    controllers: frozenset[str]  # v1: the mount's controllers; v2: in own cgroup.controllers
    key: str  # the controller field of /proc/<pid>/cgroup lines ("" for v2)
    cgroup: str  # this process's cgroup path, as /proc/self/cgroup spells it
    own: str  # the directory of that cgroup


_WANTED_V1 = ("memory", "pids", "freezer")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _parse_mountinfo(text: str) -> list[tuple[str, str, str, set[str]]]:
    """``(root, mount point, fstype, super options)`` of every cgroup mount."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append((_unescape(fields[3]), _unescape(fields[4]), tail[0], set(tail[2].split(","))))
    return mounts


def _below(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` (both cgroup paths), or None if outside it.

    A path with ``..`` (a cgroup outside the reader's cgroup namespace) is
    outside every mount.
    """
    if ".." in path.split("/"):
        return None
    if root == "/":
        return path.lstrip("/")
    if path == root:
        return ""
    if path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1 :]
    return None


def _discover(cgroup_text: str, mountinfo_text: str, missing: list[str]) -> list[_Hierarchy]:
    """The hierarchies this process can place session cgroups in.

    Pure over the two /proc texts (plus reading v2's ``cgroup.controllers``)
    so the v1, v2 and hybrid layouts can all be reasoned about the same way.
    Appends a human-readable reason to ``missing`` for each dead end.
    """
    v1_paths: dict[str, tuple[str, str]] = {}  # controller -> (key, path)
    v2_path = None
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, key, path = parts
        if key == "":
            v2_path = path
        else:
            for controller in key.split(","):
                v1_paths[controller] = (key, path)
    mounts = _parse_mountinfo(mountinfo_text)
    found: list[_Hierarchy] = []

    def locate(fstype: str, want: str | None, path: str) -> str | None:
        for root, point, mtype, opts in mounts:
            if mtype != fstype or (want is not None and want not in opts):
                continue
            rel = _below(path, root)
            if rel is not None:
                return os.path.join(point, rel) if rel else point
        return None

    for controller in _WANTED_V1:
        if controller not in v1_paths:
            continue
        key, path = v1_paths[controller]
        if any(h.key == key for h in found):
            continue  # co-mounted with one already found
        own = locate("cgroup", controller, path)
        if own is None:
            missing.append(f"{controller} (v1): no mount of its hierarchy contains {path}")
            continue
        controllers = frozenset(c for c in key.split(",") if c in _WANTED_V1)
        found.append(_Hierarchy("v1", controllers, key, path, own))
    if v2_path is not None:
        own = locate("cgroup2", None, v2_path)
        if own is None:
            missing.append(f"cgroup v2: no cgroup2 mount contains {v2_path}")
        else:
            try:
                with open(os.path.join(own, "cgroup.controllers")) as f:
                    available = set(f.read().split())
            except OSError as e:
                available = set()
                missing.append(f"cgroup v2: cannot read {own}/cgroup.controllers: {e.strerror}")
            # A controller bound to a v1 hierarchy is never also on v2.
            wanted = [c for c in ("memory", "pids") if c not in v1_paths]
            for controller in wanted:
                if controller not in available:
                    missing.append(f"{controller} (v2): not in {own}/cgroup.controllers (not delegated to this cgroup)")
            controllers = frozenset(c for c in wanted if c in available)
            if controllers:
                found.append(_Hierarchy("v2", controllers, "", v2_path, own))
    return found


def _layout(missing: list[str]) -> list[_Hierarchy]:
    try:
        with open("/proc/self/cgroup") as f:
            cgroup_text = f.read()
        with open("/proc/self/mountinfo") as f:
            mountinfo_text = f.read()
    except OSError as e:
        missing.append(f"cannot read /proc/self: {e.strerror}")
        return []
    return _discover(cgroup_text, mountinfo_text, missing)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    # Unbuffered: the kernel must see one write() per value, and its error.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


_BUSY_HINT = (
    "a non-root cgroup v2 that holds processes cannot hand memory or pids to child cgroups "
    "(the no-internal-processes rule); run pyrepl3 in a delegated cgroup whose processes "
    "live in a leaf, e.g. move them to <cgroup>/init first"
)


def _v2_is_root(directory: str) -> bool:
    """The real root of a v2 hierarchy (exempt from no-internal-processes) has no cgroup.type.

    A container's namespaced root shows as "/" in /proc/self/cgroup but is not one.
    """
    return not os.path.exists(os.path.join(directory, "cgroup.type"))


def _v2_enable(directory: str, controllers: frozenset[str], missing: list[str]) -> frozenset[str]:
    """Enable ``controllers`` for ``directory``'s children; returns those now on.

    Each failure is explained in ``missing``: EBUSY is cgroup v2's "no
    internal processes" rule (a non-root cgroup that holds processes
    cannot hand domain controllers to children).
    """
    path = os.path.join(directory, "cgroup.subtree_control")
    enabled = set(_read(path).split())
    for controller in sorted(controllers - enabled):
        try:
            _write(path, f"+{controller}")
            enabled.add(controller)
        except OSError as e:
            why = _BUSY_HINT if e.errno == errno.EBUSY else e.strerror
            missing.append(f"{controller} (v2): cannot enable it for child cgroups of {directory}: {why}")
    return frozenset(enabled & controllers)


def _v2_usable(h: _Hierarchy, missing: list[str]) -> frozenset[str]:
    """The v2 controllers child cgroups can get, without changing anything."""
    enabled = set(_read(os.path.join(h.own, "cgroup.subtree_control")).split())
    if h.controllers <= enabled or _v2_is_root(h.own):
        return h.controllers
    if _read(os.path.join(h.own, "cgroup.procs")).split():
        for controller in sorted(h.controllers - enabled):
            missing.append(f"{controller} (v2): cannot be enabled for child cgroups of {h.own}: {_BUSY_HINT}")
        return frozenset(h.controllers & enabled)
    return h.controllers


def probe() -> dict[str, Any]:
    """Which controllers session cgroups can use on this machine, and why not.

    ``{"version": "v1" | "v2" | None, "memory": dir | None, "pids": dir | None,
    "freezer": dir | None, "kill": bool, "versions": {controller: version},
    "missing": [reasons]}`` where each directory is this process's own
    cgroup in that hierarchy (sessions go below it), and ``version`` is the
    one of the hierarchy holding memory (else pids).  v1 hierarchies are tested by creating and removing a
    directory; v2 by reading which controllers can be enabled below.
    """
    missing: list[str] = []
    versions: dict[str, str] = {}
    result: dict[str, Any] = {"version": None, "memory": None, "pids": None, "freezer": None,
                              "kill": False, "versions": versions}
    for h in _layout(missing):
        trial = os.path.join(h.own, f"pyrepl3-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            os.mkdir(trial)
            os.rmdir(trial)
        except OSError as e:
            for controller in sorted(h.controllers):
                missing.append(f"{controller} ({h.version}): cannot create cgroups in {h.own}: {e.strerror}")
            continue
        if h.version == "v1":
            for controller in h.controllers:
                result[controller] = h.own
                versions[controller] = "v1"
        else:
            try:
                usable = _v2_usable(h, missing)
            except OSError as e:
                missing.append(f"cgroup v2 at {h.own}: {e.strerror}")
                continue
            for controller in usable:
                result[controller] = h.own
                versions[controller] = "v2"
            if usable:
                # cgroup.kill (5.14) and cgroup.freeze (5.2) exist in every
                # non-root cgroup: ours tells for the session's, unless ours
                # is the real root, which has neither.
                if _v2_is_root(h.own):
                    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
                    result["kill"], frozen_ok = release >= (5, 14), release >= (5, 2)
                else:
                    result["kill"] = os.path.exists(os.path.join(h.own, "cgroup.kill"))
                    frozen_ok = os.path.exists(os.path.join(h.own, "cgroup.freeze"))
                if frozen_ok:
                    result["freezer"] = result["freezer"] or h.own
    result["version"] = versions.get("memory") or versions.get("pids")
    for controller in ("memory", "pids"):
        if result[controller] is None and not any(m.startswith(controller) for m in missing):
            missing.append(f"{controller}: no writable cgroup hierarchy has this controller")
    result["missing"] = missing
    return result


def join_cgroup(procs_files: list[str]) -> None:
    """Move the calling process into a session cgroup (:attr:`SessionCgroup.procs_files`).

    For a worker to call first thing, before it imports or allocates much:
    memory a process touched before its move stays charged to the cgroup it
    came from, so joining from inside counts the worker's start-up, which a
    supervisor's :meth:`SessionCgroup.add` after ``fork`` can miss.  Writing
    ``0`` to ``cgroup.procs`` means "the writer" in v1 and v2.
    """
    for path in procs_files:
        _write(path, "0")


# ---------------------------------------------------------------------------
# SessionCgroup

_parent_lock = threading.Lock()  # serialises mkdir/rmdir of the per-process parents
_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]")


def _leaf_name(name: str) -> str:
    """``s-<name>``: safe as one path component, never an interface file's name.

    Characters outside ``[A-Za-z0-9_.-]`` become ``_``; when that (or
    truncation) changed the name, a hash of the original keeps distinct
    names distinct.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"SessionCgroup: name must be a non-empty string; got {name!r}")
    clean = _NAME_OK.sub("_", name)[:48]
    if clean != name:
        clean += "-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return "s-" + clean


def _parent_name() -> str:
    return f"pyrepl3-{os.getpid()}"


def _rmdir_quiet(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise


def _reap_stale(own: str) -> None:
    """Remove empty ``pyrepl3-<pid>`` trees left by supervisors that died.

    Only ``rmdir``: a tree that still holds processes stays (and so does
    one whose pid was recycled by a live process).
    """
    try:
        entries = os.listdir(own)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith("pyrepl3-") or not entry[8:].isdigit():
            continue
        pid = int(entry[8:])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        parent = os.path.join(own, entry)
        for dirpath, _dirs, _files in sorted(os.walk(parent), key=lambda t: -len(t[0])):
            _rmdir_quiet(dirpath)


class SessionCgroup:
    """One session's cgroup(s): a leaf in every usable hierarchy.

    v2: one directory with ``memory.max``, ``memory.swap.max = 0`` and
    ``pids.max``.  v1: a directory in the memory hierarchy
    (``memory.limit_in_bytes``, and ``memory.memsw.limit_in_bytes`` when the
    kernel accounts swap, so swap cannot dodge the limit), one in the pids
    hierarchy (``pids.max``) and one in the freezer hierarchy (for
    ``kill_all``).  ``controllers`` says which of ``memory``, ``pids``,
    ``freezer`` and ``kill`` it has; ``reason`` says why anything is
    missing ("" when complete).
    """

    #: Why the last :meth:`create` returned None (for logs; racy across threads).
    last_reason: str = ""

    def __init__(self, name: str, limits: Limits, version: str,
                 leaves: list[tuple[_Hierarchy, str, frozenset[str]]], reason: str) -> None:
        self.name = name
        self.limits = limits
        self.version = version
        self._leaves = leaves  # (hierarchy, leaf directory, controllers in use there)
        self.reason = reason
        controllers: set[str] = set()
        for h, leaf, used in leaves:
            controllers |= used
            if h.version == "v2":
                if os.path.exists(os.path.join(leaf, "cgroup.kill")):
                    controllers.add("kill")
                if os.path.exists(os.path.join(leaf, "cgroup.freeze")):
                    controllers.add("freezer")
        self.controllers = frozenset(controllers)
        # (controller field, cgroup path) as /proc/<pid>/cgroup spells our leaves.
        self._member_paths = [
            (h.key, f"{h.cgroup.rstrip('/')}/{_parent_name()}/{os.path.basename(leaf)}")
            for h, leaf, _used in leaves
        ]
        self._removed = False

    def __repr__(self) -> str:
        return f"<SessionCgroup {self.name!r} {self.version} {sorted(self.controllers)} {self.paths}>"

    @property
    def paths(self) -> list[str]:
        """The leaf directories, one per hierarchy."""
        return [leaf for _h, leaf, _used in self._leaves]

    @property
    def procs_files(self) -> list[str]:
        """``cgroup.procs`` of every leaf, for :func:`join_cgroup` in the worker."""
        return [os.path.join(leaf, "cgroup.procs") for leaf in self.paths]

    @property
    def has_memory(self) -> bool:
        """False: the caller should use ``apply_rlimits(memory_fallback=True)``."""
        return "memory" in self.controllers

    @classmethod
    def create(cls, name: str, limits: Limits) -> SessionCgroup | None:
        """Make the session's cgroups and write its limits.

        Returns None (reason in :attr:`last_reason` and the log) when no
        hierarchy could be used.  Raises ``FileExistsError`` when this
        process already has a session cgroup of that name.
        """
        leaf_name = _leaf_name(name)
        missing: list[str] = []
        leaves: list[tuple[_Hierarchy, str, frozenset[str]]] = []
        try:
            for h in _layout(missing):
                try:
                    made = cls._make_leaf(h, leaf_name, limits, missing)
                except FileExistsError:
                    raise
                except OSError as e:
                    missing.append(f"{'/'.join(sorted(h.controllers)) or h.version} in {h.own}: {e.strerror or e}")
                    continue
                if made is not None:
                    leaves.append(made)
        except BaseException:
            cls._drop(leaves)
            raise
        if not leaves:
            cls.last_reason = "; ".join(missing) or "no cgroup hierarchy found"
            log.warning("pyrepl3: no session cgroup for %r: %s", name, cls.last_reason)
            return None
        version = next((h.version for h, _l, used in leaves if "memory" in used),
                       leaves[0][0].version)
        used_all = set().union(*(used for _h, _l, used in leaves))
        for controller in ("memory", "pids"):
            if controller not in used_all and not any(m.startswith(controller) for m in missing):
                missing.append(f"{controller}: no writable cgroup hierarchy has this controller")
        self = cls(name, limits, version, leaves, "; ".join(missing))
        if self.reason:
            log.info("pyrepl3: session cgroup %r is partial: %s", name, self.reason)
        return self

    @staticmethod
    def _make_leaf(h: _Hierarchy, leaf_name: str, limits: Limits,
                   missing: list[str]) -> tuple[_Hierarchy, str, frozenset[str]] | None:
        """The session's leaf in one hierarchy, with its limits written.

        Returns ``(hierarchy, leaf, controllers that hold there)``, or None
        when v2 cannot give children any controller.  A limit that cannot be
        written drops its controller (reason in ``missing``); a leaf left
        with no controller is removed again.  The parent is created and
        removed only under ``_parent_lock``, so a concurrent ``remove`` of
        the last other session cannot delete it between our two mkdirs.
        """
        parent = os.path.join(h.own, _parent_name())
        leaf = os.path.join(parent, leaf_name)
        with _parent_lock:
            if not os.path.isdir(parent):
                _reap_stale(h.own)
            usable = h.controllers
            if h.version == "v2":
                usable = _v2_enable(h.own, usable, missing)
                if not usable:
                    return None
            os.makedirs(parent, exist_ok=True)
            if h.version == "v2":
                usable = _v2_enable(parent, usable, missing)
                if not usable:
                    _rmdir_quiet(parent)
                    return None
            os.mkdir(leaf)
        try:
            used = set(usable)
            if "memory" in usable:
                try:
                    SessionCgroup._limit_memory(h, leaf, limits.memory, missing)
                except OSError as e:
                    used.discard("memory")
                    missing.append(f"memory: cannot set the limit in {leaf}: {e.strerror}")
            if "pids" in usable:
                try:
                    _write(os.path.join(leaf, "pids.max"), str(limits.processes) if limits.processes else "max")
                except OSError as e:
                    used.discard("pids")
                    missing.append(f"pids: cannot set the limit in {leaf}: {e.strerror}")
            if not used:
                raise OSError(errno.EPERM, "no controller could be configured")
        except BaseException:
            _rmdir_quiet(leaf)
            with _parent_lock:
                _rmdir_quiet(parent)
            raise
        return h, leaf, frozenset(used)

    @staticmethod
    def _limit_memory(h: _Hierarchy, leaf: str, memory: int | None, missing: list[str]) -> None:
        if h.version == "v2":
            _write(os.path.join(leaf, "memory.max"), str(memory) if memory else "max")
            swap = os.path.join(leaf, "memory.swap.max")
            if os.path.exists(swap):
                _write(swap, "0" if memory else "max")
            elif memory:
                missing.append("memory: no memory.swap.max (swap accounting off): swap is not limited")
            return
        # v1: memsw must stay >= the memory limit, so on a fresh group
        # (both unlimited) write memory first, then memsw.
        value = str(memory) if memory else "-1"
        _write(os.path.join(leaf, "memory.limit_in_bytes"), value)
        memsw = os.path.join(leaf, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
            _write(memsw, value)
        elif memory:
            missing.append("memory: no memory.memsw.limit_in_bytes (swap accounting off): swap is not limited")

    @staticmethod
    def _drop(leaves: list[tuple[_Hierarchy, str, frozenset[str]]]) -> None:
        for _h, leaf, _used in leaves:
            _rmdir_quiet(leaf)
            with _parent_lock:
                _rmdir_quiet(os.path.dirname(leaf))

    # -- membership ---------------------------------------------------------

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into every leaf.

        Memory it has already touched stays charged where it was (v2 never
        moves charges; v1's charge moving is deprecated): add the worker
        before it allocates, or let it join itself via :attr:`procs_files`.
        Raises ProcessLookupError if ``pid`` is gone.
        """
        for path in self.procs_files:
            _write(path, str(pid))

    def pids(self) -> list[int]:
        """Every process in the session (every leaf and any cgroup a cell made below)."""
        found: set[int] = set()
        for leaf in self.paths:
            for dirpath, _dirs, _files in os.walk(leaf):
                try:
                    found.update(int(p) for p in _read(os.path.join(dirpath, "cgroup.procs")).split())
                except FileNotFoundError:
                    pass
        return sorted(found)

    def _member(self, pid: int) -> bool:
        """Is ``pid`` in one of our leaves (or below) right now, per /proc/<pid>/cgroup?"""
        try:
            lines = _read(f"/proc/{pid}/cgroup").splitlines()
        except OSError:
            return False
        for line in lines:
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            for key, path in self._member_paths:
                if parts[1] == key and (parts[2] == path or parts[2].startswith(path + "/")):
                    return True
        return False

    def _kill(self, pid: int) -> None:
        """SIGKILL ``pid`` if, through a pidfd, it is still ours (no recycled pid is hit)."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except (AttributeError, OSError):
            # No pidfds (kernel < 5.3): the membership check narrows the race.
            if self._member(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        try:
            if self._member(pid):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)

    # -- freezing and killing -----------------------------------------------

    def _freeze(self, frozen: bool, deadline: float) -> bool:
        """Freeze (or thaw) every leaf that can; True if all that can are in that state."""
        if "freezer" not in self.controllers:
            return False
        ok = False
        for h, leaf, _used in self._leaves:
            if h.version == "v1" and "freezer" in h.controllers:
                state = os.path.join(leaf, "freezer.state")
                want = "FROZEN" if frozen else "THAWED"
                _write(state, want)
                while _read(state).strip() != want:
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.002)
                ok = True
            elif h.version == "v2" and os.path.exists(os.path.join(leaf, "cgroup.freeze")):
                _write(os.path.join(leaf, "cgroup.freeze"), "1" if frozen else "0")
                events = os.path.join(leaf, "cgroup.events")
                want = f"frozen {int(frozen)}"
                while want not in _read(events).splitlines():
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.002)
                ok = True
        return ok

    def kill_all(self, timeout: float = 2.0) -> bool:
        """SIGKILL every process in the session; True once none is left.

        setsid() and double forks do not leave a cgroup, so they are
        covered.  v2 with ``cgroup.kill``: one write kills atomically.
        Otherwise: freeze (so nothing forks between listing and killing),
        kill everything listed, thaw (frozen tasks die only when thawed),
        and repeat until empty; without a freezer the repetition alone
        wins, since every new child is born inside the group.
        """
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            if not self.pids():
                return True
            if time.monotonic() > deadline:
                return False
            if "kill" in self.controllers:
                for _h, leaf, _used in self._leaves:
                    kill = os.path.join(leaf, "cgroup.kill")
                    if os.path.exists(kill):
                        _write(kill, "1")
            else:
                try:
                    self._freeze(True, deadline)
                    for pid in self.pids():
                        self._kill(pid)
                finally:
                    # Thaw even after a partial freeze: frozen tasks cannot die.
                    self._freeze(False, time.monotonic() + 1.0)
            # Killed tasks leave the group once they finish exiting.
            end = min(deadline, time.monotonic() + 0.2)
            while self.pids() and time.monotonic() < end:
                time.sleep(delay)
                delay = min(delay * 2, 0.02)

    # -- accounting ---------------------------------------------------------

    def _memory_leaf(self) -> tuple[_Hierarchy, str] | None:
        for h, leaf, used in self._leaves:
            if "memory" in used:
                return h, leaf
        return None

    def _memory_file(self, v1_name: str, v2_name: str) -> str | None:
        found = self._memory_leaf()
        if found is None:
            return None
        h, leaf = found
        return os.path.join(leaf, v2_name if h.version == "v2" else v1_name)

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer killed in the session (0 without memory)."""
        path = self._memory_file("memory.oom_control", "memory.events")
        if path is None:
            return 0
        try:
            for line in _read(path).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except FileNotFoundError:
            pass
        return 0

    def memory_usage(self) -> int | None:
        """Bytes charged to the session now (page cache included), None without memory."""
        path = self._memory_file("memory.usage_in_bytes", "memory.current")
        return int(_read(path)) if path else None

    def memory_peak(self) -> int | None:
        """Highest charge so far; None without memory or without ``memory.peak`` (v2 < 5.19)."""
        path = self._memory_file("memory.max_usage_in_bytes", "memory.peak")
        if path is None:
            return None
        try:
            return int(_read(path).split()[0])
        except FileNotFoundError:
            return None

    # -- removal ------------------------------------------------------------

    def remove(self, timeout: float = 2.0) -> None:
        """Kill what is left, remove the leaves, and the per-process parents once empty.

        Idempotent.  Raises OSError if a leaf cannot be removed (a process
        that would not die, e.g. stuck in the kernel).
        """
        if self._removed:
            return
        if self.pids() and not self.kill_all(timeout):
            raise OSError(errno.EBUSY, f"session cgroup {self.name!r} still has processes {self.pids()}")
        deadline = time.monotonic() + timeout
        for _h, leaf, _used in self._leaves:
            # Deepest first: cgroups a cell created below the leaf.
            dirs = sorted((d for d, _s, _f in os.walk(leaf)), key=len, reverse=True)
            for directory in dirs:
                while True:
                    try:
                        os.rmdir(directory)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as e:
                        # EBUSY while exiting tasks are still being released.
                        if e.errno != errno.EBUSY or time.monotonic() > deadline:
                            raise
                        time.sleep(0.005)
            with _parent_lock:
                _rmdir_quiet(os.path.dirname(leaf))
        self._removed = True
