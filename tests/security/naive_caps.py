"""A *naive* files capability, used only by the escape corpus's positive controls.

It is what a host writes without pyrepl3: state in ``_root``, a realpath
containment check, methods whose globals import ``os``.  The capability
tampering payloads prove they work against it; under the ``restricted``
policy the session gets pyrepl3's real ``FilesCapability`` instead.
"""

import os


class NaiveFiles:
    def __init__(self, root):
        self._root = os.path.realpath(root)

    def _within(self, path):
        full = os.path.realpath(os.path.join(self._root, path))
        if not full.startswith(self._root + os.sep):
            raise PermissionError(f"{path!r} is outside the root")
        return full

    def read(self, path):
        with open(self._within(path)) as f:
            return f.read()

    def write(self, path, data):
        with open(self._within(path), "w") as f:
            return f.write(data)

    def list(self, path="."):
        return sorted(os.listdir(self._within(path) if path != "." else self._root))
