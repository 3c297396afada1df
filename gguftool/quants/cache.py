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


def configure() -> None:
    """Point numba's cache at cache_dir(), unless NUMBA_CACHE_DIR is set or the folder is not writable."""
    import numba

    if os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR:  # type: ignore[attr-defined]
        return
    try:
        path = cache_dir()
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # RuntimeError: Path.home() without a home directory
        return
    if os.access(path, os.W_OK | os.X_OK):
        numba.config.CACHE_DIR = str(path)  # type: ignore[attr-defined]
