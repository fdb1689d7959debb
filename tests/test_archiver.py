"""The ``archiver`` package without a running TorchServe: the model archive ``archive_model``
builds (with torch-model-archiver) and the publisher's scan for complete versions. Registering,
publishing and serving through a real TorchServe are tested in ``test_torchserve.py``."""

from __future__ import annotations

import json
import zipfile

import pytest

from archiver.build import archive_model
from archiver.publish import Publisher, PublishSettings
from embedding_server.core.errors import ConfigError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_ctr):
    """Version 4 of the tiny model, exported."""
    return tiny_ctr.export_version(tmp_path_factory.mktemp("root"), 4, seed=4)


@pytest.mark.process  # torch-model-archiver runs as a child process
def test_archive_holds_model_spec_serving_config_and_handler(model_dir, tmp_path):
    serving = tmp_path / "my-serving.yml"
    serving.write_text("embedding_servers: ['127.0.0.1:7001']\n")
    mar = archive_model(model_dir, tmp_path / "store", serving_config=serving)
    assert mar == tmp_path / "store" / "deepctr.mar"
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert {"model.pt", "model.json", "serving.yml", "persia_handler.py"} <= names
    assert manifest["model"]["modelName"] == "deepctr" and manifest["model"]["modelVersion"] == "4"
    assert manifest["model"]["handler"] == "persia_handler.py"
    serving.write_text("embedding_server: ['127.0.0.1:7001']\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        archive_model(model_dir, tmp_path / "store", serving_config=serving)
    with pytest.raises(ConfigError, match="has no model.pt"):
        archive_model(tmp_path, tmp_path / "store")


@pytest.mark.unit
def test_publisher_sees_only_complete_versions(tmp_path, tiny_ctr):
    for version in (1, 3):
        tiny_ctr.export_version(tmp_path, version, seed=version)
    (tmp_path / "dense" / "v00000005").mkdir()  # being written: no model.json yet
    (tmp_path / "dense" / "notes").mkdir()
    publisher = Publisher(management=None, settings=PublishSettings(str(tmp_path), str(tmp_path / "store")))
    assert publisher.complete_versions() == [1, 3]
    assert publisher.mar_stem(3) == "deepctr-v00000003"
    with pytest.raises(ConfigError, match="--keep must be >= 1"):
        PublishSettings(str(tmp_path), str(tmp_path / "store"), keep=0)


@pytest.mark.unit
def test_torchserve_keys_come_from_files_or_the_environment_never_the_command_line(tmp_path, capsys):
    from ctrserve.cli import main
    from handler.torchserve_keys import KEY_FILE_ENV, TOKEN_ENV, TOKEN_FILE_ENV, TorchServeKey, key_refused

    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "m1"}, "inference": {"key": "i1"}, "API": {"key": "a"}}))
    token_file = tmp_path / "token"
    token_file.write_text("t1\n")
    env = {TOKEN_ENV: "e1", TOKEN_FILE_ENV: str(token_file), KEY_FILE_ENV: str(key_file)}
    assert TorchServeKey.resolve("inference", environ=env).current() == "t1"  # token file first
    assert TorchServeKey.resolve("inference", environ={**env, TOKEN_FILE_ENV: ""}).current() == "i1"
    assert TorchServeKey.resolve("management", key_file=str(key_file), environ=env).current() == "m1"
    assert TorchServeKey.resolve("management", environ={}) is None
    # Refused: the source is read again; a new key is retried with, the same one is not.
    key = TorchServeKey("inference", key_file=key_file)
    assert key.current() == "i1" and key.refresh("i1") is None
    key_file.write_text(json.dumps({"inference": {"key": "i2"}}))
    assert key.refresh("i1") == "i2" and key.current() == "i2"
    with pytest.raises(ConfigError, match="no 'management' key"):
        TorchServeKey("management", key_file=key_file).current()
    token_file.write_text("two words")
    with pytest.raises(ConfigError, match="spaces or control characters"):
        TorchServeKey("inference", token_file=token_file).current()
    refusal = json.dumps({"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed"})
    assert key_refused(400, refusal.encode()) and key_refused(401, b"") and not key_refused(400, b'{"type": "x"}')
    for argv in (
        ["list", "--token", "secret"],
        ["predict", "--rest", "http://127.0.0.1:1", "--input", "x.tsv", "--token", "secret"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "--token was removed: a key on the command line is visible to every user" in capsys.readouterr().err
