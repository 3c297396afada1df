"""Output files: checked before the work starts, invisible while being written, in place only when complete.

Checks (:func:`check_outputs`), run by every command before it computes anything: the output's folder exists and
is writable, the output is not a directory, an existing output is replaced only with ``overwrite`` (--force), and
an output is never -- even with ``overwrite`` -- a file the command reads (same device and inode: the same path,
a ``..`` path, a symlink or a hard link to it).

Writing (:class:`OutputFile`): on Linux the file is created with ``O_TMPFILE`` in the target's folder. It has no
name until :meth:`OutputFile.commit` links it into place (``linkat`` of ``/proc/self/fd/N``), so whatever ends
the process -- SIGKILL, the OOM killer, SIGBUS from an input truncated underneath -- the kernel frees it and
nothing is left behind. Where ``O_TMPFILE`` is missing or the filesystem refuses it, the file is a named temporary
``.NAME.XXXXXXXXXXXX.tmp`` beside the target, created with ``O_EXCL`` (so it never is, or replaces, a user's
file) and removed by :meth:`OutputFile.abort`; the command line turns SIGTERM and SIGHUP into KeyboardInterrupt
so that this cleanup runs for them as for Ctrl-C.

:func:`commit_all` makes several files (the parts of a split output) visible together: every part is
complete before the first is linked, and a failure while linking removes the parts already linked.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import BinaryIO, Sequence

from .errors import OutputError

__all__ = ["check_outputs", "OutputFile", "commit_all"]

# Set (to anything) only by tests: behave as on a filesystem that refuses O_TMPFILE.
NO_TMPFILE_ENV = "GGUFTOOL_TEST_NO_O_TMPFILE"

# errors with which open(O_TMPFILE) says "not here" (old kernel: EISDIR; filesystem without support:
# EOPNOTSUPP; EINVAL from some FUSE and network filesystems)
_TMPFILE_REFUSED = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}
# errors with which link() says the filesystem has no hard links
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


# --- checks


def _how_same(out: str, inp: str) -> str:
    if os.path.islink(out):
        return "a symlink to it"
    if os.path.realpath(out) == os.path.realpath(inp):
        same = os.path.join(os.getcwd(), out) == os.path.join(os.getcwd(), inp)   # (join keeps any '..')
        return "same path" if same else "same file by another path"
    return "a hard link to it"


def check_outputs(outputs: Sequence["str | os.PathLike[str]"], inputs: Sequence["str | os.PathLike[str]"] = (),
                  *, overwrite: bool = False) -> None:
    """Raise OutputError unless every path in ``outputs`` may be written: see the module docstring."""
    ids: dict[tuple[int, int], str] = {}
    for p in inputs:
        p = os.fspath(p)
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            continue            # a file that is not there is not read
        if stat.S_ISREG(st.st_mode):
            ids.setdefault((st.st_dev, st.st_ino), p)
    for out in outputs:
        _check_output(os.fspath(out), ids, overwrite)


def _check_output(out: str, inputs: dict[tuple[int, int], str], overwrite: bool) -> None:
    if os.path.basename(out) in ("", ".", ".."):
        raise OutputError(f"{out}: output path is not a file name")
    try:
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{out}: cannot use as output ({e.strerror})") from None
    if st is not None:
        inp = inputs.get((st.st_dev, st.st_ino))
        if inp is not None:
            raise OutputError(f"{out} is the input file {inp} ({_how_same(out, inp)}); inputs are never "
                              f"overwritten")
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{out}: output path is a directory")
    if os.path.lexists(out) and not overwrite:
        raise OutputError(f"{out}: output file already exists (use --force to overwrite it)")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise OutputError(f"{out}: output directory {folder} does not exist")
    try:   # a real file made and dropped at once: os.access says yes to root even on a read-only filesystem
        OutputFile(out, overwrite=True).abort()
    except OSError as e:
        raise OutputError(f"{out}: cannot write to the output directory {folder} ({e.strerror})") from None


# --- writing


class OutputFile:
    """One output file being written; nobody sees it under ``path`` until :meth:`commit`.

    Use as a context manager (leaving it without commit() removes the file), write through :meth:`stream` or
    :meth:`fileno`, then commit(). ``overwrite``: commit() may replace an existing file at ``path``; without it an
    existing file (even one created since the checks) makes commit() fail and stays as it was.

    ``named``: always a named temporary (never O_TMPFILE), so that other processes -- other machines, on shared
    storage -- can open it by :attr:`temp_path` and write into it (gguftool.distributed). A SIGKILL of this
    process then leaves that temporary behind (its name says what it is)."""

    def __init__(self, path: "str | os.PathLike[str]", *, overwrite: bool = False, named: bool = False):
        self.path = os.fspath(path)
        self.overwrite = overwrite
        self._name = os.path.basename(self.path)
        if self._name in ("", ".", ".."):
            raise OutputError(f"{self.path}: output path is not a file name")
        folder = os.path.dirname(os.path.abspath(self.path))
        self._dir: int | None = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        self._fd: int | None = None
        self._tmp: str | None = None        # a temporary name of the file in the folder, removed by abort()
        try:
            self._fd = None if named else self._open_unnamed()
            self._unnamed = self._fd is not None
            if self._fd is None:
                self._open_named()
        except BaseException:
            self.abort()
            raise

    def _open_unnamed(self) -> int | None:
        flag = getattr(os, "O_TMPFILE", None)
        if flag is None or os.environ.get(NO_TMPFILE_ENV) or not os.path.isdir("/proc/self/fd"):
            return None
        try:
            return os.open(".", flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666, dir_fd=self._dir)
        except OSError as e:
            if e.errno in _TMPFILE_REFUSED:
                return None
            raise

    def _open_named(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        while True:
            tmp = self._temp_name()
            try:
                self._fd = os.open(tmp, flags, 0o666, dir_fd=self._dir)
                self._tmp = tmp
                return
            except FileExistsError:
                continue
            except BaseException:
                # an interrupt just after the file was made: with O_EXCL a file of that name is ours
                self._tmp = None
                self._unlink_quietly(tmp)
                raise

    def _unlink_quietly(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._dir)
        except FileNotFoundError:
            pass

    def _temp_name(self) -> str:
        return f".{self._name}.{secrets.token_hex(6)}.tmp"

    # --- writing
    @property
    def temp_path(self) -> str | None:
        """The path of the unfinished file while it has a temporary name (None for an unnamed file)."""
        if self._tmp is None:
            return None
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), self._tmp)

    def fileno(self) -> int:
        if self._fd is None:
            raise OutputError(f"{self.path}: output file already committed or aborted")
        return self._fd

    def stream(self, buffering: int = -1) -> BinaryIO:
        """A buffered binary file object writing to this file; closing it flushes but keeps the file open
        (close it before commit())."""
        return os.fdopen(self.fileno(), "wb", buffering=buffering, closefd=False)

    # --- completion
    def commit(self) -> None:
        """Put the complete file in place under ``path``."""
        commit_all([self])

    def abort(self) -> None:
        """Forget the file: the target stays as it was. Safe to call more than once."""
        tmp, self._tmp = self._tmp, None
        if tmp is not None and self._dir is not None:
            self._unlink_quietly(tmp)
        self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        d, self._dir = self._dir, None
        for x in (fd, d):
            if x is not None:
                os.close(x)

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            self.abort()

    # --- the two steps of commit_all
    def _is_ours(self, name: str) -> bool:
        """``name`` in the folder is this very file."""
        try:
            a, b = os.stat(name, dir_fd=self._dir, follow_symlinks=False), os.fstat(self._fd)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _link(self, name: str) -> None:
        """Give the file the name ``name`` in its folder (FileExistsError when taken); a named file loses its
        temporary name."""
        if self._unnamed:
            os.link(f"/proc/self/fd/{self._fd}", name, dst_dir_fd=self._dir, follow_symlinks=True)
            return
        try:
            os.link(self._tmp, name, src_dir_fd=self._dir, dst_dir_fd=self._dir, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
            # no hard links here: a rename, after a check that the name is free (racy, but the only way)
            try:
                os.stat(name, dir_fd=self._dir, follow_symlinks=False)
            except FileNotFoundError:
                os.rename(self._tmp, name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
                self._tmp = None
                return
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), self.path) from None
        self._drop_temp_name()

    def _drop_temp_name(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            self._unlink_quietly(tmp)

    def _place(self) -> "str | None":
        """Step 1: the file under its own name if that is free, else (overwrite) under a fresh temporary name,
        returned for step 2."""
        try:
            self._link(self._name)
            return None
        except FileExistsError:
            if not self.overwrite:
                raise OutputError(f"{self.path}: output file already exists (use --force to overwrite it)") from None
        if not self._unnamed:
            return self._tmp
        while True:
            tmp = self._temp_name()
            try:
                self._link(tmp)
                self._tmp = tmp
                return tmp
            except FileExistsError:
                continue
            except BaseException:
                if self._is_ours(tmp):      # linked just before an interrupt
                    self._unlink_quietly(tmp)
                raise

    def _unplace(self) -> None:
        """Undo step 1 (a temporary name is left to abort())."""
        if self._is_ours(self._name):
            os.unlink(self._name, dir_fd=self._dir)


def commit_all(files: Sequence[OutputFile]) -> None:
    """Put every file in place, or (on an error in the linking step) none: the files already linked are removed
    again and the error is raised. Replacing existing targets (``overwrite``) is the last step and always runs
    to the end once started; an interrupt arriving during it is raised afterwards. The files are closed when this
    returns, and removed by their abort() when it raises."""
    placed: list[tuple[OutputFile, "str | None"]] = []
    started: list[OutputFile] = []
    try:
        for f in files:
            f.fileno()
            started.append(f)
            placed.append((f, f._place()))
    except BaseException:
        for g in started:       # (the last one may have been interrupted inside _place)
            try:
                g._unplace()
            except OSError:
                pass
        raise
    # step 2: rename the temporary names over the existing targets
    error: BaseException | None = None
    todo = [(f, tmp) for f, tmp in placed if tmp is not None]
    while todo:
        f, tmp = todo[0]
        try:
            try:
                os.stat(tmp, dir_fd=f._dir, follow_symlinks=False)
            except FileNotFoundError:
                pass            # renamed already (an interrupt came just after os.replace returned)
            else:
                os.replace(tmp, f._name, src_dir_fd=f._dir, dst_dir_fd=f._dir)
            if f._tmp == tmp:
                f._tmp = None
            todo.pop(0)
        except BaseException as e:
            if error is None:
                error = e
            if not isinstance(e, KeyboardInterrupt):
                todo.pop(0)     # this one cannot be replaced: its temporary name goes with its abort()
    for f, _ in placed:
        if error is None or f._tmp is None:
            f._close()
    if error is not None:
        raise error
