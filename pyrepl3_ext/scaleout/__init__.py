"""Sessions on other machines behind the same protocol (``pyrepl3 serve --placement ray``).

``gateway.py`` is the protocol endpoint clients connect to: it places each
new session on a node through a *placement* and forwards every request of
that session to the node's own ``pyrepl3 serve`` (``server.py``, unchanged),
whose sessions are process sessions (``engine/``).  ``ray_placement.py`` is
the placement on a Ray cluster, the only module that imports Ray.
``docs/scale-out.md`` has the design and what it guarantees.

Import direction: this is the service layer; it builds on ``server.py`` and
``protocol.py`` and nothing below imports it.
"""
