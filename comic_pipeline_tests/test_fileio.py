"""fileio: complete-or-nothing writes on a local disk and on an S3-compatible server (moto)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest
from fsspec.core import url_to_fs

from comic_pipeline import fileio

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def s3_endpoint():
    """An in-process moto S3 server on 127.0.0.1 (a random free port)."""
    from moto.server import ThreadedMotoServer  # a test dependency (dev extra): never skipped
    from s3fs import S3FileSystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1")
    S3FileSystem.clear_instance_cache()  # fsspec caches clients: one made for another endpoint must go
    try:
        yield endpoint
    finally:
        server.stop()
        S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_root(s3_endpoint):
    import fsspec

    bucket = f"fileio-{uuid.uuid4().hex[:10]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(bucket)
    return f"s3://{bucket}/home"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "home")
    return request.getfixturevalue("s3_root")


def _tree(url: str) -> dict[str, bytes]:
    fs, path = url_to_fs(url)
    fs.invalidate_cache()
    return {name[len(path) + 1:]: fs.cat_file(name) for name in fs.find(path)}


def test_atomic_write_bytes_replaces_whole_file_and_leaves_no_temporary(root):
    url = fileio.join(root, "tasks", "a.npz")
    fileio.atomic_write_bytes(url, b"old")
    fileio.atomic_write_bytes(url, b"new" * 1000)
    assert fileio.read_bytes(url) == b"new" * 1000
    assert list(_tree(root)) == ["tasks/a.npz"]  # no .tmp-* sibling, on disk or on S3


def test_write_bytes_if_absent_is_a_conditional_create(root):
    url = fileio.join(root, "refs", "r.json")
    assert fileio.write_bytes_if_absent(url, b"first") is True
    assert fileio.write_bytes_if_absent(url, b"second") is False
    assert fileio.read_bytes(url) == b"first"


def test_write_bytes_if_absent_has_one_winner_among_concurrent_writers(root):
    url = fileio.join(root, "refs", "race.json")
    results: list[bool] = []
    threads = [threading.Thread(target=lambda i=i: results.append(fileio.write_bytes_if_absent(url, b"w%d" % i)))
               for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]
    assert fileio.read_bytes(url) in {b"w%d" % i for i in range(6)}


def test_atomic_directory_commits_a_new_version_and_drops_the_old(root):
    final = fileio.join(root, "groups", "comic one")
    for content in (b"v1", b"v2"):
        with fileio.atomic_directory(final) as tmp:
            fileio.atomic_write_bytes(fileio.join(tmp, "a.bin"), content)
            fileio.atomic_write_bytes(fileio.join(tmp, "sub", "b.bin"), content * 2)
            assert fileio.committed_directory(final) != tmp  # not visible while written
        committed = fileio.committed_directory(final)
        assert _tree(committed) == {"a.bin": content, "sub/b.bin": content * 2}
    names = _tree(root)
    assert not any(".tmp-" in name for name in names)
    if fileio.is_url(root):
        record = fileio.read_commit(final)
        assert record["files"] == {"a.bin": 2, "sub/b.bin": 4}
        assert {name.split("/")[3] for name in names if "/_versions/" in name} == {record["version"]}


def test_atomic_directory_failure_keeps_the_old_version(root):
    final = fileio.join(root, "groups", "c")
    with fileio.atomic_directory(final) as tmp:
        fileio.atomic_write_bytes(fileio.join(tmp, "a.bin"), b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.atomic_directory(final) as tmp:
            fileio.atomic_write_bytes(fileio.join(tmp, "a.bin"), b"partial")
            raise RuntimeError("boom")
    assert _tree(fileio.committed_directory(final)) == {"a.bin": b"old"}
    assert not any("partial" in str(v) for v in _tree(root).values())


def test_uncommitted_folder_is_invisible(root):
    assert fileio.committed_directory(fileio.join(root, "nothing")) is None


def test_concurrent_directory_writers_leave_one_complete_version(root):
    final = fileio.join(root, "groups", "raced")
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            with fileio.atomic_directory(final) as tmp:
                for name in ("a", "b", "c"):
                    fileio.atomic_write_bytes(fileio.join(tmp, name), b"writer%d" % i)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if fileio.is_local(root) and errors:
        # two local renames onto the same name: the loser fails cleanly (the winner's folder stays)
        assert all(isinstance(e, OSError) for e in errors)
    else:
        assert errors == []
    tree = _tree(fileio.committed_directory(final))
    assert set(tree) == {"a", "b", "c"} and len(set(tree.values())) == 1  # one writer's whole version
    if fileio.is_url(root):  # every displaced version was deleted by the writer that displaced it
        versions = {n.split("/")[3] for n in _tree(root) if "/_versions/" in n}
        assert versions == {fileio.read_commit(final)["version"]}


def test_replace_directory_refuses_an_object_store(s3_root):
    with pytest.raises(ValueError, match="no rename"):
        fileio.replace_directory(fileio.join(s3_root, "a"), fileio.join(s3_root, "b"))


def _run_until_killed(script: str, ready_marker: str) -> None:
    """Run `script` in a child process, wait for it to print `ready_marker`, then SIGKILL it."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                             text=True, cwd=CHECKOUT, env={**os.environ, "PYTHONPATH": CHECKOUT},
                             start_new_session=True)
    try:
        for line in child.stdout:
            if ready_marker in line:
                break
        else:
            raise AssertionError(f"child exited ({child.wait()}) before {ready_marker!r}")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def test_folder_write_killed_midway_leaves_the_old_version(root):
    final = fileio.join(root, "groups", "killed")
    with fileio.atomic_directory(final) as tmp:
        fileio.atomic_write_bytes(fileio.join(tmp, "a.bin"), b"old")
    _run_until_killed(f"""
        import time
        from comic_pipeline import fileio
        with fileio.atomic_directory({final!r}) as tmp:
            fileio.atomic_write_bytes(fileio.join(tmp, "a.bin"), b"new")
            fileio.atomic_write_bytes(fileio.join(tmp, "b.bin"), b"new")
            print("HALF-WRITTEN", flush=True)
            time.sleep(600)
    """, "HALF-WRITTEN")
    assert _tree(fileio.committed_directory(final)) == {"a.bin": b"old"}
    if fileio.is_url(root):
        assert fileio.remove_uncommitted_versions(final, older_than_s=0)  # the killed writer's
        assert fileio.remove_uncommitted_versions(final, older_than_s=0) == []
        assert _tree(fileio.committed_directory(final)) == {"a.bin": b"old"}


def test_file_write_killed_before_it_lands_leaves_the_old_file(tmp_path):
    url = str(tmp_path / "checkpoint.pt")
    fileio.atomic_write_bytes(url, b"old")
    _run_until_killed(f"""
        import os, time
        from comic_pipeline import fileio
        def stalled_replace(src, dst):
            print("WRITTEN-NOT-MOVED", flush=True)
            time.sleep(600)
        os.replace = stalled_replace
        fileio.atomic_write_bytes({url!r}, b"new" * 100000)
    """, "WRITTEN-NOT-MOVED")
    assert fileio.read_bytes(url) == b"old"


def test_publish_directory_keeps_the_plain_layout_and_drops_stale_files(root):
    final = fileio.join(root, "store.zarr", "comics", "c1")
    with fileio.publish_directory(final) as tmp:
        for name in ("zarr.json", "a/zarr.json", "a/c/0", "b/zarr.json", "b/c/0"):
            fileio.atomic_write_bytes(fileio.join(tmp, name), b"v1")
    assert set(_tree(final)) == {"zarr.json", "a/zarr.json", "a/c/0", "b/zarr.json", "b/c/0"}
    with fileio.publish_directory(final) as tmp:
        for name in ("zarr.json", "a/zarr.json", "a/c/0"):
            fileio.atomic_write_bytes(fileio.join(tmp, name), b"v2")
    assert _tree(final) == {"zarr.json": b"v2", "a/zarr.json": b"v2", "a/c/0": b"v2"}
    assert not any(".tmp-" in name for name in _tree(root))


def test_publish_directory_killed_midway_leaves_nothing_visible(root):
    final = fileio.join(root, "store.zarr", "comics", "new comic")
    _run_until_killed(f"""
        import time
        from comic_pipeline import fileio
        with fileio.publish_directory({final!r}) as tmp:
            fileio.atomic_write_bytes(fileio.join(tmp, "panel_embeddings", "c", "0"), b"data")
            print("HALF-WRITTEN", flush=True)
            time.sleep(600)
            fileio.atomic_write_bytes(fileio.join(tmp, "zarr.json"), b"meta")
    """, "HALF-WRITTEN")
    assert not fileio.exists(final)  # only a dot-named staging folder is left, which readers skip


def test_publish_directory_copies_metadata_after_data(s3_root, monkeypatch):
    fs, _ = url_to_fs(s3_root)  # the cached instance fileio uses too
    order: list[str] = []
    real_copy = fs.copy

    def recording_copy(path1, path2, *args, **kwargs):
        order.extend([path2] if isinstance(path2, str) else path2)
        return real_copy(path1, path2, *args, **kwargs)

    monkeypatch.setattr(fs, "copy", recording_copy)
    final = fileio.join(s3_root, "g")
    with fileio.publish_directory(final) as tmp:
        for name in ("zarr.json", "arr/zarr.json", "arr/c/0", "arr/c/1"):
            fileio.atomic_write_bytes(fileio.join(tmp, name), b"x")
    names = [path.rpartition("/g/")[2] for path in order]
    assert names[:2] == ["arr/c/0", "arr/c/1"] and names[2:] == ["arr/zarr.json", "zarr.json"]
