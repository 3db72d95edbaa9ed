"""Host-provided capabilities: ``files`` confined to a root, ``input``, custom ones.

The host builds a capability *implementation* (:class:`FilesCapability`,
:class:`CustomCapability`) and grants it to a session under a name
(``pyrepl3_ext.grant(shell, "files", FilesCapability(root))``).  Cell code
only ever holds the grant's *facade* (:mod:`.facade`): an opaque object whose
methods hand plain-data copies of their arguments to the implementation,
record the call in an ``audit`` event, and stop working once revoked.

Arguments are frozen *before* any host code runs: only exact ``str``,
``bytes``, numbers, ``None`` and lists/tuples/dicts of those pass, so no
``__fspath__``, ``__str__`` or ``__index__`` of cell code ever runs inside
a capability (where the audit tripwire is off).
"""

from __future__ import annotations

import errno
import inspect
import os
import stat
import threading
from typing import Any, Callable, Mapping

from ..errors import SecurityError
from . import audit
from .facade import make_facade

#: Names with a meaning fixed by pyrepl3.  ``input`` is the I/O layer's input
#: request: that layer grants it (as a :class:`CustomCapability` around its
#: request function) when the session's policy allows it.
RESERVED = {"input": "the I/O layer's input request (prompt: str, password: bool)"}

_PLAIN = (str, bytes, int, float, bool, type(None))


def freeze(value: Any, depth: int = 0) -> Any:
    """A plain-data copy of ``value``; anything else raises ``TypeError``."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if depth > 20:
        raise TypeError("capability arguments are nested too deeply")
    if kind is bytearray:
        return bytes(value)
    if kind is list or kind is tuple:
        return kind(freeze(v, depth + 1) for v in value)
    if kind is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError("capability argument dicts must have str keys")
            out[k] = freeze(v, depth + 1)
        return out
    raise TypeError(f"capability arguments must be plain data (str, bytes, numbers, "
                    f"None, lists, tuples, dicts); got {kind.__name__}")


class Grant:
    """One capability granted to one session under one name."""

    def __init__(self, name: str, impl: Any, session: Any):
        self.name = name
        self.impl = impl
        self.session = session
        self.revoked = False
        self.calls = 0
        callable_ = getattr(impl, "callable", False)
        self.facade = make_facade("capability", name, impl.methods, self._dispatch,
                                  callable_=callable_,
                                  signatures=_signatures(impl, callable_))

    def revoke(self) -> None:
        self.revoked = True

    def _dispatch(self, method: str, args: tuple, kwargs: dict) -> Any:
        if self.revoked:
            self.session.record_capability_call(self.name, method, [], "refused",
                                                "revoked")
            raise SecurityError(f"the capability {self.name!r} was revoked by the host")
        args = freeze(args)
        kwargs = freeze(kwargs)
        described = audit._describe(args + tuple(kwargs.values()))
        fn = self.impl.method(method)
        self.calls += 1
        fresh = None
        try:
            with audit.trusted():
                result = fn(*args, **kwargs)
        except (OSError, ValueError, TypeError, KeyError, LookupError,
                SecurityError) as exc:
            message = str(exc) or type(exc).__name__
            self.session.record_capability_call(self.name, method, described,
                                                "error", message)
            # a fresh exception, raised outside this handler: neither its
            # cause nor its context leads to the host's frames
            fresh = _fresh(exc, message)
        except BaseException as exc:
            self.session.record_capability_call(self.name, method, described,
                                                "error", type(exc).__name__)
            raise
        if fresh is not None:
            raise fresh
        self.session.record_capability_call(self.name, method, described, "ok", None)
        return result


def _signatures(impl: Any, callable_: bool) -> dict:
    """What ``help(files)`` shows for each method: the implementation's own
    signature (a facade method's defaults are out of reach, see ``sealed``)."""
    out = {}
    for method in tuple(impl.methods) + (("__call__",) if callable_ else ()):
        try:
            target = impl.method(method)
            if isinstance(impl, CustomCapability):
                target = impl.func
            out[method] = inspect.signature(target)
        except (AttributeError, TypeError, ValueError):
            continue
    return out


def _fresh(exc: BaseException, message: str) -> BaseException:
    """A new exception of ``exc``'s kind carrying only plain data."""
    if isinstance(exc, SecurityError):
        return SecurityError(message)
    try:
        return type(exc)(*_safe_args(exc))
    except Exception:  # noqa: BLE001 - an exception type with a picky __init__
        for base in (OSError, KeyError, LookupError, ValueError, TypeError):
            if isinstance(exc, base):
                return base(message)
        return RuntimeError(message)


def _safe_args(exc: BaseException) -> tuple:
    if isinstance(exc, OSError) and exc.errno is not None:
        return (exc.errno, exc.strerror or "", *( (exc.filename,) if exc.filename else ()))
    return tuple(a for a in exc.args if type(a) in _PLAIN)


class CustomCapability:
    """A host callable offered to cells as ``name(**arguments)``.

    ``schema`` maps each parameter name to a type or tuple of types (exact
    matches, ``int`` accepted for ``float``); ``optional`` lists parameters
    that may be left out.  Positional arguments follow the schema's order.
    """

    callable = True
    methods = ()

    def __init__(self, func: Callable[..., Any], schema: Mapping[str, Any] | None = None,
                 *, optional: tuple = (), description: str = ""):
        if not callable(func):
            raise TypeError(f"capability implementation must be callable, got {func!r}")
        self.func = func
        self.schema = dict(schema or {})
        for param, types_ in self.schema.items():
            types_ = types_ if isinstance(types_, tuple) else (types_,)
            if not all(isinstance(t, type) for t in types_):
                raise TypeError(f"schema for {param!r} must be a type or tuple of types")
            self.schema[param] = types_
        self.optional = frozenset(optional)
        self.description = description

    def method(self, name: str) -> Callable:
        if name != "__call__":
            raise AttributeError(name)
        return self._call

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        params = list(self.schema)
        if len(args) > len(params):
            raise TypeError(f"takes at most {len(params)} positional arguments "
                            f"({', '.join(params)}), got {len(args)}")
        bound = dict(zip(params, args))
        for key, value in kwargs.items():
            if key not in self.schema:
                raise TypeError(f"unexpected argument {key!r} (expected: "
                                f"{', '.join(params) or 'none'})")
            if key in bound:
                raise TypeError(f"argument {key!r} given twice")
            bound[key] = value
        for param, types_ in self.schema.items():
            if param not in bound:
                if param in self.optional:
                    continue
                raise TypeError(f"missing argument {param!r}")
            value = bound[param]
            if type(value) not in types_ and not (type(value) is int and float in types_):
                names = " or ".join(t.__name__ for t in types_)
                raise TypeError(f"argument {param!r} must be {names}, "
                                f"got {type(value).__name__}")
        return self.func(**bound)


_ENCODINGS = ("utf-8", "ascii", "latin-1", "utf-16", "utf-32")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class FilesCapability:
    """Read, write and list files below one directory, and nowhere else.

    The root is opened once as a directory descriptor; every path is
    resolved by walking its components with ``openat(..., O_NOFOLLOW)``
    relative to that descriptor, so ``..``, absolute paths, symlinks (at any
    depth, even if swapped in between two calls) and renames of parent
    directories can never lead outside.  Non-regular files (FIFOs, devices)
    are refused, and so are reads and writes of files with more than one
    hard link (a hard link planted by someone else is the same file as one
    outside the root, and nothing inside the root tells which name is
    the original).
    """

    methods = ("read", "read_bytes", "write", "append", "list", "exists",
               "delete", "mkdir")

    def __init__(self, root: str, *, read_only: bool = False,
                 max_bytes: int = 64 * 1024 * 1024):
        if not hasattr(os, "O_NOFOLLOW") or os.open not in os.supports_dir_fd:
            raise OSError("FilesCapability needs openat/O_NOFOLLOW (POSIX)")
        self.root = os.path.realpath(os.fspath(root))
        self.read_only = read_only
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._dirfd: int | None = os.open(
            self.root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)

    def close(self) -> None:
        with self._lock:
            if self._dirfd is not None:
                os.close(self._dirfd)
                self._dirfd = None

    def method(self, name: str) -> Callable:
        if name not in self.methods:
            raise AttributeError(name)
        return getattr(self, "_" + name)

    # -- path resolution ---------------------------------------------------
    def _parts(self, path: Any) -> list[str]:
        if type(path) is not str:
            raise TypeError(f"files: paths must be str, got {type(path).__name__}")
        if "\x00" in path:
            raise ValueError("files: paths cannot contain NUL characters")
        if path.startswith("/"):
            raise SecurityError(f"files: absolute path {path!r} refused: paths are "
                                f"relative to the granted root")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise SecurityError(f"files: path {path!r} refused: '..' could leave "
                                f"the granted root")
        return parts

    def _open_dir(self, parts: list[str], path: str) -> int:
        """A new descriptor for the directory ``parts`` below the root."""
        with self._lock:
            if self._dirfd is None:
                raise SecurityError("files: this capability was closed by the host")
            fd = os.dup(self._dirfd)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW
                                  | _O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise SecurityError(
                            f"files: path {path!r} refused: {part!r} is a symbolic "
                            f"link or not a directory") from None
                    if exc.errno == errno.ENOENT:
                        raise FileNotFoundError(errno.ENOENT,
                                                f"files: no such directory {part!r}",
                                                path) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _leaf(self, path: Any) -> tuple[int, str]:
        parts = self._parts(path)
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "files: the root is a directory", path)
        return self._open_dir(parts[:-1], path), parts[-1]

    def _open_file(self, path: str, flags: int, mode: int = 0o644) -> int:
        dirfd, leaf = self._leaf(path)
        try:
            try:
                fd = os.open(leaf, flags | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK,
                             mode, dir_fd=dirfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise SecurityError(f"files: path {path!r} refused: it is a "
                                        f"symbolic link") from None
                if exc.errno == errno.ENOENT:
                    raise FileNotFoundError(errno.ENOENT, "files: no such file",
                                            path) from None
                raise
        finally:
            os.close(dirfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SecurityError(f"files: path {path!r} refused: not a regular file")
            # a second name for the file may live outside the root (a hard
            # link planted by someone else); from inside the root it cannot
            # be told apart from the original, so neither is read or written
            if st.st_nlink > 1:
                raise SecurityError(f"files: path {path!r} refused: the file has "
                                    f"several hard links (one may be outside the root)")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_writable(self) -> None:
        if self.read_only:
            raise SecurityError("files: this capability is read-only")

    # -- methods -----------------------------------------------------------
    def _read_bytes(self, path: str) -> bytes:
        fd = self._open_file(path, os.O_RDONLY)
        try:
            chunks, total = [], 0
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return b"".join(chunks)
                total += len(chunk)
                if total > self.max_bytes:
                    raise SecurityError(f"files: {path!r} is larger than the "
                                        f"{self.max_bytes} bytes a read may return")
                chunks.append(chunk)
        finally:
            os.close(fd)

    def _read(self, path: str, encoding: str = "utf-8") -> str:
        if encoding not in _ENCODINGS:
            raise ValueError(f"files: encoding must be one of {', '.join(_ENCODINGS)}")
        return self._read_bytes(path).decode(encoding)

    def _write(self, path: str, data: Any, *, append: bool = False) -> int:
        self._check_writable()
        if type(data) is str:
            data = data.encode("utf-8")
        elif type(data) is not bytes:
            raise TypeError(f"files: data must be str or bytes, got {type(data).__name__}")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0)
        fd = self._open_file(path, flags)
        try:
            if not append:
                os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return len(data)

    def _append(self, path: str, data: Any) -> int:
        return self._write(path, data, append=True)

    def _list(self, path: str = ".") -> list[str]:
        fd = self._open_dir(self._parts(path), path)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def _exists(self, path: str) -> bool:
        parts = self._parts(path)
        if not parts:
            return True
        try:
            dirfd = self._open_dir(parts[:-1], path)
        except (FileNotFoundError, SecurityError):
            return False
        try:
            os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dirfd)

    def _delete(self, path: str) -> None:
        self._check_writable()
        dirfd, leaf = self._leaf(path)
        try:
            os.unlink(leaf, dir_fd=dirfd)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "files: no such file", path) from None
        finally:
            os.close(dirfd)

    def _mkdir(self, path: str) -> None:
        self._check_writable()
        dirfd, leaf = self._leaf(path)
        try:
            os.mkdir(leaf, 0o755, dir_fd=dirfd)
        finally:
            os.close(dirfd)
