"""fedsafe: federated, privacy-preserving deep learning on Flower, PyTorch and Opacus.

The product's roles are folders at the repository root (client/, server/, models/, strategies/,
simulations/); an install maps them to fedsafe.client, fedsafe.server, … (pyproject's package-dir), so
nothing but `fedsafe` lands in site-packages. Where this package is imported from a source tree instead
(a checkout on sys.path, or an app package that Flower unpacked), the same folders are found beside it.
"""

from pathlib import Path as _Path

_source_root = _Path(__file__).resolve().parent.parent
if (_source_root / "pyproject.toml").is_file() and (_source_root / "client" / "__init__.py").is_file():
    __path__.append(str(_source_root))  # noqa: F821 - a package's __path__
del _Path, _source_root

# Importing Opacus, wherever fedsafe first does, leaves this process' logging as it was (no line twice).
from .opacus_logging import install as _install_opacus_logging_guard  # noqa: E402

_install_opacus_logging_guard()


# The public library API (fedsafe/api.py), loaded on first use so `import fedsafe` (the CLI) stays light.
_PUBLIC = ("simulate", "SimulationResult", "PrivateTrainer", "NodePolicy", "DataSpec")


def __getattr__(name):
    if name in _PUBLIC:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedsafe' has no attribute {name!r}")
