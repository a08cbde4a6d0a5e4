"""Files: what may be read from a checkpoint directory, how an output directory is written, and
which weights are acceptable. One mechanism per concern, used wherever it arises:

- `checkpoint_file` / `check_tree`: a file a checkpoint directory holds or names is read only
  when it lies inside the directory (symlinks followed) and is a regular file (checked before
  anything opens it, so a FIFO never blocks a read); `read_checkpoint_file` reads one through
  a single descriptor checked again once open, so that what was checked is what is read;
- `atomic_output`: an output directory (a converted model, routers) is assembled beside its
  destination and moved into place at the end: never over an input, never over an existing
  destination without `force`, nothing partial left by an error, and what a killed run left
  behind is removed by the next;
- `check_finite` / `cast_checked`: weights are finite, and stay finite when narrowed.

A leaf module (stdlib, numpy and its ml_dtypes types; of the project only `polar_jax.errors`),
so that `convert`, `routers` and `models` may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import gc
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from polar_jax.errors import PolarJaxError

# ---------------------------------------------------------------------------------------------
# Reading: every file a checkpoint directory holds or names.

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _roots(src: Path) -> tuple[Path, ...]:
    """Where the files of `src` may lie: `src` itself (resolved) and, for a snapshot of the
    Hugging Face cache (`.../snapshots/REV`, whose files are links into `.../blobs`), that
    model's blob store."""
    real = src.resolve()
    blobs = real.parent.parent / "blobs"
    if real.parent.name == "snapshots" and blobs.is_dir():
        return real, blobs.resolve()
    return (real,)


def _inspect(src: Path, roots: tuple[Path, ...], path: Path, subject: str) -> tuple[Path, int]:
    """(real path, st_mode) of `path`, which must exist and lie inside `roots`; nothing is opened."""
    try:
        real = path.resolve(strict=True)
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise PolarJaxError(f"{subject} is missing") from None
    except (OSError, RuntimeError) as err:  # a symlink loop, no permission
        raise PolarJaxError(f"{subject} cannot be read: {err}") from None
    if not any(real == root or root in real.parents for root in roots):
        raise PolarJaxError(f"{subject} lies outside {src} (it resolves to {real})")
    return real, mode


def _not_regular(subject: str, mode: int) -> PolarJaxError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
    return PolarJaxError(f"{subject} is not a regular file ({kind})")


def checkpoint_file(src: Path, name: str, *, named_by: str | None = None,
                    optional: bool = False) -> Path | None:
    """The real path of the file `name` of the checkpoint directory `src`.

    Symlinks are followed; the file must lie inside `src` and be a regular file, checked with
    stat before anything opens it. `named_by` words the message when another file names this
    one (e.g. "SRC/model.safetensors.index.json names shard"). With `optional`, None when `src`
    has no entry `name`.
    """
    path = src / name
    if optional and not os.path.lexists(path):
        return None
    subject = f"{named_by} {name!r}, which" if named_by else str(path)
    real, mode = _inspect(src, _roots(src), path, subject)
    if not stat.S_ISREG(mode):
        raise _not_regular(subject, mode)
    return real


def read_checkpoint_file(src: Path, name: str, *, optional: bool = False) -> bytes | None:
    """The bytes of the file `name` of the checkpoint directory `src`, read through one
    descriptor: the path checked as `checkpoint_file` checks it, its real path opened without
    following a symlink (O_NOFOLLOW) nor blocking on a FIFO (O_NONBLOCK), and the open
    descriptor checked again (fstat: the regular file that was checked). A file swapped for a
    symlink or another file meanwhile is refused, never read. With `optional`, None when `src`
    has no entry `name`."""
    real = checkpoint_file(src, name, optional=optional)
    if real is None:
        return None
    swapped = f"{src / name} changed while it was being read (replaced"
    try:
        checked = os.stat(real)
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise PolarJaxError(f"{swapped}: {err.strerror}); run again") from None
    with os.fdopen(fd, "rb") as file:
        opened = os.fstat(file.fileno())
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (
                checked.st_dev, checked.st_ino):
            raise PolarJaxError(f"{swapped} by another file); run again")
        try:
            return file.read()
        except OSError as err:
            raise PolarJaxError(f"{src / name} cannot be read: {err.strerror}") from None


def input_file(path: str | os.PathLike, what: str) -> Path:
    """`path`, a file the user named (`what`: e.g. "text file"), after checking with stat,
    before anything opens it, that it exists and is a regular file (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise PolarJaxError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise PolarJaxError(f"{what} {path} cannot be read: {err}") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(f"{what} {path}", mode)
    return Path(path)


def output_file(name: str, value: str | os.PathLike) -> Path:
    """`value` as the path of a file to write (a benchmark's JSON or plot), checked before any
    work: its directory must exist and it must not be a directory (in the shape of the
    `polar_jax.validate` checks, for `validate.cli_type`)."""
    path = Path(value)
    if path.is_dir() or not path.absolute().parent.is_dir():
        raise PolarJaxError(f"{name} must name a file in an existing directory, got {str(value)!r}")
    return path


def check_tree(src: Path, name: str | None = None) -> Path:
    """The real path of the directory `src / name` (default `src`), after checking every entry
    below it as `checkpoint_file` checks a file (directories allowed): for readers that open
    files of their own choosing (orbax, a Hugging Face tokenizer)."""
    top = src / name if name else src
    roots = _roots(src)
    real_top, mode = _inspect(src, roots, top, str(top))
    if not stat.S_ISDIR(mode):
        raise PolarJaxError(f"{top} is not a directory")
    pending, seen = [real_top], set()
    while pending:
        directory = pending.pop()
        if directory in seen:
            continue
        seen.add(directory)
        try:
            entries = [Path(entry.path) for entry in os.scandir(directory)]
        except OSError as err:
            raise PolarJaxError(f"{directory} cannot be listed: {err}") from None
        for path in entries:
            real, mode = _inspect(src, roots, path, str(path))
            if stat.S_ISDIR(mode):
                pending.append(real)
            elif not stat.S_ISREG(mode):
                raise _not_regular(str(path), mode)
    return real_top


# ---------------------------------------------------------------------------------------------
# Writing: one output directory, assembled beside its destination and moved into place.

SCRATCH = ".scratch"


@dataclasses.dataclass(frozen=True)
class Staging:
    """Where an output is assembled: `path` becomes the destination; `scratch`, inside it, is
    working space (never /tmp) removed before the move."""

    path: Path
    scratch: Path


def check_destination(dst: str | os.PathLike, *, force: bool,
                      inputs: Mapping[str, str | os.PathLike | None]) -> Path:
    """The absolute path of the destination `dst` (its parent resolved), after refusing a `dst`
    that overlaps any of `inputs` ({role: path}: equal, an ancestor, or inside one; compared
    with and without following a symlink at `dst`) or that exists when not `force`."""
    name = Path(dst).name
    if name in ("", ".", ".."):
        raise PolarJaxError(f"the destination {dst} must end in a name (not '.', '..' or '/')")
    entry = Path(dst).parent.resolve() / name
    try:
        targets = dict.fromkeys((entry, entry.resolve()))
    except (OSError, RuntimeError):  # a symlink loop at dst
        targets = (entry,)
    for role, given in inputs.items():
        if given is None:
            continue
        source = Path(given).resolve()
        for target in targets:
            if target == source:
                raise PolarJaxError(f"the destination {dst} is {role} itself; choose another "
                                    "destination")
            if target in source.parents:
                raise PolarJaxError(f"the destination {dst} contains {role} ({given}): replacing "
                                    "it would destroy that; choose another destination")
            if source in target.parents:
                raise PolarJaxError(f"the destination {dst} lies inside {role} ({given}); "
                                    "choose a destination outside it")
    if os.path.lexists(entry) and not force:
        raise PolarJaxError(f"{dst} already exists; pass --force to replace it")
    return entry


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, force: bool,
                  inputs: Mapping[str, str | os.PathLike | None] | None = None) -> Iterator[Staging]:
    """Yields the `Staging` in which to assemble the directory that becomes `dst`.

    On entry, before the caller reads anything: `check_destination`, then the temporaries of
    dead processes beside `dst` are removed. The staging directory is a sibling named
    `.{dst.name}.tmp-{pid}-{random}`. On success its scratch is removed and it is moved to
    `dst` atomically: refused if a `dst` appeared meanwhile, unless `force`, which swaps it in
    and then removes the old one. On any failure the staging directory (and any parent
    directory made for it) is removed and `dst` stays as it was; an OSError becomes a
    PolarJaxError naming `dst`.
    """
    entry = check_destination(dst, force=force, inputs=inputs or {})
    made = _make_parents(dst, entry.parent)
    tmp = _sibling(entry, "tmp")
    try:
        _remove_debris(entry)
        tmp.mkdir()
        staging = Staging(tmp, tmp / SCRATCH)
        staging.scratch.mkdir()
        yield staging
        _remove(staging.scratch)
        _publish(tmp, entry, dst, force)
    except BaseException as err:
        _remove(tmp, missing_ok=True)
        for directory in made:  # innermost first; one another process has filled stays
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(err, OSError):
            raise PolarJaxError(f"{dst} was not written: {err}") from None
        raise


def _sibling(entry: Path, kind: str) -> Path:
    return entry.parent / f".{entry.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _make_parents(dst, parent: Path) -> list[Path]:
    """Creates the missing directories above the destination; returns them innermost first."""
    missing = []
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    try:
        for directory in reversed(missing):
            directory.mkdir(exist_ok=True)
    except OSError as err:
        raise PolarJaxError(f"cannot create the directory for {dst}: {err}") from None
    return missing


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_debris(entry: Path) -> None:
    """Removes the `.tmp-`/`.old-` siblings of `entry` whose owning process has died."""
    pattern = re.compile(rf"\.{re.escape(entry.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]+")
    for path in entry.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not _alive(int(match[1])):
            _remove(path, missing_ok=True)


def _remove(path: Path, missing_ok: bool = False) -> None:
    """Removes a directory tree, or a file or symlink (never what a symlink points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=missing_ok)
    elif not missing_ok or os.path.lexists(path):
        path.unlink(missing_ok=missing_ok)


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _libc_renameat2():
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return func


_renameat2 = _libc_renameat2()


def _rename(src: Path, dst: Path, flags: int) -> None:
    """renameat2(src, dst, flags): RENAME_NOREPLACE raises FileExistsError when `dst` exists;
    RENAME_EXCHANGE swaps the two entries. Where the kernel, libc or filesystem lacks them, the
    same effect by plain renames (not atomic: another process may slip in between)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    if flags == _RENAME_NOREPLACE:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        try:
            os.rename(src, dst)
        except OSError as err:  # a directory that appeared meanwhile (a file: NotADirectoryError)
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
            raise
        return
    old = _sibling(dst, "old")
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    os.rename(old, src)


def _publish(tmp: Path, entry: Path, dst, force: bool) -> None:
    """Moves `tmp` to `entry`; an existing `entry` is swapped out (with `force`) and removed."""
    while True:
        try:
            _rename(tmp, entry, _RENAME_NOREPLACE)
            return
        except FileExistsError:
            if not force:
                raise PolarJaxError(f"{dst} already exists; pass --force to replace it") from None
        try:
            _rename(tmp, entry, _RENAME_EXCHANGE)
            break
        except FileNotFoundError:  # removed since: try again without replacing
            continue
    _remove(tmp, missing_ok=True)  # the old destination, now at the staging path (what a
    # failure here leaves is the debris of this process, removed by a later run)


# ---------------------------------------------------------------------------------------------
# Arrays saved with orbax (converted models, routers).


def _shapes(tree: Mapping, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{"a/b/c": shape} of the leaves (anything with a `.shape`) of a nested mapping."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_shapes(value, name + "/"))
        else:
            out[name] = tuple(value.shape)
    return out


def save_arrays(directory: Path, tree: Mapping) -> None:
    """Writes the nested mapping of arrays `tree` as the orbax checkpoint `directory` (inside an
    `atomic_output` staging directory: it is published whole or not at all). A failed write (a
    full disk) raises an OSError with its errno, without orbax's tracebacks."""
    import orbax.checkpoint as ocp

    # orbax logs a traceback per failed writer thread (absl), and each write that fails after
    # the first is a future whose exception nobody retrieves (asyncio)
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    if getattr(sys.unraisablehook, "func", None) is not _unless_closed_loop:  # stays installed:
        # a write that outlasts the wait below ends after the save returns
        sys.unraisablehook = functools.partial(_unless_closed_loop, sys.unraisablehook)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(directory.absolute(), tree)
            checkpointer.wait_until_finished()
    except Exception as err:  # tensorstore's errors carry the errno: [os_error_code='28']
        _wait_until_unchanged(directory.parent)
        gc.collect()  # the failed writes' futures, reported while the loggers are quiet
        code = re.search(r"os_error_code='(\d+)'", str(err))
        if code:  # as an OSError: `atomic_output` names the destination
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(directory)) from None
        raise PolarJaxError(f"cannot write {directory}: {' '.join(str(err).split())[:300]}"
                            ) from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _wait_until_unchanged(directory: Path, quiet_s: float = 1.0, limit_s: float = 60.0) -> None:
    """Returns once nothing below `directory` has changed for `quiet_s` seconds (or after
    `limit_s`). A failed orbax save returns while tensorstore's writes already under way still
    run, and each creates the directories it needs: removing the staging directory before they
    end left part of it behind (4 of 64 failed conversions on a loaded 2-core machine)."""
    start = last_change = time.monotonic()
    seen = _tree_state(directory)
    while (now := time.monotonic()) - last_change < quiet_s and now - start < limit_s:
        time.sleep(min(quiet_s / 10, start + limit_s - now))
        state = _tree_state(directory)
        if state != seen:
            seen, last_change = state, time.monotonic()


def _tree_state(directory: Path) -> set[tuple[str, int, int]]:
    """{(path, size, mtime in ns)} of everything below `directory` (what vanishes meanwhile is
    left out)."""
    state = set()
    for parent, names, files in os.walk(directory):
        for name in names + files:
            path = os.path.join(parent, name)
            with contextlib.suppress(OSError):
                info = os.lstat(path)
                state.add((path, info.st_size, info.st_mtime_ns))
    return state


def _unless_closed_loop(hook, unraisable) -> None:
    """`hook(unraisable)`, except for the "Event loop is closed" of tensorstore's writes still
    finishing after a failed orbax save closed its loop (a traceback each, on stderr)."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        hook(unraisable)


def restore_arrays(src: Path, name: str, target: Mapping) -> dict:
    """The orbax checkpoint `src / name` restored as `target` (a nested mapping of
    `jax.ShapeDtypeStruct`s). Every file below it is checked first (`check_tree`), then the
    stored names and shapes against `target`'s: orbax silently reads a smaller array out of a
    larger stored one, and returns a larger one at its stored size. Any failure is one line."""
    import orbax.checkpoint as ocp

    directory = check_tree(src, name)
    expected = _shapes(target)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(directory)
            stored = getattr(getattr(stored, "item_metadata", stored), "tree", stored)  # orbax >= 0.11
            if not isinstance(stored, Mapping):
                raise ValueError("no array metadata: the checkpoint is incomplete")
            shapes = _shapes(stored)
            if shapes == expected:
                return checkpointer.restore(directory, target)
    except Exception as err:
        reason = " ".join(str(err).split())  # orbax's messages span lines
        raise PolarJaxError(f"cannot read the arrays in {src / name}: {reason}") from None
    differ = sorted(set(shapes.items()) ^ set(expected.items()))[0][0]
    raise PolarJaxError(
        f"the arrays in {src / name} do not match the shapes {src} describes: {differ!r} is stored "
        f"as {shapes.get(differ, 'absent')} but expected {expected.get(differ, 'absent')}")


# ---------------------------------------------------------------------------------------------
# Weights: finite, and finite after narrowing.


def first_non_finite(array: np.ndarray) -> tuple[tuple[int, ...], str] | None:
    """(index, "NaN" | "Inf" | "-Inf") of the first non-finite element of `array`, or None."""
    finite = np.isfinite(array)
    if finite.all():
        return None
    index = tuple(int(i) for i in np.unravel_index(np.argmin(finite), array.shape))
    value = float(array[index])
    return index, "NaN" if np.isnan(value) else ("Inf" if value > 0 else "-Inf")


def check_finite(name: str, array: np.ndarray, hint: str = "weights must be finite") -> None:
    """Raises, naming `name` (e.g. "tensor 'lm_head.weight'"), the first non-finite element's
    index and kind, and `hint`."""
    bad = first_non_finite(array)
    if bad is not None:
        raise PolarJaxError(f"{name} holds {bad[1]} at index {bad[0]}; {hint}")


def cast_checked(name: str, array: np.ndarray, dtype) -> np.ndarray:
    """`array` (which must be finite) as `dtype`, refusing a value beyond `dtype`'s range
    (which the cast would turn into Inf), named with its index, the dtype and its largest
    value. No copy when `array` already has `dtype`."""
    check_finite(name, array)
    target = np.dtype(dtype)
    with np.errstate(over="ignore"):
        out = array.astype(target, copy=False)
    if not np.can_cast(array.dtype, target, "safe"):
        bad = first_non_finite(out)
        if bad is not None:
            index = bad[0]
            raise PolarJaxError(
                f"{name} holds {float(array[index]):g} at index {index}, beyond the range of "
                f"{target.name} (largest {float(ml_dtypes.finfo(target).max):g}); choose a wider "
                "dtype")
    return out
