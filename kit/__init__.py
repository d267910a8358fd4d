"""The balloond real-guest kit: QEMU >= 10.2, a Linux guest with free page reporting, and tools
to boot it and measure how much of its memory the host really holds.

Build it with ``python3 -m kit build``; see ``docs/kit.md``.
"""

from kit.build import build, ready, status
from kit.layout import Kit, KitError, default_directory

__all__ = ["Kit", "KitError", "build", "default_directory", "ready", "status"]
