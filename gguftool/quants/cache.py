"""Where numba keeps the compiled kernels: a folder keyed by a hash of the quants/ sources.

numba's on-disk cache (``cache=True``) keys a function on its own source file's path and modification time.
A kernel inlines helpers from other modules (bits.py, legacy.py, the searches), so after a change to a helper
alone numba would load the kernel's old machine code. Keying the whole cache folder by the contents of every
module in this package removes that trap: any change to a quants/ source selects a fresh folder.

The folder is ``<user cache>/gguftool/numba/<hash>`` (``$XDG_CACHE_HOME`` or ``~/.cache``; ``%LOCALAPPDATA%``
on Windows), so an installed gguftool in a read-only site-packages caches there too. numba writes every cache
file through a temporary name and an atomic rename, so processes starting at once share the folder safely.
A ``NUMBA_CACHE_DIR`` set by the user wins; when the folder cannot be created or written, numba's own default
applies (beside the sources, or its user-wide folder).

``configure()`` must run before the first ``@njit(cache=True)`` function of the package is defined: numba
picks the cache location when it decorates. gguftool/quants/__init__.py calls it first thing.

Warm start. Before loading any cached function numba refreshes its whole CPU target context, which imports
and registers every implementation numba has (numpy, unicode, typed containers, random ...): about a second,
the largest share of a short ``gguftool quantize``. Machine code loaded from the cache needs none of that:
it needs the NRT (whose symbols and atomics ``rtsys.initialize`` provides), numba's C helpers and math
symbols (installed when the context is created) and the threading layer (started by the cached function's
own reload hooks). So for gguftool's own kernels the loader initialises the NRT only; a function that
misses the cache is compiled by numba's compiler, which refreshes the full context itself. Kernels that
hash strings (the one other import-time symbol registration, numba.cpython.hashing) would need the full
refresh; quants/ has none. Applied for the numba versions this was checked on (_LIGHT_LOAD_VERSIONS).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def sources_digest(package: Path = _PACKAGE) -> str:
    """A short hash of the names and contents of every module of the package (gguftool/quants)."""
    h = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _user_cache_root() -> Path:
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"


def cache_dir() -> Path:
    """The folder this version of the kernels caches in (not created here)."""
    return _user_cache_root() / "gguftool" / "numba" / sources_digest()


# numba releases whose Cache.load_overload / _load_overload / _guard_against_spurious_io_errors were read and
# the light load checked against (tests/test_quants_cache.py runs a kernel loaded this way)
_LIGHT_LOAD_VERSIONS = ("0.60.", "0.61.", "0.62.", "0.63.", "0.64.", "0.65.", "0.66.", "0.67.", "0.68.")
_PACKAGE_PREFIX = __name__.rsplit(".", 2)[0] + "."  # "gguftool."
_light_installed = False


def _install_light_load() -> bool:
    """Make numba's cache loader skip the full context refresh for gguftool's kernels (see the docstring)."""
    import numba
    from numba.core import caching
    from numba.core.runtime import rtsys

    if not numba.__version__.startswith(_LIGHT_LOAD_VERSIONS):
        return False
    global _light_installed
    if _light_installed:
        return True
    full_load = caching.Cache.load_overload

    def load_overload(self, sig, target_context):
        if not self._py_func.__module__.startswith(_PACKAGE_PREFIX):
            return full_load(self, sig, target_context)
        rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        return None  # the guard swallowed an I/O error: numba compiles instead

    caching.Cache.load_overload = load_overload  # type: ignore[method-assign]
    _light_installed = True
    return True


def configure() -> None:
    """Point numba's cache at cache_dir(), unless NUMBA_CACHE_DIR is set or the folder is not writable;
    load gguftool's cached kernels without numba's full context refresh."""
    import numba

    _install_light_load()

    if os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR:  # type: ignore[attr-defined]
        return
    try:
        path = cache_dir()
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # RuntimeError: Path.home() without a home directory
        return
    if os.access(path, os.W_OK | os.X_OK):
        numba.config.CACHE_DIR = str(path)  # type: ignore[attr-defined]
