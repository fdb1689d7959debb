"""Shared pytest fixtures and the test tiers.

Tiers (markers registered in pyproject.toml, which also turns on ``--strict-markers``):

* ``unit``: no child process (no embedding server, TorchServe or other subprocess) and fast; an
  embedding server started in this process (``start_server``) on loopback is fine. The whole tier
  runs in well under 90 s on 2 cores: ``pytest -m unit``.
* ``process``: starts real child processes (``ServerGroup``, TorchServe, ``subprocess``), or is
  too slow for the unit tier (each such test says why in a comment).
* ``ceph``: uses the real Ceph cluster (the ``ceph_s3`` fixture below); these are ``process``
  tests too.

A module sets ``pytestmark`` where all its tests are one tier, and marks each test otherwise.
:func:`pytest_collection_modifyitems` checks the marks when tests are collected and fails the
collection, naming every wrong test, where a test has neither ``unit`` nor ``process`` or both,
where a test uses ``ceph_s3`` (as an argument, or through another fixture's arguments) without
``ceph`` and ``process``, or where a ``ceph`` test is not also ``process``. Nothing is marked
automatically: the tier is visible in the test file. A fixture that asks for ``ceph_s3`` only
at run time (``request.getfixturevalue``, as test_storage.py's backend fixture does for its
``s3`` parameter) is not seen at collection, so such a parameter carries its marks itself
(``pytest.param(..., marks=...)``).

Fixtures (tests never import one another; what several files share is here):

``ceph_s3`` (session scope): a real single-node Ceph cluster (one monitor, one memstore OSD, the
RADOS Gateway on a free loopback port; all state in a temporary directory) started with
:mod:`ctrserve.ceph_cluster`, with an S3 user and the bucket ``ctrserve-test``. It starts in about
2-3 s the first time a test asks for it and is stopped (SIGTERM, then SIGKILL after a short
grace) when the session ends. Without Ceph's programs installed the tests that use it fail
with the install command; they are not skipped.

``tiny_ctr`` (session scope): a :class:`TinyCtrKit`, the serving tests' tiny real dense model
(an MLP over ``concat(dense, pooled embeddings, flattened raw embeddings)`` scripted with
``torch.jit.script``, written as ``model.pt`` beside a ``model.json`` made with
:meth:`DenseModelSpec.for_config`, exactly what the trainer exports), its embedding and global
configs, request batches in bytes and JSON form, and the independent computation of expected
scores.

``server_configs`` (module scope): ``(embedding_config.yml, global_config.yml)`` of the embedding
service tests (four features, one of them raw, two tables of dim 8 and one of dim 4).

``lookup_checks`` (session scope): a :class:`LookupChecks`, random batches for ``server_configs``'
features and the bit-for-bit comparison of two lookup results.

``registered_servers`` (session scope): a context manager starting a service registry
(``persia.registry``) and embedding servers (child processes) registered in it as PERSIA's
embedding parameter servers; yields ``(ServerGroup, RegistryServer)``.

``pooling_emb`` (session scope): the fast-path tests' embedding config, three tables of dim 4
(sum, mean and sqrt pooling: ``a``, ``b``, ``c``) and one of dim 16 (``d``).

``wait_until`` (session scope): polls a predicate until it is truthy, failing after a timeout.

``process_tree`` (session scope): the processes below a pid, and whether processes have exited
(psutil), for checking that stopping a program leaves nothing behind.

``huge_page_bytes``: the bytes on huge pages of the memory area holding an array, read from
``/proc/self/smaps``; it skips the test where the kernel cannot collapse pages onto huge pages
(``MADV_COLLAPSE``: Linux 6.1+ with transparent huge pages not turned off).

``pairwise_auc`` and ``pairwise_gauc`` (session scope): the AUC and the group AUC by counting
every (positive, negative) pair in plain Python, references for trainer.metrics.

``farmhash_reference`` (session scope): FarmHash's Fingerprint(uint64) and Fingerprint(uint128)
written with Python integers, the reference for the FarmHash kernels and the feature ops.

``rank0_registry``: a service registry served in this process, named by
``EMBEDDING_WORKER_SERVICE``, with this process as nn-worker rank 0 of 1 (``persia.env``);
yields the ``RegistryServer``. ``nn_worker_entries`` (session scope): the addresses registered
as nn workers in such a registry.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from ctrserve import ceph_cluster
from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.model_spec import MODEL_FILE, SPEC_FILE, DenseModelSpec, version_dir
from embedding_server.modelroot.hotload import FollowOptions
from embedding_server.rpc.client import EmbeddingClient, RawEmbedding
from embedding_server.rpc.launcher import ServerGroup
from persia.registry import RegistryServer
from persia.service import EMBEDDING_PARAMETER_SERVER
from trainer.batch import PyPersiaBatchData

REPO = Path(__file__).resolve().parents[1]
CEPH_TEST_BUCKET = "ctrserve-test"
TIERS = ("unit", "process")


# ----------------------------------------------------------------------------------------- tiers


def tier_problems(item: pytest.Item) -> list[str]:
    """What is wrong with one test's tier marks (nothing: an empty list)."""
    marks = {mark.name for mark in item.iter_markers()}
    tiers = [tier for tier in TIERS if tier in marks]
    uses_ceph = "ceph_s3" in getattr(item, "fixturenames", ())
    problems = []
    if not tiers:
        problems.append("has neither the 'unit' nor the 'process' mark")
    elif len(tiers) > 1:
        problems.append("has both the 'unit' and the 'process' mark")
    if uses_ceph and not {"ceph", "process"} <= marks:
        problems.append("uses the ceph_s3 fixture, so it must be marked 'ceph' and 'process'")
    if "ceph" in marks and "process" not in marks:
        problems.append("is marked 'ceph' (a real Ceph cluster: child processes) but not 'process'")
    return problems


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = [f"  {item.nodeid}: {problem}" for item in items for problem in tier_problems(item)]
    if wrong:
        raise pytest.UsageError(
            "tests without their right tier marks (see tests/conftest.py: every test is 'unit' or "
            "'process'; tests using ceph_s3 are also 'ceph'):\n" + "\n".join(wrong)
        )


# ------------------------------------------------------------------------------------------ Ceph


@dataclass(frozen=True)
class CephS3:
    """How to reach the test cluster's S3 gateway."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    start_seconds: float

    def env(self) -> dict[str, str]:
        """Environment variables that ``embedding_server.storage.base`` reads."""
        return {
            "CTRSERVE_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def options(self, **overrides):
        """StorageOptions for this gateway, with ``overrides`` on top."""
        from embedding_server.storage.base import StorageOptions

        values = {"endpoint": self.endpoint, "access_key": self.access_key, "secret_key": self.secret_key}
        return StorageOptions.from_dict({**values, **overrides})


@pytest.fixture(scope="session")
def ceph_s3():
    missing = ceph_cluster.missing_binaries()
    if missing:
        pytest.fail(
            f"the S3 tests need a real Ceph; not found: {', '.join(missing)}; {ceph_cluster.INSTALL_HINT}",
            pytrace=False,
        )
    root = tempfile.mkdtemp(prefix="ctrserve-ceph-")
    began = time.monotonic()
    try:
        cluster = ceph_cluster.CephCluster.start(root, die_with_parent=True)
    except ceph_cluster.CephError as exc:  # its logs stay in ``root`` for diagnosis
        pytest.fail(f"could not start the test Ceph cluster: {exc}", pytrace=False)
    try:
        cluster.create_bucket(CEPH_TEST_BUCKET)
        yield CephS3(
            cluster.endpoint, cluster.access_key, cluster.secret_key, CEPH_TEST_BUCKET, time.monotonic() - began
        )
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------ the serving tests' model


class TinyCtr(torch.nn.Module):
    """``sigmoid(MLP(concat(dense, flattened embeddings)))``: one score per sample."""

    def __init__(self, in_width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = torch.nn.Linear(in_width, 16)
        self.out = torch.nn.Linear(16, 1)

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        parts = [dense]
        for s in sparse:
            parts.append(s.reshape(s.shape[0], -1))
        return torch.sigmoid(self.out(torch.relu(self.hidden(torch.cat(parts, 1)))))


class TinyCtrKit:
    """The serving tests' model, configs, request batches and expected scores."""

    DENSE_WIDTH = 5
    EMB = {
        "slots_config": {
            "C1": {"dim": 8},
            "C2": {"dim": 8, "sqrt_scaling": True},
            "C3": {"dim": 4, "mean_scaling": True},
            "H1": {"dim": 4, "embedding_summation": False, "sample_fixed_size": 3},
        },
    }
    CRITEO_EMB = {"slots_config": {f"C{i}": {"dim": 4} for i in range(1, 27)}}
    GLOBAL = {
        "common_config": {"job_type": "train"},
        "embedding_parameter_server_config": {"capacity": 100_000},
    }

    def write_configs(self, directory: Path, emb_config: dict | None = None) -> tuple[Path, Path]:
        """``embedding_config.yml`` (``EMB`` unless given) and ``global_config.yml`` in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        emb, glob = directory / "embedding_config.yml", directory / "global_config.yml"
        emb.write_text(yaml.safe_dump(self.EMB if emb_config is None else emb_config, sort_keys=False))
        glob.write_text(yaml.safe_dump(self.GLOBAL))
        return emb, glob

    def export_version(
        self,
        model_root: Path,
        version: int,
        seed: int,
        emb_config: dict | None = None,
        dense_width: int | None = None,
    ) -> Path:
        """Write ``<model_root>/dense/vN/{model.pt, model.json}`` (model.json last, as the trainer)."""
        config = EmbeddingConfig.from_dict(self.EMB if emb_config is None else emb_config)
        dense_width = self.DENSE_WIDTH if dense_width is None else dense_width
        spec = DenseModelSpec.for_config(config, version=version, step=100 * version, dense_width=dense_width)
        in_width = dense_width + sum(f.dim * (f.sample_fixed_size if not f.pooled else 1) for f in spec.features)
        target = model_root / version_dir(version)
        target.mkdir(parents=True, exist_ok=True)
        torch.jit.script(TinyCtr(in_width, seed).eval()).save(str(target / MODEL_FILE))
        (target / SPEC_FILE).write_text(spec.to_json())
        return target

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> PyPersiaBatchData:
        """A request batch as clients build it (with a target, which serving ignores)."""
        batch = PyPersiaBatchData()
        batch.add_dense([rng.normal(size=(batch_size, self.DENSE_WIDTH)).astype(np.float32)])

        def lists(high: int, max_len: int) -> list[np.ndarray]:
            return [rng.integers(0, high, rng.integers(0, max_len + 1)).astype(np.uint64) for _ in range(batch_size)]

        batch.add_sparse([("C1", lists(1000, 3)), ("C2", lists(50, 4)), ("C3", lists(2**62, 2)), ("H1", lists(300, 5))])
        batch.add_target(rng.integers(0, 2, (batch_size, 1)).astype(np.float32))
        return batch

    @staticmethod
    def as_json(batch: PyPersiaBatchData) -> dict:
        """The same batch as the handler's JSON request form."""
        return {
            "dense": batch.dense_matrix().tolist(),
            "sparse": {
                f.name: [f.ids[f.offsets[i] : f.offsets[i + 1]].tolist() for i in range(f.batch_size)]
                for f in batch.sparse
            },
        }

    @staticmethod
    def expected_scores(model_dir: Path, embeddings: EmbeddingClient, batch: PyPersiaBatchData) -> np.ndarray:
        """The independent computation: the same TorchScript file run directly on embeddings looked
        up directly from the embedding servers."""
        spec = DenseModelSpec.from_json((model_dir / SPEC_FILE).read_text())
        model = torch.jit.load(str(model_dir / MODEL_FILE))
        by_name: dict[str, SparseFeature] = {f.name: f for f in batch.sparse}
        looked_up = embeddings.lookup([by_name[f.name] for f in spec.features])
        inputs = []
        for f in spec.features:
            value = looked_up.embeddings[f.name]
            inputs.append(value.values if isinstance(value, RawEmbedding) else value)
        with torch.no_grad():
            return model(torch.from_numpy(batch.dense_matrix()), inputs)[:, 0].numpy()


@pytest.fixture(scope="session")
def tiny_ctr() -> TinyCtrKit:
    return TinyCtrKit()


# -------------------------------------------------------------------- the embedding service tests'


SERVICE_EMB = {
    "slots_config": {
        "user": {"dim": 8},
        "item": {"dim": 8, "sqrt_scaling": True},
        "history": {"dim": 8, "embedding_summation": False, "sample_fixed_size": 4},
        "query": {"dim": 4, "mean_scaling": True},
    },
    "feature_groups": {"items": ["item", "history"]},
}
SERVICE_GLOBAL = {
    "embedding_parameter_server_config": {"capacity": 50_000},
    "sparse_optimizer": {"type": "adagrad", "lr": 0.05},
}


@pytest.fixture(scope="module")
def server_configs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cfg")
    (d / "emb.yml").write_text(yaml.safe_dump(SERVICE_EMB, sort_keys=False))
    (d / "global.yml").write_text(yaml.safe_dump(SERVICE_GLOBAL))
    return d / "emb.yml", d / "global.yml"


class LookupChecks:
    """Batches for ``server_configs``' features, and the comparison of two lookup results."""

    @staticmethod
    def random_batch(rng: np.random.Generator, batch: int = 32) -> list[SparseFeature]:
        def lists(high, max_len):
            return [rng.integers(0, high, rng.integers(0, max_len + 1)).astype(np.uint64) for _ in range(batch)]

        return [
            SparseFeature.from_lists("user", lists(2**63, 3)),
            SparseFeature.from_lists("item", lists(500, 5)),
            SparseFeature.from_lists("history", lists(500, 6)),
            SparseFeature.from_lists("query", lists(1000, 4)),
        ]

    @staticmethod
    def assert_same(a, b) -> None:
        """Every embedding of lookup result ``a`` equals ``b``'s bit for bit (raw ones with their mask)."""
        for name, value in a.embeddings.items():
            other = b.embeddings[name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), name
            else:
                assert torch.equal(value.values, other.values) and torch.equal(value.mask, other.mask), name


@pytest.fixture(scope="session")
def lookup_checks() -> LookupChecks:
    return LookupChecks()


@contextlib.contextmanager
def _registered_servers(
    emb_path: Path, glob_path: Path, workdir: Path, num_shards: int = 2
) -> Iterator[tuple[ServerGroup, RegistryServer]]:
    """A service registry on loopback and ``num_shards`` embedding servers (child processes)
    registered in it as PERSIA's embedding parameter servers, all stopped when the block ends."""
    registry = RegistryServer(("127.0.0.1", 0))
    registry.start()
    try:
        with ServerGroup.start(emb_path, glob_path, num_shards=num_shards, workdir=workdir) as group:
            for index, address in enumerate(group.addresses):
                registry.entries.put(EMBEDDING_PARAMETER_SERVER, index, address, num_shards)
            yield group, registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def registered_servers() -> Callable[..., contextlib.AbstractContextManager[tuple[ServerGroup, RegistryServer]]]:
    """``with registered_servers(emb_path, glob_path, workdir, num_shards=2) as (group, registry)``:
    PERSIA's view of a job's embedding servers (``process`` tests only: it starts child processes)."""
    return _registered_servers


@pytest.fixture(scope="session")
def pooling_emb() -> EmbeddingConfig:
    return EmbeddingConfig.from_dict(
        {
            "slots_config": {
                "a": {"dim": 4},
                "b": {"dim": 4, "mean_scaling": True},
                "c": {"dim": 4, "sqrt_scaling": True},
                "d": {"dim": 16},
            }
        }
    )


# ------------------------------------------------------------------------------------ waiting, memory


def poll_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it is truthy (returning its value); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def polling_follow() -> FollowOptions:
    """Follower options that poll a local model root quickly and without inotify, so a test sees
    exactly what a listing-based follower (S3, HDFS) does."""
    return FollowOptions(poll_interval_s=0.02, rescan_interval_s=0.2, gap_timeout_s=30.0, use_inotify=False)


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., object]:
    return poll_until


class ProcessTree:
    """The processes a started program started in turn, and whether processes have exited."""

    @staticmethod
    def descendants(pid: int) -> list[psutil.Process]:
        """Every process below ``pid`` (children, theirs, ...); none once ``pid`` has exited."""
        try:
            return psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    @staticmethod
    def gone(processes: list[psutil.Process]) -> bool:
        """Whether every one of ``processes`` has exited (a zombie has: only its reaping is left)."""
        return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in processes)


@pytest.fixture(scope="session")
def process_tree() -> type[ProcessTree]:
    """:class:`ProcessTree`: ``descendants(pid)`` and ``gone(processes)``, for checking that
    stopping a program leaves none of its processes behind."""
    return ProcessTree


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def collapse_supported() -> bool:
    """Linux 6.1+ (MADV_COLLAPSE) with transparent huge pages not turned off."""
    if platform.system() != "Linux" or not THP.exists() or "[never]" in THP.read_text():
        return False
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    return (major, minor) >= (6, 1)


def bytes_on_huge_pages(array: np.ndarray) -> int:
    """Bytes on huge pages of the kernel's memory area that holds ``array``'s first byte (areas
    with the same settings may be merged, so this can include a neighbour's: never less)."""
    address = array.ctypes.data
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no memory area holds address {address:#x}")


@pytest.fixture()
def huge_page_bytes() -> Callable[[np.ndarray], int]:
    if not collapse_supported():
        pytest.skip("needs Linux 6.1+ with transparent huge pages")
    return bytes_on_huge_pages


def _pairwise_auc(labels, scores) -> float:
    """AUC by counting every (positive, negative) pair: 1 when the positive scores higher, 1/2 on a tie."""
    pos = [s for y, s in zip(labels, scores) if y > 0.5]
    neg = [s for y, s in zip(labels, scores) if y <= 0.5]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _pairwise_gauc(labels, scores, groups, weight: str = "impressions") -> float:
    """GAUC in plain Python: each group's pairwise AUC, groups of one class skipped, the mean
    weighted by the group's samples (impressions) or positives (clicks); NaN without any group."""
    by_group: dict = {}
    for y, s, g in zip(labels, scores, groups):
        by_group.setdefault(g, []).append((y, s))
    total, weights = 0.0, 0.0
    for rows in by_group.values():
        ys = [y for y, _ in rows]
        clicks = sum(1 for y in ys if y > 0.5)
        if clicks in (0, len(ys)):
            continue
        w = len(ys) if weight == "impressions" else clicks
        total += w * _pairwise_auc(ys, [s for _, s in rows])
        weights += w
    return total / weights if weights else float("nan")


@pytest.fixture(scope="session")
def pairwise_auc() -> Callable[..., float]:
    """``pairwise_auc(labels, scores)``: the ROC AUC by counting pairs (a reference for metrics)."""
    return _pairwise_auc


@pytest.fixture(scope="session")
def pairwise_gauc() -> Callable[..., float]:
    """``pairwise_gauc(labels, scores, groups, weight)``: GAUC in plain Python (a reference)."""
    return _pairwise_gauc


class FarmHashReference:
    """FarmHash's integer fingerprints, written from farmhash.h with Python integers: the
    reference for ``embedding_server.core.farmhash`` and for the feature ops' ``hash`` and ``cross``."""

    MASK = (1 << 64) - 1
    KMUL = 0x9DDFEA08EB382D69

    @classmethod
    def fingerprint_u64(cls, x: int) -> int:
        """FarmHash's Fingerprint(uint64)."""
        b = (x * cls.KMUL) & cls.MASK
        b ^= b >> 44
        b = (b * cls.KMUL) & cls.MASK
        b ^= b >> 41
        return (b * cls.KMUL) & cls.MASK

    @classmethod
    def fingerprint_pair(cls, low: int, high: int) -> int:
        """FarmHash's Fingerprint(uint128) of (low, high)."""
        a = ((low ^ high) * cls.KMUL) & cls.MASK
        a ^= a >> 47
        b = ((high ^ a) * cls.KMUL) & cls.MASK
        b ^= b >> 44
        b = (b * cls.KMUL) & cls.MASK
        b ^= b >> 41
        return (b * cls.KMUL) & cls.MASK


@pytest.fixture(scope="session")
def farmhash_reference() -> type[FarmHashReference]:
    """:class:`FarmHashReference`: FarmHash's Fingerprint(uint64) and Fingerprint(uint128) in plain Python."""
    return FarmHashReference


class PushControl:
    """Instruments an embedding client's gradient pushes; the real push still runs. Push ``n``
    (counted from 0) waits for :meth:`release` when listed in ``hold``, every push first waits
    ``delay`` seconds (a slow link), and those listed in ``fail`` raise as a lost shard does.
    Install it before the context's first ``backward`` (its pusher binds the client's method).

    Args:
        client: the client whose ``push_gradients`` is wrapped.
        delay: seconds each push takes longer.
        hold: pushes that wait for :meth:`release`.
        fail: pushes that raise ``ShardUnavailableError`` instead of being applied.
    """

    def __init__(self, client: EmbeddingClient, delay: float = 0.0, hold=(), fail=()):
        import threading

        self._push = client.push_gradients
        client.push_gradients = self  # type: ignore[method-assign]
        self.delay = delay
        self.held = {n: threading.Event() for n in hold}
        self.fail = set(fail)
        self.started = 0
        #: the results whose gradients were applied, in the order they were applied
        self.applied: list = []
        self._lock = threading.Lock()

    def release(self, n: int) -> None:
        self.held[n].set()

    def __call__(self, result) -> None:
        from embedding_server.core.errors import ShardUnavailableError

        with self._lock:
            n = self.started
            self.started += 1
        if n in self.held:
            assert self.held[n].wait(30), f"gradient push {n} was never released"
        if self.delay:
            time.sleep(self.delay)
        if n in self.fail:
            raise ShardUnavailableError(f"embedding shard 1 unavailable (gradient push {n})")
        self._push(result)
        with self._lock:
            self.applied.append(result)


@pytest.fixture
def push_control() -> type[PushControl]:
    """:class:`PushControl`: slow, held or failing gradient pushes of a training context."""
    return PushControl


@pytest.fixture()
def rank0_registry(monkeypatch) -> Iterator[RegistryServer]:
    from persia import env

    server = RegistryServer(("127.0.0.1", 0))
    server.start()
    monkeypatch.setenv("EMBEDDING_WORKER_SERVICE", server.address)
    monkeypatch.delenv("PERSIA_NN_WORKER_ADDRS", raising=False)
    env.set_env(rank=0, world_size=1, local_rank=0)
    yield server
    server.stop()
    env.reload_env()


@pytest.fixture(scope="session")
def nn_worker_entries() -> Callable[[RegistryServer], list[str]]:
    from persia.service import NN_WORKER

    def entries(server: RegistryServer) -> list[str]:
        return [s["address"] for s in server.entries.read(NN_WORKER, None, 0.0)["services"]]

    return entries
