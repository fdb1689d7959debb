"""``ctrserve config-reference``: every config key with its default and meaning.

The plain output is for a terminal; ``--markdown`` prints the page committed as
``docs/configuration-reference.md`` (``tests/test_docs.py`` fails when the two differ).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
from collections.abc import Iterator

from embedding_server.core.config import EmbeddingConfig, GlobalConfig, SlotConfig
from embedding_server.core.config_schema import describe
from embedding_server.core.optimizers import OPTIMIZERS
from handler.serving_config import ServingConfig
from trainer.job import JobConfig

#: The command that writes the committed page (run from the repository root).
REGENERATE = ".venv/bin/ctrserve config-reference --markdown > docs/configuration-reference.md"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config-reference",
        help="print every config key with its default",
        description=(
            "Print every key of embedding_config.yml, global_config.yml, job.yml and serving.yml with its "
            "default and meaning."
        ),
    )
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the Markdown page kept as docs/configuration-reference.md instead of plain text",
    )
    p.set_defaults(func=run)


Row = tuple[str, str, str]


def sections() -> list[tuple[str, list[Row]]]:
    """(file title, [(dotted key, default, meaning), ...]) of every config file, from the code."""
    embedding = describe(EmbeddingConfig) + describe(SlotConfig, "slots_config.<feature>")
    global_rows = [row for row in describe(GlobalConfig) if row[0] != "sparse_optimizer"]
    global_rows.append(("sparse_optimizer.type", "'adagrad'", "sgd, adagrad or adam; the other keys depend on it"))
    for name, cls in OPTIMIZERS.items():
        global_rows += [(f"{key} ({name})", default, doc) for key, default, doc in describe(cls, "sparse_optimizer")]
    return [
        ("embedding_config.yml", embedding),
        ("global_config.yml", global_rows),
        ("job.yml (`ctrserve train`)", describe(JobConfig)),
        ("serving.yml (the TorchServe handler, inside the .mar)", serving_rows()),
    ]


def serving_rows() -> list[Row]:
    """serving.yml's keys: defaults from :class:`ServingConfig`, meanings from its docstring."""
    docs = dict(_docstring_args(ServingConfig.__doc__ or ""))
    rows = []
    for f in dataclasses.fields(ServingConfig):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"ServingConfig.{f.name} has no default: serving.yml keys are all optional")
        if isinstance(default, tuple):
            default = list(default)
        rows.append((f.name, repr(default), docs.get(f.name, "")))
    return rows


def _docstring_args(doc: str) -> Iterator[tuple[str, str]]:
    """(name, text) of each entry of a Google-style ``Args:`` section, continuation lines joined."""
    section = re.search(r"^\s*Args:\n(.*?)(?:^\s*\n|\Z)", doc, re.S | re.M)
    if not section:
        return
    for match in re.finditer(r"^\s{8}(\w+): (.*?)(?=^\s{8}\w+: |\Z)", section.group(1), re.S | re.M):
        yield match.group(1), " ".join(match.group(2).split()).replace("``", "`")


def reference_markdown() -> str:
    """The whole page ``docs/configuration-reference.md``."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the config schema by `ctrserve config-reference --markdown`; do not edit.",
        f"     Regenerate: {REGENERATE} -->",
        "",
        "Every key of every config file, with its default and meaning, printed from the code. How the",
        "files fit together, validation and examples: [configuration.md](configuration.md).",
    ]
    for title, rows in sections():
        lines += ["", f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
        lines += [f"| {_markdown_key(key)} | `{default}` | {_cell(doc)} |" for key, default, doc in rows]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """``text`` for a Markdown table cell (a ``|`` would end the cell)."""
    return text.replace("|", "\\|")


def _markdown_key(key: str) -> str:
    """``sparse_optimizer.lr (adam)`` as `` `sparse_optimizer.lr` (adam)``; other keys in backticks."""
    name, _, qualifier = key.partition(" (")
    return f"`{name}` ({qualifier}" if qualifier else f"`{key}`"


def reference_text(width: int = 100) -> str:
    """The same keys as plain text for a terminal: key, default, then the meaning indented."""
    out = []
    for title, rows in sections():
        out += [title.replace("`", ""), "=" * len(title.replace("`", ""))]
        for key, default, doc in rows:
            out.append(f"{key} = {default}")
            out += textwrap.wrap(doc, width, initial_indent="    ", subsequent_indent="    ")
        out.append("")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    print(reference_markdown() if args.markdown else reference_text(), end="")
    return 0
