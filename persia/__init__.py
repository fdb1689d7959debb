"""PERSIA's public Python API, built on ctrserve.

PERSIA users' programs, configs, launcher commands and clients run unchanged: the module and
class names, signatures and defaults are PERSIA's (PersiaML/PERSIA), the implementation is
ctrserve's (``trainer``, ``embedding_server``, ``handler``). README.md, "Coming from PERSIA",
maps every PERSIA concept to its ctrserve counterpart.
"""

from __future__ import annotations

__version__ = "0.1.0"
