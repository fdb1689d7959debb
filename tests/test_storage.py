"""The storage layer: one contract suite run against every backend, then each backend's own
errors, options and URL parsing.

Backends of the contract suite:
- ``local``: a temporary directory.
- ``s3``: a real Ceph cluster's S3 gateway on loopback (the session fixture ``ceph_s3``).
- ``hdfs``: :class:`HdfsStorage`'s code over pyarrow's local file system, with HDFS's rule that a
  rename onto an existing file fails (no Hadoop cluster can run here). With
  ``CTRSERVE_TEST_HDFS_URL=hdfs://host:port/path`` it runs against that cluster instead.
"""

from __future__ import annotations

import hashlib
import os
import stat as stat_module
import struct
import threading
import time
import uuid
from functools import partial

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from embedding_server.storage import remote as storage_remote
from embedding_server.storage.base import (
    LocalStorage,
    Storage,
    StorageError,
    StorageNotFoundError,
    StorageOptions,
    UnreadableFileError,
    plain_names,
)
from embedding_server.storage.remote import HdfsStorage, S3Storage, parse_hdfs_url, parse_s3_url
from embedding_server.storage.urls import open_storage

# The s3 backend runs on the real Ceph cluster (child processes); the others in this process.
BACKENDS = [
    pytest.param("local", marks=pytest.mark.unit),
    pytest.param("s3", marks=[pytest.mark.process, pytest.mark.ceph]),
    pytest.param("hdfs", marks=pytest.mark.unit),
]


class HdfsLikeHandler(pafs.FileSystemHandler):
    """pyarrow's local file system with HDFS's rename rule: never onto an existing path."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()
        self.refused_renames = 0

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def get_type_name(self) -> str:
        return "hdfs-like"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the root")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        if self.fs.get_file_info(dest).type != pafs.FileType.NotFound:
            self.refused_renames += 1
            raise OSError(f"rename {src} to {dest}: destination exists")
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


@pytest.fixture
def backend_storage(request, tmp_path) -> Storage:
    """A fresh, empty storage root on the backend named by the test's ``backend`` parameter."""
    kind = request.param
    if kind == "local":
        yield open_storage(str(tmp_path / "root"))
        return
    if kind == "s3":
        ceph = request.getfixturevalue("ceph_s3")
        st = open_storage(f"s3://{ceph.bucket}/{uuid.uuid4().hex}", ceph.options())
        yield st
        st.delete("")
        return
    real = os.environ.get("CTRSERVE_TEST_HDFS_URL")
    if real:
        st = open_storage(f"{real.rstrip('/')}/{uuid.uuid4().hex}")
        yield st
        st.delete("")
        return
    yield HdfsStorage.with_filesystem(f"hdfs://namenode:8020{tmp_path}/root", pafs.PyFileSystem(HdfsLikeHandler()))


def contract(test):
    """Run ``test`` once per backend, with a fresh storage root as ``backend_storage``."""
    return pytest.mark.parametrize("backend_storage", BACKENDS, indirect=True)(test)


# --------------------------------------------------------------------------- contract suite


@contract
def test_round_trip_and_overwrite(backend_storage):
    st = backend_storage
    payloads = {"empty.bin": b"", "small.txt": b"hello", "one-mib.bin": os.urandom(1 << 20)}
    for name, data in payloads.items():
        st.write_atomic(f"d/{name}", data)
    for name, data in payloads.items():
        assert st.read_bytes(f"d/{name}") == data
    st.write_atomic("d/small.txt", b"replaced, and longer than before")
    assert st.read_bytes("d/small.txt") == b"replaced, and longer than before"
    st.write_atomic("d/small.txt", b"short")
    assert st.read_bytes("d/small.txt") == b"short"


@contract
def test_listing_is_sorted_plain_names_and_leaves_no_temporary_files(backend_storage):
    st = backend_storage
    for name in ["b.arrow", "a.arrow", "c/x.arrow", "10", "9"]:
        st.write_atomic(f"p/{name}", b"x")
    assert st.list_dir("p") == ["10", "9", "a.arrow", "b.arrow", "c"]
    assert st.list_dir("") == ["p"]
    assert st.list_dir("missing") == []
    assert st.list_dir("p/a.arrow") == []  # a file has no entries


@contract
def test_nested_prefixes_do_not_leak_into_each_other(backend_storage):
    st = backend_storage
    for path in ["a/b/1", "a/b/2", "a/bc/3", "a/b2", "ab/4"]:
        st.write_atomic(path, path.encode())
    assert st.list_dir("a") == ["b", "b2", "bc"]
    assert st.list_dir("a/b") == ["1", "2"]
    assert st.list_dir("a/bc") == ["3"]
    assert st.list_dir("") == ["a", "ab"]
    assert st.read_bytes("a/bc/3") == b"a/bc/3"


@contract
def test_stat_size_and_mtime(backend_storage):
    st = backend_storage
    before = time.time()
    st.write_atomic("s/file.bin", b"12345678")
    info = st.stat("s/file.bin")
    assert (info.size, info.is_dir) == (8, False)
    assert st.size("s/file.bin") == 8
    assert before - 2 <= st.mtime("s/file.bin") <= time.time() + 2  # S3 keeps whole seconds
    assert st.stat("s").is_dir
    with pytest.raises(StorageNotFoundError, match="missing.bin"):
        st.stat("s/missing.bin")


@contract
def test_exists_for_files_directories_and_missing_paths(backend_storage):
    st = backend_storage
    st.write_atomic("e/f/g.txt", b"g")
    assert st.exists("e/f/g.txt") and st.exists("e/f") and st.exists("e")
    assert not st.exists("e/f/nope") and not st.exists("e/f/g")


@contract
def test_delete_file_and_whole_prefix(backend_storage):
    st = backend_storage
    for path in ["x/keep.txt", "x/gone/1", "x/gone/deep/2", "x/gone2/3"]:
        st.write_atomic(path, b"1")
    st.delete("x/keep.txt")
    assert not st.exists("x/keep.txt")
    st.delete("x/gone")
    assert not st.exists("x/gone/1") and not st.exists("x/gone/deep/2") and not st.exists("x/gone")
    assert st.read_bytes("x/gone2/3") == b"1"  # a sibling sharing the name's prefix survives
    st.delete("x/never-existed")
    st.delete("x/gone")  # twice is fine


@contract
def test_child_storage_shares_files_and_settings(backend_storage):
    st = backend_storage
    st.write_atomic("models/v1/dense.pt", b"dense")
    child = st.child("models")
    assert child.url == st.join_url("models")
    assert child.read_bytes("v1/dense.pt") == b"dense"
    grandchild = child.child("v1")
    grandchild.write_atomic("meta.json", b"{}")
    assert st.list_dir("models/v1") == ["dense.pt", "meta.json"]
    assert type(grandchild) is type(st)
    with pytest.raises(StorageError, match="inside the storage root"):
        child.child("../escape")


@contract
def test_missing_file_is_a_not_found_error_naming_the_url(backend_storage):
    st = backend_storage
    with pytest.raises(StorageNotFoundError) as caught:
        st.read_bytes("nothing/here.bin")
    assert isinstance(caught.value, FileNotFoundError)
    assert st.join_url("nothing/here.bin") in str(caught.value)


@contract
def test_read_size_bound(backend_storage):
    st = backend_storage
    st.write_atomic("big.bin", b"z" * 1000)
    assert st.read_bytes("big.bin", max_bytes=1000) == b"z" * 1000
    with pytest.raises(StorageError, match="1000 bytes is more than the allowed 999"):
        st.read_bytes("big.bin", max_bytes=999)


@contract
def test_read_buffer_returns_the_same_bytes_and_errors_as_read_bytes(backend_storage):
    st = backend_storage
    big = np.random.default_rng(0).bytes(3 << 20)  # over one huge page: pooled memory locally
    for name, data in (("small.bin", b"abc"), ("big.bin", big), ("empty.bin", b"")):
        st.write_atomic(name, data)
        got = st.read_buffer(name, max_bytes=len(data))
        assert bytes(got) == data and len(got) == len(data)
    with pytest.raises(StorageError, match=f"{len(big)} bytes is more than the allowed {len(big) - 1}"):
        st.read_buffer("big.bin", max_bytes=len(big) - 1)
    with pytest.raises(StorageNotFoundError):
        st.read_buffer("nothing/here.bin")


@contract
@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "a/.."])
def test_paths_escaping_the_root_are_refused(backend_storage, bad):
    st = backend_storage
    for call in (
        lambda: st.read_bytes(bad),
        lambda: st.write_atomic(bad, b"1"),
        lambda: st.list_dir(bad),
        lambda: st.delete(bad),
        lambda: st.exists(bad),
        lambda: st.stat(bad),
        lambda: st.child(bad),
    ):
        with pytest.raises(StorageError, match="must be relative and stay inside the storage root") as caught:
            call()
        assert st.url in str(caught.value)


def _payload(version: int, size: int) -> bytes:
    """Self-checking bytes: a header (version, length, digest of the body) and the body."""
    body = np.full(size, version % 251, np.uint8).tobytes()
    return struct.pack("<QQ", version, size) + hashlib.sha256(body).digest() + body


def _check_payload(data: bytes) -> int:
    version, size = struct.unpack_from("<QQ", data)
    body = data[48:]
    assert len(body) == size, f"torn read: {len(body)} body bytes of version {version}, expected {size}"
    assert hashlib.sha256(body).digest() == data[16:48], f"torn read: version {version}'s body does not match"
    return version


@contract
def test_concurrent_reader_never_sees_a_partial_object(backend_storage):
    """Overwrite an object with versions of different sizes while a reader thread reads it."""
    st = backend_storage
    # S3: 12 MiB goes up as a multipart upload, the others as single PUTs.
    sizes = [3 << 20, 1 << 20, 12 << 20] if isinstance(st, S3Storage) else [3 << 20, 1 << 20, 5 << 20]
    st.write_atomic("hot/blob", _payload(0, sizes[0]))
    stop, seen, errors = threading.Event(), [], []
    reads_missing = 0

    def reader():
        nonlocal reads_missing
        while not stop.is_set():
            try:
                seen.append(_check_payload(st.read_bytes("hot/blob")))
            except StorageNotFoundError:
                reads_missing += 1  # HDFS only: the moment between removing the old file and the rename
            except Exception as exc:  # reported in the main thread
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 13):
            st.write_atomic("hot/blob", _payload(version, sizes[version % len(sizes)]))
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors[0]
    assert len(seen) >= 5 and len(set(seen)) >= 2, seen
    assert seen == sorted(seen), "a reader went back to an older version"
    if not isinstance(st, HdfsStorage):
        assert reads_missing == 0


@contract
def test_new_objects_appear_only_complete(backend_storage):
    """A lister polling a directory reads each new object whole the first time it sees it."""
    st = backend_storage
    size = (11 << 20) if isinstance(st, S3Storage) else (4 << 20)
    stop, errors, checked = threading.Event(), [], set()

    def lister():
        while not stop.is_set() or len(checked) < 4:
            try:
                for name in st.list_dir("incoming"):
                    if name not in checked:
                        _check_payload(st.read_bytes(f"incoming/{name}"))
                        checked.add(name)
            except Exception as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=lister)
    thread.start()
    try:
        for i in range(4):
            st.write_atomic(f"incoming/packet-{i:04d}", _payload(i, size))
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors[0]
    assert checked == {f"packet-{i:04d}" for i in range(4)}


# --------------------------------------------------------------------------- S3 on Ceph


@pytest.mark.process
@pytest.mark.ceph
def test_ceph_starts_quickly(ceph_s3):
    assert ceph_s3.start_seconds < 20, f"Ceph took {ceph_s3.start_seconds:.1f} s to start"


@pytest.mark.process
@pytest.mark.ceph
def test_s3_writes_put_no_temporary_objects(ceph_s3):
    st = open_storage(f"s3://{ceph_s3.bucket}/{uuid.uuid4().hex}", ceph_s3.options())
    st.write_atomic("a/one.bin", b"1" * 100)
    st.write_atomic("a/one.bin", b"2" * 200)
    st.write_atomic("a/two.bin", os.urandom(11 << 20))
    everything = st.filesystem.get_file_info(pafs.FileSelector(st._key(""), recursive=True))
    assert sorted(i.path.rsplit("/", 1)[1] for i in everything if i.is_file) == ["one.bin", "two.bin"]
    st.delete("")


@pytest.mark.process
@pytest.mark.ceph
def test_s3_bad_credentials_are_refused(ceph_s3):
    good = open_storage(f"s3://{ceph_s3.bucket}/creds", ceph_s3.options())
    good.write_atomic("x", b"1")
    for options in (ceph_s3.options(secret_key="not-the-secret"), ceph_s3.options(access_key="NOSUCHKEY")):
        st = open_storage(f"s3://{ceph_s3.bucket}/creds", options)
        for action, call in (
            ("read", partial(st.read_bytes, "x")),
            ("write", partial(st.write_atomic, "y", b"1")),
            ("listing", partial(st.list_dir, "")),
            ("existence check", partial(st.exists, "x")),
        ):
            with pytest.raises(StorageError, match=f"s3://{ceph_s3.bucket}/creds.*{action} failed: access denied"):
                call()
    assert good.list_dir("") == ["x"]  # nothing was written with the wrong keys
    good.delete("")


@pytest.mark.process
@pytest.mark.ceph
def test_s3_missing_bucket_is_named(ceph_s3):
    st = open_storage("s3://no-such-bucket/prefix", ceph_s3.options())
    for call in (
        lambda: st.list_dir(""),
        lambda: st.read_bytes("x"),
        lambda: st.exists("x"),
        lambda: st.write_atomic("x", b"1"),
        lambda: st.stat("x"),
        lambda: st.delete("x"),
    ):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1:") as caught:
            call()
        assert not isinstance(caught.value, StorageNotFoundError)


@pytest.mark.process
@pytest.mark.ceph
def test_s3_unreachable_endpoint_is_named(ceph_s3):
    options = ceph_s3.options(endpoint="http://127.0.0.1:1", max_attempts=1, connect_timeout_s=1)
    st = open_storage(f"s3://{ceph_s3.bucket}/x", options)
    with pytest.raises(
        StorageError, match=r"s3://.*/x/y: read failed: cannot connect to the S3 endpoint http://127.0.0.1:1"
    ):
        st.read_bytes("y")
    with pytest.raises(StorageError, match="listing failed: cannot connect"):
        st.list_dir("")


@pytest.mark.process
@pytest.mark.ceph
def test_s3_settings_come_from_the_environment(ceph_s3, monkeypatch):
    for name, value in ceph_s3.env().items():
        monkeypatch.setenv(name, value)
    st = open_storage(f"s3://{ceph_s3.bucket}/env-{uuid.uuid4().hex}")
    st.write_atomic("f", b"via environment")
    assert st.child("").read_bytes("f") == b"via environment"
    st.delete("")


@pytest.mark.unit
def test_s3_with_one_static_key_is_refused_before_any_request(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StorageError, match="access_key is set but secret_key is not.*default credential chain"):
        open_storage("s3://bucket/prefix", endpoint="http://127.0.0.1:7480", access_key="only-this")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "only-that")
    with pytest.raises(StorageError, match="secret_key is set but access_key is not"):
        open_storage("s3://bucket/prefix", endpoint="http://127.0.0.1:7480")


@pytest.mark.process
@pytest.mark.ceph
def test_s3_without_static_keys_uses_the_aws_default_chain_profile_file(ceph_s3, monkeypatch, tmp_path):
    """No keys in the options or AWS_ACCESS_KEY_ID: pyarrow's S3 client asks the AWS SDK's default
    chain, here a shared credentials file holding the Ceph user's keys under a named profile."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[ceph]\naws_access_key_id = {ceph_s3.access_key}\naws_secret_access_key = {ceph_s3.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_PROFILE", "ceph")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata to wait for here
    url = f"s3://{ceph_s3.bucket}/profile-{uuid.uuid4().hex}"
    st = open_storage(url, endpoint=ceph_s3.endpoint, region="us-east-1")
    st.write_atomic("dense/f.bin", b"via the profile")
    assert open_storage(url, endpoint=ceph_s3.endpoint, region="us-east-1").read_bytes("dense/f.bin") == (
        b"via the profile"
    )
    st.delete("")
    # The same chain with a wrong key is refused by the gateway, and the message says where keys came from.
    credentials.write_text(f"[ceph]\naws_access_key_id = {ceph_s3.access_key}\naws_secret_access_key = wrong\n")
    with pytest.raises(StorageError, match="AWS default chain"):
        open_storage(url, endpoint=ceph_s3.endpoint, region="us-east-1").read_bytes("dense/f.bin")


@pytest.mark.process
@pytest.mark.ceph
def test_s3_listing_skips_keys_that_are_not_plain_names(ceph_s3):
    st = open_storage(f"s3://{ceph_s3.bucket}/{uuid.uuid4().hex}", ceph_s3.options())
    st.write_atomic("d/ok", b"1")
    with st.filesystem.open_output_stream(st._key("d") + "/.hidden") as out:
        out.write(b"1")
    assert st.list_dir("d") == ["ok"]
    st.delete("")


@pytest.mark.process
@pytest.mark.ceph
def test_checkpoint_dump_and_load_through_s3_is_bit_identical(ceph_s3, monkeypatch):
    from embedding_server.core.batch import SparseFeature
    from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    from embedding_server.rpc.client import InProcessEmbeddingClient

    emb = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 8}, "item": {"dim": 4, "mean_scaling": True}}})
    train = GlobalConfig.from_dict(
        {"common_config": {"job_type": "train"}, "sparse_optimizer": {"type": "adagrad", "lr": 0.1}}
    )
    rng = np.random.default_rng(7)
    batch = [
        SparseFeature.from_lists(name, [rng.integers(0, 10_000, rng.integers(0, 6)).tolist() for _ in range(64)])
        for name in ("user", "item")
    ]
    trained = InProcessEmbeddingClient(emb, train, num_shards=2)
    trained.lookup(batch)
    url = f"s3://{ceph_s3.bucket}/ckpt-{uuid.uuid4().hex}"
    for name, value in ceph_s3.env().items():  # a plain URL: settings from the environment
        monkeypatch.setenv(name, value)
    trained.dump(url)
    assert open_storage(url).list_dir("") == ["manifest.json", "shard-00000-of-00002", "shard-00001-of-00002"]
    infer = GlobalConfig.from_dict({"common_config": {"job_type": "infer"}})
    for name in ceph_s3.env():  # an open Storage: explicit options, no environment
        monkeypatch.delenv(name)
    loaded = InProcessEmbeddingClient(emb, infer, num_shards=3)
    loaded.load(open_storage(url, ceph_s3.options()))
    expected, actual = trained.lookup(batch).embeddings, loaded.lookup(batch).embeddings
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    open_storage(url, ceph_s3.options()).delete("")


# --------------------------------------------------------------------------- options and URLs


@pytest.mark.unit
def test_options_from_dict_rejects_unknown_keys_and_bad_values():
    assert StorageOptions.from_dict(None) == StorageOptions()
    opts = StorageOptions.from_dict({"endpoint": "http://127.0.0.1:7480", "connect_timeout_s": 2, "max_attempts": 5})
    assert (opts.endpoint, opts.connect_timeout_s, opts.max_attempts) == ("http://127.0.0.1:7480", 2.0, 5)
    with pytest.raises(
        StorageError, match=r"global_config.yml storage: unknown option\(s\) endpont; known options are access_key"
    ):
        StorageOptions.from_dict({"endpont": "x"}, where="global_config.yml storage")
    bad_values = [
        ({"endpoint": "127.0.0.1:7480"}, "must start with http:// or https://"),
        ({"endpoint": "http://127.0.0.1:7480/path"}, "no path"),
        ({"endpoint": "http://127.0.0.1:99999"}, "port"),
        ({"endpoint": "http://"}, "no host"),
        ({"access_key": 12}, "access_key: expected a string"),
        ({"connect_timeout_s": 0}, "positive number"),
        ({"connect_timeout_s": float("nan")}, "positive number"),
        ({"connect_timeout_s": True}, "positive number"),
        ({"max_attempts": 0}, "integer from 1 to 20"),
        ({"max_attempts": 2.5}, "integer from 1 to 20"),
    ]
    for data, message in bad_values:
        with pytest.raises(StorageError, match=message):
            StorageOptions.from_dict(data)
    with pytest.raises(StorageError, match="expected a mapping"):
        StorageOptions.from_dict(["endpoint"])


@pytest.mark.unit
def test_options_from_environment_never_override_explicit_ones():
    env = {
        "CTRSERVE_S3_ENDPOINT": "http://ceph:7480",
        "AWS_ENDPOINT_URL": "http://other:9000",
        "AWS_ACCESS_KEY_ID": "ENVKEY",
        "AWS_SECRET_ACCESS_KEY": "envsecret",
        "AWS_DEFAULT_REGION": "eu",
        "HADOOP_USER_NAME": "etl",
        "KRB5CCNAME": "FILE:/tmp/krb5cc_0",
    }
    opts = StorageOptions(access_key="MINE", secret_key="mine").with_env(env)
    assert (opts.endpoint, opts.access_key, opts.secret_key, opts.region) == ("http://ceph:7480", "MINE", "mine", "eu")
    assert (opts.hdfs_user, opts.kerb_ticket) == ("etl", "/tmp/krb5cc_0")
    assert StorageOptions().with_env({"AWS_ENDPOINT_URL": "http://other:9000"}).endpoint == "http://other:9000"
    with pytest.raises(StorageError, match="CTRSERVE_S3_ENDPOINT"):
        StorageOptions().with_env({"CTRSERVE_S3_ENDPOINT": "ceph:7480"})


@pytest.mark.unit
def test_secrets_stay_out_of_repr():
    text = repr(StorageOptions(access_key="AK", secret_key="very-secret", session_token="tok"))
    assert "AK" in text and "very-secret" not in text and "tok" not in text


@pytest.mark.unit
def test_open_storage_dispatch_and_refusals(tmp_path):
    local = open_storage(f"file://{tmp_path}")
    assert isinstance(local, LocalStorage) and open_storage(local) is local
    local.write_atomic("a", b"1")
    assert open_storage(tmp_path).read_bytes("a") == b"1"  # os.PathLike works too
    with pytest.raises(StorageError, match="already open"):
        open_storage(local, endpoint="http://x:1")
    with pytest.raises(StorageError, match="scheme 'gs://' is not supported"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="file:///abs/path"):
        open_storage("file://otherhost/x")
    with pytest.raises(StorageError, match="unknown option"):
        open_storage(str(tmp_path), nonsense=1)


@pytest.mark.unit
def test_storage_kind_of_url():
    from embedding_server.storage.kinds import StorageKind

    assert [StorageKind.of_url(u) for u in ("/a/b", "rel/x", "file:///a", "s3://bucket/p", "hdfs://nn:8020/p")] == [
        StorageKind.LOCAL,
        StorageKind.LOCAL,
        StorageKind.LOCAL,
        StorageKind.S3,
        StorageKind.HDFS,
    ]
    assert StorageKind.of_url("gs://bucket/x") is None


@pytest.mark.unit
def test_s3_url_parsing():
    assert parse_s3_url("s3://models") == ("models", "")
    assert parse_s3_url("s3://models/") == ("models", "")
    assert parse_s3_url("s3://models/a/b/") == ("models", "a/b")
    for url, message in [
        ("s3://Models/x", "bucket name 'Models' is not valid"),
        ("s3:///x", "bucket name '' is not valid"),
        ("s3://AK:SK@models/x", "credentials do not belong in the URL"),
        ("s3://models/x?endpoint_override=y", "query parameters"),
        ("s3://models/a/../../b", "must not contain '..'"),
    ]:
        with pytest.raises(StorageError, match=message):
            parse_s3_url(url)


@pytest.mark.unit
def test_hdfs_url_parsing():
    assert parse_hdfs_url("hdfs://namenode:9000/models/a") == ("namenode", 9000, "/models/a")
    assert parse_hdfs_url("hdfs://namenode/models/") == ("namenode", 8020, "/models")
    assert parse_hdfs_url("hdfs:///models") == ("default", 0, "/models")
    assert parse_hdfs_url("hdfs://namenode:8020") == ("namenode", 8020, "/")
    for url, message in [
        ("hdfs://nn:port/x", "port is not a number"),
        ("hdfs://nn:8020/a/../../b", "'..'"),
        ("hdfs://user@nn:8020/x", "without user"),
        ("hdfs://nn:8020/x?a=b", "without user, query"),
    ]:
        with pytest.raises(StorageError, match=message):
            parse_hdfs_url(url)


@pytest.mark.unit
def test_hdfs_options_reach_pyarrow(monkeypatch, tmp_path):
    calls = []

    def fake_hadoop(host, port, user=None, kerb_ticket=None):
        calls.append((host, port, user, kerb_ticket))
        return pafs.LocalFileSystem()

    monkeypatch.setattr(storage_remote.pafs, "HadoopFileSystem", fake_hadoop)
    monkeypatch.delenv("HADOOP_USER_NAME", raising=False)
    monkeypatch.setenv("KRB5CCNAME", "FILE:/tmp/krb5cc_1000")
    st = open_storage(f"hdfs://namenode:9000{tmp_path}/m", hdfs_user="etl")
    assert calls == [("namenode", 9000, "etl", "/tmp/krb5cc_1000")]
    assert st.url == f"hdfs://namenode:9000{tmp_path}/m"
    st.write_atomic("x/y", b"1")
    assert (tmp_path / "m" / "x" / "y").read_bytes() == b"1"


@pytest.mark.unit
@pytest.mark.skipif(bool(os.environ.get("CTRSERVE_TEST_HDFS_URL")), reason="a Hadoop client is configured here")
def test_hdfs_without_a_hadoop_client_says_what_to_install():
    with pytest.raises(StorageError) as caught:
        open_storage("hdfs://127.0.0.1:1/models")
    message = str(caught.value)
    assert message.startswith("hdfs://127.0.0.1:1/models: cannot connect to HDFS")
    assert "JAVA_HOME" in message and "CLASSPATH" in message and len(message) < 600


@pytest.mark.unit
def test_hdfs_replaces_existing_files_although_its_rename_does_not(tmp_path):
    handler = HdfsLikeHandler()
    st = HdfsStorage.with_filesystem(f"hdfs://nn:8020{tmp_path}", pafs.PyFileSystem(handler))
    st.write_atomic("f", b"old")
    st.write_atomic("f", b"new")
    assert st.read_bytes("f") == b"new" and handler.refused_renames == 1
    assert sorted(os.listdir(tmp_path)) == ["f"]  # no temporary file left behind


@pytest.mark.unit
def test_plain_names_drops_unsafe_and_hidden_entries(caplog):
    assert plain_names("s3://b/p", ["b", "a", "..", ".", "", "x/y", ".tmp", "n\0ul"]) == ["a", "b"]
    assert caplog.text.count("not a plain file name") == 5


@pytest.mark.unit
def test_local_storage_behaviour_is_unchanged(tmp_path):
    st = LocalStorage(str(tmp_path))
    st.write_atomic("a/b.txt", b"hi")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.txt"]
    assert st.list_dir("a") == ["b.txt"] and st.read_bytes("a/b.txt") == b"hi"
    st.delete("a")
    assert not (tmp_path / "a").exists()


def _bounded(call, seconds: float = 5.0):
    """``call()`` on a daemon thread: its result or exception, failing the test if it has not
    returned within ``seconds`` (a read that blocks must not hang the test run)."""
    box: list = []

    def run():
        try:
            box.append(("ok", call()))
        except BaseException as exc:  # handed back to the test
            box.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"the read did not return within {seconds} s"
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


SPECIAL_FILES = {
    "fifo": ("is a FIFO, not a regular file", lambda path, outside: os.mkfifo(path)),
    "dev-zero": ("outside the storage root", lambda path, outside: path.symlink_to("/dev/zero")),
    "file-outside": ("outside the storage root", lambda path, outside: path.symlink_to(outside / "secret.bin")),
    "dir-outside": ("outside the storage root", lambda path, outside: path.symlink_to(outside)),
    "dir-inside": ("is a directory, not a regular file", lambda path, outside: path.mkdir()),
}


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(SPECIAL_FILES))
def test_local_reads_refuse_special_files_and_links_leaving_the_root_at_once(tmp_path, kind):
    """Only regular files inside the root are read: a FIFO would block the open forever, /dev/zero
    would be read up to the size bound, and a link out of the root reads what the root does not hold."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"not the model's")
    st = LocalStorage(str(tmp_path / "root"))
    st.write_atomic("d/keep.bin", b"kept")
    message, make = SPECIAL_FILES[kind]
    make(tmp_path / "root" / "d" / "odd.bin", outside)
    for read in (st.read_bytes, st.read_buffer, lambda path: st.read_bytes(path, max_bytes=1 << 30)):
        with pytest.raises(UnreadableFileError, match=message) as caught:
            _bounded(lambda read=read: read("d/odd.bin"))
        assert st.join_url("d/odd.bin") in str(caught.value)
    assert bytes(st.read_buffer("d/keep.bin")) == b"kept"  # regular files still read


@pytest.mark.unit
def test_local_reads_follow_links_that_stay_inside_the_root_and_children_keep_the_root_as_bound(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.bin").write_bytes(b"outside")
    root = tmp_path / "root"
    st = LocalStorage(str(root))
    st.write_atomic("a/real.bin", b"inside")
    (root / "a" / "link.bin").symlink_to(root / "a" / "real.bin")
    (root / "elsewhere").symlink_to(outside)
    assert st.read_bytes("a/link.bin") == b"inside"
    child = st.child("elsewhere")  # a child storage whose root leads out of the parent's
    with pytest.raises(UnreadableFileError, match="outside the storage root"):
        child.read_bytes("f.bin")
    assert LocalStorage(str(root / "elsewhere")).read_bytes("f.bin") == b"outside"  # a root of its own: fine


@pytest.mark.unit
def test_the_size_bound_is_checked_before_reading_and_is_an_unreadable_file_error(tmp_path):
    st = LocalStorage(str(tmp_path))
    st.write_atomic("big.bin", b"z" * 1000)
    with pytest.raises(UnreadableFileError, match="1000 bytes is more than the allowed 999"):
        st.read_buffer("big.bin", max_bytes=999)


@pytest.mark.unit
def test_local_writes_are_group_readable_by_default_and_modes_are_configurable(tmp_path):
    """Files written 0640 and created folders 0750 by default (a server of the writer's group reads
    them), whatever the umask; both configurable, and ``umask`` honours the process umask."""
    old = os.umask(0o077)
    try:
        st = open_storage(str(tmp_path / "root"))
        st.write_atomic("incremental/shard-0-of-1/p.bin", b"x")
        assert stat_module.S_IMODE(os.stat(tmp_path / "root/incremental/shard-0-of-1/p.bin").st_mode) == 0o640
        for folder in ("root", "root/incremental", "root/incremental/shard-0-of-1"):
            assert stat_module.S_IMODE(os.stat(tmp_path / folder).st_mode) == 0o750, folder
        st.child("dense").write_atomic("v1/model.json", b"{}")  # a child keeps the modes
        assert stat_module.S_IMODE(os.stat(tmp_path / "root/dense/v1/model.json").st_mode) == 0o640

        strict = open_storage(str(tmp_path / "strict"), {"file_mode": "0600", "dir_mode": "0700"})
        strict.write_atomic("a/f", b"x")
        assert stat_module.S_IMODE(os.stat(tmp_path / "strict/a/f").st_mode) == 0o600
        assert stat_module.S_IMODE(os.stat(tmp_path / "strict/a").st_mode) == 0o700

        os.umask(0o002)
        masked = open_storage(str(tmp_path / "masked"), file_mode="umask", dir_mode="umask")
        masked.write_atomic("a/f", b"x")
        assert stat_module.S_IMODE(os.stat(tmp_path / "masked/a/f").st_mode) == 0o664
        assert stat_module.S_IMODE(os.stat(tmp_path / "masked/a").st_mode) == 0o775
    finally:
        os.umask(old)
    for bad, message in [
        ({"file_mode": "0440"}, "file_mode.*owner 600"),
        ({"dir_mode": "0640"}, "dir_mode.*owner 700"),
        ({"file_mode": "4640"}, "at most 0777"),
        ({"file_mode": "rw-r-----"}, "octal"),
        ({"file_mode": 416}, "expected a string"),
    ]:
        with pytest.raises(StorageError, match=message):
            StorageOptions.from_dict(bad)
