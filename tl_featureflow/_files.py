"""Atomic file and folder writes, and checksummed manifests.

Everything tl_featureflow writes (saved banks, the converted model cache) goes
through here, so a crash or a full disk mid-write never leaves a file or folder
that later loads as valid: files are written beside their target and moved into
place with ``os.replace``; folders are built under a temporary name and swapped
in whole; a manifest of SHA-256 sums, written last, vouches for the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tl_featureflow.errors import CacheError, FeatureFlowError

__all__ = [
    "cache_root",
    "entry_lock",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_directory",
    "file_sha256",
    "tensor_digest",
    "write_manifest",
    "read_manifest",
    "header",
    "check_header",
]

_CHUNK = 8 * 1024 * 1024


@contextmanager
def exclusive_lock(lock: str | Path, what: str) -> Iterator[Path]:
    """Hold ``lock`` (a file) exclusively, or raise :class:`CacheError` at once if another process
    holds it: for work that must not run twice at the same place (two trainings into one run
    folder). Released by the OS if the holder dies; not a lock where ``fcntl`` is missing."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield lock
        return
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"{what} is already running (another process holds {lock}): wait for it to finish, "
                             "or use another folder") from None
        try:
            yield lock
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def cache_root() -> Path:
    """Folder of tl_featureflow's caches: ``$TL_FEATUREFLOW_CACHE``, else
    ``$XDG_CACHE_HOME/tl_featureflow``, else ``~/.cache/tl_featureflow``."""
    env = os.environ.get("TL_FEATUREFLOW_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tl_featureflow"


@contextmanager
def entry_lock(entry: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on a cache entry while it is built (``<entry>.lock`` beside it).

    Two processes that build the same entry at once (two notebooks, or ``make demo`` and
    ``make test`` on an empty cache) take turns: the second waits, then finds the entry
    built. Callers check for the entry again once they hold the lock. The lock is an
    ``fcntl.flock`` (released by the OS if the holder dies); where ``fcntl`` is missing
    (Windows) this does not lock, and atomic writes alone keep half-built entries unseen.

    >>> import tempfile
    >>> with entry_lock(Path(tempfile.mkdtemp()) / "model") as lock:
    ...     lock.name
    '.model.lock'
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = entry.with_name(f".{entry.name}.lock")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield lock
        return
    with open(lock, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield lock
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new, never half."""
    path = _through_link(Path(path))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_debris(path)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _raise_as_cache_error(exc, path)
        raise


def read_json(path: str | Path, what: str) -> Any:
    """Parse the JSON file at ``path``; an unreadable or malformed file raises CacheError naming ``what``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read {what} from {path}: {exc}") from exc


def atomic_write_json(path: str | Path, data: Any) -> None:
    """:func:`atomic_write_text` of ``data`` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it replaces ``final`` whole.

    >>> import tempfile
    >>> final = Path(tempfile.mkdtemp()) / "bank"
    >>> with atomic_directory(final) as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")     # an exception here would leave ``final`` as it was
    >>> (final / "a.txt").read_text(), tmp.exists()
    ('new', False)

    An existing ``final`` is moved aside first (``.final.*.old``) and deleted only once the new
    folder is in place; a kill between the two renames leaves it there, and the next write or
    :func:`recover_directory` puts it back. A symlink at ``final`` keeps pointing at the new
    folder (the target is replaced). Debris of writers that died (``.final.<pid>.*.tmp``, and
    ``.final.<pid>.*.old`` once ``final`` is back) is removed.
    """
    final = _through_link(Path(final))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(final)             # and removes dead writers' debris
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), suffix=".tmp", dir=final.parent))
    except OSError as exc:
        _raise_as_cache_error(exc, final)
        raise
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual folder mode
        yield tmp
        old = None
        if final.exists():      # named with the pid, as a .tmp is: a kill before it is removed leaves debris to clean
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), suffix=".old", dir=final.parent))
            old.rmdir()
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_as_cache_error(exc, final)
        raise


def _raise_as_cache_error(exc: BaseException, path: Path) -> None:
    """A write that failed for want of room or rights (``OSError``, or safetensors' own ``SafetensorError``,
    which is neither) raises :class:`CacheError` naming the path; anything else passes through."""
    if isinstance(exc, FeatureFlowError):
        return
    if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
        raise CacheError(f"could not write {path}: {exc} (is the disk full, or the folder read-only?)") from exc


def _through_link(path: Path) -> Path:
    """The path a write should replace: a symlink's target (so the link keeps working), else ``path``."""
    return path.resolve() if path.is_symlink() else path


def _tmp_prefix(final: Path) -> str:
    """Temporary names carry the writer's pid, so that debris of a dead writer can be told apart."""
    return f".{final.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's live process
        return True
    return True


def clean_debris(final: str | Path) -> list[Path]:
    """Remove ``.final.<pid>.*.tmp`` files and folders left by writers that died, and their
    ``.final.<pid>.*.old`` folders once ``final`` exists (a kill after the swap of
    :func:`atomic_directory`, before the old folder was deleted); returns what was removed."""
    final = Path(final)
    removed = []
    olds = list(final.parent.glob(f".{final.name}.*.old")) if final.exists() else []   # else: recover_directory's
    for path in [*final.parent.glob(f".{final.name}.*.tmp"), *olds]:
        pid = path.name[len(final.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def scratch_directory(final: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``final``, named as :func:`clean_debris` knows (so a writer killed while
    it exists leaves debris the next one removes), deleted on exit."""
    final = Path(final)
    clean_debris(final)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=_tmp_prefix(final), suffix=".tmp") as tmp:
        yield Path(tmp)


def recover_directory(final: str | Path) -> bool:
    """Put back the folder an :func:`atomic_directory` swap moved aside, if it was killed before
    the new one went in (``final`` missing, ``.final.*.old`` present), and remove what dead writers left
    (:func:`clean_debris`; where the folder is read-only, the debris stays). Returns True if it put one back."""
    final = _through_link(Path(final))
    recovered = False
    if not (final.exists() or final.is_symlink()):
        olds = sorted(final.parent.glob(f".{final.name}.*.old"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], final)
            recovered = True
    try:
        clean_debris(final)
    except OSError:
        pass
    return recovered


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(tensor: Any, length: int = 16) -> str:
    """Short hex SHA-256 of a tensor's bytes (identifies token sets and corpora)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:length]


def write_manifest(folder: Path, name: str, content: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``folder/name``: ``content`` plus size and SHA-256 of every other file.

    Call it last, once every other file of the folder is written.
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != name):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {**content, "files": files}
    atomic_write_json(folder / name, manifest)
    return manifest


def read_manifest(folder: str | Path, name: str, *, verify: bool = True) -> dict[str, Any]:
    """Read ``folder/name`` and check every file it lists; raise CacheError on any fault.

    With ``verify=False`` only presence and sizes are checked, not checksums.
    """
    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        raise CacheError(f"{folder} has no {name}: it is not a complete saved folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"{path} is corrupt ({exc}); expected a JSON manifest") from exc
    for rel, info in files.items():
        file = folder / rel
        if not file.is_file():
            raise CacheError(f"{file} is missing: {path} lists it")
        size = file.stat().st_size
        if size != info["size"]:
            raise CacheError(f"{file} has {size} bytes, expected {info['size']}: partial or corrupt")
        if verify and file_sha256(file) != info["sha256"]:
            raise CacheError(f"{file} does not match its SHA-256 in {path}: corrupt")
    return manifest


def header(kind: str, version: int) -> dict[str, Any]:
    """The first keys of every file or index tl_featureflow saves: what it is and its schema.

    >>> header("FlowGraph", 1)
    {'schema_version': 1, 'format': 'tl_featureflow.FlowGraph'}
    """
    return {"schema_version": version, "format": f"tl_featureflow.{kind}"}


def check_header(data: Any, kind: str, version: int, where: str | Path) -> None:
    """Raise CacheError unless ``data`` starts with :func:`header` ``(kind, version)``."""
    if not isinstance(data, Mapping):
        raise CacheError(f"{where} is not a saved {kind}: expected a JSON object")
    found = data.get("schema_version")
    if found != version:
        raise CacheError(f"{where} has {kind} schema version {found!r}: this tl_featureflow reads version {version}")
    if data.get("format", f"tl_featureflow.{kind}") != f"tl_featureflow.{kind}":
        raise CacheError(f"{where} holds a {data.get('format')!r}, not a tl_featureflow.{kind}")
