"""IPython's "a trailing ``;`` hides the result" check, made to read the running cell.

Stock ``DisplayHook.quiet`` tokenizes the last cell *stored in history*
(``input_hist_parsed[-1]``).  That is the running cell only when the cell was
stored.  Hosts run most cells unstored (``store_history=False``: the engine's
default for tools, ``%%timeout``'s body, ``pyrepl3_ext.run_cell(...,
store_history=False)``), and then the check reads an unrelated cell:

* after a stored ``x = 1;``, an unstored ``42`` shows nothing and its
  ``ExecutionResult.result`` is None;
* after a stored cell that does not tokenize (an unclosed bracket, which
  IPython stores before compiling it), every unstored expression cell fails
  with ``tokenize.TokenError`` instead of giving its value;
* an unstored ``42;`` is shown after a stored ``y = 2``.

The wrapper installed per shell judges the cell the displayhook is showing a
value of (``displayhook.exec_result.info``: set by ``run_cell_async`` for
exactly the running cell, nested cells included) and treats a cell the
tokenizer refuses as "not quiet": losing a value to an exception is worse than
showing it.  Outside a cell (``exec_result`` is None) IPython's own choice is
kept, with the same guard.
"""

from __future__ import annotations

from typing import Any, Callable

from . import _compat


def install(shell: Any, patches: Any) -> None:
    """Replace ``shell.displayhook.quiet`` until ``patches`` (an ``InstancePatches``) are undone."""
    displayhook = getattr(shell, "displayhook", None)
    if displayhook is None or not hasattr(displayhook, "semicolon_at_end_of_expression"):
        return  # a host's own displayhook: nothing of IPython's to correct
    patches.wrap(displayhook, "quiet", lambda original: _judging_the_running_cell(
        shell, displayhook, original))


def _judging_the_running_cell(shell: Any, displayhook: Any,
                              original: Callable[[], bool]) -> Callable[[], bool]:
    def quiet() -> bool:
        info = getattr(getattr(displayhook, "exec_result", None), "info", None)
        try:
            if info is None:
                return bool(original())
            cell = _compat.transformed_cell(info)  # 9.2+
            if cell is None and info.store_history and not info.silent:
                return bool(original())  # the running cell is the last one stored
            if cell is None:
                cell = shell.transform_cell(info.raw_cell or "")
            return bool(displayhook.semicolon_at_end_of_expression(cell))
        except Exception:  # noqa: BLE001 - TokenError above all: show the value
            return False

    return quiet
