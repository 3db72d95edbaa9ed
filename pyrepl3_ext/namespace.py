"""Namespace manager: host access to a session's variables, transactions, snapshots.

Three things, all on the shell's own ``user_ns`` (never replaced: IPython,
``__main__`` and every function defined in a cell hold references to that
dict, so it is only ever merged into):

* **Host access** from any thread while a cell runs: get, set, delete,
  update, list.  Single dict operations are atomic under the GIL; whatever
  iterates (list, snapshots, rollback) works on a ``dict.copy()``, which is
  one C call, so a cell adding names meanwhile cannot break it.  IPython's
  own names (``In``/``Out``/``_ih``/``_oh``/``_``/``_iN``/``get_ipython``...)
  cannot be set or deleted through the API, and ``list`` hides them the way
  ``%who`` does.

* **Transactions** (``%%transaction``, ``run_cell(..., transaction=True)``,
  ``c.PyREPL3.transactions``).  Before the cell, the namespace's key -> value
  map is copied shallowly (pointers, not objects); if the cell raises or is
  cancelled, names it added are removed, names it rebound or deleted get
  their old object back.  Objects mutated in place (``lst.append``) are the
  same objects before and after, so that is *not* undone; snapshots (deep
  copies) are the tool for that.  Writes a host makes through this API while
  the transaction is open are kept (they are folded into the baseline).
  IPython's input-history names (``_i``, ``_ii``, ``_iii``, ``_iN``) and
  output-history names (``_N``) record what ran and are left as they are,
  like ``In``/``Out`` themselves; so are names IPython itself bound during
  the cell (``push(..., interactive=False)``, e.g. ``_`` when a value was
  displayed before the failure).

* **Snapshots**: named deep copies of the user's variables, restorable any
  number of times; saving one to disk is an explicit call and the file is
  signed (HMAC-SHA256) because loading it means unpickling, which can run
  arbitrary code: a file that fails verification is refused unread.

``docs/namespace.md`` has the design, the limits and the measured costs.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import itertools
import operator
import os
import pickle
import re
import secrets
import shlex
import threading
import time
from typing import Any, Iterable, Mapping

from .errors import (NamespaceError, ProtectedName, SnapshotNotFound,
                     SnapshotRefused, VariableNotFound)
from .extension import Component, require_state

#: IPython's history records: written for every cell, failing ones too, so a
#: rollback leaves them alone (they must keep matching ``In``/``Out``).
_HISTORY_RE = re.compile(r"_i{1,3}|_i\d+|_\d+")
#: Names a host may not set or delete: the history records, the current-value
#: names the displayhook maintains, and IPython's fixed objects.
_PROTECTED_RE = re.compile(r"_{1,3}|_i{1,3}|_i\d+|_\d+")
_IPYTHON_FIXED = frozenset({"In", "Out", "_ih", "_oh", "_dh", "get_ipython", "exit",
                            "quit", "__builtins__", "__builtin__", "__name__"})
#: At most this many names per list in a rollback report.
REPORT_LIMIT = 100
SNAPSHOT_FORMAT = 1
_FILE_MAGIC = b"PYREPL3-SNAPSHOT 1 HMAC-SHA256\n"
_MISSING = object()


def is_ipython_name(name: Any) -> bool:
    """Whether ``name`` is one of IPython's own names (protected from host writes)."""
    return isinstance(name, str) and (name in _IPYTHON_FIXED
                                      or _PROTECTED_RE.fullmatch(name) is not None)


def _is_history(name: Any) -> bool:
    return isinstance(name, str) and _HISTORY_RE.fullmatch(name) is not None


def _is_user_name(name: Any, value: Any, hidden: Mapping) -> bool:
    """A variable of the user's: not IPython's, not a module dunder, not a
    hidden name still bound to what IPython put there (``open``...)."""
    if not isinstance(name, str) or is_ipython_name(name):
        return False
    if name.startswith("__") and name.endswith("__"):
        return False
    return hidden.get(name, _MISSING) is not value


def _display_name(name: Any) -> str:
    return name if isinstance(name, str) else repr(name)


def _diff(base: dict, current: dict) -> tuple[list, list]:
    """``(keys added, keys of base rebound or deleted)`` from ``base`` to ``current``.

    Values are compared by identity, never ``==`` (no user ``__eq__`` runs,
    and an equal object is still a change).  When the cell deleted nothing,
    ``current`` starts with ``base``'s keys in the same order (dicts keep
    insertion order, rebinding keeps the position): the added keys are the
    tail and the values are compared pairwise in C, with no lookup per key.
    """
    keys = list(base)
    n = len(keys)
    if len(current) >= n and list(itertools.islice(current, n)) == keys:
        changed = list(itertools.compress(keys, map(
            operator.is_not, itertools.islice(current.values(), n), base.values())))
        return list(itertools.islice(current, n, None)), changed
    get = current.get
    return ([k for k in current if k not in base],
            [k for k, v in base.items() if get(k, _MISSING) is not v])


class Transaction:
    """One open transaction: the namespace's key -> value map when the cell
    began, and where the cell runs (its thread, and its asyncio task when
    it runs on a loop, where the host's own coroutines run too)."""

    __slots__ = ("execution_id", "thread_id", "task", "base")

    def __init__(self, execution_id: str, thread_id: int, base: dict,
                 task: Any = None):
        self.execution_id = execution_id
        self.thread_id = thread_id
        self.task = task
        self.base = base

    def is_own_call(self, thread_id: int) -> bool:
        """Whether a namespace call from here is the cell's own doing."""
        if thread_id != self.thread_id:
            return False
        return self.task is None or _current_task() is self.task


def _current_task() -> Any:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        return None


class Snapshot:
    """A named deep copy of the user's variables (``by_reference``: names whose
    value could not be copied and is kept as the object itself)."""

    __slots__ = ("name", "created", "values", "by_reference", "source")

    def __init__(self, name: str, created: float, values: dict,
                 by_reference: list[str], source: str = "memory"):
        self.name = name
        self.created = created
        self.values = values
        self.by_reference = by_reference
        self.source = source

    def info(self) -> dict:
        return {"name": self.name, "created": self.created,
                "names": sorted(self.values), "by_reference": list(self.by_reference),
                "source": self.source}


def _deep_copy_values(items: Iterable[tuple[str, Any]], keep: Iterable[str] = ()
                      ) -> tuple[dict, list[str]]:
    """Deep-copy each value with one shared memo (aliasing between names is kept).

    A value that cannot be copied is kept by reference; the partial copies
    its failed attempt left in the memo are dropped (the memo is insertion
    ordered), so no later value can pick up a half-built object.
    """
    memo: dict = {}
    keep = set(keep)
    values: dict = {}
    by_reference: list[str] = []
    for name, value in items:
        if name in keep:
            values[name] = value
            by_reference.append(name)
            continue
        mark = len(memo)
        try:
            values[name] = copy.deepcopy(value, memo)
        except Exception:  # noqa: BLE001 - modules, sockets, generators...
            for key in list(itertools.islice(memo, mark, None)):
                del memo[key]
            values[name] = value
            by_reference.append(name)
    return values, by_reference


class NamespaceManager(Component):
    """Per-shell namespace access, transactions and snapshots."""

    name = "namespace"
    #: idle while transactions are off by default; a cell's ``transaction``
    #: option still opens one
    idle = True
    triggers = ("transaction",)

    def __init__(self, state: Any):
        super().__init__(state)
        #: Serialises host operations, transaction baselines and rollbacks.
        self._lock = threading.RLock()
        self._open: list[Transaction] = []
        self._snapshots: dict[str, Snapshot] = {}
        self._default = False

    # -- load / unload -----------------------------------------------------
    def attach(self) -> None:
        config = self.state.config
        self._default = bool(config.transactions)  # read per cell: cached
        self.set_idle(not self._default)
        config.observe(self._on_default, names="transactions")

    def _on_default(self, change: dict) -> None:
        self._default = bool(change["new"])
        self.set_idle(not self._default)

    def detach(self) -> None:
        self.state.config.unobserve(self._on_default, names="transactions")
        with self._lock:
            self._open.clear()
            self._snapshots.clear()

    # -- transactions ------------------------------------------------------
    def before_cell(self, execution: Any) -> None:
        wanted = execution.options.get("transaction")
        if wanted is None:
            wanted = self._default
        if not wanted:
            return
        ns = self.state.shell.user_ns
        task = _current_task() if execution.mode == "async" else None
        with self._lock:
            txn = Transaction(execution.id, threading.get_ident(), ns.copy(), task)
            self._open.append(txn)
        execution.extras["namespace"] = txn

    def after_cell(self, execution: Any, result: Any) -> None:
        txn = execution.extra("namespace")
        if txn is None:
            return
        failed = result is None or result.error_in_exec is not None \
            or result.error_before_exec is not None
        with self._lock:
            try:
                self._open.remove(txn)
            except ValueError:
                return  # unloaded meanwhile
            # the execution outlives the cell (state.last_execution): let the
            # baseline go now rather than with it
            del execution.extras["namespace"]
            if not failed:
                txn.base = {}
                return  # committed
            report = self._rollback(txn)
            txn.base = {}
        execution.extras.setdefault("error_fields", {})["rollback"] = report
        if result is not None:
            result.pyrepl3_rollback = report

    def _rollback(self, txn: Transaction) -> dict:
        """Put ``user_ns`` back to ``txn.base`` (caller holds the lock)."""
        shell = self.state.shell
        ns = shell.user_ns
        hidden = shell.user_ns_hidden
        base = txn.base
        current = ns.copy()
        added, changed = _diff(base, current)

        def ipython_bound(key: Any) -> bool:
            # IPython binds its records with push(interactive=False), which
            # also lists them in user_ns_hidden: the displayhook's _/__/___
            # (matching Out), the lists %reset creates anew...  Kept.
            value = current.get(key, _MISSING)
            return value is not _MISSING and hidden.get(key, _MISSING) is value

        removed = [k for k in added if not _is_history(k) and not ipython_bound(k)]
        rebound: list = []
        undeleted: list = []
        for key in changed:
            if _is_history(key) or ipython_bound(key):
                continue
            (rebound if key in current else undeleted).append(key)
        for key in removed:
            ns.pop(key, None)
        for key in rebound:
            ns[key] = base[key]
        for key in undeleted:
            ns[key] = base[key]
        report: dict = {}
        omitted = 0
        for field, names in (("removed", removed), ("rebound", rebound),
                             ("undeleted", undeleted)):
            listed = sorted(_display_name(k) for k in names)
            omitted += max(0, len(listed) - REPORT_LIMIT)
            report[field] = listed[:REPORT_LIMIT]
        report["omitted"] = omitted
        return report

    def _host_changed(self, name: str, value: Any = _MISSING) -> None:
        """Fold a host's write into every open transaction (caller holds the lock).

        A write from the cell itself (its thread; its task for a cell
        running on an event loop) is rolled back with it; any other
        thread's or coroutine's is kept.
        """
        if not self._open:
            return
        tid = threading.get_ident()
        for txn in self._open:
            if txn.is_own_call(tid):
                continue
            if value is _MISSING:
                txn.base.pop(name, None)
            else:
                txn.base[name] = value

    def open_transactions(self) -> list[str]:
        """Execution ids whose transaction is open (for diagnostics and tests)."""
        with self._lock:
            return [t.execution_id for t in self._open]

    # -- host access -------------------------------------------------------
    def _not_found(self, name: Any) -> VariableNotFound:
        return VariableNotFound(
            f"session {self.state.session_id!r} has no variable {name!r}")

    @staticmethod
    def _check_writable(name: Any) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise NamespaceError(f"variable names must be identifiers, got {name!r}")
        if is_ipython_name(name):
            raise ProtectedName(
                f"{name!r} is one of IPython's own names; it cannot be set or "
                f"deleted through the namespace API")

    def get(self, name: str, default: Any = _MISSING) -> Any:
        """The object bound to ``name``; ``VariableNotFound`` (a ``KeyError``)
        if there is none and no ``default`` was given."""
        if not isinstance(name, str):
            raise NamespaceError(f"variable names are strings, got {name!r}")
        value = self.state.shell.user_ns.get(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self._not_found(name)
            return default
        return value

    def set(self, name: str, value: Any) -> None:
        """Bind ``name`` to ``value`` (merged into ``user_ns``, never replacing it)."""
        self._check_writable(name)
        with self._lock:
            self.state.shell.user_ns[name] = value
            self._host_changed(name, value)

    def update(self, values: Mapping[str, Any]) -> None:
        """Bind several names at once; all names are checked before any is bound."""
        items = list(dict(values).items())
        for name, _ in items:
            self._check_writable(name)
        with self._lock:
            ns = self.state.shell.user_ns
            for name, value in items:
                ns[name] = value
                self._host_changed(name, value)

    def delete(self, name: str) -> None:
        """Unbind ``name``; ``VariableNotFound`` if it is not bound."""
        self._check_writable(name)
        with self._lock:
            try:
                del self.state.shell.user_ns[name]
            except KeyError:
                raise self._not_found(name) from None
            self._host_changed(name)

    def names(self, *, private: bool = False) -> list[str]:
        """The user's variable names, sorted, hidden the way ``%who`` hides them.

        ``%who`` leaves out names starting with ``_`` and names still bound to
        what IPython put there; ``private=True`` adds the user's own ``_x``
        names (IPython's and module dunders stay out).
        """
        shell = self.state.shell
        current = shell.user_ns.copy()
        hidden = shell.user_ns_hidden
        out = []
        for name, value in current.items():
            if not _is_user_name(name, value, hidden):
                continue
            if name.startswith("_") and not private:
                continue
            out.append(name)
        out.sort()
        return out

    def describe(self, name: str, *, max_repr: int = 200) -> dict:
        """Type and a bounded, never-raising repr of ``name``'s value (for protocols)."""
        value = self.get(name)
        try:
            text = repr(value)
        except Exception as exc:  # noqa: BLE001 - a broken repr must not break the host
            text = f"<repr failed: {type(exc).__name__}: {exc}>"
        if len(text) > max_repr:
            text = text[:max_repr] + "..."
        kind = type(value)
        return {"name": name, "type": f"{kind.__module__}.{kind.__qualname__}",
                "repr": text}

    # -- snapshots ---------------------------------------------------------
    @staticmethod
    def _check_snapshot_name(name: Any) -> None:
        if not isinstance(name, str) or not name or name.strip() != name:
            raise NamespaceError(
                f"snapshot names are non-empty strings without surrounding spaces, "
                f"got {name!r}")

    def _snapshot(self, name: str) -> Snapshot:
        with self._lock:
            snap = self._snapshots.get(name)
        if snap is None:
            raise SnapshotNotFound(
                f"session {self.state.session_id!r} has no snapshot {name!r}")
        return snap

    def _user_items(self) -> list[tuple[str, Any]]:
        shell = self.state.shell
        current = shell.user_ns.copy()
        hidden = shell.user_ns_hidden
        return [(k, v) for k, v in current.items() if _is_user_name(k, v, hidden)]

    def take_snapshot(self, name: str) -> dict:
        """Deep-copy the user's variables under ``name`` (replacing an older one)."""
        self._check_snapshot_name(name)
        values, by_reference = _deep_copy_values(self._user_items())
        snap = Snapshot(name, time.time(), values, by_reference)
        with self._lock:
            self._snapshots[name] = snap
        return snap.info()

    def restore_snapshot(self, name: str, *, clear: bool = True) -> dict:
        """Bind the snapshot's variables again, as fresh copies (the snapshot
        stays intact for later restores).  ``clear`` also removes the user's
        variables that did not exist when it was taken.

        Returns ``{"restored": [...], "removed": [...]}``.
        """
        snap = self._snapshot(name)
        fresh, _ = _deep_copy_values(snap.values.items(), keep=snap.by_reference)
        shell = self.state.shell
        removed: list[str] = []
        with self._lock:
            ns = shell.user_ns
            if clear:
                hidden = shell.user_ns_hidden
                for key, value in list(ns.copy().items()):
                    if key not in fresh and _is_user_name(key, value, hidden):
                        ns.pop(key, None)
                        self._host_changed(key)
                        removed.append(key)
            for key, value in fresh.items():
                ns[key] = value
                self._host_changed(key, value)
        return {"restored": sorted(fresh), "removed": sorted(removed)}

    def delete_snapshot(self, name: str) -> None:
        with self._lock:
            if self._snapshots.pop(name, None) is None:
                raise SnapshotNotFound(
                    f"session {self.state.session_id!r} has no snapshot {name!r}")

    def list_snapshots(self) -> list[dict]:
        with self._lock:
            snaps = list(self._snapshots.values())
        return [s.info() for s in sorted(snaps, key=lambda s: s.name)]

    # -- snapshot files ----------------------------------------------------
    def _key(self, key: bytes | str | None) -> bytes:
        if key is not None:
            if isinstance(key, str):
                key = key.encode("utf-8")
            if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
                raise NamespaceError("a snapshot key must be at least 16 bytes")
            return bytes(key)
        return load_or_create_key(self.key_file())

    def key_file(self) -> str:
        """The per-user signing key file (``c.PyREPL3.snapshot_key_file``)."""
        configured = self.state.config.snapshot_key_file
        if configured:
            return os.path.expanduser(configured)
        return default_key_file()

    def save_snapshot(self, name: str, path: str | os.PathLike, *,
                      key: bytes | str | None = None) -> dict:
        """Write snapshot ``name`` to ``path``, pickled and signed.

        Values that cannot be pickled (lambdas, open files, modules...) are
        left out and listed in the returned ``skipped``.
        """
        snap = self._snapshot(name)
        secret = self._key(key)
        values = {k: v for k, v in snap.values.items() if k not in snap.by_reference}
        skipped = sorted(snap.by_reference)
        try:
            body = pickle.dumps(values, protocol=4)
        except Exception:  # noqa: BLE001 - find the culprits, save the rest
            for k in list(values):
                try:
                    pickle.dumps(values[k], protocol=4)
                except Exception:  # noqa: BLE001
                    del values[k]
                    skipped.append(k)
            skipped.sort()
            try:
                body = pickle.dumps(values, protocol=4)
            except Exception as exc:  # noqa: BLE001
                raise NamespaceError(f"snapshot {name!r} could not be pickled: {exc}") from exc
        payload = pickle.dumps({"format": SNAPSHOT_FORMAT, "name": snap.name,
                                "created": snap.created, "skipped": skipped,
                                "values": body}, protocol=4)
        mac = hmac.new(secret, _FILE_MAGIC + payload, hashlib.sha256).hexdigest()
        _write_private(os.fspath(path), _FILE_MAGIC + mac.encode("ascii") + b"\n" + payload)
        return {"name": snap.name, "path": os.fspath(path), "names": sorted(values),
                "skipped": skipped}

    def snapshot_bytes(self, name: str, *, key: bytes | str | None = None) -> tuple[bytes, dict]:
        """Snapshot ``name`` as a signed file's bytes (what :meth:`save_snapshot`
        writes), for a host that stores them itself (a session process's
        parent, which alone may write the operator's snapshot directory)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="pyrepl3-snapshot-") as tmp:
            path = os.path.join(tmp, "snapshot")
            info = self.save_snapshot(name, path, key=key)
            with open(path, "rb") as f:
                data = f.read()
        info.pop("path", None)
        return data, info

    def load_snapshot(self, path: str | os.PathLike, *, name: str | None = None,
                      key: bytes | str | None = None) -> dict:
        """Verify and read a snapshot file into memory (restore it separately).

        The signature is checked before anything is unpickled; a file that
        fails is refused with ``SnapshotRefused``.
        """
        secret = self._key(key)
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise NamespaceError(f"cannot read snapshot file {path!r}: {exc}") from exc
        payload = verify_snapshot(data, secret, path)
        # Verified: this key wrote it, so unpickling runs only what we pickled.
        record = pickle.loads(payload)  # noqa: S301
        if not isinstance(record, dict) or record.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotRefused(f"snapshot file {path!r} has an unknown format")
        values = pickle.loads(record["values"])  # noqa: S301
        target = name if name is not None else record["name"]
        self._check_snapshot_name(target)
        snap = Snapshot(target, record["created"], values, [], source=path)
        with self._lock:
            self._snapshots[target] = snap
        info = snap.info()
        info["skipped"] = list(record.get("skipped", []))
        return info


def verify_snapshot(data: bytes, key: bytes, where: str) -> bytes:
    """The payload of a snapshot file's bytes once its signature checks out
    against ``key``; ``SnapshotRefused`` otherwise.  Reads nothing else, so
    a host that must not unpickle (a session process's parent) can use it."""
    if not data.startswith(_FILE_MAGIC):
        raise SnapshotRefused(f"{where!r} is not a pyrepl3 snapshot file; not loaded")
    mac, sep, payload = data[len(_FILE_MAGIC):].partition(b"\n")
    expected = hmac.new(key, _FILE_MAGIC + payload, hashlib.sha256).hexdigest()
    if not sep or not hmac.compare_digest(mac, expected.encode("ascii")):
        raise SnapshotRefused(
            f"snapshot file {where!r} failed verification (modified, or signed "
            f"with another key); it was not unpickled")
    return payload


def default_key_file() -> str:
    """The per-user signing key file when ``c.PyREPL3.snapshot_key_file`` is empty."""
    from IPython.paths import get_ipython_dir

    return os.path.join(get_ipython_dir(), "pyrepl3", "snapshot.key")


def write_snapshot_file(path: str, data: bytes) -> None:
    """Write a snapshot file's bytes, owner-only (what ``save_snapshot`` does)."""
    _write_private(path, data)


def load_or_create_key(path: str) -> bytes:
    """The signing key in ``path``, created (32 random bytes, mode 0600) if absent.

    A key file that other users can read or write is refused: whoever can
    read it can forge snapshot files this user would then unpickle.
    """
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise NamespaceError(f"cannot create the snapshot key file {path!r}: {exc}") from exc
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read()
    except OSError as exc:
        raise NamespaceError(f"cannot read the snapshot key file {path!r}: {exc}") from exc
    if os.name == "posix":
        if st.st_mode & 0o077:
            raise NamespaceError(
                f"the snapshot key file {path!r} is accessible to other users "
                f"(mode {st.st_mode & 0o777:o}); run chmod 600 on it")
        if st.st_uid != os.getuid():
            raise NamespaceError(f"the snapshot key file {path!r} belongs to another user")
    if len(key) < 16:
        raise NamespaceError(f"the snapshot key file {path!r} holds fewer than 16 bytes")
    return key


def _write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise NamespaceError(f"cannot write snapshot file {path!r}: {exc}") from exc


# -- host API (re-exported by pyrepl3_ext) ----------------------------------------

def manager(shell: Any) -> NamespaceManager:
    """The namespace manager of ``shell`` (the extension must be loaded)."""
    found = getattr(require_state(shell), "namespace", None)
    if found is None:
        raise RuntimeError("the namespace component of pyrepl3_ext failed to load")
    return found


def get_variable(shell: Any, name: str, default: Any = _MISSING) -> Any:
    """The value of ``name`` in ``shell``'s namespace (``VariableNotFound`` if absent)."""
    return manager(shell).get(name, default)


def set_variable(shell: Any, name: str, value: Any) -> None:
    """Bind ``name`` in ``shell``'s namespace, from any thread, even while a cell runs."""
    manager(shell).set(name, value)


def update_variables(shell: Any, values: Mapping[str, Any]) -> None:
    """Bind several names in ``shell``'s namespace (merged, never replaced)."""
    manager(shell).update(values)


def delete_variable(shell: Any, name: str) -> None:
    """Unbind ``name`` in ``shell``'s namespace (``VariableNotFound`` if absent)."""
    manager(shell).delete(name)


def list_variables(shell: Any, *, private: bool = False) -> list[str]:
    """The user's variable names in ``shell``, as ``%who`` would show them."""
    return manager(shell).names(private=private)


def take_snapshot(shell: Any, name: str) -> dict:
    return manager(shell).take_snapshot(name)


def restore_snapshot(shell: Any, name: str, *, clear: bool = True) -> dict:
    return manager(shell).restore_snapshot(name, clear=clear)


def delete_snapshot(shell: Any, name: str) -> None:
    manager(shell).delete_snapshot(name)


def list_snapshots(shell: Any) -> list[dict]:
    return manager(shell).list_snapshots()


def save_snapshot(shell: Any, name: str, path: str | os.PathLike, *,
                  key: bytes | str | None = None) -> dict:
    return manager(shell).save_snapshot(name, path, key=key)


def load_snapshot(shell: Any, path: str | os.PathLike, *, name: str | None = None,
                  key: bytes | str | None = None) -> dict:
    return manager(shell).load_snapshot(path, name=name, key=key)


# -- %snapshot ---------------------------------------------------------------------

SNAPSHOT_USAGE = ("usage: %snapshot take NAME | restore NAME [--keep] | delete NAME | "
                  "list | save NAME PATH | load PATH [NAME]")


def snapshot_magic(shell: Any, line: str) -> str:
    """Run one ``%snapshot`` command; returns the text to print.

    Raises ``ValueError`` (usage) or a ``NamespaceError`` for the magic to report.
    """
    try:
        args = shlex.split(line)
    except ValueError as exc:
        raise ValueError(f"{exc}; {SNAPSHOT_USAGE}") from None
    if not args:
        raise ValueError(SNAPSHOT_USAGE)
    command, rest = args[0], args[1:]
    ns = manager(shell)
    if command == "list" and not rest:
        snaps = ns.list_snapshots()
        if not snaps:
            return "no snapshots"
        return "\n".join(
            f"{s['name']}: {len(s['names'])} names, taken "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['created']))}"
            + (f" (by reference: {', '.join(s['by_reference'])})" if s["by_reference"] else "")
            for s in snaps)
    if command == "take" and len(rest) == 1:
        info = ns.take_snapshot(rest[0])
        note = f"; kept by reference (not copyable): {', '.join(info['by_reference'])}" \
            if info["by_reference"] else ""
        return f"snapshot {info['name']!r}: {len(info['names'])} names{note}"
    if command == "restore" and rest and len(rest) <= 2 and rest[1:] in ([], ["--keep"]):
        done = ns.restore_snapshot(rest[0], clear=not rest[1:])
        extra = f", removed {len(done['removed'])} newer" if done["removed"] else ""
        return f"restored {len(done['restored'])} names from {rest[0]!r}{extra}"
    if command == "delete" and len(rest) == 1:
        ns.delete_snapshot(rest[0])
        return f"deleted snapshot {rest[0]!r}"
    if command == "save" and len(rest) == 2:
        info = ns.save_snapshot(rest[0], rest[1])
        note = f"; not saved (not picklable): {', '.join(info['skipped'])}" \
            if info["skipped"] else ""
        return f"saved {len(info['names'])} names of {info['name']!r} to {info['path']}{note}"
    if command == "load" and 1 <= len(rest) <= 2:
        info = ns.load_snapshot(rest[0], name=rest[1] if len(rest) == 2 else None)
        return (f"loaded snapshot {info['name']!r} ({len(info['names'])} names); "
                f"restore it with %snapshot restore {info['name']}")
    raise ValueError(SNAPSHOT_USAGE)
