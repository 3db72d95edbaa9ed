"""Why the capability-aware user_ns is not a dict subclass: what a non-exact
globals dict costs.

Run: ``python bench/bench_ns_subclass.py``.  Each cell runs with ``exec(code,
ns, ns)`` (how IPython runs cells) where ``ns`` is an exact dict, a dict
subclass without Python methods (the best a C-level check could do: CPython
specialises LOAD_GLOBAL / module-level names only on exact dicts), and a
subclass whose ``__setitem__``/``__delitem__`` refuse protected names in
Python.  Ratios to the exact dict, best of 7 interleaved rounds.
"""
import timeit, builtins, sys
class ProtectedNamespace(dict):
    __slots__ = ("protected",)
    def __setitem__(self, k, v):
        if k in self.protected: raise KeyError(k)
        dict.__setitem__(self, k, v)
    def __delitem__(self, k):
        if k in self.protected: raise KeyError(k)
        dict.__delitem__(self, k)
class Plain(dict):  # subclass, no Python methods: the check would be in C
    __slots__ = ()
SETUP = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nimport math\n"
CELLS = {"loop arithmetic": "total = 0\nfor i in range(100_000):\n    total += i * i",
         "fib(20)": "r = fib(20)",
         "module attrs": "s = 0.0\nfor i in range(50_000):\n    s += math.sqrt(i)"}
def make(kind):
    if kind == "dict": ns = {}
    elif kind == "subclass (C methods)": ns = Plain()
    else:
        ns = ProtectedNamespace(); ns.protected = frozenset({"files"})
    ns["__builtins__"] = builtins
    exec(SETUP, ns, ns)
    return ns
kinds = ["dict", "subclass (C methods)", "subclass + Python __setitem__"]
print(sys.version.split()[0])
for cell, src in CELLS.items():
    code = compile(src, "<cell>", "exec")
    best = {}
    for r in range(7):
        for k in kinds:
            ns = make(k); exec(code, ns, ns)
            t = min(timeit.repeat(lambda: exec(code, ns, ns), number=3, repeat=3)) / 3
            best[k] = min(best.get(k, 1e9), t)
    print(f"{cell:16}" + "".join(f"  {k}: {best[k]/best['dict']:.2f}" for k in kinds))
