"""The README and the pages in ``docs/`` are tested: their commands run, their configs load, their
links resolve, and the configuration reference is the generator's output.

Marker convention for fenced blocks in ``README.md`` and ``docs/*.md`` (``docs/architecture.md``,
"How the docs are tested", says the same for writers):

* Every fenced block names its language: ``bash``, ``python``, ``yaml`` or ``text``.
* ``bash`` and ``python`` blocks are **run as written**, in page order, one page per test, in a
  scratch directory laid out like the repository root (a copy of ``deploy/`` and ``docs/``, a link
  to ``.venv``, ``.venv/bin`` first on ``PATH``, a private ``TMPDIR``). Each block runs in its own
  process session under ``bash -euo pipefail`` (python blocks with the venv's python) with a time
  limit; background processes it leaves may be used by later blocks of the page, and whatever is
  still running after the page is stopped (``torchserve --stop``, then the process groups).
* ``<!-- excerpt: why -->`` on the line right before a block: not run. The reason is required; it
  should name the test that runs the same command (``tests/test_x.py::test_name``), which must
  exist.
* ``yaml`` blocks are config files: ``<!-- config: job.yml -->`` (or ``embedding_config.yml``,
  ``global_config.yml``, ``serving.yml``) on the line before says which, and the block is loaded
  with that file's loader; or they are marked as excerpts.
* ``text`` blocks (diagrams, output) are not checked.

The runs are ``process`` tests; everything else here is ``unit``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REFERENCE_PAGE = REPO / "docs" / "configuration-reference.md"
LANGUAGES = {"bash", "python", "yaml", "text"}
CONFIG_FILES = {"embedding_config.yml", "global_config.yml", "job.yml", "serving.yml"}
BLOCK_TIMEOUT_S = 180
MAX_README_LINES = 250

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>excerpt|config)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$", re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    marker: str | None  # "excerpt", "config" or None
    marker_arg: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in ("bash", "python") and self.marker is None


def blocks_of(page: Path) -> list[Block]:
    """Every fenced block of ``page`` with the marker comment on the line before it."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
            j += 1
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        blocks.append(
            Block(
                page=page,
                line=i + 1,
                language=opening["info"].strip().split(" ")[0],
                marker=marker["kind"] if marker else None,
                marker_arg=(marker["arg"] or "").strip() if marker else "",
                code="\n".join(body) + "\n",
            )
        )
        i = j + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]
RUN_PAGES = [page for page in PAGES if any(block.runs for block in blocks_of(page))]
CONFIG_BLOCKS = [block for block in ALL_BLOCKS if block.marker == "config"]


def prose_of(page: Path) -> str:
    """``page`` without its fenced blocks."""
    out, fence = [], None
    for line in page.read_text().splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match["fence"]
        elif fence is not None and re.match(rf"^\s*{re.escape(fence)}\s*$", line):
            fence = None
        elif fence is None:
            out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------- unit checks


@pytest.mark.unit
def test_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines; move detail into docs/ (at most {MAX_README_LINES})"
    )


@pytest.mark.unit
def test_every_block_names_its_language_and_its_marker_fits():
    wrong = []
    for block in ALL_BLOCKS:
        if block.language not in LANGUAGES:
            wrong.append(f"{block.where}: language {block.language!r}; use one of {sorted(LANGUAGES)}")
        elif block.language == "yaml" and block.marker is None:
            wrong.append(f"{block.where}: a yaml block needs <!-- config: FILE --> or <!-- excerpt: why -->")
        elif block.marker == "config" and (block.language != "yaml" or block.marker_arg not in CONFIG_FILES):
            wrong.append(f"{block.where}: <!-- config: F --> marks a yaml block, F one of {sorted(CONFIG_FILES)}")
        elif block.marker == "excerpt" and not block.marker_arg:
            wrong.append(f"{block.where}: say why the block is an excerpt: <!-- excerpt: why -->")
    assert not wrong, "\n".join(wrong)


def _named_tests(text: str) -> list[tuple[str, str]]:
    return re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", text)


@pytest.mark.unit
def test_tests_named_by_excerpts_exist():
    wrong = []
    for block in ALL_BLOCKS:
        if block.marker != "excerpt":
            continue
        for path, name in _named_tests(block.marker_arg):
            source = REPO / path
            if not source.is_file():
                wrong.append(f"{block.where}: {path} does not exist")
            elif name and not re.search(rf"^def {name}\(", source.read_text(), re.M):
                wrong.append(f"{block.where}: {path} has no test {name}")
    assert not wrong, "\n".join(wrong)


def _loader(kind: str):
    if kind == "embedding_config.yml":
        from embedding_server.core.config import EmbeddingConfig

        return EmbeddingConfig.load
    if kind == "global_config.yml":
        from embedding_server.core.config import GlobalConfig

        return GlobalConfig.load
    if kind == "job.yml":
        from trainer.job import JobConfig

        return JobConfig.load
    from handler.serving_config import ServingConfig

    return ServingConfig.load


@pytest.mark.unit
@pytest.mark.parametrize("block", CONFIG_BLOCKS, ids=lambda b: b.where)
def test_config_blocks_load_with_their_loader(block, tmp_path):
    path = tmp_path / block.marker_arg
    path.write_text(block.code)
    _loader(block.marker_arg)(path)  # raises ConfigError naming the key


@pytest.mark.unit
def test_configuration_reference_is_the_generated_page():
    from ctrserve.reference import REGENERATE, reference_markdown

    committed = REFERENCE_PAGE.read_text() if REFERENCE_PAGE.exists() else ""
    assert committed == reference_markdown(), (
        f"{REFERENCE_PAGE.relative_to(REPO)} differs from the config schema; regenerate it: {REGENERATE}"
    )


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(page: Path) -> set[str]:
    return {_slug(m[1]) for m in re.finditer(r"^#{1,6}\s+(.*)$", prose_of(page), re.M)}


@pytest.mark.unit
def test_relative_links_resolve():
    wrong = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose_of(page)):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: link {target}"
            if not resolved.exists():
                wrong.append(f"{where}: {path} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                wrong.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(REPO)}")
    assert not wrong, "\n".join(wrong)


_PARTS = ("embedding_server", "trainer", "handler", "archiver", "protos", "ctrserve")
_REPO_PATH = re.compile(rf"^(?:{'|'.join(_PARTS)}|deploy|benchmarks|tests|docs)/[\w./-]*$")


def _named_in_backticks(page: Path) -> list[str]:
    """Inline code spans of ``page``'s prose; in architecture.md's "Module paths" table, only the
    new paths (the old ones are gone by design)."""
    text = prose_of(page)
    if page.name == "architecture.md":
        section = re.search(r"^## Module paths\n(.*?)(?=^## )", text, re.S | re.M)
        if section:
            rows = [re.sub(r"^\|[^|]*\|", "|", row) for row in section[1].splitlines()]
            text = text.replace(section[1], "\n".join(rows))
    return re.findall(r"`([^`\n]+)`", text)


@pytest.mark.unit
def test_paths_named_in_the_docs_exist():
    wrong = []
    for page in PAGES:
        for span in _named_in_backticks(page):
            if _REPO_PATH.match(span) and not span.startswith("protos/_generated"):
                if not (REPO / span.rstrip("/")).exists():
                    wrong.append(f"{page.relative_to(REPO)}: `{span}` does not exist")
    assert not wrong, "\n".join(wrong)


def _resolves(dotted: str) -> bool:
    """``dotted`` is a module of this project, or a module plus attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _python_imports(block: Block) -> list[str]:
    try:
        tree = ast.parse(block.code)
    except SyntaxError:
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in _PARTS:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.split(".")[0] in _PARTS]
    return names


@pytest.mark.unit
def test_modules_named_in_the_docs_import():
    """Dotted names in backticks (``embedding_server.storage.urls.open_storage``) and the imports of
    python blocks, excerpts included, resolve in the code as it is now."""
    wrong = []
    for page in PAGES:
        for span in _named_in_backticks(page):
            match = re.match(rf"((?:{'|'.join(_PARTS)})(?:\.\w+)+)", span)
            if match and not _resolves(match[1]):
                wrong.append(f"{page.relative_to(REPO)}: `{match[1]}` does not resolve")
    for block in ALL_BLOCKS:
        if block.language == "python":
            wrong += [
                f"{block.where}: import of {name} fails" for name in _python_imports(block) if not _resolves(name)
            ]
    assert not wrong, "\n".join(wrong)


_FIGURE = re.compile(
    r"\d\s?(?:ms|µs|us)\b|\d\s?[kMG]?\s?(?:rows|keys|req|requests|samples)/s\b|\d\.\d+x\b|\d\s?[KMG]B/s\b",
)


@pytest.mark.unit
def test_docs_quote_no_measured_figures():
    """Figures live in benchmarks/README.md (dated, with the machine); the docs link there."""
    wrong = [
        f"{page.relative_to(REPO)}:{n}: {line.strip()}"
        for page in PAGES
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if _FIGURE.search(line)
    ]
    assert not wrong, "measured figures belong in benchmarks/README.md:\n" + "\n".join(wrong)


# --------------------------------------------------------------------------- running the blocks


def _scratch() -> Path:
    """A short-pathed directory laid out like the repository root (Unix socket paths stay short)."""
    root = Path(tempfile.mkdtemp(prefix="docs-"))
    shutil.copytree(REPO / "deploy", root / "deploy")
    shutil.copytree(REPO / "docs", root / "docs")
    (root / ".venv").symlink_to(REPO / ".venv")
    (root / "t").mkdir()
    return root


def _environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{root / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(root / ".venv"),
            "TMPDIR": str(root / "t"),
            "TEMP": str(root / "t"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("CTRSERVE_EMBEDDING_SERVERS", None)
    return env


def _ports_of(blocks: list[Block]) -> set[int]:
    """Fixed ports the blocks bind or call: --port N, 127.0.0.1:N and TorchServe's local config."""
    ports = set()
    for block in blocks:
        ports |= {int(p) for p in re.findall(r"(?:--port |127\.0\.0\.1:)(\d{2,5})\b", block.code) if int(p)}
        if "config.local.properties" in block.code:
            text = (REPO / "deploy" / "torchserve" / "config.local.properties").read_text()
            ports |= {int(p) for p in re.findall(r"^\w+=(?:http://[\d.]+:)?(\d{4,5})\s*$", text, re.M)}
    return ports


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _stop_everything(root: Path, env: dict[str, str], groups: list[int]) -> None:
    if (root / "t" / ".model_server.pid").exists():
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["torchserve", "--stop"], env=env, cwd=root, capture_output=True, timeout=60)
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        alive = []
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
                alive.append(group)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [g for g in alive if _group_alive(g)]
        groups = alive
        if not groups:
            return


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.process
@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_command_blocks_run_as_written(page):
    blocks = [block for block in blocks_of(page) if block.runs]
    busy = sorted(port for port in _ports_of(blocks) if _port_in_use(port))
    assert not busy, f"{page.relative_to(REPO)}'s commands need ports {busy}, which something else is using"
    root = _scratch()
    env = _environment(root)
    groups: list[int] = []
    passed = False
    try:
        for n, block in enumerate(blocks):
            suffix = ".py" if block.language == "python" else ".sh"
            script = root / f".block-{n}{suffix}"
            script.write_text(block.code)
            log_path = root / f".block-{n}.log"
            command = (
                [str(VENV_BIN / "python"), str(script)]
                if suffix == ".py"
                else ["bash", "-euo", "pipefail", str(script)]
            )
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            groups.append(proc.pid)
            started = time.monotonic()
            try:
                rc = proc.wait(timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = None
            output = log_path.read_text(errors="replace")[-4000:]
            status = f"timed out after {BLOCK_TIMEOUT_S} s" if rc is None else f"exit status {rc}"
            assert rc == 0, (
                f"{block.where}: the block failed ({status}, {time.monotonic() - started:.0f} s) in {root}:\n"
                f"{block.code}--- its output ---\n{output}"
            )
        passed = True
    finally:
        _stop_everything(root, env, groups)
        if passed:
            shutil.rmtree(root, ignore_errors=True)
