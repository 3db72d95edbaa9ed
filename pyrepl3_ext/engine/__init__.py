"""The engine layer: sessions the engine creates, in this process or in one of their own.

``engine.py`` holds :class:`Engine` and the in-process :class:`Session`;
``executor.py`` the per-session executor that routes sync and await cells.
Import direction: this package builds on the extension (core and
components) and is used by the service layer (``server.py``), never the
other way round.
"""

from __future__ import annotations

from .engine import Engine, ExecutionHandle, Session

__all__ = ["Engine", "ExecutionHandle", "Session"]
