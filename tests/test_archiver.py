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
