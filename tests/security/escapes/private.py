"""Private state of host objects: each payload's only step is reaching a ``_name``.

The prize is the host's event loop (it starts processes); every route below
reaches it through a private attribute, and nothing else in the payload is
refused on its own.
"""

_RUN = ("t, _ = await loop.subprocess_shell(asyncio.SubprocessProtocol, @C@)\n"
        "while t.get_returncode() is None:\n    await asyncio.sleep(0.02)")

PAYLOADS = [
    ("private_attribute", "private_state", "run_command",
     "import asyncio\nloop = asyncio.gather()._loop\n" + _RUN),
    ("private_getattr", "private_state", "run_command",
     "import asyncio\nloop = getattr(asyncio.gather(), '_lo' + 'op')\n" + _RUN),
    ("private_foreign_self", "private_state", "run_command",
     "import asyncio\nclass A:\n    def m(self):\n        return self._loop\n"
     "loop = A.m(asyncio.gather())\n" + _RUN),
    # a sync cell: whether IPython runs a cell whose await follows a walrus in
    # an annotation on its loop varies, and the payload must not
    ("private_in_annotation", "private_state", "run_command",
     "import asyncio\ndef f(x: (loop := asyncio.gather()._loop)):\n    pass\n"
     "t, _ = loop.run_until_complete(loop.subprocess_shell(asyncio.SubprocessProtocol, @C@))\n"
     "while t.get_returncode() is None:\n    loop.run_until_complete(asyncio.sleep(0.02))"),
    ("private_method_of_host_base", "private_state", "run_command",
     "import asyncio\nclass Q(asyncio.Queue):\n    def steal(self):\n"
     "        return self._get_loop()\nloop = Q().steal()\n" + _RUN),
]
