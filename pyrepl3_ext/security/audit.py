"""The audit tripwire: a PEP 578 hook that refuses OS effects of a running cell.

One hook is installed per process (hooks cannot be removed) the first time a
session with an auditing policy attaches.  Rules follow *origin* as well as
time:

* a scope is entered for the thread running a cell (``before_cell``) and
  left in ``after_cell``; on Python 3.12+ a ``threading.Thread`` started by
  cell code inherits it, and a raw ``_thread.start_new_thread`` from cell
  code is refused (3.10/3.11 raise no thread-start event; ``restricted``
  makes ``threading`` unimportable there);
* outside any scope, an event raised while a session's code is on the
  stack (a frame whose globals are that session's namespace: a finalizer,
  a ``__str__`` the host calls, a profile function, a generator's
  ``finally``) is decided by that session's rules, on whatever thread and
  whenever it runs (:func:`_origin`).

What it refuses (per the policy): process creation, network, writes and
reads outside granted roots, filesystem mutation, environment changes,
ctypes, subinterpreters, ``gc`` walks, unpickling globals; and, when the
nearest Python caller is cell code, frame/trace access, ``compile``/
``exec``, code and function construction and code-object attribute reads.
A denial raises :class:`AuditDenied` (a ``SecurityError`` *and* a
``PermissionError``, so stdlib code that tolerates unreadable files keeps
working) and is always reported host-side (an ``audit`` event and the
session's ``denials`` log), even when cell code catches it.

Cells cannot change host functions: writing a function's ``__code__``,
``__defaults__`` or ``__kwdefaults__`` (or any object's ``__class__``) from
a session's scope or origin is refused unless the function is the session's
own.  ``_posixsubprocess.fork_exec``, the one process-starting primitive
CPython does not audit, is replaced by a sealed wrapper that raises
``pyrepl3.fork_exec`` first (:func:`install`).

Known holes (``docs/security.md``): ctypes is audited only at entry,
subinterpreters run their own hook-free code, native libraries do syscalls
unseen.  The import layer keeps those modules unreachable; this hook is the
tripwire behind it.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import types
import weakref
from typing import Any

from ..errors import SecurityError
from .sealed import is_sealed, seal


class AuditDenied(SecurityError, PermissionError):
    """An OS effect refused by the audit tripwire."""


_PROCESS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "subprocess.Popen", "os.startfile", "pty.spawn", "os.kill", "os.killpg",
    "signal.pthread_kill", "os.setuid", "os.setgid", "pyrepl3.fork_exec",
})
_NETWORK = frozenset({
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
    "socket.gethostbyname_ex", "socket.getnameinfo", "urllib.Request",
    "http.client.connect", "ftplib.connect", "smtplib.connect", "poplib.connect",
    "imaplib.open", "nntplib.connect", "telnetlib.Telnet.open", "webbrowser.open",
})
_FS_MUTATION = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
    "os.link", "os.symlink", "os.truncate", "os.utime", "os.chflags",
    "os.lchflags", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod",
    "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree",
    "shutil.move", "shutil.rmtree", "shutil.chown", "shutil.make_archive",
    "shutil.unpack_archive", "tempfile.mkstemp", "tempfile.mkdtemp",
    "sqlite3.connect",
})
_ALWAYS = {
    "os.putenv": "changing the process environment",
    "os.unsetenv": "changing the process environment",
    "os.chdir": "changing the process's working directory",
    "cpython.PyInterpreterState_New": "creating a subinterpreter (it runs code "
                                      "outside this hook)",
    "gc.get_objects": "walking the garbage collector's objects",
    "gc.get_referrers": "walking the garbage collector's referrers",
    "gc.get_referents": "walking the garbage collector's referents",
    "pickle.find_class": "unpickling globals (pickle can call anything)",
    "sys.addaudithook": "adding an audit hook",
    "mmap.__new__": "mapping memory",
    "sqlite3.enable_load_extension": "loading native SQLite extensions",
    "sqlite3.load_extension": "loading native SQLite extensions",
    "resource.setrlimit": "changing process limits",
    "resource.prlimit": "changing process limits",
}
_CTYPES = frozenset({
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata",
    "ctypes.cdata/buffer", "ctypes.string_at", "ctypes.wstring_at",
    "ctypes.addressof", "ctypes.call_function", "ctypes.PyObj_FromPtr",
    "ctypes.create_string_buffer", "ctypes.create_unicode_buffer",
    "ctypes.get_errno", "ctypes.set_errno", "ctypes.set_exception",
})
#: Refused only when the nearest Python frame is cell code (the stdlib uses
#: them legitimately on the cell's behalf: namedtuple, dataclasses, imports).
#: Not ``sys.settrace``/``sys.setprofile``: CPython raises them itself, with
#: the cell's frame on top, when a trace function raises (that is how a
#: cancel unwinds a traced cell); a cell's tracer could not use the frames it
#: gets anyway (frame attributes are refused by the AST guard).
_FROM_CELL = {
    "sys._getframe": "reading frames",
    "sys._getframemodulename": "reading frames",
    "sys._current_frames": "reading other threads' frames",
    "sys._current_exceptions": "reading other threads' exceptions",
    "sys.monitoring.register_callback": "installing a monitoring callback",
    "compile": "compiling code outside the security checks",
    "exec": "running code outside the security checks",
    "code.__new__": "building code objects",
    "function.__new__": "building functions from code objects",
    "object.__getattr__": "reading code, frame or generator internals",
    "marshal.loads": "loading marshalled code",
    "marshal.load": "loading marshalled code",
}
_IMPORT_TRIPWIRE = frozenset({
    "ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_interpreters",
    "_xxinterpchannels", "_interpchannels", "concurrent.interpreters",
    "multiprocessing", "_multiprocessing", "mmap", "pty", "_testcapi",
    "_testinternalcapi",
})
_THREAD_START = frozenset({"_thread.start_new_thread", "_thread.start_joinable_thread"})
_OPEN = frozenset({"open", "os.listdir", "os.scandir"})
#: Writes that change what a function runs or what an object is.
_MUTATION = frozenset({"object.__setattr__", "object.__delattr__"})
_FUNCTION_STATE = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
#: What a sealed function hides (:mod:`.sealed`): its defaults; its code is
#: a generic template holding no host object, which ``inspect`` reads.
_SEALED_ATTRS = frozenset({"__defaults__", "__kwdefaults__"})

_WATCHED = (_PROCESS | _NETWORK | _FS_MUTATION | frozenset(_ALWAYS) | _CTYPES
            | frozenset(_FROM_CELL) | _THREAD_START | _OPEN | _MUTATION
            | frozenset({"import", "socket.__new__"}))

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

# -- process-wide state (the hook is process-wide by nature) -----------------
_install_lock = threading.Lock()
_installed = False
#: thread ident -> the innermost active scope of that thread
_scopes: dict[int, "AuditScope"] = {}
#: threads started by a scoped cell -> the scope they inherit (3.12+)
_thread_scopes: "weakref.WeakKeyDictionary[threading.Thread, AuditScope]" = \
    weakref.WeakKeyDictionary()
#: (namespace, scope) of every session whose policy audits: code whose
#: globals are a session's namespace is that session's code (its origin)
_origins: tuple = ()
_local = threading.local()
_get_ident = threading.get_ident
_threads_by_ident = threading._active  # noqa: SLF001 - no side effects, unlike current_thread()


def install() -> None:
    """Install the process's hook once (idempotent), and audit ``fork_exec``."""
    global _installed
    with _install_lock:
        if not _installed:
            sys.addaudithook(_hook)
            _audit_fork_exec()
            _installed = True


def is_installed() -> bool:
    return _installed


def _audited_fork_exec(*args, _fork_exec=None, _audit=sys.audit):
    """``_posixsubprocess.fork_exec``, raising ``pyrepl3.fork_exec`` first."""
    _audit("pyrepl3.fork_exec", args[0] if args else None)
    return _fork_exec(*args)


def _audit_fork_exec() -> None:
    """Make the one unaudited way to start a program raise an event.

    CPython's ``_posixsubprocess.fork_exec`` raises none (``subprocess.Popen``
    raises its own in ``__init__``, before it; ``multiprocessing``'s
    ``spawnv_passfds`` and a direct call raise nothing).  Its callers look it
    up at call time (``_posixsubprocess.fork_exec``), except ``subprocess``
    on 3.11+, which binds it once as ``_fork_exec``: both are replaced by a
    sealed wrapper, so the real function is out of reach of cell code.
    """
    try:
        import _posixsubprocess
    except ImportError:  # not POSIX
        return
    real = _posixsubprocess.fork_exec
    if is_sealed(real):
        return
    wrapper = seal(_audited_fork_exec, "fork_exec", _fork_exec=real, _audit=sys.audit)
    _posixsubprocess.fork_exec = wrapper
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None and getattr(subprocess, "_fork_exec", None) is real:
        subprocess._fork_exec = wrapper


def watch_origin(user_ns: dict, scope: "AuditScope | None") -> None:
    """Decide events raised by ``user_ns``'s code by ``scope`` (None: no longer)."""
    global _origins
    with _install_lock:
        kept = tuple(pair for pair in _origins if pair[0] is not user_ns)
        _origins = kept + (((user_ns, scope),) if scope is not None else ())


def _origin(frame: Any) -> "AuditScope | None":
    """The scope of the nearest session code on the stack from ``frame`` up."""
    origins = _origins
    if len(origins) == 1:  # the usual case, kept to one comparison per frame
        ns, scope = origins[0]
        while frame is not None:
            if frame.f_globals is ns:
                return scope
            frame = frame.f_back
        return None
    while frame is not None:
        globals_ = frame.f_globals
        for ns, scope in origins:
            if globals_ is ns:
                return scope
        frame = frame.f_back
    return None


def _origin_of_frame(frame: Any) -> "AuditScope | None":
    """The scope of ``frame`` itself, if it is session code."""
    if frame is None:
        return None
    globals_ = frame.f_globals
    for ns, scope in _origins:
        if globals_ is ns:
            return scope
    return None


class trusted:
    """Context manager: audit events raised inside are the host's (capability calls)."""

    __slots__ = ("_prev",)

    def __enter__(self) -> None:
        self._prev = getattr(_local, "busy", False)
        _local.busy = True

    def __exit__(self, *exc: Any) -> None:
        _local.busy = self._prev


def _hook(event: str, args: tuple) -> None:
    if event not in _WATCHED:
        return
    scope = _scopes.get(_get_ident())
    if scope is None and _thread_scopes:
        thread = _threads_by_ident.get(_get_ident())
        scope = _thread_scopes.get(thread) if thread is not None else None
    if scope is None and not _origins:
        return
    if getattr(_local, "busy", False):
        return
    _local.busy = True
    try:
        caller = sys._getframe(1)
        if scope is None or len(_origins) > 1:
            # origin: session code on the stack is under its session's rules,
            # whenever and on whatever thread it runs (with several sessions,
            # the nearest one's, not the rules of the cell that happens to run).
            # The rules of _FROM_CELL events look at the nearest frame only, so
            # for them (sealed reads aside) that frame is all there is to see.
            if event in _FROM_CELL and not (event == "object.__getattr__"
                                            and len(args) > 1 and is_sealed(args[0])):
                scope = _origin_of_frame(caller) or scope
            else:
                scope = _origin(caller) or scope
            if scope is None:
                return
        reason = scope.decide(event, args, caller)
        if reason is not None:
            raise scope.deny(event, args, reason)
    finally:
        _local.busy = False


def enter(scope: "AuditScope") -> "AuditScope | None":
    """Make ``scope`` active for this thread; returns the one it replaces."""
    ident = _get_ident()
    previous = _scopes.get(ident)
    _scopes[ident] = scope
    return previous


def leave(previous: "AuditScope | None") -> None:
    ident = _get_ident()
    if previous is None:
        _scopes.pop(ident, None)
    else:
        _scopes[ident] = previous


def _under(path: str, roots: tuple) -> bool:
    for root in roots:
        if path == root or path.startswith(root + os.sep) or root == os.sep:
            return True
    return False


def _python_roots() -> tuple:
    """Directories of the interpreter and of sys.path (cold imports read them)."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix,
                                           sys.exec_prefix, sys.base_exec_prefix)}
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            roots.add(os.path.realpath(entry))
    return tuple(sorted(r for r in roots if r != os.sep))


class AuditScope:
    """The audit rules of one session's policy, and where denials are reported.

    Invariant: what the hook trusts (``policy``, ``user_ns``, the roots) is
    read-only: attribute writes raise, and the roots change only through
    :meth:`refresh_roots`, which recomputes them from the session's grants.
    Only ``execution`` (where denials are reported) is set per cell.
    """

    __slots__ = ("session", "policy", "user_ns", "execution", "write_roots", "read_roots")

    def __init__(self, session: Any):
        _set = object.__setattr__
        _set(self, "session", session)
        _set(self, "policy", session.policy)
        _set(self, "user_ns", session.user_ns)
        _set(self, "execution", None)
        self.refresh_roots()

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "execution":
            raise AttributeError(f"the audit scope's {name!r} is read-only")
        object.__setattr__(self, name, value)

    __delattr__ = None  # type: ignore[assignment]

    def refresh_roots(self) -> None:
        policy = self.policy
        granted = tuple(os.path.realpath(r) for r in self.session.granted_roots())
        write = granted + tuple(os.path.realpath(r) for r in policy.extra_write_roots)
        read = write + tuple(os.path.realpath(r) for r in policy.extra_read_roots)
        if policy.read_scope == "python":
            read = read + _python_roots()
        object.__setattr__(self, "write_roots", write)
        object.__setattr__(self, "read_roots", read)

    # -- decisions ---------------------------------------------------------
    def _from_cell(self, frame: Any) -> bool:
        return frame is not None and frame.f_globals is self.user_ns

    def _cell_on_stack(self, frame: Any) -> bool:
        user_ns = self.user_ns
        while frame is not None:
            if frame.f_globals is user_ns:
                return True
            frame = frame.f_back
        return False

    def decide(self, event: str, args: tuple, caller: Any) -> str | None:
        """Why ``event`` is refused in this scope, or None."""
        policy = self.policy
        if event == "open" or event == "os.listdir" or event == "os.scandir":
            return self._decide_path(event, args)
        if event == "object.__getattr__" and len(args) > 1 and args[1] in _SEALED_ATTRS \
                and is_sealed(args[0]):
            return f"reading a sealed host function's {args[1]} (it leads to the host)"
        if event in _MUTATION:
            return self._decide_mutation(args, caller)
        if event in _FROM_CELL:
            if not self._from_cell(caller):
                return None
            if event == "object.__getattr__" and len(args) > 1:
                return f"{_FROM_CELL[event]} ({args[1]!r})"
            return _FROM_CELL[event]
        if event in _ALWAYS:
            return _ALWAYS[event]
        if event in _CTYPES:
            return "using ctypes (raw memory and native calls bypass every check)"
        if event in _PROCESS:
            return None if policy.allow_subprocess else "starting or signalling processes"
        if event in _NETWORK:
            return None if policy.allow_network else "network access"
        if event == "socket.__new__":
            family = args[1] if len(args) > 1 else None
            if policy.allow_network or family == socket.AF_UNIX or family == -1:
                return None
            return "opening a network socket"
        if event in _FS_MUTATION:
            return None if policy.allow_writes else "changing the filesystem"
        if event in _THREAD_START:
            return self._decide_thread(event, args, caller)
        if event == "import":
            name = args[0] if args else ""
            if name in _IMPORT_TRIPWIRE or str(name).partition(".")[0] in _IMPORT_TRIPWIRE:
                return f"importing {name!r} (process, memory or interpreter escape hatch)"
        return None

    def _decide_mutation(self, args: tuple, caller: Any) -> str | None:
        """Cells do not change what a host function runs, or what an object is.

        Only with cell code on the stack (directly or through a helper such
        as ``functools.update_wrapper``): the host's own work during a cell
        is left alone.
        """
        if len(args) < 2 or args[1] not in _FUNCTION_STATE and args[1] != "__class__" \
                or not self._cell_on_stack(caller):
            return None
        target, name = args[0], args[1]
        if name == "__class__":
            return "changing an object's class"
        if name in _FUNCTION_STATE and isinstance(target, types.FunctionType) \
                and target.__globals__ is not self.user_ns:
            return f"changing a host function's {name}"
        return None

    def _decide_path(self, event: str, args: tuple) -> str | None:
        path = args[0] if args else None
        if path is None or isinstance(path, int):
            return None  # an already open descriptor: its opening was checked
        try:
            path = os.fsdecode(path)
        except TypeError:
            return None
        write = False
        if event == "open":
            mode = args[1] if len(args) > 1 else None
            flags = args[2] if len(args) > 2 else 0
            if isinstance(mode, str):
                write = any(c in mode for c in "wax+")
            elif isinstance(flags, int):
                write = bool(flags & _WRITE_FLAGS)
        real = os.path.realpath(path)
        policy = self.policy
        if write:
            if policy.allow_writes or _under(real, self.write_roots):
                return None
            return f"writing {path!r} (outside the granted roots)"
        if policy.read_scope == "any" or _under(real, self.read_roots):
            return None
        verb = "reading" if event == "open" else "listing"
        return f"{verb} {path!r} (outside the granted roots)"

    def _decide_thread(self, event: str, args: tuple, caller: Any) -> str | None:
        if not self._cell_on_stack(caller):
            return None  # the host's own thread, started while a cell runs
        if not self.policy.allow_threads:
            return "starting threads"
        target = args[0] if args else None
        owner = getattr(target, "__self__", None)
        if isinstance(owner, threading.Thread):
            _thread_scopes[owner] = self
            return None
        return "starting a raw thread (only threading.Thread is followed by the policy)"

    # -- reporting ---------------------------------------------------------
    def deny(self, event: str, args: tuple, reason: str) -> AuditDenied:
        message = (f"{reason} is refused by security policy {self.policy.name!r} "
                   f"(audit event {event!r})")
        self.session.record_denial(event, _describe(args), message, self.execution)
        return AuditDenied(message)


_PLAIN = (str, bytes, int, float, bool, type(None))


def _describe(args: tuple) -> list[str]:
    """The event's arguments for the report, without running any cell code
    (a user ``__repr__`` would run inside the hook, unaudited)."""
    out = []
    for arg in args[:4]:
        if type(arg) in _PLAIN:
            text = repr(arg)
        elif type(arg) in (tuple, list):
            text = "[" + ", ".join(_describe(tuple(arg))) + "]"
        else:
            text = f"<object of {type.__repr__(type(arg))}>"
        out.append(text if len(text) <= 200 else text[:197] + "...")
    return out
