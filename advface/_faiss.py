"""faiss, imported quietly: the one place advface imports it (``from advface._faiss import faiss``).

faiss's loader logs a dozen INFO lines on import ("Loading faiss with AVX512 support.", ``ModuleNotFoundError(...)``
for every instruction set it tries), which land on stderr as soon as any logging is configured (``advface`` sets up
INFO logging before running a command) and break the sidecar's JSON-lines log. The ``faiss.loader`` logger is set
to WARNING before the import, unless a level was already chosen for it (set it to INFO or DEBUG to see the chatter).
"""

from __future__ import annotations

import logging

_loader = logging.getLogger("faiss.loader")
if _loader.level == logging.NOTSET:
    _loader.setLevel(logging.WARNING)

import faiss  # noqa: E402 - after the logger is quiet

__all__ = ["faiss"]
