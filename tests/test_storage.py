"""Storage behaves the same on a local folder, a file:// URI and the S3 server."""

import os
import threading

import pytest

from pipeline.edges import storage


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file":
        return f"file://{tmp_path}/store"
    request.applymarker(pytest.mark.slow)
    return request.getfixturevalue("s3_prefix")


def test_write_read_and_byte_ranges(root):
    data = bytes(range(256)) * 1000
    uri = storage.join(root, "a", "b.bin")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    assert storage.read_bytes(uri, 1000, 24) == data[1000:1024]
    assert storage.read_bytes(uri, 255_990) == data[255_990:]
    assert storage.read_bytes(uri, 5, 0) == b""


def test_list_is_recursive_sorted_sized_and_skips_hidden_names(root):
    for rel, size in [
        ("z.txt", 3),
        ("a/x.png", 5),
        ("a/b/y.png", 7),
        (".hidden", 1),
        ("a/.cache/q", 1),
    ]:
        storage.write_bytes(storage.join(root, rel), b"x" * size)
    listed = storage.list_objects(root)
    assert [(o.relpath, o.size) for o in listed] == [("a/b/y.png", 7), ("a/x.png", 5), ("z.txt", 3)]
    assert storage.read_bytes(listed[0].uri) == b"x" * 7
    assert storage.list_objects(storage.join(root, "a/b")) == [
        listed[0].__class__(storage.join(root, "a/b", "y.png"), "y.png", 7)
    ]


def test_exists_and_delete(root):
    uri = storage.join(root, "f")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"1")
    assert storage.exists(uri)
    storage.delete(uri)
    storage.delete(uri)  # absent is fine
    assert not storage.exists(uri)


def test_missing_things_raise_not_found_naming_the_uri(root):
    missing = storage.join(root, "nope.png")
    with pytest.raises(storage.NotFound, match="nope.png"):
        storage.read_bytes(missing)
    if storage.is_s3(root):
        assert storage.list_objects(storage.join(root, "empty-prefix")) == []
    else:
        with pytest.raises(storage.NotFound, match="empty-prefix"):
            storage.list_objects(storage.join(root, "empty-prefix"))


@pytest.mark.slow
def test_missing_bucket_is_not_found(s3):
    with pytest.raises(storage.NotFound, match="s3://no-such-bucket-here"):
        storage.list_objects("s3://no-such-bucket-here/x")


def test_arrow_filesystem_reads_what_storage_wrote(root):
    uri = storage.join(root, "dir", "obj.bin")
    storage.write_bytes(uri, b"arrow sees this")
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        assert f.read() == b"arrow sees this"


def test_local_writes_are_atomic_for_a_concurrent_reader(tmp_path):
    # A reader listing and reading while a large file is written (and rewritten)
    # sees it absent or complete, never partial; no temporary name is listed.
    uri, size = str(tmp_path / "big.bin"), 32 << 20
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            for o in storage.list_objects(str(tmp_path)):
                seen.add((o.relpath, o.size))

    watcher = threading.Thread(target=watch)
    watcher.start()
    for fill in (b"a", b"b"):
        storage.write_bytes(uri, fill * size)
    done.set()
    watcher.join()
    assert seen <= {("big.bin", size)}
    assert sorted(os.listdir(tmp_path)) == ["big.bin"]


def test_failed_local_write_leaves_nothing(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(storage.StorageError, match="file/child"):
        storage.write_bytes(str(tmp_path / "file" / "child"), b"data")
    assert sorted(os.listdir(tmp_path)) == ["file"]
