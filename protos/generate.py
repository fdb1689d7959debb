"""Generate the Python gRPC stubs of the project's protos into ``protos/_generated``.

Two sets of stubs are built:

* the embedding service's own ``protos/*.proto`` (always);
* TorchServe's inference and management APIs, compiled from the ``.proto`` files inside the
  installed TorchServe's ``ts/frontend/model-server.jar`` (folder ``proto/``): they are read
  from the jar at generate time into a temporary directory, so no TorchServe file is ever kept
  in the repository. Skipped (with the embedding stubs still built) when TorchServe is not
  installed; :mod:`protos.torchserve` then says how to fix it.

When they are generated:

* **Wheel builds**: ``setup.py``'s ``build_py`` step calls :func:`generate` with the build folder as
  ``out``, so the wheel ships ``protos/_generated`` and an installed package never writes into
  site-packages at run time (:func:`ensure` does nothing outside a source checkout).
* **Source checkouts**: ``python -m protos.generate`` (the install script runs it); importing
  :mod:`protos.embedding` or :mod:`protos.torchserve` also regenerates the stubs when they are
  missing or older than their source (:func:`ensure`). Generation writes to a temporary directory
  and renames it into place, so concurrent imports never see half-written modules.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "_generated"
PROTOS = ("embedding_service.proto",)
TORCHSERVE_PROTOS = ("inference.proto", "management.proto")
_JAR_FOLDER = "proto/"


def torchserve_jar() -> Path | None:
    """The installed TorchServe's ``model-server.jar``, or None when TorchServe is absent."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(list(spec.submodule_search_locations)[0]) / "frontend" / "model-server.jar"
    return jar if jar.exists() else None


def source_checkout() -> bool:
    """Whether this package runs from a source checkout (``pyproject.toml`` beside it), not an
    installed wheel: only then may stubs be (re)generated in place at import time."""
    return (HERE.parent / "pyproject.toml").is_file()


def ensure() -> None:
    """Regenerate stale stubs in a source checkout; in an installed wheel they were built with it."""
    if source_checkout():
        generate()


def _older(stem: str, source: Path) -> bool:
    """Whether ``stem``'s message module or its typing stub is missing or older than ``source``."""
    stubs = (OUT / f"{stem}_pb2.py", OUT / f"{stem}_pb2.pyi")
    return any(not stub.exists() or stub.stat().st_mtime < source.stat().st_mtime for stub in stubs)


def _stale() -> bool:
    if any(_older(Path(name).stem, HERE / name) for name in PROTOS):
        return True
    jar = torchserve_jar()
    return jar is not None and any(_older(Path(n).stem, jar) for n in TORCHSERVE_PROTOS)


def _compile(proto: Path, includes: list[Path], out: Path) -> None:
    from grpc_tools import protoc  # imported lazily: only needed when stubs are (re)built

    args = [
        "grpc_tools.protoc",
        *(f"-I{i}" for i in includes),
        f"--python_out={out}",
        f"--pyi_out={out}",  # typed message stubs (``*_pb2.pyi``) for mypy
        f"--grpc_python_out={out}",
        str(proto),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed on {proto.name} (exit {rc})")
    # Stubs import their siblings absolutely; make that a package-relative import.
    stem = proto.stem
    grpc_stub = out / f"{stem}_pb2_grpc.py"
    grpc_stub.write_text(grpc_stub.read_text().replace(f"import {stem}_pb2 as", f"from . import {stem}_pb2 as"))


def _googleapis_include() -> Path:
    """The site-packages folder holding ``google/rpc/status.proto`` (googleapis-common-protos)."""
    spec = importlib.util.find_spec("google.rpc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "TorchServe's inference.proto imports google/rpc/status.proto: pip install googleapis-common-protos"
        )
    for location in spec.submodule_search_locations:
        if (Path(location) / "status.proto").exists():
            return Path(location).parent.parent
    raise RuntimeError("googleapis-common-protos is installed without google/rpc/status.proto")


def _compile_torchserve(jar: Path, out: Path, protoc_include: Path) -> None:
    """Extract TorchServe's protos from ``jar`` into a temporary folder and compile them."""
    with tempfile.TemporaryDirectory(prefix="ts-protos-") as tmp, zipfile.ZipFile(jar) as archive:
        for name in TORCHSERVE_PROTOS:
            member = _JAR_FOLDER + name
            try:
                (Path(tmp) / name).write_bytes(archive.read(member))
            except KeyError:
                raise RuntimeError(f"{jar} has no {member}: this TorchServe version is not supported") from None
        for name in TORCHSERVE_PROTOS:
            _compile(Path(tmp) / name, [Path(tmp), protoc_include, _googleapis_include()], out)


def generate(force: bool = False, out: Path = OUT) -> Path:
    """Compile the protos if needed (always when ``force`` or ``out`` is not the package's own
    ``_generated`` folder, e.g. a wheel's build folder); returns the output directory."""
    out = Path(out)
    if out == OUT and not force and not _stale():
        return OUT
    from grpc_tools import protoc

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=out.parent))
    try:
        include = Path(protoc.__file__).parent / "_proto"
        for name in PROTOS:
            _compile(HERE / name, [HERE, include], tmp)
        jar = torchserve_jar()
        if jar is not None:
            _compile_torchserve(jar, tmp, include)
        (tmp / "__init__.py").write_text('"""Generated by protos/generate.py; do not edit."""\n')
        old = out.parent / f".old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if not out.exists():  # another process won the race and already installed its copy
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(f"stubs in {generate(force='--force' in sys.argv)}")
