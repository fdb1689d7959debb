"""The container images (``deploy/docker/Dockerfile``): lint, structure, and each role's command
line and health check run on this host.

No container engine can build these images here (base images cannot be pulled; podman from
Debian builds ``FROM scratch`` images but cannot run containers: crun's setrlimit is refused in
this sandbox), so what the images would run is checked on the host instead: the ``ENTRYPOINT`` +
``CMD`` of each role, parsed from the Dockerfile, with the files its ``COPY`` lines place under
``/etc/ctrserve`` and ``/var/lib/ctrserve`` mapped into a scratch folder, its ``ENV``, and its
ports replaced by free ones. The embedding server and TorchServe really start and their
``HEALTHCHECK`` command must answer; the trainer's and publisher's command lines are parsed by
the real ``ctrserve`` parser.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
VENV_BIN = REPO / ".venv" / "bin"
ROLES = ("trainer", "embedding-server", "torchserve", "publisher")
IMAGE_ROOTS = ("/etc/ctrserve", "/var/lib/ctrserve")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> dict[str, Stage]:
    """The stages of a Dockerfile by name: (INSTRUCTION, arguments) with continuations joined."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, rest = logical.partition(" ")
        logical = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else f"stage{len(stages)}"
            current = stages[name] = Stage(name, words[0])
        elif current is not None:
            current.instructions.append((keyword, rest.strip()))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """``name`` and the stages it is built FROM, base first."""
    result = []
    while name in stages:
        result.insert(0, stages[name])
        name = stages[name].base
    return result


def last(stages: dict[str, Stage], role: str, keyword: str) -> str | None:
    found = None
    for stage in chain(stages, role):
        for kw, rest in stage.instructions:
            if kw == keyword:
                found = rest
    return found


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def command_line(stages: dict[str, Stage], role: str) -> list[str]:
    entrypoint, cmd = last(stages, role, "ENTRYPOINT"), last(stages, role, "CMD")
    assert entrypoint is not None and cmd is not None, f"{role}: ENTRYPOINT and CMD in exec form"
    return exec_form(entrypoint) + exec_form(cmd)


def healthcheck(stages: dict[str, Stage], role: str) -> list[str]:
    text = last(stages, role, "HEALTHCHECK")
    assert text is not None and " CMD " in f" {text} ", f"{role}: no HEALTHCHECK CMD"
    return exec_form(text.split("CMD", 1)[1].strip())


def environment(stages: dict[str, Stage], role: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in chain(stages, role):
        for kw, rest in stage.instructions:
            if kw == "ENV":
                for pair in rest.split():
                    key, _, value = pair.partition("=")
                    env[key] = value
    return env


def copies(stages: dict[str, Stage], role: str) -> list[tuple[list[str], str]]:
    """(repository sources, image destination) of the COPY lines from the build context."""
    result = []
    for stage in chain(stages, role):
        for kw, rest in stage.instructions:
            words = rest.split()
            if kw == "COPY" and not any(w.startswith("--from") for w in words):
                words = [w for w in words if not w.startswith("--")]
                result.append((words[:-1], words[-1]))
    return result


def materialise(stages: dict[str, Stage], role: str, root: Path) -> None:
    """Place the files the role's image has under IMAGE_ROOTS into ``root`` (same layout)."""
    for sources, dest in copies(stages, role):
        if not dest.startswith(IMAGE_ROOTS):
            continue
        target = root / dest.lstrip("/")
        if dest.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            for source in sources:
                shutil.copy(REPO / source, target / Path(source).name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / sources[0], target)


def on_host(words: list[str], root: Path, ports: dict[int, int] | None = None) -> list[str]:
    """``words`` with image paths moved under ``root`` and ports replaced."""
    result = []
    for word in words:
        if word.startswith(IMAGE_ROOTS):
            word = str(root / word.lstrip("/"))
        for old, new in (ports or {}).items():
            word = word.replace(f":{old}", f":{new}")
            if word == str(old):
                word = str(new)
        result.append(word)
    return result


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def host_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("CTRSERVE_EMBEDDING_SERVERS", None)
    env.update(extra or {})
    return env


def wait_healthy(check: list[str], env: dict[str, str], process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            return result.stdout
        assert process.poll() is None, f"{check[0]} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"not healthy after {timeout} s: {result.stderr}"
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- lint and structure


def dockerfiles() -> list[Path]:
    return sorted(p for p in (REPO / "deploy").rglob("Dockerfile*") if p.is_file())


@pytest.mark.process
@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_passes_hadolint(path: Path):
    result = subprocess.run(
        [str(VENV_BIN / "hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.unit
def test_every_role_has_a_target_a_health_check_and_a_non_root_user():
    stages = parse(DOCKERFILE)
    for role in ROLES:
        assert role in stages, f"no target {role}"
        assert healthcheck(stages, role)[0] == "ctrserve", f"{role}: HEALTHCHECK through `ctrserve health`"
        user = last(stages, role, "USER")
        assert user is not None and user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, role
        for sources, _ in copies(stages, role):
            assert all((REPO / s).exists() for s in sources), sources
    # torch: CPU by default, CUDA through the build argument
    runtime = "\n".join(rest for _, rest in stages["runtime"].instructions)
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in runtime and '"${TORCH_INDEX}"' in runtime
    # build tools only in the builder; TorchServe's stage has Java 17
    for role in ROLES:
        text = "\n".join(rest for stage in chain(stages, role) for _, rest in stage.instructions)
        assert not any(tool in text for tool in ("build-essential", "gcc", "pip wheel")), role
    assert "openjdk-17-jre-headless" in "\n".join(rest for _, rest in stages["torchserve"].instructions)


@pytest.mark.unit
def test_ctrserve_command_lines_parse():
    """Every ``ctrserve`` ENTRYPOINT/CMD and HEALTHCHECK of the Dockerfile is accepted by the real parser."""
    from ctrserve.cli import build_parser

    stages = parse(DOCKERFILE)
    parser = build_parser()
    for role in ROLES:
        for words in (command_line(stages, role), healthcheck(stages, role)):
            if words[0] == "ctrserve":
                args = parser.parse_args(words[1:])
                assert callable(args.func), words


# --------------------------------------------------------------------------- the roles on this host


@pytest.mark.process
def test_embedding_server_command_starts_and_its_health_check_passes(tmp_path: Path):
    stages = parse(DOCKERFILE)
    materialise(stages, "embedding-server", tmp_path)
    grpc_port, metrics_port = free_ports(2)
    ports = {8500: grpc_port, 9401: metrics_port}
    env = host_env({k: v for k, v in environment(stages, "embedding-server").items() if not k.startswith("PIP_")})
    cmd = on_host(command_line(stages, "embedding-server"), tmp_path, ports)
    check = on_host(healthcheck(stages, "embedding-server"), tmp_path, ports)
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        assert "SERVING" in wait_healthy(check, env, process, 120)
    finally:
        stop(process)
    unhealthy = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
    assert unhealthy.returncode == 1 and "UNAVAILABLE" in unhealthy.stderr


@pytest.mark.process
def test_torchserve_command_starts_and_its_health_check_wants_ready_workers(tmp_path: Path):
    from archiver.torchserve import _render_config

    stages = parse(DOCKERFILE)
    materialise(stages, "torchserve", tmp_path)
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management", "worker")
    ports = dict(zip(names, free_ports(len(names))))
    config = tmp_path / "etc" / "ctrserve" / "torchserve" / "config.properties"
    # the production config, on free loopback ports; token authorization stays on
    config.write_text(_render_config(config, ports, {}))
    workdir = tmp_path / "var" / "lib" / "ctrserve"
    for sub in ("model-store", "tmp", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    image_env = environment(stages, "torchserve")
    env = host_env({k: on_host([v], tmp_path)[0] for k, v in image_env.items() if not k.startswith("PIP_")})
    cmd = on_host(command_line(stages, "torchserve"), tmp_path)
    cmd[0] = str(VENV_BIN / cmd[0])
    check = on_host(healthcheck(stages, "torchserve"), tmp_path, {8081: ports["management"]})
    with open(tmp_path / "torchserve.log", "wb") as log:
        process = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # the API part of the check (no --model): healthy once TorchServe answers with its key file
        api_only = [w for i, w in enumerate(check) if w != "--model" and check[i - 1] != "--model"]
        wait_healthy(api_only, env, process, 120)
        assert (workdir / "key_file.json").exists()
        # the image's check names the model: no version registered, no READY workers, unhealthy
        result = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "deepctr" in result.stderr, result.stdout + result.stderr
    finally:
        stop(process)
