"""Evaluates RestrictedPython's transformer as the AST layer, against ours.

Needs RestrictedPython (not a dependency): run it from a venv that has it,
with this worktree on the path::

    PYTHONPATH=. /work/venvs/security-rp/bin/python bench/eval_restrictedpython.py

Measures, on the benign notebook corpus (``tests/security/benign.py``, after
IPython's input transformations): how many cells each transformer refuses
at compile time, the compile cost per cell, and the run-time cost of the
guards RestrictedPython's rewritten code calls (``_getattr_``,
``_getiter_``, ``_write_``...) against our layer's plain code, side by side.
"""

from __future__ import annotations

import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from IPython.core.error import InputRejected  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from RestrictedPython import compile_restricted, limited_builtins, safe_builtins, utility_builtins  # noqa: E402
from RestrictedPython.Eval import default_guarded_getitem, default_guarded_getiter  # noqa: E402
from RestrictedPython.Guards import (guarded_iter_unpack_sequence,  # noqa: E402
                                     guarded_unpack_sequence, safer_getattr)

from bench._common import interleaved  # noqa: E402
from pyrepl3_ext.security.ast_guard import SecurityGuard  # noqa: E402
from pyrepl3_ext.security.imports import Importer  # noqa: E402
from pyrepl3_ext.security.policy import SecurityPolicy  # noqa: E402
from tests.security.benign import CELLS  # noqa: E402


class Session:
    policy = SecurityPolicy.preset("restricted")
    importer = Importer(policy.allowed_modules, "restricted")
    user_ns = {"get_ipython": None, "files": None}

    def protected_names(self):
        return frozenset({"files", "get_ipython"})

    def gate_active(self):
        return True

    def record_refusal(self, layer, message):
        pass


def main() -> None:
    import warnings

    warnings.simplefilter("ignore", SyntaxWarning)
    shell = InteractiveShell.instance()
    sources = [shell.transform_cell(c) for c in CELLS]
    guard = SecurityGuard(Session())
    rp_refused, ours_refused = [], []
    for src in sources:
        try:
            compile_restricted(src, "<cell>", "exec")
        except SyntaxError as exc:
            rp_refused.append((src.splitlines()[0][:50], str(exc).splitlines()[0][:110]))
        try:
            guard.visit(ast.parse(src))
        except (InputRejected, SyntaxError) as exc:
            ours_refused.append((src.splitlines()[0][:50], str(exc)[:110]))
    print(f"benign cells: {len(sources)}")
    print(f"refused at compile time: RestrictedPython {len(rp_refused)}, ours {len(ours_refused)}")
    for first, why in rp_refused:
        print(f"  RP   {first!r}: {why}")
    for first, why in ours_refused:
        print(f"  ours {first!r}: {why}")

    # compile cost per cell (parse + transform + compile)
    def rp_compile():
        for src in sources:
            try:
                compile_restricted(src, "<cell>", "exec")
            except SyntaxError:
                pass

    def ours_compile():
        for src in sources:
            try:
                tree = guard.visit(ast.parse(src))
                compile(tree, "<cell>", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            except (InputRejected, SyntaxError):
                pass

    def plain_compile():
        for src in sources:
            try:
                compile(src, "<cell>", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            except SyntaxError:
                pass

    t = interleaved({"plain": plain_compile, "ours": ours_compile, "rp": rp_compile},
                    rounds=7, number=3, clock=time.thread_time)
    n = len(sources)
    print(f"\ncompile per cell (us): plain {t['plain']['best'] / n * 1e6:.0f}, "
          f"ours {t['ours']['best'] / n * 1e6:.0f}, RestrictedPython {t['rp']['best'] / n * 1e6:.0f}")

    # run-time cost of the guards on an attribute/subscript/loop-heavy cell
    body = ("class P:\n    def __init__(self, x):\n        self.x = x\n"
            "ps = [P(i) for i in range(2000)]\ntotal = 0\n"
            "for p in ps:\n    d = {'v': p.x}\n    total += d['v'] + p.x\n")
    rp_code = compile_restricted(body, "<cell>", "exec")
    ours_code = compile(guard.visit(ast.parse(body)), "<cell>", "exec")
    # limited_builtins caps range() at 1000 elements: the plain range keeps
    # the comparison about the guards
    rp_builtins = {**safe_builtins, **limited_builtins, **utility_builtins, "range": range}
    rp_globals = {"__builtins__": rp_builtins, "_getattr_": safer_getattr,
                  "_getitem_": default_guarded_getitem, "_getiter_": default_guarded_getiter,
                  "_write_": _allow_writes, "_unpack_sequence_": guarded_unpack_sequence,
                  "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
                  "__metaclass__": type, "__name__": "cell",
                  "_inplacevar_": _inplacevar}
    import builtins as b
    from pyrepl3_ext.security.builtins import build_builtins

    ours_globals = {"__builtins__": build_builtins(Session.policy, Session.importer),
                    "__name__": "cell"}
    plain_globals = {"__builtins__": b, "__name__": "cell"}
    plain_code = compile(body, "<cell>", "exec")
    t = interleaved({"plain": lambda: exec(plain_code, dict(plain_globals)),
                     "ours": lambda: exec(ours_code, dict(ours_globals)),
                     "rp": lambda: exec(rp_code, dict(rp_globals))},
                    rounds=9, number=20, clock=time.thread_time)
    print(f"attribute/subscript-heavy cell (us): plain {t['plain']['best'] * 1e6:.0f}, "
          f"ours {t['ours']['best'] * 1e6:.0f} ({t['ours']['best'] / t['plain']['best']:.2f}x), "
          f"RestrictedPython {t['rp']['best'] * 1e6:.0f} "
          f"({t['rp']['best'] / t['plain']['best']:.2f}x)")


def _allow_writes(obj):
    # full_write_guard refuses writes to any object but dict/list; integrators
    # that allow their own classes pass the object through, the cheapest choice
    return obj


def _inplacevar(op, x, y):
    import operator
    return {"+=": operator.iadd, "-=": operator.isub, "*=": operator.imul}[op](x, y)


if __name__ == "__main__":
    main()
