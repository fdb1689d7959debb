"""Build a TorchServe ``.mar`` of one exported dense version with the real torch-model-archiver.

The archive holds ``model.pt`` (serialized file), ``model.json`` and optionally ``serving.yml``
(extra files) and ``handler/persia_handler.py`` as its handler; its version is the
``version`` of ``model.json``. The archiver runs into a temporary folder next to the output and
the result is renamed into place, so a model store never holds a half-written archive.

Example:
    >>> archive_model("root/dense/v00000003", "model_store", name="deepctr")
    PosixPath('model_store/deepctr.mar')
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from embedding_server.core.errors import ConfigError
from embedding_server.core.model_spec import MODEL_FILE, SPEC_FILE, DenseModelSpec
from handler.serving_config import SERVING_FILE, ServingConfig

DEFAULT_NAME = "deepctr"


def handler_file() -> Path:
    """Path of ``handler/persia_handler.py`` (found without importing TorchServe or torch)."""
    spec = importlib.util.find_spec("handler.persia_handler")
    if spec is None or spec.origin is None:
        raise ConfigError("handler/persia_handler.py not found: is ctrserve installed?")
    return Path(spec.origin)


def archiver_command() -> str:
    """The ``torch-model-archiver`` executable beside this Python, else on ``PATH``."""
    beside = Path(sys.executable).parent / "torch-model-archiver"
    found = str(beside) if beside.exists() else shutil.which("torch-model-archiver")
    if not found:
        raise ConfigError("torch-model-archiver not found: pip install 'torch-model-archiver==0.12.*'")
    return found


def read_spec(model_dir: str | Path) -> DenseModelSpec:
    """The validated ``model.json`` of an exported version folder.

    Raises:
        ConfigError: the folder lacks model.pt or model.json, or model.json is invalid.
    """
    model_dir = Path(model_dir)
    for name in (MODEL_FILE, SPEC_FILE):
        if not (model_dir / name).is_file():
            raise ConfigError(f"{model_dir} has no {name}: not an exported dense version")
    return DenseModelSpec.from_json((model_dir / SPEC_FILE).read_text(), source=str(model_dir / SPEC_FILE))


def archive_model(
    model_dir: str | Path,
    out: str | Path,
    name: str = DEFAULT_NAME,
    serving_config: str | Path | None = None,
    file_name: str | None = None,
) -> Path:
    """Build ``<out>/<file_name or name>.mar`` from an exported version folder.

    Args:
        model_dir: ``<model root>/dense/vN`` holding model.pt and model.json.
        out: the model store (created when missing).
        name: the model name inside the archive (what clients call).
        serving_config: a ``serving.yml`` to ship (validated first); stored as serving.yml.
        file_name: archive file name without ``.mar`` (default ``name``), e.g.
            ``deepctr-v00000003`` so several versions can sit in one model store.

    Returns:
        The archive's path.

    Raises:
        ConfigError: missing files, an invalid model.json or serving config.
        RuntimeError: torch-model-archiver failed (its output is quoted).
    """
    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{file_name or name}.mar"
    with tempfile.TemporaryDirectory(prefix=".archive-", dir=out) as tmp:
        extra = [str(model_dir / SPEC_FILE)]
        if serving_config is not None:
            ServingConfig.load(_existing(Path(serving_config)))  # refuse an invalid config now, not in the worker
            shutil.copyfile(serving_config, Path(tmp) / SERVING_FILE)
            extra.append(str(Path(tmp) / SERVING_FILE))
        export = Path(tmp) / "export"
        export.mkdir()
        cmd = [
            archiver_command(),
            "--model-name",
            name,
            "--version",
            str(spec.version),
            "--serialized-file",
            str(model_dir / MODEL_FILE),
            "--handler",
            str(handler_file()),
            "--extra-files",
            ",".join(extra),
            "--export-path",
            str(export),
            "--force",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        built = export / f"{name}.mar"
        if result.returncode != 0 or not built.exists():
            raise RuntimeError(
                f"torch-model-archiver failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
            )
        os.replace(built, target)
    return target


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"serving config {path} does not exist")
    return path
