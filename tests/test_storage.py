"""Storage behaves the same on a local folder, a file:// URI and the S3 server."""

import dataclasses
import json
import os
import pickle
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import botocore.exceptions  # noqa: F401 - imported before as_nobody forks (see there)
import numpy as np
import pytest

from pipeline.config import ConfigError, PreprocessConfig
from pipeline.data.sources import InputItem, ShardPlan
from pipeline.edges import storage
from pipeline.jobs.preprocess import build, preprocess
from tests import images


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


# --- entries that cannot be read: one reject each, never the whole listing ------------

NOBODY = 65534
T = TypeVar("T")


def as_nobody(fn: Callable[[], T]) -> T:
    """`fn()` run in a forked child as uid and gid 65534: the tests run as root, whom
    no permission stops. Returns what it returned, or raises what it raised. What
    `fn` imports must be imported already: that user may not read the interpreter's
    own folder on every machine."""
    if os.geteuid() != 0:
        return fn()  # not root: permissions already apply
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: runs fn, sends the outcome, never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome = (True, fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the parent
            outcome = (False, e)
        finally:
            with os.fdopen(write_end, "wb") as f:
                pickle.dump(outcome, f)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        ok, value = pickle.load(f)
    os.waitpid(pid, 0)
    if not ok:
        raise value
    return value


@pytest.fixture
def open_tmp():
    """A fresh folder user 65534 can reach (pytest's tmp_path sits in a folder only
    root may enter)."""
    path = Path(tempfile.mkdtemp(prefix="storage-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_entries_that_are_not_readable_files_are_reported_and_the_rest_listed(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"bb")
    os.symlink("nowhere.png", root / "broken.png")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.symlink("..", root / "sub" / "up")  # back to the root: must not be walked forever
    os.symlink("sub", root / "linked")  # a link to a folder is a folder of inputs
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
    devices = []
    try:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # as /dev/null
        devices = [("null", "not_a_regular_file", "a character device, not a file")]
    except PermissionError:
        pass  # a container without CAP_MKNOD

    objects, unreadable = storage.list_inputs(str(root))
    assert [(o.relpath, o.size) for o in objects] == [
        ("a.png", 1),
        ("linked/b.png", 2),
        ("sub/b.png", 2),
    ]
    assert [(u.relpath, u.reason, u.detail) for u in unreadable] == sorted(
        [
            ("broken.png", "broken_link", "a link to nowhere.png, which is missing"),
            ("fifo", "not_a_regular_file", "a FIFO (named pipe), not a file"),
            ("linked/up", "link_loop", "a link to .., a folder that contains it"),
            ("loop1", "link_loop", "a link to loop2, in a loop of links"),
            ("loop2", "link_loop", "a link to loop1, in a loop of links"),
            ("sock", "not_a_regular_file", "a socket, not a file"),
            ("sub/up", "link_loop", "a link to .., a folder that contains it"),
            *devices,
        ]
    )
    assert all(u.uri == str(root / u.relpath) for u in unreadable)
    # Our own outputs hold no such entries: listing them names the first one.
    with pytest.raises(storage.StorageError, match="broken.png: a link to nowhere.png"):
        storage.list_objects(str(root))


def test_what_this_user_may_not_read_is_one_reject_each(open_tmp):
    root = open_tmp / "in"
    for rel in ("open/a.png", "closed/b.png", "dark/c.png", "secret.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "closed").chmod(0)  # may not be listed
    (root / "dark").chmod(0o444)  # may be listed, but not entered: its entries not stat'ed
    (root / "secret.png").chmod(0)

    objects, unreadable = as_nobody(lambda: storage.list_inputs(str(root)))
    assert [o.relpath for o in objects] == ["open/a.png"]
    assert [(u.relpath, u.reason, u.detail) for u in unreadable] == [
        ("closed", "permission_denied", "this user may not list it"),
        ("dark/c.png", "permission_denied", "this user may not stat it"),
        ("secret.png", "permission_denied", "this user may not read the file"),
    ]
    # Refused at read time (permissions changed after listing): AccessDenied,
    # which the build turns into one reject.
    with pytest.raises(storage.AccessDenied, match="secret.png: permission denied"):
        as_nobody(lambda: storage.read_bytes(str(root / "secret.png")))


def test_an_input_root_missing_or_unlistable_is_the_one_config_error(open_tmp):
    root = open_tmp / "in"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    root.chmod(0o311)  # may be entered, not listed

    def job(input_: Path) -> None:
        preprocess(PreprocessConfig(input=str(input_), output=str(open_tmp / "out")))

    with pytest.raises(storage.AccessDenied, match=f"^{root}: permission denied$"):
        as_nobody(lambda: storage.list_inputs(str(root)))
    with pytest.raises(ConfigError, match=f"^preprocess.input: cannot list {root}: permission"):
        as_nobody(lambda: job(root))
    missing = f"^preprocess.input: cannot list {open_tmp}/gone: not found \\(no such folder\\)$"
    with pytest.raises(ConfigError, match=missing):
        job(open_tmp / "gone")
    assert sorted(os.listdir(open_tmp)) == ["in"]  # nothing written


def test_a_listed_object_deleted_or_refused_before_its_read_is_one_reject(root, request):
    for name in ("keep", "gone", "denied"):
        png = images.encode(images.noise(24, 24, len(name)), "PNG")
        storage.write_bytes(storage.join(root, "in", f"{name}.png"), png)
    objects, unreadable = storage.list_inputs(storage.join(root, "in"))
    assert [o.relpath for o in objects] == ["denied.png", "gone.png", "keep.png"]
    assert unreadable == []
    storage.delete(objects[1].uri)
    refused = storage.is_s3(root)  # S3 can refuse one object to its owner; a file, not root
    if refused:
        _deny_reading(objects[0].uri, request)

    cfg = PreprocessConfig(
        input=storage.join(root, "in"), output=storage.join(root, "out"), resolution=16
    )
    plan = ShardPlan("train", 0, tuple(InputItem(o.uri, o.relpath) for o in objects))
    batch = {
        "split": np.array([plan.split], dtype=object),
        "index": np.array([plan.index]),
        "plan_sha256": np.array(["digest"], dtype=object),
        "items": np.array([json.dumps([dataclasses.asdict(i) for i in plan.items])], dtype=object),
    }
    record = json.loads(build.build_shards(batch, cfg)["record"][0])

    rejects = {r["uri"]: r["reason"] for r in record["rejects"]}
    assert rejects.pop(objects[1].uri) == "vanished"
    if refused:
        assert rejects.pop(objects[0].uri) == "permission_denied"
    assert rejects == {}
    assert record["inputs"] == 3 and record["samples"] == (1 if refused else 2)


def _deny_reading(uri: str, request) -> None:
    """Deny GetObject on `uri` by a bucket policy (the S3 server answers 403), until
    the test ends."""
    import boto3

    bucket, key = storage.split_s3(uri)
    client = boto3.client("s3")
    statement = {
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/{key}",
    }
    policy = {"Version": "2012-10-17", "Statement": [statement]}
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    request.addfinalizer(lambda: client.delete_bucket_policy(Bucket=bucket))
