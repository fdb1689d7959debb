"""Build steps that pyproject.toml cannot declare (the rest of the metadata lives there).

``build_py`` also writes into the build folder, so they end up in the wheel:

* ``protos/_generated``: the gRPC stubs of the embedding service and of TorchServe's inference and
  management APIs (:func:`protos.generate.generate`; needs grpcio-tools, and torchserve plus
  googleapis-common-protos for TorchServe's stubs: the build requirements in pyproject.toml);
* ``archiver/_deploy``: the deploy templates the code reads (``deploy/torchserve/*``,
  ``deploy/examples/*``), copied from ``deploy/``, their only source (see ``archiver/templates.py``).

An installed wheel thus never generates or looks up files outside its own package folders.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: deploy/ folders shipped as package data under archiver/_deploy/ (same layout below it)
TEMPLATE_FOLDERS = ("torchserve", "examples")


def _load_generator():
    """protos/generate.py by path: importing the ``protos`` package of the source tree is not needed."""
    spec = importlib.util.spec_from_file_location("_ctrserve_protos_generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithGenerated(build_py):
    """``build_py`` plus the generated stubs and the deploy templates."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install runs from the checkout: protos.generate works in place
            return
        build = Path(self.build_lib)
        generator = _load_generator()
        if generator.torchserve_jar() is None:
            self.warn("torchserve is not installed in the build environment: no TorchServe gRPC stubs in the wheel")
        generator.generate(force=True, out=build / "protos" / "_generated")
        for folder in TEMPLATE_FOLDERS:
            target = build / "archiver" / "_deploy" / folder
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / "deploy" / folder, target)


setup(cmdclass={"build_py": BuildPyWithGenerated})
