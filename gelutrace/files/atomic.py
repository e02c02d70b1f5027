"""
Writing without ever leaving a torn file: atomic writes (a temporary file beside the target, renamed over it
when complete), output sets swapped in together (OutputSet, with a manifest), versioned directories, the
writer's lock on a directory, and the one-line report of a full disk.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError
from gelutrace.files.layout import LOCK_FILE

# --- atomic writes ----------------------------------------------------------------------------------------
_UMASK = os.umask(0)  # read the process's umask (only os.umask tells it), then put it back
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(target, mode="w", **kwargs):
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as f:
        yield f

_held_locks: dict = {}  # lock file path -> its open file: held until released or the process ends
_call_locks = threading.local()  # .held: the lock files the calls of locked() in this thread hold


def check_output_dir(directory, flag: str) -> Path:
    """
    Check up front, without creating anything, that an output directory exists or can be created, so a bad
    location fails before the heavy work (writers create it when they write).
    """
    d = Path(directory)
    for parent in [d, *d.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise PipelineError(f"{flag} {d}: {parent} exists and is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PipelineError(f"{flag} {d}: {parent} is not writable")
            break
    return d


LOCK_FD_ENV = "GELUTRACE_LOCK_FD"  # run_pipeline.sh: the descriptor of the lock it holds, which its stages inherit


def _busy(d: Path, what: str) -> PipelineError:
    return PipelineError(f"another run is writing into {d} (it holds {d / LOCK_FILE}); wait for it to end or write "
                         f"elsewhere ({what})")


def lock_on_descriptor(fd: int, directory, what: str):
    """Take `directory`'s writer lock on the open descriptor `fd` of its LOCK_FILE (run_pipeline.sh's, which its
    stages inherit: a flock belongs to the open file, so they share it), or refuse."""
    d = Path(directory)
    held, mine = os.fstat(fd), (d / LOCK_FILE).stat()
    if (held.st_dev, held.st_ino) != (mine.st_dev, mine.st_ino):
        raise PipelineError(f"descriptor {fd} is not {d / LOCK_FILE}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds on the lock's own open file
    except BlockingIOError:
        raise _busy(d, what) from None


def _inherited_lock(directory: Path) -> bool:
    """Whether this process inherited the open file on which run_pipeline.sh holds `directory`'s lock (LOCK_FD_ENV
    names its descriptor), so that the stages the driver runs write under its lock while any other process, opening
    the file anew, is refused."""
    fd = os.environ.get(LOCK_FD_ENV, "")
    if not fd.isdigit():
        return False
    try:
        lock_on_descriptor(int(fd), directory, "")
    except (OSError, PipelineError):
        return False
    return True


def _lock_key(directory) -> str:
    return str((Path(directory) / LOCK_FILE).resolve())


def _held_by_call(key: str) -> bool:
    return key in getattr(_call_locks, "held", ())


def _flock(d: Path, what: str):
    """A new open file description of d's LOCK_FILE, exclusively flock'ed (flock conflicts between two opens of
    one file, in one process or two), or the refusal."""
    f = open(d / LOCK_FILE, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise _busy(d, what) from None
    return f


def lock_directory(directory, what: str) -> Path:
    """
    Take the directory's writer lock (an exclusive flock on LOCK_FILE inside it) until release_locks() or the
    end of the process, or refuse at once: two runs writing into one directory would mix their outputs. The
    kernel releases the lock when the process exits, also on a crash or kill -9, so a stale lock never blocks
    the next run. A script that already holds the lock takes it again freely; within a locked() block (a library
    call) the block's lock stands for it, and is released with the block; a stage that run_pipeline.sh runs shares
    the driver's lock (_inherited_lock).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = _lock_key(d)
    if key in _held_locks or _held_by_call(key) or _inherited_lock(d):
        return d
    _held_locks[key] = _flock(d, what)
    return d


def release_locks():
    while _held_locks:
        _, f = _held_locks.popitem()
        f.close()  # closing the file drops its flock


@contextlib.contextmanager
def locked(directory, what: str):
    """
    The directory's writer lock for the block only, for library calls, whose process goes on: taken on a new
    open file description, so that it excludes every other holder, another thread's call in this process
    included, and released when the block ends. Inside the block, lock_directory on the same directory (the
    stage code the call runs) takes nothing more. A lock this process's script already holds stands for it.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = _lock_key(d)
    if key in _held_locks or _held_by_call(key):
        yield d
        return
    f = _flock(d, what)
    held = _call_locks.__dict__.setdefault("held", set())
    held.add(key)
    try:
        yield d
    finally:
        held.discard(key)
        f.close()


@contextlib.contextmanager
def removed_if_unused(directory):
    """
    Around a stage's lock and its reading of the inputs (the lock taken before the heavy work): when the block
    fails, the directories it created (`directory` and any missing parents) are removed again if they hold nothing
    but the lock file, so a refused input leaves nothing behind, as a check before the lock does.
    """
    d = Path(directory).absolute()
    created = [p for p in [d, *d.parents] if not os.path.lexists(p)]
    try:
        yield
    except BaseException:
        for p in created:  # deepest first; rmdir keeps any directory something else was written into
            with contextlib.suppress(OSError):
                if p == d and [q.name for q in p.iterdir()] == [LOCK_FILE]:
                    (p / LOCK_FILE).unlink()
                p.rmdir()
        raise


def write_csv(df: pd.DataFrame, target, **kwargs):
    with atomic_path(target) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


@contextlib.contextmanager
def atomic_dir(target):
    """
    Yield a new, empty version of directory `target` to fill; on success switch `target` to it atomically.
    `target` is a symbolic link to its current version, `.{name}.v{id}` beside it, and the switch is one
    rename of a new link over it, so a reader finds the old version or the new one, complete, whatever
    happens; the old version is removed afterwards. Leftovers of a killed run are cleaned up on the next.
    A plain directory (a store written by an older version) is replaced the same way.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise PipelineError(f"{target} exists and is not a directory")
    _clean_versions(target)
    version = new_version(target)
    try:
        yield version
        switch_dir(target, version)
    except BaseException:
        if not (target.is_symlink() and target.resolve() == version.resolve()):  # not switched to it
            shutil.rmtree(version, ignore_errors=True)
        raise


def new_version(target) -> Path:
    """A new, empty version directory of `target`, beside it (see atomic_dir)."""
    target = Path(target)
    version = target.parent / f".{target.name}.v{uuid.uuid4().hex[:12]}"
    version.mkdir()  # the usual umask-based mode
    return version


def switch_dir(target, version):
    """
    Make `target` a link to `version` (a directory beside it that new_version named) by one rename of a new link
    over it, then remove the version it pointed to; a plain directory in its place is swapped out first.
    """
    target, version = Path(target), Path(version)
    tag = version.name[len(f".{target.name}.v"):]
    link = target.parent / f".{target.name}.link{tag}"
    try:
        os.symlink(version.name, link)
        old = own_version(target)
        if target.is_dir() and not target.is_symlink():
            legacy = target.parent / f".{target.name}.legacy{tag}"
            os.replace(target, legacy)  # a crash before the next line is undone by _clean_versions
            os.replace(link, target)
            shutil.rmtree(legacy, ignore_errors=True)
        else:
            os.replace(link, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        raise
    if old is not None and old.name != version.name:
        shutil.rmtree(old, ignore_errors=True)


def own_version(target) -> Path | None:
    """The version directory `target` links to when it is a link that new_version made (a `.{name}.v*` beside
    it, existing or not); None for anything else, a link to elsewhere included, which is never removed."""
    target = Path(target)
    if not target.is_symlink():
        return None
    version = target.parent / os.readlink(target)
    if version.parent == target.parent and version.name.startswith(f".{target.name}.v"):
        return version
    return None


def remove_dir(target):
    """Remove a versioned directory (its link, then the version beside it) or a plain one; a link to anywhere else
    is removed, not what it points to."""
    target = Path(target)
    if target.is_symlink():
        version = own_version(target)
        target.unlink()
        if version is not None:
            shutil.rmtree(version, ignore_errors=True)
    elif target.is_dir():
        shutil.rmtree(target)


def recover_dir(target) -> Path:
    """Put back a plain directory whose switch to a versioned one was cut short (see atomic_dir)."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        for legacy in sorted(target.parent.glob(f".{target.name}.legacy*")):
            os.replace(legacy, target)
            break
    return target


def _clean_versions(target: Path):
    """Remove what killed runs left beside `target`; restore a replaced plain directory if the switch was cut."""
    recover_dir(target)
    current = target.resolve() if target.is_symlink() else None
    for p in target.parent.glob(f".{target.name}.*"):
        if not any(p.name.startswith(f".{target.name}.{kind}") for kind in ("v", "link", "legacy")):
            continue
        if current is not None and p.resolve() == current:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# --- output sets: all files of one run, or none of them ---------------------------------------------------
def file_sha256(p) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listing(files, root: Path) -> dict:
    return {Path(f).relative_to(root).as_posix(): {"size": Path(f).stat().st_size, "sha256": file_sha256(f)}
            for f in files}


def store_files(store) -> list[Path]:
    """The files of a store directory, named through its link (as a manifest lists them)."""
    return sorted(p for p in Path(store).iterdir() if p.is_file())


def disk_full(e: BaseException, where) -> bool:
    """Whether a failed write ran out of room: ENOSPC or EDQUOT, or an OSError without an errno (numpy's '...
    requested and ... written') on a filesystem with less than 1 MiB left."""
    if not isinstance(e, OSError):
        return False
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if e.errno is None:
        try:
            st = os.statvfs(where)
            return st.f_bavail * st.f_frsize < 1 << 20
        except OSError:
            return False
    return False


_TEMPORARY = re.compile(r"\..*(\.tmp|staging.*|\.v[0-9a-f]+|_partial)")  # atomic_path, OutputSet, atomic_dir, --resume


def disk_full_directory(e: BaseException) -> Path | None:
    """For a write that ran out of room (ENOSPC, EDQUOT): the directory it wrote into, as the user named it: the
    file's directory above any temporary or staging folder of ours (which a failure removes), or, when the error
    names no file, the directory this process last locked for writing; None for any other error."""
    if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    if e.filename:
        d = Path(os.path.abspath(os.fsdecode(e.filename))).parent
        while d != d.parent and (_TEMPORARY.fullmatch(d.name) or not d.is_dir()):
            d = d.parent
        return d
    if _held_locks:
        return Path(list(_held_locks)[-1]).parent
    return None


class OutputSet:
    """
    The files of one run, written beside the earlier run's and swapped in together, so that a failure while
    writing them (an error, a full disk, an interrupt) leaves the earlier files byte for byte as they were:

        with OutputSet(directory, manifest, owned, "stage b") as out:
            write_csv(df, path(out.dir, FREQUENCY, m))   # every file under its own name, in out.dir
            ...
            out.vouch([...])                              # the files of out.dir the manifest lists

    `out.dir` is a staging directory inside `directory` (so on the same filesystem); a store directory written
    there with atomic_dir moves with the files. Once every file is staged, the manifest is marked `writing` by a
    rename, each staged file is renamed over its target (a store is switched to its new version, as atomic_dir
    does), the `owned` names this run did not write are removed, and the complete manifest (each vouched file's
    size and sha256) is renamed in last; a staged plain directory has its files renamed into the target's. Renames
    need no room on the disk; only a crash among them leaves the
    manifest at `writing`, which readers refuse. A run needs room for its files beside the earlier ones. The
    leftovers of a killed run are removed by the next.
    """

    def __init__(self, directory, manifest, owned=(), what: str = "the run"):
        self.target, self.manifest = Path(directory), Path(manifest)
        self.owned, self.what = tuple(owned), what
        self.vouched: list[Path] = []

    def __enter__(self) -> "OutputSet":
        try:
            self.target.mkdir(parents=True, exist_ok=True)
            for old in self.target.glob(f".{self.manifest.name}.staging*"):
                shutil.rmtree(old, ignore_errors=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.manifest.name}.staging", dir=self.target))
            os.chmod(self.dir, 0o777 & ~_UMASK)
        except OSError as e:
            self._refuse(e)
            raise
        return self

    def vouch(self, files):
        self.vouched = [Path(f) for f in files]

    def __exit__(self, kind, exc, tb):
        if kind is None:
            try:
                write_json({"state": "writing", "run": self._run()}, self.dir / self._WRITING, indent=2)
                write_json({"state": "complete", "run": self._run(), "files": _listing(self.vouched, self.dir)},
                           self.dir / self.manifest.name, indent=2)
            except BaseException as e:
                exc = e
        if exc is None:
            self._swap()
            return False
        try:
            self._refuse(exc)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        if kind is None:
            raise exc
        return False

    _WRITING = ".writing.json"

    def _run(self) -> str:
        if not hasattr(self, "_id"):
            self._id = uuid.uuid4().hex
        return self._id

    def _refuse(self, e: BaseException):
        if disk_full(e, self.target if not hasattr(self, "dir") else self.dir):
            raise PipelineError(f"no space left on {self.target} (disk full) while writing {self.what}'s files; the "
                                f"earlier files there are unchanged") from None

    def _swap(self):
        names = set(os.listdir(self.dir)) - {self.manifest.name, self._WRITING}
        stores = {n: os.readlink(self.dir / n) for n in names if (self.dir / n).is_symlink()}
        staged = sorted(names - set(stores.values()))
        os.replace(self.dir / self._WRITING, self.manifest)  # from here until the last rename, readers refuse
        for name in staged:
            src, dst = self.dir / name, self.target / name
            if name in stores:  # a store written with atomic_dir: move its version out, then switch to it
                version = self.target / stores[name]
                os.replace(self.dir / stores[name], version)
                recover_dir(dst)
                switch_dir(dst, version)
                _clean_versions(dst)
            elif src.is_dir():  # a plain directory: its files renamed over the target's, the others kept
                dst.mkdir(exist_ok=True)
                for f in sorted(os.listdir(src)):
                    os.replace(src / f, dst / f)
            else:
                os.replace(src, dst)
        for name in set(self.owned) - set(staged):
            p = self.target / name
            if p.is_dir():
                remove_dir(p)
            elif p.is_symlink() or p.exists():
                p.unlink()
        os.replace(self.dir / self.manifest.name, self.manifest)
        shutil.rmtree(self.dir, ignore_errors=True)


def verify_output_set(manifest, files, what: str, required: bool = False):
    """
    Refuse files that do not all come from the run the manifest records (an interrupted write, or a file
    replaced since). A directory without a manifest (written by hand or an older version) is taken as it is,
    unless `required`.
    """
    m = Path(manifest)
    if not m.is_file():
        if required:
            raise PipelineError(f"{m.parent} has no {m.name} to vouch for its files (written by hand or an older "
                                f"version?); rerun {what}")
        return
    try:
        rec = json.loads(m.read_text())
        state, listed = rec["state"], rec.get("files", {})
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise PipelineError(f"{m} is damaged; rerun {what}") from None
    if state != "complete":
        raise PipelineError(f"{m.parent}: the last {what} run stopped while writing its files, so they may mix two "
                            f"runs; rerun {what}")
    for f in map(Path, files):
        rel = f.relative_to(m.parent).as_posix()
        want = listed.get(rel)
        if want is None or not f.is_file():
            raise PipelineError(f"{f} is not part of the run {m.name} records; rerun {what}")
        if f.stat().st_size != want["size"] or file_sha256(f) != want["sha256"]:
            raise PipelineError(f"{f} was changed or replaced after the run {m.name} records; rerun {what}")


def manifest_lists(manifest, name: str) -> bool:
    """Whether a complete manifest lists the file `name` (relative to its directory); False without one."""
    try:
        rec = json.loads(Path(manifest).read_text())
        return rec.get("state") == "complete" and name in rec.get("files", {})
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return False


def write_json(obj, target, indent=None):
    text = json.dumps(obj, indent=indent)  # dumps, not dump: without indent only the one-shot call uses the C encoder
    with atomic_open(target, "w", encoding="utf-8") as f:
        f.write(text)
        f.write("\n")


class _Writes:
    """A file descriptor as the file object numpy writes a .npy through: every write an os.write, so a full disk
    raises ENOSPC (ndarray.tofile, numpy's way into a real file, raises an OSError without errno: '... requested
    and ... written')."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while len(view):
            view = view[os.write(self.fd, view):]
        return len(data)


@contextlib.contextmanager
def _raw_file(target):
    """A new file (its permissions as open()'s) to write through os.write (_Writes): a failure keeps its errno and
    names the file."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        yield _Writes(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(target)) from None
    finally:
        os.close(fd)


def write_bytes(data, target):
    with _raw_file(target) as f:
        f.write(data)


def save_npy(target, array: np.ndarray):
    """np.save(target, array) (target named as given: name it .npy), written through os.write."""
    with _raw_file(target) as f:
        np.save(f, np.asanyarray(array), allow_pickle=False)


def write_npy(array: np.ndarray, target):
    with atomic_path(target) as tmp:
        save_npy(tmp, array)


def write_npz(target, compress=True, **arrays):
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)
