"""The extension's magics: ``%pyrepl3``, ``%%timeout``, ``%%transaction``, ``%snapshot``.

``%%timeout`` and ``%%transaction`` are *directives*: when they open a cell,
the extension's input transformer strips them and the cell body runs as an
ordinary cell (top-level await, last-expression display and history all
behave as usual) with the option recorded on its execution.  The magic
functions below only run when a directive reaches IPython unstripped (a
malformed argument, or ``run_cell_magic`` called directly); then they report
the error or run the body as a nested cell with the option.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from . import _compat
from ._version import __version__


@magics_class
class PyREPL3Magics(Magics):
    """Magics of one shell's pyrepl3 state."""

    def __init__(self, shell: Any, state: Any):
        super().__init__(shell=shell)
        self._state = state

    @line_magic
    def pyrepl3(self, line: str = "") -> None:
        """Show the pyrepl3 version, the IPython build and the active settings."""
        state = self._state
        build = "patched (multi-shell)" if _compat.is_patched_build() else "stock"
        import IPython

        lines = [
            f"pyrepl3_ext {__version__}",
            f"IPython {IPython.__version__} ({build}), Python "
            f"{platform.python_version()} on {sys.platform}",
            f"session: {state.session_id}",
            f"components: {', '.join(c.name for c in state.components) or 'none'}",
            f"event subscribers: {len(state.bus._subscribers)}",
            "settings:",
        ]
        config = state.config
        for name in sorted(config.trait_names(config=True)):
            lines.append(f"  PyREPL3.{name} = {getattr(config, name)!r}")
        print("\n".join(lines))

    def _run_with(self, option: dict, body: str) -> Any:
        from . import run_cell

        return run_cell(self.shell, body, store_history=False, **option)

    @cell_magic
    def timeout(self, line: str, cell: str) -> None:
        """%%timeout SECONDS -- cancel this cell if it runs longer than SECONDS."""
        try:
            seconds = float(line.strip())
        except ValueError:
            raise UsageError(
                f"%%timeout expects a number of seconds, got {line.strip()!r}") from None
        if not seconds > 0:
            raise UsageError(f"%%timeout must be > 0 seconds, got {line.strip()!r}")
        self._run_with({"timeout": seconds}, cell)

    @cell_magic
    def transaction(self, line: str, cell: str) -> None:
        """%%transaction -- roll this cell's namespace changes back if it fails."""
        if line.strip():
            raise UsageError(f"%%transaction takes no argument, got {line.strip()!r}")
        self._run_with({"transaction": True}, cell)

    @line_magic
    def snapshot(self, line: str = "") -> None:
        """%snapshot take|restore|delete NAME, list, save NAME PATH, load PATH [NAME].

        Named deep copies of your variables (see docs/namespace.md);
        ``restore NAME --keep`` keeps variables created after the snapshot.
        """
        from .errors import NamespaceError
        from .namespace import snapshot_magic

        try:
            print(snapshot_magic(self.shell, line))
        except (ValueError, NamespaceError) as exc:
            raise UsageError(str(exc)) from None
