"""The wheel: built from the sources, installed into a fresh virtual environment, it gives a
working ``ctrserve`` without the repository, and never writes into its site-packages at run time.

The fresh environment gets only the wheel (``pip install --no-deps``); the heavy dependencies
(torch, grpcio, TorchServe, ...) come from ``.venv``'s site-packages through a ``.pth`` line
appended after the fresh site-packages (the ``.pth`` files in there, such as ``.venv``'s editable
ctrserve finder, are not processed), so every project module is the wheel's: the test checks it.
Also: the command table of ``ctrserve.cli`` matches the modules' parsers, and the deploy templates
resolve from ``deploy/`` in a checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
#: what the wheel is built from (the Dockerfile's builder stage copies the same)
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "protos", "embedding_server", "trainer")
SOURCES += ("handler", "archiver", "ctrserve", "deploy/torchserve", "deploy/examples")
HEAVY = ("torch", "numba", "grpc", "pyarrow", "numpy")
HELP_LIMIT_S = 1.0


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout}\n{result.stderr}"
    return result


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.process
def test_wheel_in_a_fresh_venv_runs_from_outside_the_repository(tmp_path: Path):
    source = tmp_path / "src"
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        copy(
            REPO / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__", "_generated")} if copy is shutil.copytree else {}),
        )  # type: ignore[operator]
    _run(
        [
            str(VENV_PYTHON),
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ]
    )
    (wheel,) = (tmp_path / "dist").glob("ctrserve-*.whl")

    fresh = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(fresh)])
    python = fresh / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _run([str(VENV_PYTHON), "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)])
    (site / "zz_ctrserve_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = _listing(fresh)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{fresh / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONDONTWRITEBYTECODE="1")
    ctrserve = str(fresh / "bin" / "ctrserve")

    assert _run([ctrserve, "--version"], cwd=outside, env=env).stdout.strip() == "ctrserve 0.1.0"
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        help_text = _run([ctrserve, "--help"], cwd=outside, env=env).stdout
        timings.append(time.perf_counter() - start)
    assert "embedding-server" in help_text and "health" in help_text
    assert min(timings) < HELP_LIMIT_S, f"ctrserve --help took {timings}"
    probe = (
        "import contextlib, json, sys\n"
        "from ctrserve.cli import main\n"
        "with contextlib.redirect_stdout(None), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    assert json.loads(_run([str(python), "-c", probe], cwd=outside, env=env).stdout) == []

    check = (
        "import json, protos, archiver, ctrserve\n"
        "from protos.embedding import pb, pb_grpc\n"
        "from protos.torchserve import inference_pb2, management_pb2_grpc\n"
        "from archiver.torchserve import LOCAL_CONFIG, LOG_CONFIG\n"
        "from archiver.templates import template\n"
        "print(json.dumps({'modules': [m.__file__ for m in (protos, archiver, ctrserve, pb, inference_pb2)],\n"
        "    'templates': {str(p): p.read_text() for p in (LOCAL_CONFIG, LOG_CONFIG,\n"
        "        template('torchserve/config.production.properties'), template('examples/job.yml'))}}))\n"
    )
    found = json.loads(_run([str(python), "-c", check], cwd=outside, env=env).stdout)
    assert all(path.startswith(str(site)) for path in found["modules"]), found["modules"]
    for path, text in found["templates"].items():
        relative = Path(path).relative_to(site / "archiver" / "_deploy")
        assert text == (REPO / "deploy" / relative).read_text(), f"{relative} differs from deploy/"
    _run([ctrserve, "health", "http", "--help"], cwd=outside, env=env)

    assert _listing(fresh) == before, "running ctrserve wrote into the fresh environment"


@pytest.mark.unit
def test_command_table_matches_the_modules_parsers():
    """Every command the modules register is in ``COMMANDS`` with its module and help line, and
    the other way round (the table is what ``ctrserve --help`` shows without importing them)."""
    from ctrserve.cli import COMMANDS, build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    helps = {action.dest: action.help for action in sub._choices_actions}  # type: ignore[attr-defined]
    assert set(helps) == set(COMMANDS)
    for name, (_, _, text) in COMMANDS.items():
        assert helps[name] == text, name


@pytest.mark.unit
def test_templates_come_from_deploy_in_a_checkout():
    from archiver import templates
    from archiver.torchserve import LOCAL_CONFIG, LOG_CONFIG

    assert LOCAL_CONFIG == REPO / "deploy" / "torchserve" / "config.local.properties"
    assert LOG_CONFIG == REPO / "deploy" / "torchserve" / "log4j2.xml"
    assert not templates.PACKAGED.exists(), "archiver/_deploy is written into wheels only; deploy/ is the source"
    with pytest.raises(FileNotFoundError):
        templates.template("torchserve/missing.properties")
