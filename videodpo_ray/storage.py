"""Object-storage helpers over fsspec (local paths, s3://, gs://, memory://) with commit-after-write.

s3:// needs no endpoint plumbing: s3fs 2026 (through botocore) and pyarrow both read AWS_ENDPOINT_URL, the keys and
the region from the environment, so the same URL works for s3fs, pyarrow, Ray Data and Ray Train.
"""

from __future__ import annotations

import glob
import hashlib
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from videodpo_ray.errors import CheckpointError

TEMP_PREFIX = "_tmp-"
WRITING_MARKER = "_WRITING"  # in a directory `publish_directory` has not finished: `local_directory` refuses it


def filesystem_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it (bucket/key for object stores)."""
    return fsspec.core.url_to_fs(url)


def join(root: str, *parts: str) -> str:
    """Join URL or path segments with "/" (`join("s3://b/run", "pairs", "x")` -> "s3://b/run/pairs/x")."""
    return "/".join([root.rstrip("/"), *(part.strip("/") for part in parts)])


def absolute_url(url: str) -> str:
    """`url` with a relative local path made absolute (Ray workers may run in another working directory)."""
    return url if "://" in url else os.path.abspath(url)


def is_local(url: str) -> bool:
    """Whether `url` is a path on this machine's filesystem."""
    return isinstance(filesystem_for(url)[0], LocalFileSystem)


def exists(url: str) -> bool:
    """Whether an object or directory exists at `url` (fresh listing: other writers may have committed since)."""
    fs, path = filesystem_for(url)
    fs.invalidate_cache(path)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    """The full content of the object at `url` (FileNotFoundError when absent)."""
    fs, path = filesystem_for(url)
    return fs.cat_file(path)


def read_many(urls: list[str]) -> list[bytes]:
    """Contents of several objects on one filesystem, fetched concurrently where the filesystem can. The paths are
    read as they are (`fs.cat` would expand `[`, `*` and `?` in them as glob patterns)."""
    if not urls:
        return []
    fs, _ = filesystem_for(urls[0])
    paths = [filesystem_for(url)[1] for url in urls]
    return fs.cat_ranges(paths, None, None, on_error="raise")


def list_files(url: str) -> dict[str, int]:
    """Files directly under the directory `url` as {name: size in bytes}; empty when the directory is absent."""
    fs, path = filesystem_for(url)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    files = [entry for entry in entries if entry["type"] == "file"]
    return {posixpath.basename(entry["name"].rstrip("/")): int(entry["size"] or 0) for entry in files}


@dataclass(frozen=True)
class Entry:
    """One object or directory: its URL, whether it is a directory, and when it was last modified (None: unknown)."""

    url: str
    is_dir: bool
    modified: datetime | None


def list_entries(url: str) -> list[Entry]:
    """Objects and directories directly under `url`, sorted by URL; empty when `url` does not exist."""
    fs, path = filesystem_for(url)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(
        (_entry(url, entry) for entry in entries if entry["name"].rstrip("/") != path.rstrip("/")),
        key=lambda entry: entry.url,
    )


def find_temporary(url: str) -> list[Entry]:
    """Every temporary object of an unfinished `stage()` (`_tmp-*`) anywhere under `url`, sorted by URL."""
    fs, path = filesystem_for(url)
    fs.invalidate_cache(path)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return []
    prefix = path.rstrip("/") + "/"
    return sorted(
        (
            _entry(url, info)
            for name, info in found.items()
            if posixpath.basename(name.rstrip("/")).startswith(TEMP_PREFIX) and name.startswith(prefix)
        ),
        key=lambda entry: entry.url,
    )


def remove_crashed_writes(committed: str, stem: str) -> None:
    """Delete the temporary objects (`stage`) of `stem`* beside `committed`, the object the caller has just committed,
    that are older than it: what crashed writes of the same key left behind (readers never see them). One prefix
    listing, not the whole folder: the cost of a commit does not grow with the shard count. A write still in flight
    started after the commit and stays."""
    fs, path = filesystem_for(committed)
    parent = posixpath.dirname(path)
    fs.invalidate_cache(parent)
    cutoff = _entry(committed, fs.info(path)).modified
    for name, info in fs.glob(glob.escape(posixpath.join(parent, f"{TEMP_PREFIX}{stem}")) + "*", detail=True).items():
        modified = _entry(committed, info).modified
        if cutoff and modified and modified < cutoff:
            fs.rm_file(name)


def newest_change(url: str) -> datetime | None:
    """The latest modification time of anything under the directory `url` (None when none is known)."""
    fs, path = filesystem_for(url)
    fs.invalidate_cache(path)
    times = [_entry(url, info).modified for info in fs.find(path, detail=True).values()]
    return max((time for time in times if time is not None), default=None)


def remove_tree(url: str) -> None:
    """Delete `url` and everything under it (a no-op when it does not exist). `[`, `*` and `?` in `url` are names,
    not patterns: an object store's `rm` expands them (`run[1]` would delete `run1`), so they are escaped there."""
    fs, path = filesystem_for(url)
    try:
        fs.rm(path if isinstance(fs, LocalFileSystem) else glob.escape(path), recursive=True)
    except FileNotFoundError:
        pass


def _entry(root_url: str, info: dict[str, Any]) -> Entry:
    """An Entry for an fsspec `info` dict found under `root_url` (URL rebuilt from the root, so schemes survive)."""
    fs, root = filesystem_for(root_url)
    relative = info["name"].rstrip("/")[len(root.rstrip("/")) :].lstrip("/")
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if isinstance(modified, (int, float)):
        modified = datetime.fromtimestamp(modified, tz=timezone.utc)
    return Entry(join(root_url, relative), info["type"] == "directory", modified)


def size(url: str) -> int | None:
    """Size in bytes of the object at `url`, None when it does not exist."""
    fs, path = filesystem_for(url)
    fs.invalidate_cache(path)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None


def remove(url: str) -> None:
    """Delete the object at `url` if it exists."""
    fs, path = filesystem_for(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def stage(url: str, data: bytes) -> str:
    """Upload `data` to a temporary key beside `url` (invisible to readers: `_`-prefixed, other suffix); return it.

    Follow with `commit(temporary, url)`; on failure the temporary object is removed.
    """
    fs, path = filesystem_for(url)
    parent, name = posixpath.split(path)
    temporary = posixpath.join(parent, f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex}")
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(parent, exist_ok=True)
    try:
        fs.pipe_file(temporary, data)
    except BaseException:
        _discard(fs, temporary)
        raise
    return fs.unstrip_protocol(temporary) if not isinstance(fs, LocalFileSystem) else temporary


def commit(temporary: str, url: str) -> None:
    """Make a staged object visible at `url` in one step (local rename; server-side copy on object stores)."""
    fs, source = filesystem_for(temporary)
    _, target = filesystem_for(url)
    try:
        if isinstance(fs, LocalFileSystem):
            fs.mv(source, target)
        else:  # one object (fs.mv would expand `[`, `*` and `?` in the path as glob patterns)
            fs.cp_file(source, target)
            fs.rm_file(source)
    except BaseException:
        _discard(fs, source)
        raise


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers see either the previous object or the whole new one, never a part."""
    commit(stage(url, data), url)


def pyarrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for `url`, for `ray.data.read_parquet(paths, filesystem=...)` and pyarrow.

    Local paths and s3:// use pyarrow's native clients (S3 configured from the environment, like s3fs); any other
    fsspec protocol is wrapped with `PyFileSystem(FSSpecHandler(fs))`.
    """
    fs, path = filesystem_for(url)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    if url.startswith("s3://"):  # the bucket's client (its region resolved); the key as fsspec reads it, not decoded
        return pafs.FileSystem.from_uri(f"s3://{path.split('/', 1)[0]}")[0], path
    return PyFileSystem(FSSpecHandler(fs)), path


def check_ray_storage_url(url: str) -> str:
    """`url`, when Ray Train (which parses it with pyarrow's URI parser) and fsspec locate the same objects at it;
    ValueError when a URL with a scheme holds %, #, ? or whitespace (pyarrow decodes or cuts there, fsspec does
    not: checkpoints would land apart from where resumes and exports look)."""
    unsafe = sorted({char for char in url if char in "%#?" or char.isspace()}) if "://" in url else []
    if unsafe:
        raise ValueError(f"{url!r} holds {', '.join(map(repr, unsafe))}: Ray Train's URL parser reads a storage URL "
                         "with these otherwise than fsspec; use a name without them")
    return url


def upload_directory(local: Path, url: str) -> None:
    """Copy the local directory `local` to `url` (a local path or any fsspec URL), file by file."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        write_bytes_atomic(join(url, path.relative_to(local).as_posix()), path.read_bytes())


def publish_directory(local: Path, url: str) -> None:
    """Put the local directory `local` at `url` in place of whatever was there (no stale file of it stays).
    `WRITING_MARKER` is written first and removed last, so a reader of an unfinished upload (a crash, a rewrite
    under way) is refused by `local_directory` instead of loading a mix of files."""
    remove_tree(url)
    write_bytes_atomic(join(url, WRITING_MARKER), b"")
    upload_directory(local, url)
    remove(join(url, WRITING_MARKER))


def cache_directory() -> Path:
    """Where remote weight directories are downloaded: $VIDEODPO_RAY_CACHE or ~/.cache/videodpo-ray."""
    return Path(os.environ.get("VIDEODPO_RAY_CACHE", Path.home() / ".cache" / "videodpo-ray"))


def local_directory(url: str) -> Path:
    """A local directory holding what `url` (a local path or an fsspec URL: s3://, gs://, ...) holds.

    The one way remote weights reach a model: a remote directory is downloaded once into `cache_directory()`, keyed
    by URL and by the listing's names, sizes and versions (ETag), so weights rewritten at the same URL (a new export,
    a re-merged model) are downloaded again; into a temporary folder renamed into place only when complete, so an
    interrupted download is never used. Raises CheckpointError when there is nothing at `url`, or when
    `publish_directory` has not finished writing it.
    """
    fs, root = filesystem_for(url)
    unfinished = CheckpointError(f"{url}: its writing did not finish ({WRITING_MARKER} is there): the run that wrote "
                                 "it was interrupted or is still writing; write it again")
    if isinstance(fs, LocalFileSystem):
        directory = Path(root)
        if not directory.is_dir():
            raise CheckpointError(f"{url}: not a directory")
        if (directory / WRITING_MARKER).exists():
            raise unfinished
        return directory
    fs.invalidate_cache(root)
    listing = fs.find(root, detail=True)
    if not listing:
        raise CheckpointError(f"{url}: no files found")
    if posixpath.join(root.rstrip("/"), WRITING_MARKER) in listing:
        raise unfinished
    target = cache_directory() / _cache_key(url.rstrip("/"), listing)
    if target.is_dir():
        return target
    files = sorted(listing)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    prefix = root.rstrip("/") + "/"
    for remote in files:
        local = partial / remote[len(prefix) :]
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(local))
    try:
        partial.rename(target)
    except OSError:  # another process finished the same download first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def local_file(url: str) -> Path:
    """A local path of the file at `url`: itself when local, else a cached download (as `local_directory`)."""
    fs, path = filesystem_for(url)
    if isinstance(fs, LocalFileSystem):
        if not Path(path).is_file():
            raise CheckpointError(f"{url}: file not found")
        return Path(path)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        info = {}
    if info.get("type") != "file":
        raise CheckpointError(f"{url}: file not found")
    target = cache_directory() / _cache_key(url, {path: info}) / posixpath.basename(path)
    if target.is_file():
        return target
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(path, str(partial))
    partial.replace(target)
    return target


def _cache_key(url: str, listing: dict[str, dict[str, Any]]) -> str:
    """The download cache's name for what `url` holds now: its files' names, sizes and versions (the first of the
    store's ETag / hash / modification-time fields)."""
    fields = ("ETag", "etag", "md5Hash", "crc32c", "LastModified", "last_modified", "updated", "mtime")
    versions = [(name, info.get("size"), str(next((info[key] for key in fields if info.get(key)), "")))
                for name, info in sorted(listing.items())]
    return hashlib.sha256(repr((url, versions)).encode()).hexdigest()[:24]


def _discard(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except (FileNotFoundError, OSError):
        pass
