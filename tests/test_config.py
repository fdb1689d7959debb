"""Loading and validation of embedding_config.yml and global_config.yml from real YAML files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from embedding_server.core.config import (
    EmbeddingConfig,
    GlobalConfig,
    HashStackConfig,
    InitMethod,
    JobType,
    Pooling,
    SlotConfig,
)
from embedding_server.core.errors import ConfigError
from embedding_server.core.optimizers import SGD, Adagrad, Adam, optimizer_from_dict

pytestmark = pytest.mark.unit


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_embedding(tmp_path: Path, text: str) -> EmbeddingConfig:
    return EmbeddingConfig.load(write(tmp_path, "embedding_config.yml", text))


def load_global(tmp_path: Path, text: str) -> GlobalConfig:
    return GlobalConfig.load(write(tmp_path, "global_config.yml", text))


def embedding_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, "embedding_config.yml", text)
    with pytest.raises(ConfigError) as info:
        EmbeddingConfig.load(path)
    message = str(info.value)
    assert str(path) in message, f"error does not name the file: {message}"
    return message


def global_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, "global_config.yml", text)
    with pytest.raises(ConfigError) as info:
        GlobalConfig.load(path)
    message = str(info.value)
    assert str(path) in message, f"error does not name the file: {message}"
    return message


# --------------------------------------------------------------------------- embedding_config.yml


def test_slot_defaults_apply_when_only_dim_is_given(tmp_path):
    cfg = load_embedding(
        tmp_path,
        """
        slots_config:
          user:
            dim: 8
        """,
    )
    slot = cfg.slot("user")
    assert slot == SlotConfig(dim=8)
    assert (slot.embedding_summation, slot.sqrt_scaling, slot.mean_scaling) == (True, False, False)
    assert slot.pooling is Pooling.SUM
    assert slot.sample_fixed_size == 10
    assert slot.hash_stack_config is None
    assert cfg.feature_index_prefix_bit == 8
    assert cfg.feature_groups == {}
    assert cfg.feature_names == ["user"]


def test_every_slot_option_is_read_from_yaml(tmp_path):
    cfg = load_embedding(
        tmp_path,
        """
        feature_index_prefix_bit: 12
        slots_config:
          user:
            dim: 16
            embedding_summation: false
            sample_fixed_size: 3
          item:
            dim: 4
            sqrt_scaling: true
            hash_stack_config:
              hash_stack_rounds: 2
              embedding_size: 1000
          tag:
            dim: 4
            mean_scaling: true
        """,
    )
    assert cfg.feature_index_prefix_bit == 12
    assert cfg.slot("user") == SlotConfig(dim=16, embedding_summation=False, sample_fixed_size=3)
    assert cfg.slot("item").sqrt_scaling is True
    assert cfg.slot("item").hash_stack_config == HashStackConfig(hash_stack_rounds=2, embedding_size=1000)
    assert cfg.slot("tag").mean_scaling is True
    # PERSIA's flags select the pooling
    assert [cfg.slot(name).pooling for name in ("user", "item", "tag")] == [Pooling.NONE, Pooling.SQRTN, Pooling.MEAN]
    # One table per ungrouped feature, indexed in file order.
    assert [(t.name, t.index, t.dim, t.features) for t in cfg.tables.values()] == [
        ("user", 0, 16, ("user",)),
        ("item", 1, 4, ("item",)),
        ("tag", 2, 4, ("tag",)),
    ]


def test_slot_configs_alias_is_accepted(tmp_path):
    cfg = load_embedding(
        tmp_path,
        """
        slot_configs:
          user:
            dim: 8
            mean_scaling: true
        """,
    )
    assert cfg.slots_config == {"user": SlotConfig(dim=8, mean_scaling=True)}
    assert cfg.table_of("user").dim == 8


def test_slots_config_and_slot_configs_together_are_refused(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          user: {dim: 8}
        slot_configs:
          item: {dim: 8}
        """,
    )
    assert "'slots_config' or 'slot_configs', not both" in message


def test_misspelled_slot_key_names_file_dotted_key_and_suggestion(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          user:
            dim: 8
            sqrt_scalng: true
        """,
    )
    assert "unknown key 'slots_config.user.sqrt_scalng'" in message
    assert "did you mean 'sqrt_scaling'?" in message


def test_misspelled_hash_stack_key_names_nested_dotted_key(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          user:
            dim: 8
            hash_stack_config:
              hash_stack_round: 2
              embedding_size: 100
        """,
    )
    assert "unknown key 'slots_config.user.hash_stack_config.hash_stack_round'" in message
    assert "did you mean 'hash_stack_rounds'?" in message


def test_misspelled_server_key_names_file_dotted_key_and_suggestion(tmp_path):
    message = global_error(
        tmp_path,
        """
        embedding_parameter_server_config:
          capcity: 1000
        """,
    )
    assert "unknown key 'embedding_parameter_server_config.capcity'" in message
    assert "did you mean 'capacity'?" in message


def test_unknown_top_level_key_is_refused_with_suggestion(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          user: {dim: 8}
        feature_group:
          g: [user]
        """,
    )
    assert "unknown key 'feature_group'" in message
    assert "did you mean 'feature_groups'?" in message


def test_unrelated_unknown_top_level_key_lists_known_keys_without_guess(tmp_path):
    message = global_error(
        tmp_path,
        """
        zzz: 1
        """,
    )
    assert "unknown key 'zzz'" in message
    assert "did you mean" not in message
    assert "common_config" in message and "embedding_parameter_server_config" in message


@pytest.mark.parametrize("dim", [0, -3])
def test_non_positive_dim_is_refused(tmp_path, dim):
    message = embedding_error(
        tmp_path,
        f"""
        slots_config:
          user:
            dim: {dim}
        """,
    )
    assert "'slots_config.user'" in message
    assert f"dim must be > 0, got {dim}" in message


def test_non_positive_sample_fixed_size_is_refused(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          user: {dim: 4, embedding_summation: false, sample_fixed_size: 0}
        """,
    )
    assert "sample_fixed_size must be > 0, got 0" in message


def test_missing_dim_is_reported_as_required_key(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          user:
            sqrt_scaling: true
        """,
    )
    assert "missing required key 'slots_config.user.dim'" in message


def test_empty_embedding_config_file_misses_slots_config(tmp_path):
    message = embedding_error(tmp_path, "")
    assert "missing required key 'slots_config'" in message


def test_empty_slots_config_is_refused(tmp_path):
    message = embedding_error(tmp_path, "slots_config: {}\n")
    assert "slots_config must name at least one feature" in message


@pytest.mark.parametrize("bits", [-1, 64])
def test_feature_index_prefix_bit_out_of_range_is_refused(tmp_path, bits):
    message = embedding_error(
        tmp_path,
        f"""
        feature_index_prefix_bit: {bits}
        slots_config:
          user: {{dim: 4}}
        """,
    )
    assert f"feature_index_prefix_bit must be in [0, 63], got {bits}" in message


def test_sqrt_and_mean_scaling_together_are_refused(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          user:
            dim: 8
            sqrt_scaling: true
            mean_scaling: true
        """,
    )
    assert "'slots_config.user'" in message
    assert "sqrt_scaling and mean_scaling are exclusive" in message


@pytest.mark.parametrize(
    "slot_yaml, fragment",
    [
        ('dim: "8"', "'slots_config.user.dim' must be an integer, got '8'"),
        ("dim: 8.5", "'slots_config.user.dim' must be an integer, got 8.5"),
        ("dim: true", "'slots_config.user.dim' must be an integer, got True"),
        (
            "dim: 8, embedding_summation: 'yes'",
            "'slots_config.user.embedding_summation' must be true or false, got 'yes'",
        ),
        ("dim: 8, mean_scaling: 1", "'slots_config.user.mean_scaling' must be true or false, got 1"),
        ("dim: 8, sample_fixed_size: [3]", "'slots_config.user.sample_fixed_size' must be an integer, got [3]"),
        ("dim: 8, hash_stack_config: 5", "'slots_config.user.hash_stack_config' must be a mapping, got int"),
    ],
)
def test_wrong_slot_value_types_are_refused(tmp_path, slot_yaml, fragment):
    message = embedding_error(tmp_path, f"slots_config:\n  user: {{{slot_yaml}}}\n")
    assert fragment in message


def test_slots_config_as_list_is_refused(tmp_path):
    message = embedding_error(tmp_path, "slots_config: [user, item]\n")
    assert "'slots_config' must be a mapping, got list" in message


def test_feature_group_members_as_string_is_refused(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          a: {dim: 4}
        feature_groups:
          g: a
        """,
    )
    assert "'feature_groups.g' must be a list, got str" in message


@pytest.mark.parametrize(
    "server_yaml, fragment",
    [
        ('capacity: "lots"', "'embedding_parameter_server_config.capacity' must be an integer, got 'lots'"),
        ("capacity: 10.0", "'embedding_parameter_server_config.capacity' must be an integer, got 10.0"),
        ('weight_bound: "high"', "'embedding_parameter_server_config.weight_bound' must be a number, got 'high'"),
        ("weight_bound: false", "'embedding_parameter_server_config.weight_bound' must be a number, got False"),
        ("incremental_dir: 3", "'embedding_parameter_server_config.incremental_dir' must be a string, got 3"),
    ],
)
def test_wrong_server_value_types_are_refused(tmp_path, server_yaml, fragment):
    message = global_error(tmp_path, f"embedding_parameter_server_config:\n  {server_yaml}\n")
    assert fragment in message


def test_section_given_as_scalar_is_refused(tmp_path):
    message = global_error(tmp_path, "common_config: train\n")
    assert "'common_config' must be a mapping, got str" in message


def test_top_level_list_is_refused(tmp_path):
    message = embedding_error(tmp_path, "- dim: 8\n")
    assert "the top level must be a mapping, got list" in message


def test_invalid_yaml_syntax_is_reported(tmp_path):
    message = global_error(tmp_path, "common_config: {job_type: train\n")
    assert "not valid YAML" in message


def test_missing_embedding_config_file_is_reported(tmp_path):
    path = tmp_path / "nowhere" / "embedding_config.yml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        EmbeddingConfig.load(path)
    assert str(path) in str(info.value)


def test_missing_global_config_file_is_reported(tmp_path):
    path = tmp_path / "global_config.yml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        GlobalConfig.load(path)
    assert str(path) in str(info.value)


def test_directory_instead_of_file_is_reported_as_not_found(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        GlobalConfig.load(tmp_path)


# --------------------------------------------------------------------------- feature groups


def test_feature_group_members_share_one_table(tmp_path):
    cfg = load_embedding(
        tmp_path,
        """
        slots_config:
          user: {dim: 8}
          clicked_item: {dim: 4}
          candidate_item: {dim: 4}
        feature_groups:
          items: [clicked_item, candidate_item]
        """,
    )
    shared = cfg.table_of("clicked_item")
    assert cfg.table_of("candidate_item") is shared
    assert shared.name == "items"
    assert shared.dim == 4
    assert shared.features == ("clicked_item", "candidate_item")
    assert cfg.table_of("user").name == "user"
    assert cfg.table_of("user").features == ("user",)
    assert sorted(t.index for t in cfg.tables.values()) == [0, 1]
    assert len(cfg.tables) == 2
    assert cfg.table_of("user").salt != shared.salt


def test_feature_group_with_unknown_member_is_refused(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          a: {dim: 4}
        feature_groups:
          g: [a, b]
        """,
    )
    assert "feature group 'g' names unknown feature 'b'" in message


def test_feature_group_mixing_dims_is_refused(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          a: {dim: 4}
          b: {dim: 8}
        feature_groups:
          g: [a, b]
        """,
    )
    assert "feature group 'g' mixes dims [4, 8]" in message


def test_feature_in_two_groups_is_refused(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          a: {dim: 4}
          b: {dim: 4}
          c: {dim: 4}
        feature_groups:
          g: [a, b]
          h: [c, a]
        """,
    )
    assert "feature 'a' is in two groups: 'g' and 'h'" in message


def test_empty_feature_group_is_refused(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          a: {dim: 4}
        feature_groups:
          g: []
        """,
    )
    assert "feature group 'g' is empty" in message


def test_feature_group_named_like_a_feature_is_refused(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        slots_config:
          a: {dim: 4}
          b: {dim: 4}
        feature_groups:
          a: [a, b]
        """,
    )
    assert "feature group 'a' has the same name as a feature" in message


def test_unknown_feature_lookup_in_config_names_known_features():
    cfg = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}, "item": {"dim": 4}}})
    with pytest.raises(ConfigError, match="unknown feature 'usr'; embedding_config.yml defines: user, item"):
        cfg.table_of("usr")
    with pytest.raises(ConfigError, match="unknown feature 'usr'"):
        cfg.slot("usr")


def test_embedding_config_round_trips_through_to_dict(tmp_path):
    cfg = load_embedding(
        tmp_path,
        """
        slots_config:
          a: {dim: 4, sqrt_scaling: true}
          b: {dim: 4, embedding_summation: false, sample_fixed_size: 2}
          c: {dim: 8, hash_stack_config: {hash_stack_rounds: 3, embedding_size: 50}}
        feature_groups:
          g: [a, b]
        """,
    )
    again = EmbeddingConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert list(again.tables) == list(cfg.tables) == ["g", "c"]


# --------------------------------------------------------------------------- global_config.yml


def test_global_defaults_from_empty_file(tmp_path):
    cfg = load_global(tmp_path, "")
    assert cfg.mode is JobType.TRAIN
    assert cfg.server.capacity == 1_000_000
    assert cfg.server.max_ids_per_request == 4_000_000
    assert cfg.server.weight_bound == 0.0
    assert cfg.server.enable_incremental_update is False
    assert cfg.initialization.method is InitMethod.BOUNDED_UNIFORM
    assert (cfg.initialization.lower, cfg.initialization.upper) == (-0.01, 0.01)
    assert cfg.sparse_optimizer == Adagrad()
    assert cfg == GlobalConfig.from_dict({})


def test_global_values_are_read_from_yaml(tmp_path):
    cfg = load_global(
        tmp_path,
        """
        common_config:
          job_type: infer
        embedding_parameter_server_config:
          capacity: 5000
          max_ids_per_request: 100
          weight_bound: 2
        initialization:
          method: bounded_normal
          lower: -0.5
          upper: 0.5
          mean: 0.1
          std: 0.2
          seed: 7
        """,
    )
    assert cfg.mode is JobType.INFER
    assert cfg.server.capacity == 5000
    assert cfg.server.max_ids_per_request == 100
    assert cfg.server.weight_bound == 2.0 and isinstance(cfg.server.weight_bound, float)
    init = cfg.initialization
    assert (init.method, init.lower, init.upper, init.mean, init.std, init.seed) == (
        "bounded_normal",
        -0.5,
        0.5,
        0.1,
        0.2,
        7,
    )


@pytest.mark.parametrize("key", ["capacity", "max_ids_per_request", "incremental_buffer_size"])
@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_server_sizes_are_refused(tmp_path, key, value):
    message = global_error(
        tmp_path,
        f"""
        embedding_parameter_server_config:
          {key}: {value}
        """,
    )
    assert "'embedding_parameter_server_config'" in message
    assert f"{key} must be > 0, got {value}" in message


def test_negative_weight_bound_is_refused(tmp_path):
    message = global_error(tmp_path, "embedding_parameter_server_config: {weight_bound: -1}\n")
    assert "weight_bound must be >= 0, got -1.0" in message


def test_incremental_update_needs_a_packet_folder(tmp_path):
    # PERSIA's default folder applies when none is given; an empty one is refused
    assert (
        load_global(
            tmp_path, "embedding_parameter_server_config: {enable_incremental_update: true}\n"
        ).server.incremental_dir
        == "/workspace/incremental_dir/"
    )
    message = global_error(
        tmp_path, "embedding_parameter_server_config: {enable_incremental_update: true, incremental_dir: ''}\n"
    )
    assert "enable_incremental_update needs incremental_dir" in message
    cfg = load_global(
        tmp_path,
        "embedding_parameter_server_config: {enable_incremental_update: true, incremental_dir: /m/incremental}\n",
    )
    assert cfg.server.incremental_dir == "/m/incremental" and cfg.server.incremental_flush_interval == 10.0


@pytest.mark.parametrize(
    "body, message",
    [
        ("{incremental_flush_interval: 0}", "incremental_flush_interval must be > 0 seconds"),
        ("{storage: {endpiont: x}}", "unknown option(s) endpiont"),
        ("{storage: {max_attempts: 0}}", "max_attempts"),
    ],
)
def test_bad_incremental_and_storage_settings_are_refused(tmp_path, body, message):
    assert message in global_error(tmp_path, f"embedding_parameter_server_config: {body}\n")


@pytest.mark.parametrize(
    "job_type, mode",
    [
        ("train", JobType.TRAIN),
        ("infer", JobType.INFER),
        ("INFER", JobType.INFER),
        ("Train", JobType.TRAIN),
        ("Eval", JobType.EVAL),
        ("eval", JobType.EVAL),
        ("Infer", JobType.INFER),
    ],
)
def test_job_type_is_accepted_case_insensitively(tmp_path, job_type, mode):
    cfg = load_global(tmp_path, f"common_config:\n  job_type: {job_type}\n")
    assert cfg.mode is mode
    assert cfg.common_config.job_type is mode


@pytest.mark.parametrize("job_type", ["serve", "training", "''"])
def test_unknown_job_type_is_refused(tmp_path, job_type):
    message = global_error(tmp_path, f"common_config:\n  job_type: {job_type}\n")
    assert "'common_config.job_type' must be one of 'train', 'eval', 'infer', got" in message


def test_job_type_of_wrong_type_is_refused(tmp_path):
    message = global_error(tmp_path, "common_config:\n  job_type: 1\n")
    assert "'common_config.job_type' must be one of 'train', 'eval', 'infer', got 1" in message


def test_job_type_given_in_code_takes_the_file_spellings():
    from embedding_server.core.config import CommonConfig

    assert CommonConfig(job_type="Infer").job_type is JobType.INFER
    with pytest.raises(ValueError, match="job_type must be 'train', 'eval' or 'infer', got 'serve'"):
        CommonConfig(job_type="serve")


def test_unknown_initialization_method_is_refused(tmp_path):
    message = global_error(tmp_path, "initialization: {method: gaussian}\n")
    assert "'initialization.method' must be one of 'bounded_uniform', 'bounded_normal', got 'gaussian'" in message


@pytest.mark.parametrize(
    "init_yaml, fragment",
    [
        ("{lower: 0.1, upper: 0.1}", "lower (0.1) must be < upper (0.1)"),
        ("{std: 0}", "std must be > 0, got 0.0"),
        ("{seed: -1}", "seed must be >= 0, got -1"),
    ],
)
def test_initialization_ranges_are_checked(tmp_path, init_yaml, fragment):
    message = global_error(tmp_path, f"initialization: {init_yaml}\n")
    assert fragment in message


# --------------------------------------------------------------------------- sparse_optimizer


def test_missing_sparse_optimizer_defaults_to_adagrad(tmp_path):
    assert load_global(tmp_path, "common_config: {job_type: train}\n").sparse_optimizer == Adagrad()
    assert load_global(tmp_path, "sparse_optimizer:\n").sparse_optimizer == Adagrad()


def test_sgd_optimizer_section(tmp_path):
    cfg = load_global(
        tmp_path,
        """
        sparse_optimizer:
          type: sgd
          lr: 0.5
          weight_decay: 0.01
        """,
    )
    assert cfg.sparse_optimizer == SGD(lr=0.5, weight_decay=0.01)


def test_adagrad_optimizer_section(tmp_path):
    cfg = load_global(
        tmp_path,
        """
        sparse_optimizer:
          type: adagrad
          lr: 0.05
          initial_accumulator_value: 0.1
          weight_decay: 0.001
          g_square_momentum: 0.9
          eps: 0.001
          vectorwise_shared: true
        """,
    )
    assert cfg.sparse_optimizer == Adagrad(
        lr=0.05,
        initial_accumulator_value=0.1,
        weight_decay=0.001,
        g_square_momentum=0.9,
        eps=0.001,
        vectorwise_shared=True,
    )
    assert cfg.sparse_optimizer.state_width(16) == 1


def test_adam_optimizer_section_reads_betas_list(tmp_path):
    cfg = load_global(
        tmp_path,
        """
        sparse_optimizer:
          type: Adam
          lr: 0.002
          betas: [0.8, 0.99]
          eps: 0.0001
          weight_decay: 0.1
        """,
    )
    opt = cfg.sparse_optimizer
    assert opt == Adam(lr=0.002, betas=(0.8, 0.99), eps=0.0001, weight_decay=0.1)
    assert opt.betas == (0.8, 0.99)
    assert opt.state_width(4) == 9


def test_unknown_optimizer_type_is_refused(tmp_path):
    message = global_error(tmp_path, "sparse_optimizer: {type: rmsprop}\n")
    assert "'sparse_optimizer.type' must be one of ['adagrad', 'adam', 'sgd'], got 'rmsprop'" in message


def test_unknown_optimizer_key_is_refused_with_suggestion(tmp_path):
    message = global_error(tmp_path, "sparse_optimizer: {type: adam, beta: [0.9, 0.99]}\n")
    assert "unknown key 'sparse_optimizer.beta'" in message
    assert "did you mean 'betas'?" in message


def test_key_of_another_optimizer_is_refused(tmp_path):
    message = global_error(tmp_path, "sparse_optimizer: {type: sgd, initial_accumulator_value: 0.1}\n")
    assert "unknown key 'sparse_optimizer.initial_accumulator_value'" in message
    assert "known keys: lr, weight_decay" in message


@pytest.mark.parametrize(
    "opt_yaml, fragment",
    [
        ("{type: sgd, lr: 0}", "lr must be > 0, got 0.0"),
        ("{type: adagrad, lr: -1}", "lr must be > 0, got -1.0"),
        ("{type: adagrad, g_square_momentum: 0}", "g_square_momentum must be in (0, 1], got 0.0"),
        ("{type: adagrad, g_square_momentum: 1.5}", "g_square_momentum must be in (0, 1], got 1.5"),
        ("{type: adagrad, initial_accumulator_value: -0.1}", "initial_accumulator_value must be >= 0, got -0.1"),
        ("{type: adam, betas: [0.9, 1.0]}", "betas must be two numbers in [0, 1), got [0.9, 1.0]"),
        ("{type: adam, betas: [0.9]}", "betas must be two numbers in [0, 1), got [0.9]"),
        ("{type: adam, eps: 0}", "eps must be > 0, got 0.0"),
        ("{type: sgd, weight_decay: -0.5}", "weight_decay must be >= 0, got -0.5"),
    ],
)
def test_optimizer_values_out_of_range_are_refused(tmp_path, opt_yaml, fragment):
    message = global_error(tmp_path, f"sparse_optimizer: {opt_yaml}\n")
    assert "'sparse_optimizer'" in message
    assert fragment in message


@pytest.mark.parametrize(
    "opt_yaml, fragment",
    [
        ("{type: sgd, lr: fast}", "'sparse_optimizer.lr' must be a number, got 'fast'"),
        ("{type: adagrad, vectorwise_shared: 1}", "'sparse_optimizer.vectorwise_shared' must be true or false, got 1"),
        ("{type: adam, betas: 0.9}", "'sparse_optimizer.betas' must be a list, got float"),
        ("{type: adam, betas: [0.9, x]}", "'sparse_optimizer.betas[1]' must be a number, got 'x'"),
    ],
)
def test_optimizer_values_of_wrong_type_are_refused(tmp_path, opt_yaml, fragment):
    message = global_error(tmp_path, f"sparse_optimizer: {opt_yaml}\n")
    assert fragment in message


def test_sparse_optimizer_as_list_is_refused(tmp_path):
    message = global_error(tmp_path, "sparse_optimizer: [adam]\n")
    assert "'sparse_optimizer' must be a mapping" in message


@pytest.mark.parametrize(
    "opt", [SGD(lr=0.3, weight_decay=0.1), Adagrad(lr=0.2, vectorwise_shared=True), Adam(betas=(0.5, 0.6))]
)
def test_optimizer_round_trips_through_to_dict(opt):
    assert optimizer_from_dict(opt.to_dict()) == opt


def test_scientific_notation_floats_load_as_numbers(tmp_path):
    # `ctrserve config-reference` prints float defaults with repr(), e.g. Adagrad's eps as
    # "1e-10"; copying that value into global_config.yml must give the same number.
    cfg = load_global(
        tmp_path,
        """
        sparse_optimizer:
          type: adagrad
          lr: 1e-3
          eps: 1e-10
        """,
    )
    assert cfg.sparse_optimizer == Adagrad(lr=1e-3, eps=1e-10)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_refused(tmp_path, value):
    message = global_error(tmp_path, f"embedding_parameter_server_config:\n  weight_bound: {value}\n")
    assert "'embedding_parameter_server_config.weight_bound' must be a finite number" in message


def test_exponent_string_that_is_not_a_number_is_still_refused(tmp_path):
    message = global_error(tmp_path, "sparse_optimizer: {type: sgd, lr: 1e-3x}\n")
    assert "'sparse_optimizer.lr' must be a number, got '1e-3x'" in message


def test_config_reference_prints_enum_defaults_as_their_yaml_spelling():
    from ctrserve.reference import reference_markdown

    text = reference_markdown()
    assert "| `common_config.job_type` | `'train'` |" in text
    assert "| `initialization.method` | `'bounded_uniform'` |" in text
    assert "JobType" not in text and "InitMethod" not in text


# --------------------------------------------------------------------------- PERSIA's files as written

PERSIA = Path(__file__).parent / "data" / "persia"

#: every key of PERSIA's schema that changes nothing here (each must log exactly one line)
NO_EFFECT_GLOBAL = {
    "common_config.checkpointing_config.num_workers",
    "embedding_parameter_server_config.num_hashmap_internal_shards",
    "embedding_parameter_server_config.incremental_channel_capacity",
    "embedding_parameter_server_config.storage",
    "embedding_parameter_server_config.full_amount_manager_buffer_size",
    "embedding_parameter_server_config.embedding_recycle_pool_capacity",
    "embedding_parameter_server_config.num_persistence_workers",
    "embedding_parameter_server_config.num_signs_per_file",
    "embedding_parameter_server_config.local_buffer_dir",
    "embedding_worker_config.forward_buffer_size",
    "embedding_worker_config.buffered_data_expired_sec",
}
NO_EFFECT_EMBEDDING = {"feature_index_prefix_bit", "slots_config.user_id.index_prefix"}


def no_effect_lines(caplog) -> list[str]:
    """The dotted keys of the 'has no effect here' lines logged, in order, repeats kept."""
    return [
        r.getMessage().split("'")[1]
        for r in caplog.records
        if r.name == "ctrserve.config" and "has no effect here" in r.getMessage()
    ]


def test_persias_published_global_configs_load_as_written():
    train = GlobalConfig.load(PERSIA / "global_config.yml")
    assert train.mode is JobType.TRAIN
    assert train.server.capacity == 1_000_000 and train.server.incremental_buffer_size == 5_000_000
    assert train.common_config.metrics_config.enable_metrics is False
    assert train.common_config.metrics_config.push_interval_seconds == 10  # written push_interval_sec
    infer = GlobalConfig.load(PERSIA / "global_config_infer.yml")
    assert infer.mode is JobType.INFER
    assert infer.common_config.infer_config.servers == ["embedding_parameter_server:8888"]
    assert infer.common_config.infer_config.embedding_checkpoint == "/cache/adult_income_ckpt/"
    assert infer.common_config.metrics_config.enable_metrics is True
    full = GlobalConfig.load(PERSIA / "global_config_all_keys.yml")
    assert full.mode is JobType.EVAL and full.mode.store_mode is JobType.INFER
    assert full.server.storage == {}  # PERSIA's "Ceph": no storage options
    assert full.common_config.metrics_config.job_name == "persia_default_jobname"
    assert full.server.incremental_dir == "/workspace/incremental_dir/"


def test_persias_published_embedding_configs_load_as_written():
    published = EmbeddingConfig.load(PERSIA / "embedding_config.yml")
    assert list(published.tables) == [
        "workclass",
        "education",
        "marital_status",
        "occupation",
        "relationship",
        "race",
        "gender",
        "native_country",
    ]
    full = EmbeddingConfig.load(PERSIA / "embedding_config_all_keys.yml")
    assert full.slot("user_id").hash_stack_config is None  # PERSIA's default {0, 0}: off
    assert full.slot("item_id").hash_stack_config == HashStackConfig(hash_stack_rounds=2, embedding_size=1000)
    assert full.table_of("user_id") is full.table_of("user_tags")  # feature_groups share a table
    assert full.slot("click_history").pooling is Pooling.NONE and full.slot("user_tags").pooling is Pooling.SQRTN


def test_every_no_effect_key_logs_one_line_with_its_reason(caplog):
    caplog.set_level("INFO", logger="ctrserve.config")
    GlobalConfig.load(PERSIA / "global_config_all_keys.yml")
    logged = no_effect_lines(caplog)
    assert sorted(logged) == sorted(NO_EFFECT_GLOBAL)  # each once, and only those
    assert all(str(PERSIA / "global_config_all_keys.yml") in r.getMessage() for r in caplog.records)
    assert any("no embedding worker" in r.getMessage() for r in caplog.records)
    caplog.clear()
    EmbeddingConfig.load(PERSIA / "embedding_config_all_keys.yml")
    assert sorted(no_effect_lines(caplog)) == sorted(NO_EFFECT_EMBEDDING)
    caplog.clear()
    GlobalConfig.load(PERSIA / "global_config.yml")  # honoured keys log nothing
    assert sorted(no_effect_lines(caplog)) == sorted(
        {
            "common_config.checkpointing_config.num_workers",
            "embedding_parameter_server_config.num_hashmap_internal_shards",
            "embedding_parameter_server_config.incremental_channel_capacity",
            "embedding_worker_config.forward_buffer_size",
        }
    )


def test_several_unknown_keys_are_reported_in_one_error(tmp_path):
    message = global_error(
        tmp_path,
        """
        common_config:
          job_type: Train
          metrics_confg: {enable_metrics: false}
          infer_config: {servers: [], embeding_checkpoint: /x}
        embedding_parameter_server_config:
          capacity: 10
          num_hashmap_shards: 4
        embedding_worker_config: {forward_buffer: 1}
        zzz: 1
        sparse_optimizer: {type: adagrad, lr: 0.1, lrr: 1}
        """,
    )
    path = tmp_path / "global_config.yml"
    assert message.startswith(f"{path}: 6 unknown keys:")
    for line in [
        "unknown key 'common_config.metrics_confg' (did you mean 'metrics_config'?)",
        "unknown key 'common_config.infer_config.embeding_checkpoint' (did you mean 'embedding_checkpoint'?)",
        "unknown key 'embedding_parameter_server_config.num_hashmap_shards' (did you mean "
        "'num_hashmap_internal_shards'?)",
        "unknown key 'embedding_worker_config.forward_buffer' (did you mean 'forward_buffer_size'?)",
        "unknown key 'zzz'; known keys: ",
        "unknown key 'sparse_optimizer.lrr' (did you mean 'lr'?)",
    ]:
        assert f"\n  {path}: {line}" in message, line


def test_several_unknown_embedding_keys_are_reported_in_one_error(tmp_path):
    message = embedding_error(
        tmp_path,
        """
        feature_index_prefix_bits: 8
        slots_config:
          a: {dim: 8, index_prefx: 0}
          b: {dim: 8, hash_stack_config: {hash_stack_rounds: 2, embeding_size: 10}}
        """,
    )
    assert ": 3 unknown keys:" in message
    assert "unknown key 'feature_index_prefix_bits' (did you mean 'feature_index_prefix_bit'?)" in message
    assert "unknown key 'slots_config.a.index_prefx' (did you mean 'index_prefix'?)" in message
    assert "unknown key 'slots_config.b.hash_stack_config.embeding_size' (did you mean 'embedding_size'?)" in message


@pytest.mark.parametrize("storage", ["Ceph", "Hdfs", "hdfs"])
def test_persias_storage_kinds_are_accepted(tmp_path, storage, caplog):
    caplog.set_level("INFO", logger="ctrserve.config")
    cfg = load_global(tmp_path, f"embedding_parameter_server_config: {{storage: {storage}}}\n")
    assert cfg.server.storage == {}
    assert no_effect_lines(caplog) == ["embedding_parameter_server_config.storage"]


def test_other_storage_strings_are_refused(tmp_path):
    message = global_error(tmp_path, "embedding_parameter_server_config: {storage: S3}\n")
    assert (
        "'embedding_parameter_server_config.storage' must be a mapping of storage options or PERSIA's Ceph or Hdfs, got 'S3'"
        in message
    )


def test_index_prefix_set_by_hand_is_refused_as_in_persia(tmp_path):
    message = embedding_error(tmp_path, "slots_config:\n  a: {dim: 8, index_prefix: 450359962737049600}\n")
    assert "index_prefix must not be set (got 450359962737049600)" in message


@pytest.mark.parametrize(
    "hash_stack, fragment",
    [
        ("{hash_stack_rounds: 2}", "embedding_size must be >= 1 with hash stacking on, got 0"),
        ("{hash_stack_rounds: -1, embedding_size: 5}", "hash_stack_rounds must be >= 0 (0 = off), got -1"),
    ],
)
def test_hash_stack_on_needs_a_size(tmp_path, hash_stack, fragment):
    assert fragment in embedding_error(tmp_path, f"slots_config:\n  a: {{dim: 8, hash_stack_config: {hash_stack}}}\n")


def test_metrics_push_interval_takes_either_spelling_but_not_two_values(tmp_path):
    cfg = load_global(tmp_path, "common_config: {metrics_config: {push_interval_seconds: 3}}\n")
    assert cfg.common_config.metrics_config.push_interval_seconds == 3
    cfg = load_global(tmp_path, "common_config: {metrics_config: {push_interval_sec: 4}}\n")
    assert cfg.common_config.metrics_config.push_interval_seconds == 4
    message = global_error(
        tmp_path, "common_config: {metrics_config: {push_interval_sec: 4, push_interval_seconds: 3}}\n"
    )
    assert "give push_interval_seconds or push_interval_sec, not both" in message
    assert "push_interval_seconds must be > 0, got 0" in global_error(
        tmp_path, "common_config: {metrics_config: {push_interval_seconds: 0}}\n"
    )


@pytest.mark.parametrize("address", ["server", "server:", ":80", "server:http", "server:70000"])
def test_infer_config_servers_must_be_host_and_port(tmp_path, address):
    message = global_error(tmp_path, f"common_config: {{infer_config: {{servers: ['{address}']}}}}\n")
    assert f"servers: '{address}' is not host:port" in message


# --------------------------------------------------------------------------- tables, combiners, initializers


def test_features_naming_one_table_share_it_and_the_table_may_carry_a_features_name(tmp_path):
    cfg = load_embedding(
        tmp_path,
        """
        slots_config:
          dense2: {dim: 8, table: sparse1}
          sparse1: {dim: 8}
          sparse2: {dim: 16}
          x: {dim: 4, table: crossed}
          y: {dim: 4, table: crossed}
        """,
    )
    assert list(cfg.tables) == ["sparse1", "sparse2", "crossed"]
    assert cfg.table_of("dense2") is cfg.table_of("sparse1")
    assert cfg.tables["sparse1"].features == ("dense2", "sparse1")
    assert cfg.tables["crossed"].features == ("x", "y") and cfg.tables["crossed"].index == 2


def test_feature_groups_still_share_tables_like_the_table_key(tmp_path):
    grouped = load_embedding(tmp_path, "slots_config: {a: {dim: 4}, b: {dim: 4}}\nfeature_groups: {g: [a, b]}")
    named = load_embedding(tmp_path, "slots_config: {a: {dim: 4, table: g}, b: {dim: 4, table: g}}")
    assert grouped.tables == named.tables and grouped.fingerprint() == named.fingerprint()
    both = load_embedding(tmp_path, "slots_config: {a: {dim: 4, table: g}, b: {dim: 4}}\nfeature_groups: {g: [a, b]}")
    assert both.tables == grouped.tables


@pytest.mark.parametrize(
    "slots, groups, message",
    [
        ("a: {dim: 4, table: b}\n  b: {dim: 4, table: c}", "", "feature 'a' names table 'b', the name of feature 'b'"),
        ("a: {dim: 4, table: t}\n  b: {dim: 8, table: t}", "", "table 't' mixes dims [4, 8]"),
        (
            "a: {dim: 4, table: t}\n  b: {dim: 4}",
            "g: [a, b]",
            "feature 'a' names table 't' but is in feature group 'g'",
        ),
        (
            "a: {dim: 4, table: t, initializer: {type: zeros}}\n  b: {dim: 4, table: t, initializer: {type: normal}}",
            "",
            "table 't': features 'a', 'b' give different initializers",
        ),
        (
            "a: {dim: 4, table: t, optimizer: {type: sgd}}\n  b: {dim: 4, table: t, optimizer: {type: adam}}",
            "",
            "table 't': features 'a', 'b' give different optimizers",
        ),
        ("a: {dim: 4, combiner: max}", "", "combiner must be one of sum, mean, sqrtn, tile, got 'max'"),
        ("a: {dim: 4, combiner: tile}", "", "combiner tile needs tile_len >= 1, got 0"),
        ("a: {dim: 4, tile_len: 3}", "", "tile_len is for combiner: tile"),
        ("a: {dim: 4, combiner: sum, tile_len: 3}", "", "tile_len is for combiner: tile, not sum"),
        ("a: {dim: 4, combiner: mean, sqrt_scaling: true}", "", "combiner mean disagrees with sqrtn_scaling"),
        ("a: {dim: 4, combiner: sum, embedding_summation: false}", "", "combiner sum needs embedding_summation: true"),
        (
            "a: {dim: 4, combiner: tile, tile_len: 2, hash_stack_config: {hash_stack_rounds: 2, embedding_size: 9}}",
            "",
            "combiner tile cannot be combined with hash_stack_config",
        ),
        ("a: {dim: 4, initializer: {type: gaussian}}", "", "initializer type must be one of normal, truncated_normal"),
        ("a: {dim: 4, initializer: {std: 1}}", "", "initializer needs a 'type'"),
        ("a: {dim: 4, initializer: {type: constant, std: 1}}", "", "initializer 'constant' has no parameter 'std'"),
        ("a: {dim: 4, initializer: {type: normal, std: 0}}", "", "initializer 'normal': std must be > 0, got 0.0"),
        ("a: {dim: 4, initializer: {type: uniform, lower: 1, upper: 0}}", "", "lower (1.0) must be < upper (0.0)"),
        ("a: {dim: 4, optimizer: {type: adagrad, lrr: 0.1}}", "", "optimizer: unknown key 'lrr' (did you mean 'lr'?)"),
        ("a: {dim: 4, optimizer: {type: rmsprop}}", "", "optimizer: 'type' must be one of ['adagrad', 'adam', 'sgd']"),
    ],
)
def test_bad_table_combiner_and_initializer_settings_are_refused(tmp_path, slots, groups, message):
    text = f"slots_config:\n  {slots}\n" + (f"feature_groups:\n  {groups}\n" if groups else "")
    assert message in embedding_error(tmp_path, text)


def test_combiner_key_and_persia_flags_select_the_same_pooling(tmp_path):
    cfg = load_embedding(
        tmp_path,
        """
        slots_config:
          s: {dim: 4, combiner: sum}
          m: {dim: 4, combiner: mean}
          m2: {dim: 4, mean_scaling: true}
          q: {dim: 4, combiner: sqrtn, sqrt_scaling: true}
          q2: {dim: 4, sqrt_scaling: true}
          t: {dim: 4, combiner: tile, tile_len: 3}
          r: {dim: 4, embedding_summation: false, sample_fixed_size: 2}
        """,
    )
    pooling = {n: str(s.pooling) for n, s in cfg.slots_config.items()}
    assert pooling == {"s": "sum", "m": "mean", "m2": "mean", "q": "sqrtn", "q2": "sqrtn", "t": "tile", "r": "none"}
    assert [s.output_dim for s in cfg.slots_config.values()] == [4, 4, 4, 4, 4, 12, 4]


def test_table_settings_round_trip_and_parse(tmp_path):
    cfg = load_embedding(
        tmp_path,
        """
        slots_config:
          a: {dim: 8, table: t, initializer: {type: truncated_normal, std: 0.02}, optimizer: {type: sgd, lr: 0.5}}
          b: {dim: 8, table: t, combiner: tile, tile_len: 4}
          c: {dim: 4, initializer: {type: constant, value: 1.5}}
        """,
    )
    t = cfg.tables["t"]
    assert t.initializer is not None and t.initializer.to_dict() == {
        "type": "truncated_normal",
        "mean": 0.0,
        "std": 0.02,
    }
    assert t.optimizer == SGD(lr=0.5)
    assert cfg.tables["c"].initializer.to_dict() == {"type": "constant", "value": 1.5}
    assert cfg.tables["c"].optimizer is None
    again = EmbeddingConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.tables == cfg.tables and again.fingerprint() == cfg.fingerprint()


def test_fingerprint_follows_the_table_layout_and_settings(tmp_path):
    import hashlib
    import json

    base = EmbeddingConfig.from_dict({"slots_config": {"a": {"dim": 4}, "b": {"dim": 4}}})
    # Configs without table settings keep the digest of [name, index, dim] per table.
    layout = json.dumps([["a", 0, 4], ["b", 1, 4]], sort_keys=True)
    assert base.fingerprint() == hashlib.sha256(layout.encode()).hexdigest()[:16]
    variants = [
        {"a": {"dim": 4}, "b": {"dim": 4, "table": "a"}},  # b shares a's table
        {"a": {"dim": 4}, "b": {"dim": 8}},  # another dim
        {"a": {"dim": 4}, "b": {"dim": 4, "optimizer": {"type": "sgd"}}},
        {"a": {"dim": 4}, "b": {"dim": 4, "initializer": {"type": "zeros"}}},
    ]
    prints = {EmbeddingConfig.from_dict({"slots_config": v}).fingerprint() for v in variants}
    assert len(prints) == len(variants) and base.fingerprint() not in prints
    pooled = EmbeddingConfig.from_dict({"slots_config": {"a": {"dim": 4, "combiner": "mean"}, "b": {"dim": 4}}})
    assert pooled.fingerprint() == base.fingerprint()  # pooling is the client's business
