"""Opacus without its logging set-up: importing Opacus must not change how a fedsafe process logs.

Opacus 1.6 calls `logging.basicConfig` when `opacus.utils.module_utils` is imported (by `import opacus`
and most of its submodules), which gives the root logger a handler. Flower's logger has its own handler
and passes its records on to the root, so from then on every Flower line of a ClientApp or ServerApp
printed twice on the node's or the coordinator's console (once as Flower formats it, once as
`date:INFO:text`), and fedsafe's warnings changed format. fedsafe imports Opacus lazily in many places
(the node's training, its accountant, the coordinator's model check), so the guard sits on that one
module's import, wherever it happens first: it runs as usual, then the root logger's handlers are put
back as they were. Installed when `fedsafe` is imported (fedsafe/__init__.py); costs nothing until
Opacus is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

OPACUS_LOGGING_MODULE = "opacus.utils.module_utils"  # the module whose import calls logging.basicConfig


class _KeepRootHandlers(importlib.abc.Loader):
    """Runs the module with its own loader, then restores the root logger's handlers."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        handlers = list(logging.root.handlers)
        try:
            self.loader.exec_module(module)
        finally:
            logging.root.handlers[:] = handlers


class _OpacusLoggingGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != OPACUS_LOGGING_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _KeepRootHandlers(spec.loader)
        return spec


def install() -> None:
    """Guard the next import of Opacus' logging set-up in this process (once; idempotent)."""
    # by name: a ClientApp that re-imports fedsafe from its app package gets a second copy of this module
    if not any(type(finder).__name__ == _OpacusLoggingGuard.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, _OpacusLoggingGuard())
