"""All-or-nothing output directories for the converter and `export_torch`.

`atomic_directory(out)` yields a temporary directory beside `out` and renames it to `out` when
the writer finished without error. One writer at a time (a lock file beside `out`); `out` is
checked again at the rename; nothing but an empty directory or a previous output is ever
replaced, and only with `force`. Temporary directories of killed writers are removed by the
next writer (docs/reliability.md, "Output directories").
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# What our writers put in an output directory: a conversion (converted.py: longmamba_config.json,
# params/, manifest.json) or an export (export.py: config.json and the weights).
_MARKERS = frozenset({"longmamba_config.json", "config.json"})
_OUTPUT_NAMES = _MARKERS | {"params", "manifest.json", "model.safetensors", "pytorch_model.bin"}


def _replaceable(path: Path) -> bool:
    """Whether --force may replace `path`: an empty directory, or one holding only what a
    conversion or an export writes (a file of the user's in it makes it not replaceable)."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}
    return not names or (names <= _OUTPUT_NAMES and bool(names & _MARKERS))


def check_output_dir(out, *, force: bool = False) -> None:
    """Raises FileExistsError unless `out` is free, or `force` and `out` may be replaced."""
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not force:
            raise FileExistsError(f"{out}: already exists (pass --force / force=True to replace "
                                  "it)")
        if not _replaceable(out):
            raise FileExistsError(
                f"{out}: exists and is not an empty directory or a previous conversion; refusing "
                "to replace it even with --force"
            )


def _temp_pattern(out: Path, kind: str) -> re.Pattern:
    """`.NAME.tmp-PID-XXXXXXXX` (mkdtemp's 8 random characters) or `.NAME.old-PID-XXXXXXXX`."""
    return re.compile(rf"\.{re.escape(out.name)}\.{kind}-(\d+)-[a-z0-9_]{{8}}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or not a pid we can ask about): keep its files
    return True


def _clean_stale(out: Path) -> None:
    """Removes what writers to `out` that died (SIGKILL, power loss) left beside it.

    Only our own names with the pid of a process that no longer runs on this machine: their
    temporary directories are removed; a previous output they had moved aside is moved back
    when `out` is missing (they died between the two renames of a --force commit), else
    removed (they died after committing, while deleting it). Called with the lock held.
    """
    tmp_re, old_re = _temp_pattern(out, "tmp"), _temp_pattern(out, "old")
    for path in sorted(out.parent.iterdir()):
        m = tmp_re.fullmatch(path.name) or old_re.fullmatch(path.name)
        if m is None or path.is_symlink() or not path.is_dir() or _alive(int(m.group(1))):
            continue
        if tmp_re.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
        elif not (out.exists() or out.is_symlink()):
            os.rename(path, out)
        elif _replaceable(path):
            shutil.rmtree(path, ignore_errors=True)


def lock_path(out) -> Path:
    """The lock file of an output directory: `.NAME.lock` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on `out`: flock on `.NAME.lock` beside it (released by the kernel if
    the holder dies, so a killed writer never leaves a stale lock)."""
    import fcntl

    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileExistsError(
                f"{out}: another conversion or export is writing it right now (it holds "
                f"{path}); wait for it to finish or choose another output directory"
            ) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: the next writer then locks a new file
        os.close(fd)


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Renames the finished `tmp` to `out`, checking `out` again now (it may have appeared or
    changed since the start): anything not replaceable is left untouched."""
    untouched = "it was left untouched and the new output was not written"
    if not (out.exists() or out.is_symlink()):
        try:
            os.rename(tmp, out)  # fails on a non-empty directory or a file put there meanwhile
        except OSError as exc:
            raise FileExistsError(f"{out}: appeared during the run ({exc.strerror}); "
                                  f"{untouched}") from None
        return
    if not force:
        raise FileExistsError(f"{out}: appeared during the run; {untouched} (pass --force to "
                              "replace a previous conversion)")
    if not _replaceable(out):
        raise FileExistsError(f"{out}: is no longer an empty directory or a previous conversion "
                              f"(it changed during the run); {untouched}")
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    if not _replaceable(old):  # changed between the check and the rename
        try:
            os.rename(old, out)
        except OSError:
            raise FileExistsError(f"{out}: changed during the run; it is now at {old}, and the "
                                  "new output was not written") from None
        raise FileExistsError(f"{out}: changed during the run; {untouched}")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out, *, force: bool = False,
                     on_commit: Callable[[], contextlib.AbstractContextManager] | None = None,
                     ) -> Iterator[Path]:
    """Yields a temporary directory beside `out`; on success it becomes `out`.

    One writer at a time: an exclusive lock beside `out` is held from the start to the end
    (a second writer gets FileExistsError at once). On any exception (including
    KeyboardInterrupt) the temporary directory is removed and `out` is left exactly as it was.
    An existing `out` is refused unless `force`, and then replaced only after the writer
    succeeded, and only if it still is an empty directory or a previous conversion / export
    (never an arbitrary directory or a file, nor one that changed meanwhile). Temporary
    directories of earlier writers to `out` that were killed are removed first.

    `on_commit`, if given, makes a context manager entered around the final renames (the
    converter defers a second signal there).

    Raises:
      FileExistsError: `out` exists and `force` is off, cannot be replaced safely, appeared or
        changed during the run, or another writer holds it.
    """
    out = Path(out).absolute()
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _output_lock(out):
            _clean_stale(out)
            check_output_dir(out, force=force)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-",
                                        dir=out.parent))
            try:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is not
                yield tmp
                with on_commit() if on_commit is not None else contextlib.nullcontext():
                    _commit(tmp, out, force)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException:
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
