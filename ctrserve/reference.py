"""``ctrserve config-reference``: every config key with its default and meaning."""

from __future__ import annotations

import argparse

from embedding_server.core.config import EmbeddingConfig, GlobalConfig, SlotConfig
from embedding_server.core.config_schema import describe
from embedding_server.core.optimizers import OPTIMIZERS
from trainer.job import JobConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config-reference",
        help="print every config key with its default",
        description="Print every key of embedding_config.yml, global_config.yml and job.yml with its default.",
    )
    p.set_defaults(func=run)


def reference_markdown() -> str:
    lines = ["### embedding_config.yml", "", "| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe(EmbeddingConfig):
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    for key, default, doc in describe(SlotConfig, "slots_config.<feature>"):
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    lines += ["", "### global_config.yml", "", "| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe(GlobalConfig):
        if key == "sparse_optimizer":
            continue
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    lines.append("| `sparse_optimizer.type` | `'adagrad'` | sgd, adagrad or adam; the other keys depend on it |")
    for name, cls in OPTIMIZERS.items():
        for key, default, doc in describe(cls, "sparse_optimizer"):
            lines.append(f"| `{key}` ({name}) | `{default}` | {doc} |")
    lines += ["", "### job.yml (`ctrserve train`)", "", "| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe(JobConfig):
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(reference_markdown())
    return 0
