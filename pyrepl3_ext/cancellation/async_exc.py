"""Delivery to worker threads before 3.12: an asynchronous exception.

``PyThreadState_SetAsyncExc`` posted while the cell is inside ``run_code``;
it lands at the next bytecode check, so it cannot honour safe points
(documented in docs/cancellation.md).  Never retracted (see
``_post_async_exc``); a pending one is drained by the ``run_code`` wrapper.
"""

from __future__ import annotations

import ctypes
from typing import Any

from ..errors import CellCancelled

# -- worker threads on 3.10/3.11: asynchronous exception ----------------------

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.restype = ctypes.c_int


class _AsyncCellCancelled(CellCancelled):
    """Delivered by ``PyThreadState_SetAsyncExc`` (created without arguments;
    the manager fills in reason and kind when the cell ends)."""

    def __init__(self, *args: Any):
        super().__init__(*args) if args else super().__init__("cancelled")


def _post_async_exc(thread_id: int, exc: type[BaseException]) -> None:
    """Post ``exc`` (a class) to the thread.

    Never called with NULL to retract: on 3.10/3.11 that leaves the
    interpreter-wide "async exception pending" flag set with nothing to
    deliver, so the eval breaker fires on every backward jump forever.
    A pending exception is instead drained by the ``run_code`` wrapper.
    """
    _set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(exc))
