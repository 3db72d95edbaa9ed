"""Class 5: cell code that runs after the cell, outside its audit scope.

The audit scope used to follow time (while the cell runs).  Each payload
leaves code behind that the host runs later: here, right after the cell,
when the host turns ``pwned`` into text or checks the marker file.  Under
``guarded`` (free imports, commands refused by the audit hook).
"""

PAYLOADS = [
    # a __str__ in a type() dict: the host's str(pwned) runs it
    ("later_str_type_dict", "code_after_the_cell", "run_command",
     "import os\npwned = type('P', (), {'__str__': lambda s: str(os.system(@C@)),\n"
     "                        '__repr__': lambda s: str(os.system(@C@))})()"),
    # a profile function: every host call after the cell runs it
    ("later_setprofile", "code_after_the_cell", "run_command",
     "import sys, os\nran = []\n"
     "def prof(frame, event, arg):\n"
     "    if not ran and event == 'call':\n"
     "        try:\n            ran.append(os.system(@C@))\n"
     "        except Exception:\n            pass  # refused in the cell: try again later\n"
     "sys.setprofile(prof)"),
    # a host function's code replaced by the cell's (update_wrapper's setattr):
    # the host's os.path.exists runs the cell's code, with the host's globals
    # (``os`` there is genericpath's); aims at the in-process corpus runner,
    # which checks the marker with os.path.exists
    ("later_code_swap", "code_after_the_cell", "run_command",
     "import functools, genericpath\n"
     "def evil(path):\n    return os.system(@C@) == 0 or True\n"
     "functools.update_wrapper(genericpath.exists, evil, assigned=('__code__',), updated=())",
     (3, 0), {"aims_at": "host"}),
    # a generator's finally, run when the host drops the last reference
    ("later_generator_finally", "code_after_the_cell", "run_command",
     "import os\n"
     "def g():\n    try:\n        yield 1\n    finally:\n        os.system(@C@)\n"
     "it = g()\nnext(it)\n"
     "pwned = type('P', (), dict.fromkeys(('__str__', '__repr__'),\n"
     "                                   lambda s: (it.close(), '')[1]))()"),
]
