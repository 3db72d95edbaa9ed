"""No test asserts on the wall clock (issue 21): speed belongs to ``bench/``,
hangs to pytest-timeout (pyproject.toml) and to timeouts passed to waits
(``event.wait(WAIT)``, ``thread.join(WAIT)``, ``handle.result(WAIT)``).

A *wall-clock assertion* is an ``assert`` (or an ``if`` that raises or calls
``pytest.fail``) whose condition compares a clock reading, or a name computed
from one (``start = time.monotonic()``, ``elapsed = time.perf_counter() -
start``, ``deadline = time.monotonic() + 5``), with anything.  Clock readings
passed to an API, stored in events or printed are not flagged.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent

#: clock functions, by attribute name; ``time``/``time_ns`` only on the
#: ``time`` module or an event loop (``loop.time()``)
CLOCKS = {"monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns",
          "process_time", "thread_time"}
CLOCKS_ON = {"time", "time_ns"}


def _is_clock_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in CLOCKS
    if isinstance(func, ast.Attribute):
        if func.attr in CLOCKS:
            return True
        if func.attr in CLOCKS_ON:
            owner = func.value
            name = owner.id if isinstance(owner, ast.Name) else \
                owner.attr if isinstance(owner, ast.Attribute) else ""
            return name == "time" or name.endswith("loop")
    return False


def _mentions_clock(node: ast.AST, tainted: set[str]) -> bool:
    return any(_is_clock_call(n) or (isinstance(n, ast.Name) and n.id in tainted)
               for n in ast.walk(node))


def _clock_valued(node: ast.AST, tainted: set[str]) -> bool:
    """``node`` computes a time from a clock reading (arithmetic on one, or
    ``max``/``min``/``abs``/``round``/``float`` of one); a reading stored in a
    container (an event's ``ts``) is not a time to compare."""
    if _is_clock_call(node) or (isinstance(node, ast.Name) and node.id in tainted):
        return True
    if isinstance(node, ast.BinOp):
        return _clock_valued(node.left, tainted) or _clock_valued(node.right, tainted)
    if isinstance(node, ast.UnaryOp):
        return _clock_valued(node.operand, tainted)
    if isinstance(node, ast.IfExp):
        return _clock_valued(node.body, tainted) or _clock_valued(node.orelse, tainted)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id in ("max", "min", "abs", "round", "float", "int"):
        return any(_clock_valued(a, tainted) for a in node.args)
    return False


def _tainted_names(tree: ast.AST) -> set[str]:
    """Names assigned (anywhere in the file) a time computed from a clock
    reading, to a fixpoint."""
    tainted: set[str] = set()
    while True:
        before = len(tainted)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) \
                    and node.value is not None and _clock_valued(node.value, tainted):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for n in ast.walk(target):
                        if isinstance(n, ast.Name):
                            tainted.add(n.id)
                        elif isinstance(n, ast.Attribute):
                            tainted.add(n.attr)
            elif isinstance(node, ast.NamedExpr) and _clock_valued(node.value, tainted):
                tainted.add(node.target.id)
        if len(tainted) == before:
            return tainted


def _fails(body: list[ast.stmt]) -> bool:
    for stmt in body:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Raise):
                return True
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) \
                    and n.func.attr == "fail":
                return True
    return False


def wall_clock_assertions(source: str, filename: str = "<test>") -> list[int]:
    """Line numbers of the wall-clock assertions in ``source``."""
    tree = ast.parse(source, filename)
    tainted = _tainted_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            condition = node.test
        elif isinstance(node, (ast.If, ast.While)) and _fails(node.body):
            condition = node.test
        else:
            continue
        if any(isinstance(n, ast.Compare) and _mentions_clock(n, tainted)
               for n in ast.walk(condition)):
            found.append(node.lineno)
    return sorted(found)


def test_no_wall_clock_assertion_in_tests():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if "escapes" in path.parts:  # payload data of the security corpus, not tests
            continue
        for line in wall_clock_assertions(path.read_text(), str(path)):
            offenders.append(f"{path.relative_to(TESTS.parent)}:{line}")
    assert offenders == [], (
        "wall-clock assertions in tests/ (move speed checks to bench/, wait on "
        "events, let pytest-timeout catch hangs):\n  " + "\n  ".join(offenders))


def test_the_check_flags_clock_comparisons_and_nothing_else():
    flagged = wall_clock_assertions("""\
import time
start = time.monotonic()
assert time.monotonic() - start < 5
elapsed = time.perf_counter() - start
assert elapsed < 2.9
deadline = time.monotonic() + 30
while not done():
    assert time.monotonic() < deadline, "timed out"
if time.time() - start > 1:
    pytest.fail("slow")
t0 = loop.time()
assert loop.time() - t0 <= 1
took = max(time.monotonic() - t0, 0)
assert took < 3
""")
    assert flagged == [3, 5, 8, 9, 12, 14]
    assert wall_clock_assertions("""\
import time
assert event.wait(30)
thread.join(WAIT)
assert handle.result(WAIT).success
event = {"ts": time.time()}
assert event["type"] == "started"
time.sleep(0.01)
assert runs == 3 and "timeout of 0.2 s" in message
""") == []
