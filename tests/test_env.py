"""persia.env: PERSIA's reading of RANK / LOCAL_RANK / WORLD_SIZE (nn workers) and
REPLICA_INDEX / REPLICA_SIZE (data loaders, servers), its defaults, set_env, and a precise
ValueError for every bad value."""

from __future__ import annotations

import importlib
import logging

import pytest

import persia.env as persia_env
from persia.env import (
    get_local_rank,
    get_rank,
    get_replica_index,
    get_replica_size,
    get_world_size,
    reload_env,
    set_env,
)

pytestmark = pytest.mark.unit

VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "REPLICA_INDEX", "REPLICA_SIZE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    persia_env._env.is_init = False


def test_nn_worker_reads_rank_local_rank_and_world_size(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("REPLICA_INDEX", "7")  # an nn worker ignores these, as in PERSIA
    reload_env()
    assert (get_rank(), get_local_rank(), get_world_size()) == (3, 1, 4)
    assert (get_replica_index(), get_replica_size()) == (None, None)


def test_data_loader_reads_replica_index_and_size(clean_env):
    clean_env.setenv("REPLICA_INDEX", "2")
    clean_env.setenv("REPLICA_SIZE", "5")
    reload_env()
    assert (get_replica_index(), get_replica_size()) == (2, 5)
    assert (get_rank(), get_local_rank(), get_world_size()) == (None, None, None)


def test_without_replica_index_the_process_is_replica_zero_of_one_with_a_warning(clean_env, caplog):
    with caplog.at_level(logging.WARNING, logger="persia.env"):
        reload_env()
    assert (get_replica_index(), get_replica_size()) == (0, 1)
    assert "REPLICA_INDEX not found" in caplog.text


def test_environment_is_read_once_until_reload(clean_env):
    clean_env.setenv("REPLICA_INDEX", "0")
    clean_env.setenv("REPLICA_SIZE", "2")
    reload_env()
    clean_env.setenv("REPLICA_INDEX", "1")
    assert get_replica_index() == 0
    reload_env()
    assert get_replica_index() == 1


def test_first_get_reads_the_environment_lazily(clean_env):
    persia_env._env.is_init = False
    clean_env.setenv("RANK", "0")
    clean_env.setenv("LOCAL_RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    assert get_world_size() == 2


def test_set_env_sets_values_without_checks_and_clears_the_others(clean_env):
    clean_env.setenv("REPLICA_INDEX", "0")
    clean_env.setenv("REPLICA_SIZE", "1")
    reload_env()
    set_env(rank=5, world_size=2)  # rank >= world_size: set_env checks nothing, as PERSIA's
    assert (get_rank(), get_world_size(), get_local_rank(), get_replica_index()) == (5, 2, None, None)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"RANK": "one", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "RANK must be an integer, got 'one'"),
        ({"RANK": "-1", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "RANK cannot be negative, got -1"),
        ({"RANK": "0", "LOCAL_RANK": "-2", "WORLD_SIZE": "1"}, "LOCAL_RANK cannot be negative, got -2"),
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE should be at least one, got 0"),
        ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK 2 must be less than WORLD_SIZE 2"),
        ({"RANK": "0", "WORLD_SIZE": "1"}, "LOCAL_RANK not found"),
        ({"REPLICA_INDEX": "0"}, "REPLICA_SIZE not found"),
        ({"REPLICA_INDEX": "x", "REPLICA_SIZE": "1"}, "REPLICA_INDEX must be an integer, got 'x'"),
        ({"REPLICA_INDEX": "-1", "REPLICA_SIZE": "1"}, "REPLICA_INDEX cannot be negative, got -1"),
        ({"REPLICA_INDEX": "0", "REPLICA_SIZE": "0"}, "REPLICA_SIZE should be at least one, got 0"),
        ({"REPLICA_INDEX": "3", "REPLICA_SIZE": "3"}, "REPLICA_INDEX 3 must be less than REPLICA_SIZE 3"),
    ],
)
def test_bad_values_raise_value_error_naming_the_variable(clean_env, values, message):
    for name, value in values.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError) as excinfo:
        reload_env()
    assert message in str(excinfo.value)


@pytest.mark.parametrize(("value", "expected"), [("0", False), ("1", True), ("2", True)])
def test_skip_check_data_is_read_at_import_as_an_integer(clean_env, value, expected):
    clean_env.setenv("PERSIA_SKIP_CHECK_DATA", value)
    try:
        assert importlib.reload(persia_env).PERSIA_SKIP_CHECK_DATA is expected
    finally:
        clean_env.delenv("PERSIA_SKIP_CHECK_DATA")
        importlib.reload(persia_env)


def test_a_switch_that_is_not_an_integer_is_refused_naming_it(clean_env):
    clean_env.setenv("PERSIA_LAUNCHER_VERBOSE", "yes")
    try:
        with pytest.raises(ValueError, match="PERSIA_LAUNCHER_VERBOSE must be an integer, got 'yes'"):
            importlib.reload(persia_env)
    finally:
        clean_env.delenv("PERSIA_LAUNCHER_VERBOSE")
        importlib.reload(persia_env)
