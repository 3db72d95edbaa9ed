"""SecurityPolicy: what one session may do, as presets plus fine-grained settings.

A policy is plain data (a frozen dataclass); the enforcement layers read it.
Presets, from nothing to everything enforced:

* ``trusted``: no restriction at all (the default; stock IPython behaviour).
* ``guarded``: a guardrail against accidents by cooperative code: shell
  escapes and process/network/write effects are refused (audit tripwire),
  dunder/frame/code attribute access is refused, capabilities are protected;
  imports and builtins stay as they are.
* ``restricted``: every layer: sanitized builtins, import allowlist with
  read-only module views, the AST guard, magics allowlist, the audit
  tripwire with reads confined to the Python installation and granted roots.

Use :meth:`SecurityPolicy.preset` and :meth:`SecurityPolicy.replace` to
derive a custom policy (``SecurityPolicy.preset("restricted").replace(
allow_network=True)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .imports import DEFAULT_ALLOWED_MODULES

#: Magics that only measure, show or capture what the cell does themselves
#: (their code runs through the AST guard again) plus pyrepl3's directives.
SAFE_MAGICS = frozenset({
    "time", "timeit", "capture", "who", "whos", "who_ls", "timeout",
    "transaction", "precision", "pprint",
})

#: Magics refused even when every other magic is allowed (``guarded``): each
#: changes the policy itself (``%config PyREPL3.security_policy``), loads or
#: runs code outside the AST guard, opens a debugger on live frames, or
#: rewrites the namespace wholesale.
POLICY_MAGICS = frozenset({
    "config", "load_ext", "unload_ext", "reload_ext", "run", "load", "loadpy",
    "debug", "pdb", "store", "reset", "reset_selective", "xdel", "writefile",
    "edit", "logstart", "logon", "cd", "pushd", "popd", "bookmark", "autocall",
    "env", "set_env", "aimport", "autoreload", "macro", "recall", "rerun",
})

PRESETS = ("trusted", "guarded", "restricted")


@dataclass(frozen=True)
class SecurityPolicy:
    """One session's security settings; see the module docstring for presets."""

    name: str = "trusted"
    #: Run the AST guard (refuse forbidden constructs before anything runs).
    ast_guard: bool = False
    #: Refuse ``__dunder__`` attributes (except a few harmless ones such as
    #: ``__init__``/``__name__``), frame/code/generator internals
    #: (``f_globals``, ``gi_frame``, ``co_code``...) and ``str.format`` on
    #: non-literal templates.
    block_dunder_access: bool = False
    #: Spell the private names cell code writes (``obj._x`` is ``obj._x·``):
    #: a cell reaches only private state that cell code set.
    guard_private_attributes: bool = False
    #: Replace the session's ``__builtins__`` with a sanitized mapping.
    sanitize_builtins: bool = False
    #: Builtin names removed from the mapping (``sanitize_builtins``).
    denied_builtins: frozenset = frozenset()
    #: Importable modules: ``{module: None | frozenset(attribute names)}``
    #: (None: the module's public, non-module names).  ``None`` here means
    #: imports are not restricted at all.
    allowed_modules: Mapping[str, Any] | None = None
    #: Magics that may run (None: all of them but ``denied_magics``).
    allowed_magics: frozenset | None = None
    denied_magics: frozenset = frozenset()
    #: ``!cmd``, ``!!cmd``, ``%sx``, ``%system``, ``x = !cmd``, ``%%bash``/``%%script``.
    allow_shell_escapes: bool = True
    #: Audit tripwire (PEP 578) active while the cell runs.
    audit: bool = False
    allow_subprocess: bool = True
    allow_network: bool = True
    #: Threads started by the cell (they inherit the cell's audit scope on 3.12+).
    allow_threads: bool = True
    #: ``open()`` for reading outside granted roots.  ``"any"``, or
    #: ``"python"`` (the interpreter's and sys.path's directories only).
    read_scope: str = "any"
    #: ``open()`` for writing outside granted roots.
    allow_writes: bool = True
    #: Extra directories where the cell may read/write with ``open`` (besides
    #: the ``files`` capability's root).
    extra_read_roots: tuple = ()
    extra_write_roots: tuple = ()
    #: Names of capabilities injected into the namespace (from the session's
    #: registry); None: every capability the host registers.
    granted_capabilities: frozenset | None = None

    @classmethod
    def preset(cls, name: str) -> "SecurityPolicy":
        """The named preset: ``trusted``, ``guarded`` or ``restricted``."""
        if isinstance(name, SecurityPolicy):
            return name
        if name == "trusted":
            return cls(name="trusted")
        if name == "guarded":
            return cls(
                name="guarded", ast_guard=True, block_dunder_access=True,
                allow_shell_escapes=False, denied_magics=POLICY_MAGICS,
                allowed_magics=None, audit=True, allow_subprocess=False,
                allow_network=False, allow_threads=True, read_scope="any",
                allow_writes=False,
                denied_builtins=frozenset({"breakpoint"}),
                sanitize_builtins=True,
            )
        if name == "restricted":
            return cls(
                name="restricted", ast_guard=True, block_dunder_access=True,
                guard_private_attributes=True, sanitize_builtins=True,
                denied_builtins=RESTRICTED_DENIED_BUILTINS,
                allowed_modules=DEFAULT_ALLOWED_MODULES,
                allowed_magics=SAFE_MAGICS, allow_shell_escapes=False,
                audit=True, allow_subprocess=False, allow_network=False,
                allow_threads=False, read_scope="python", allow_writes=False,
            )
        raise ValueError(f"unknown security policy preset {name!r}: "
                         f"expected one of {', '.join(PRESETS)}")

    def replace(self, **changes: Any) -> "SecurityPolicy":
        """A copy with ``changes`` applied (named ``<preset>+custom``)."""
        if "name" not in changes and not self.name.endswith("+custom"):
            changes["name"] = f"{self.name}+custom"
        for key in ("denied_builtins", "allowed_magics", "denied_magics",
                    "granted_capabilities"):
            if key in changes and changes[key] is not None:
                changes[key] = frozenset(changes[key])
        return dataclasses.replace(self, **changes)

    @property
    def enforcing(self) -> bool:
        """Whether any layer is active."""
        return (self.ast_guard or self.sanitize_builtins or self.audit
                or self.allowed_modules is not None or self.allowed_magics is not None
                or bool(self.denied_magics) or not self.allow_shell_escapes)

    def magic_allowed(self, name: str) -> bool:
        if name in self.denied_magics:
            return False
        if self.allowed_magics is None:
            return name not in SHELL_MAGICS or self.allow_shell_escapes
        return name in self.allowed_magics and (
            name not in SHELL_MAGICS or self.allow_shell_escapes)

    def grants(self, capability: str) -> bool:
        return self.granted_capabilities is None or capability in self.granted_capabilities


#: Magics that run a shell or another interpreter: refused whenever shell
#: escapes are, whatever the magics allowlist says.
SHELL_MAGICS = frozenset({
    "sx", "system", "bash", "sh", "script", "perl", "ruby", "python", "python2",
    "python3", "pypy", "svg", "html", "javascript", "js", "sc", "alias",
    "unalias", "rehashx", "pip", "conda", "mamba", "micromamba", "uv",
})

#: ``help`` is not here: with an import allowlist the session gets its own
#: (``builtins.make_help``), which documents objects, never names.
RESTRICTED_DENIED_BUILTINS = frozenset({
    "open", "eval", "exec", "compile", "breakpoint", "globals", "locals",
    "vars", "input", "license", "credits", "copyright", "exit", "quit",
    "get_ipython", "__loader__", "__spec__",
})
