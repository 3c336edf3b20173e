"""Complete-or-nothing writes and reads for local paths and fsspec URLs (DESIGN §7).

A reader sees the old version of a file or folder or the new one, never a partial one:

- one file: locally written to a hidden sibling, flushed and `os.replace`d (atomic on one
  filesystem); on an object store written with ONE put (an S3 object, multipart or not, only
  becomes visible once complete), never through fsspec's `mv`, which on S3 is copy + delete.
- one folder: locally written to a hidden sibling and renamed into place. An object store has no
  rename, so a folder there is versioned: its files go to `<folder>/_versions/<id>/`, and a commit
  pointer `<folder>/_COMMIT.json` naming the version (and its files) is written last, with a
  conditional write (If-Match / If-None-Match) so that two writers never lose track of a version.
  Readers resolve a folder with `committed_directory`; an uncommitted version is never read.
- a folder others read in its plain layout (a Stage 3 Zarr group): `publish_directory` stages it
  and copies it into place data first, metadata (zarr.json) last.
- content-addressed files: `write_bytes_if_absent`, a conditional create (one winner).
"""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import time
import uuid
from typing import IO, Iterator

import fsspec
from fsspec.core import url_to_fs

COMMIT_NAME = "_COMMIT.json"  # the pointer that makes a folder version visible on an object store
VERSIONS_NAME = "_versions"  # where the versions of a folder live on an object store
COMMIT_RETRIES = 20


class CommitConflict(RuntimeError):
    """A conditional write lost its race too many times in a row."""


def is_local(url: str) -> bool:
    fs, _ = url_to_fs(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def local_path(url: str) -> str | None:
    """The filesystem path of a local `url` (plain path or file://), None for any other URL.
    Cheap (no filesystem object, unlike is_local): writers call it for every file."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url or "::" in url:
        return None
    return url


def is_url(location: str) -> bool:
    """True for an fsspec URL that is not a plain local path (s3://, gs://, memory://, ...)."""
    return "://" in location and not location.startswith("file://")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def temporary_sibling(url: str) -> str:
    """A name beside `url` that readers of `url`'s parent skip (leading dot)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    return f"{parent}/.tmp-{name}-{uuid.uuid4().hex[:12]}" if parent else f".tmp-{name}-{uuid.uuid4().hex[:12]}"


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def open_binary(url: str) -> IO[bytes]:
    return fsspec.open(url, "rb").open()


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


# --- one file ---------------------------------------------------------------------------------
def missing_folders(folder: str) -> list[str]:
    """`folder` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def fsync_folder(folder: str) -> None:
    """Put a local folder's entries (names created, renamed or removed in it) on the disk."""
    descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_local_temporary(path: str, data: bytes, durable: bool = True) -> str:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp_path = temporary_sibling(path)
    write_local_file(tmp_path, data, durable=durable)
    return tmp_path


def write_local_file(path: str, data: bytes | memoryview, *, durable: bool) -> None:
    """Create (or truncate) the local file `path` holding `data`; durable: fsynced before this
    returns. Plain descriptors: no Python file object for a file written once, whole."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data).cast("B")
        while view:  # a regular file takes it all in one call unless interrupted
            written = os.write(descriptor, view)
            if written == 0:
                raise OSError(f"{path}: the disk took no bytes")
            view = view[written:]
        if durable:
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(url: str, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `url`, replacing what was there; readers see the old bytes or the new.
    Locally the file and its new name are on the disk when this returns (durable=False skips the
    fsyncs: scratch data only)."""
    path = local_path(url)
    if path is None and is_local(url):  # a local URL of another spelling (local://, ...)
        path = url_to_fs(url)[1]
    if path is not None:
        tmp_path = _write_local_temporary(path, data, durable)
        try:
            os.replace(tmp_path, path)  # atomic on one filesystem
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            raise
        if durable:
            fsync_folder(os.path.dirname(path) or ".")  # the new name survives a power loss too
    else:
        # One put: the object appears whole once the upload completes, or not at all.
        fs, path = url_to_fs(url)
        fs.pipe_file(path, data)


def write_bytes_if_absent(url: str, data: bytes) -> bool:
    """Create `url` with `data` only when nothing is there (a conditional write).

    Returns True when this call created it, False when it already existed (its content is left
    alone). Two concurrent callers: exactly one gets True.
    """
    fs, path = url_to_fs(url)
    if is_local(url):
        tmp_path = _write_local_temporary(path, data)
        try:
            os.link(tmp_path, path)  # fails with FileExistsError when path exists: no clobbering
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp_path)
    if _is_s3(fs):
        try:
            fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if _is_precondition_failure(error):
                return False
            raise
    # a store without conditional writes: best effort (check, then one put)
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


# --- one folder -------------------------------------------------------------------------------
def replace_directory(tmp_url: str, final_url: str) -> None:
    """Move a completely written local folder `tmp_url` to `final_url`, replacing what was there.

    The old folder is first renamed aside, then the new one renamed in (two renames, each
    atomic), then the old one deleted. Object stores have no rename: use `atomic_directory`,
    which commits a version there instead.
    """
    if not (is_local(final_url) and is_local(tmp_url)):
        raise ValueError(
            f"replace_directory({tmp_url!r}, {final_url!r}): an object store has no rename; "
            "write the folder with fileio.atomic_directory, which commits a version there"
        )
    fs, final_path = url_to_fs(final_url)
    _, tmp_path = url_to_fs(tmp_url)
    old_path = None
    if os.path.exists(final_path):
        old_path = temporary_sibling(final_path) + "-old"
        os.rename(final_path, old_path)
    os.rename(tmp_path, final_path)
    if old_path:
        fs.rm(old_path, recursive=True)


@contextlib.contextmanager
def atomic_directory(final_url: str) -> Iterator[str]:
    """Yield a folder URL to write into; when the block completes it becomes `final_url`'s content.

    Locally: a hidden sibling renamed into place. On an object store: a new version under
    `final_url/_versions/`, made visible by the commit pointer written last; the version it
    replaces is deleted. Either way an exception (or a killed process) leaves the old content
    as it was. Readers resolve the folder with `committed_directory(final_url)`.
    """
    if is_local(final_url):
        tmp_url = temporary_sibling(final_url)
        fs, tmp_path = url_to_fs(tmp_url)
        fs.makedirs(tmp_path, exist_ok=True)
        try:
            yield tmp_url
        except BaseException:
            fs.rm(tmp_path, recursive=True)
            raise
        replace_directory(tmp_url, final_url)
        return
    version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
    version_url = join(final_url, VERSIONS_NAME, version)
    fs, version_path = url_to_fs(version_url)
    try:
        yield version_url
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(version_path, recursive=True)
        raise
    fs.invalidate_cache()
    files = {
        name[len(version_path) + 1:]: int(info.get("size") or 0)
        for name, info in fs.find(version_path, detail=True).items()
    }
    displaced = _commit(final_url, {"version": version, "files": files,
                                    "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if displaced and displaced != version:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(url_to_fs(join(final_url, VERSIONS_NAME, displaced))[1], recursive=True)


METADATA_NAMES = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")


@contextlib.contextmanager
def publish_directory(final_url: str) -> Iterator[str]:
    """Like `atomic_directory`, for a folder that other programs read in its plain layout (a Zarr
    group of an input store, DESIGN §3), so it cannot be versioned.

    Locally: the same hidden sibling + rename. On an object store: the folder is written to a
    hidden staging prefix, then copied into place server-side, metadata files (zarr.json) last and
    the deepest first, so a reader never finds a group's metadata before its data; then objects of
    the previous content that the new one lacks are deleted. A new folder is thus invisible until
    complete and a crash leaves only the staging prefix (readers skip dot-names). Replacing a folder
    that exists is ordered but not atomic on an object store: a reader that reads while it is
    replaced may see new chunks under old metadata — use `atomic_directory` where rewrites happen.
    """
    if is_local(final_url):
        with atomic_directory(final_url) as tmp_url:
            yield tmp_url
        return
    staging_url = temporary_sibling(final_url)
    fs, staging_path = url_to_fs(staging_url)
    _, final_path = url_to_fs(final_url)
    try:
        yield staging_url
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(staging_path, recursive=True)
        raise
    fs.invalidate_cache()
    staged = sorted(name[len(staging_path) + 1:] for name in fs.find(staging_path))
    try:
        old = {name[len(final_path) + 1:] for name in fs.find(final_path)}
    except FileNotFoundError:
        old = set()

    def is_metadata(relative: str) -> bool:
        return relative.rpartition("/")[2] in METADATA_NAMES

    data = [r for r in staged if not is_metadata(r)]
    metadata = sorted((r for r in staged if is_metadata(r)), key=lambda r: -r.count("/"))  # deepest first
    if data:
        fs.copy([f"{staging_path}/{r}" for r in data], [f"{final_path}/{r}" for r in data])
    for relative in metadata:
        fs.copy(f"{staging_path}/{relative}", f"{final_path}/{relative}")
    stale = sorted(old - set(staged))
    if stale:
        fs.rm([f"{final_path}/{r}" for r in stale])
    fs.rm(staging_path, recursive=True)
    fs.invalidate_cache()


def read_commit(final_url: str) -> dict | None:
    """The commit record of an object-store folder (version, files), or None when uncommitted."""
    fs, path = url_to_fs(join(final_url, COMMIT_NAME))
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def committed_directory(final_url: str) -> str | None:
    """Where the committed content of a folder written by `atomic_directory` is, or None.

    Locally that is `final_url` itself (when it exists); on an object store the version named by
    the commit pointer. Versions without a commit (a writer still at work, or killed) are never
    returned.
    """
    if is_local(final_url):
        return final_url if exists(final_url) else None
    record = read_commit(final_url)
    return None if record is None else join(final_url, VERSIONS_NAME, record["version"])


def remove_uncommitted_versions(final_url: str, older_than_s: float = 3600.0) -> list[str]:
    """Delete the versions of an object-store folder that were never committed (killed writers),
    sparing the committed one and any younger than `older_than_s` (a writer may be at work)."""
    if is_local(final_url):
        return []
    fs, versions_path = url_to_fs(join(final_url, VERSIONS_NAME))
    record = read_commit(final_url)
    committed = record and record["version"]
    removed = []
    now = time.time()
    for entry in fs.ls(versions_path, detail=False) if fs.exists(versions_path) else []:
        name = entry.rstrip("/").rpartition("/")[2]
        if name == committed:
            continue
        try:
            started = calendar.timegm(time.strptime(name.split("-")[0], "%Y%m%dT%H%M%S"))  # names are UTC
        except ValueError:
            continue
        if now - started >= older_than_s:
            fs.rm(entry, recursive=True)
            removed.append(name)
    return removed


def _commit(final_url: str, record: dict) -> str | None:
    """Point `final_url` at `record['version']` with a compare-and-swap on the pointer.

    Returns the version this commit displaced (None when there was none). Concurrent committers
    both succeed in turn (the last one wins, as with local renames) and each displaced version
    is reported to exactly one of them, so each is deleted exactly once.
    """
    fs, path = url_to_fs(join(final_url, COMMIT_NAME))
    data = json.dumps(record, indent=1, sort_keys=True).encode()
    for _ in range(COMMIT_RETRIES):
        fs.invalidate_cache(path)
        try:
            info = fs.info(path)
            previous = json.loads(fs.cat_file(path))["version"]
            etag = info.get("ETag")
        except FileNotFoundError:
            previous, etag = None, None
        if not _is_s3(fs):
            fs.pipe_file(path, data)
            return previous
        try:
            if etag is None:
                fs.pipe_file(path, data, mode="create")
            else:
                fs.pipe_file(path, data, IfMatch=etag)
            return previous
        except FileExistsError:
            continue
        except OSError as error:
            if _is_precondition_failure(error):
                continue
            raise
    raise CommitConflict(f"could not commit {final_url!r}: {COMMIT_RETRIES} concurrent commits in a row")


def _is_s3(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"s3", "s3a"} & set(protocols))


def _is_precondition_failure(error: BaseException) -> bool:
    """S3 answers a lost conditional write with 412 PreconditionFailed (or 409 ConditionalRequestConflict
    while another conditional write to the key is in flight); s3fs wraps it in an OSError."""
    text = f"{error!r} {error.__cause__!r}"
    return "PreconditionFailed" in text or "ConditionalRequestConflict" in text
