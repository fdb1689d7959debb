"""The ``ops`` of a slot in ``embedding_config.yml``: the op definitions, their parsing and the
checks of a chain and of a config's inputs. What the ops mean and how they run:
:mod:`embedding_server.core.feature_ops` (this module is apart so that the config can check its
slots' ops without importing the batch classes, which import the config).

Example:
    >>> parse_ops([{"select": "tags"}, {"mod": 100}], "tags")
    (Select(inputs=('tags',)), Mod(n=100))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

InputKind = Literal["dense", "ids"]
OP_NAMES = ("select", "bucketize", "mod", "hash", "cross", "truncate")
_SIDES = ("left", "right")
_U64_MAX = (1 << 64) - 1


# --------------------------------------------------------------------------- op definitions


@dataclass(frozen=True)
class Select:
    """``select``: the named input(s) the chain starts from."""

    inputs: tuple[str, ...]

    def to_config(self) -> dict[str, Any]:
        return {"select": self.inputs[0] if len(self.inputs) == 1 else list(self.inputs)}


@dataclass(frozen=True)
class Bucketize:
    """``bucketize``: dense values to bucket ids (the count of boundaries ``<=`` the value)."""

    boundaries: tuple[float, ...]

    def to_config(self) -> dict[str, Any]:
        return {"bucketize": list(self.boundaries)}


@dataclass(frozen=True)
class Mod:
    """``mod``: ``id % n`` (unsigned 64-bit)."""

    n: int

    def to_config(self) -> dict[str, Any]:
        return {"mod": self.n}


@dataclass(frozen=True)
class Hash:
    """``hash``: FarmHash ``Fingerprint(uint64)`` of each id."""

    kind: str = "farm"

    def to_config(self) -> dict[str, Any]:
        return {"hash": self.kind}


@dataclass(frozen=True)
class Cross:
    """``cross``: every pair of the two selected inputs' distinct ids per row, hashed."""

    def to_config(self) -> str:
        return "cross"


@dataclass(frozen=True)
class Truncate:
    """``truncate``: at most ``seq_len`` ids per row, cutting off ``side``."""

    seq_len: int
    side: str = "left"

    def to_config(self) -> dict[str, Any]:
        return {"truncate": {"seq_len": self.seq_len, "side": self.side}}


FeatureOp = Select | Bucketize | Mod | Hash | Cross | Truncate


# --------------------------------------------------------------------------- parsing


def parse_ops(raw: Sequence[Any], slot: str = "") -> tuple[FeatureOp, ...]:
    """Parse and check one slot's ``ops`` list (as written in YAML, or :meth:`to_config` output).

    Args:
        raw: the list; each entry a bare op name (``hash``, ``cross``) or a one-key mapping
            ``{op: parameter}``, or an already parsed op.
        slot: the slot's name, for messages.

    Returns:
        The ops, in order.

    Raises:
        ValueError: an unknown op, a wrong parameter, or a chain that cannot run (no select
            first, bucketize not right after a one-input select, a two-input select not
            crossed next, ...); the message names the slot and the entry.
    """
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ValueError(f"ops{_of(slot)} must be a list of ops, got {type(raw).__name__}")
    ops = tuple(_parse_op(entry, f"ops[{i}]") for i, entry in enumerate(raw))
    _check_chain(ops, slot)
    return ops


def _parse_op(entry: Any, where: str) -> FeatureOp:
    if isinstance(entry, (Select, Bucketize, Mod, Hash, Cross, Truncate)):
        return entry
    if isinstance(entry, str):
        name, param, bare = entry, None, True
    elif isinstance(entry, Mapping) and len(entry) == 1:
        ((name, param),) = entry.items()
        bare = False
    else:
        raise ValueError(
            f"{where}: each op is a name (hash, cross) or a mapping with one key, the op's name, "
            f"e.g. {{mod: 1000}}; got {entry!r}"
        )
    if name not in OP_NAMES:
        raise ValueError(f"{where}: unknown op {name!r}; the ops are: {', '.join(OP_NAMES)}")
    where = f"{where} ({name})"
    if name == "select":
        inputs = [param] if isinstance(param, str) else param
        if bare or not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) and i for i in inputs):
            raise ValueError(f"{where}: give the input's name, or a list of two names for a cross; got {param!r}")
        if len(inputs) > 2:
            raise ValueError(f"{where}: select takes one input, or two for a cross; got {len(inputs)}: {inputs}")
        if len(set(inputs)) != len(inputs):
            raise ValueError(f"{where}: input {inputs[0]!r} is selected twice")
        return Select(tuple(inputs))
    if name == "bucketize":
        bounds = param.get("boundaries") if isinstance(param, Mapping) and set(param) == {"boundaries"} else param
        if (
            not isinstance(bounds, list)
            or not bounds
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
        ):
            raise ValueError(f"{where}: boundaries must be a non-empty list of finite numbers; got {param!r}")
        if any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"{where}: boundaries must rise strictly; got {bounds}")
        return Bucketize(tuple(float(b) for b in bounds))
    if name == "mod":
        n = param.get("n") if isinstance(param, Mapping) and set(param) == {"n"} else param
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _U64_MAX:
            raise ValueError(f"{where}: the modulus must be an integer in [1, 2**64); got {param!r}")
        return Mod(n)
    if name == "hash":
        if param not in (None, "farm"):
            raise ValueError(f"{where}: the only hash is 'farm' (FarmHash); got {param!r}")
        return Hash()
    if name == "cross":
        if not bare and param not in (None, {}):
            raise ValueError(f"{where}: cross takes no parameter; got {param!r}")
        return Cross()
    # truncate
    if not isinstance(param, Mapping):
        raise ValueError(f"{where}: give {{seq_len: N, side: left|right}}; got {param!r}")
    unknown = sorted(set(param) - {"seq_len", "side"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; truncate takes seq_len and side")
    seq_len, side = param.get("seq_len"), param.get("side", "left")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"{where}: seq_len must be an integer >= 1; got {seq_len!r}")
    if side not in _SIDES:
        raise ValueError(f"{where}: side must be 'left' (cut off the first ids) or 'right' (the last); got {side!r}")
    return Truncate(seq_len, side)


def _check_chain(ops: tuple[FeatureOp, ...], slot: str) -> None:
    """The chain's shape: select first and only first; bucketize right after a one-input
    select; a two-input select crossed right after."""
    if not ops:
        raise ValueError(f"ops{_of(slot)} is empty: start with a select (or leave ops out)")
    if not isinstance(ops[0], Select):
        raise ValueError(f"ops[0]{_of(slot)}: the first op must be a select of the input(s), got {_name(ops[0])}")
    pairs = len(ops[0].inputs) == 2
    for i, op in enumerate(ops[1:], 1):
        where = f"ops[{i}] ({_name(op)}){_of(slot)}"
        if isinstance(op, Select):
            raise ValueError(f"{where}: select may only be the first op")
        if pairs and i == 1 and not isinstance(op, Cross):
            raise ValueError(f"{where}: two selected inputs must be crossed next (cross)")
        if isinstance(op, Cross) and not (pairs and i == 1):
            raise ValueError(f"{where}: cross needs a select of two inputs right before it")
        if isinstance(op, Bucketize) and not (i == 1 and not pairs):
            raise ValueError(
                f"{where}: bucketize turns a dense input's values into ids, so it must follow a select of one "
                "input directly; here its input is already ids"
            )
    if pairs and len(ops) == 1:
        raise ValueError(f"ops{_of(slot)}: two selected inputs must be crossed next (cross)")


def _of(slot: str) -> str:
    return f" of slot '{slot}'" if slot else ""


def _name(op: FeatureOp) -> str:
    return type(op).__name__.lower()


def _selected(ops: Sequence[FeatureOp]) -> tuple[str, ...]:
    """The inputs a checked chain selects (its first op)."""
    first = ops[0]
    assert isinstance(first, Select)  # _check_chain puts a select first
    return first.inputs


def ops_input_kind(ops: Sequence[FeatureOp]) -> InputKind:
    """What a chain's input(s) must be: dense values when it bucketizes them, else ids."""
    return "dense" if len(ops) > 1 and isinstance(ops[1], Bucketize) else "ids"


def ops_to_config(ops: Sequence[FeatureOp]) -> list[Any]:
    """The YAML form of a chain (what :func:`parse_ops` reads back to equal ops)."""
    return [op.to_config() for op in ops]


def input_kinds(slots: Mapping[str, Sequence[FeatureOp]], plain: Sequence[str] = ()) -> dict[str, InputKind]:
    """The kind of every input the slots' ops select: ``dense`` (bucketized) or ``ids``.

    Args:
        slots: slot name -> its checked ops.
        plain: slots without ops (each reads the id input of its own name).

    Raises:
        ValueError: an input bucketized by one slot and read as ids by another (or by a plain
            slot of the same name).
    """
    users: dict[str, tuple[InputKind, str]] = {name: ("ids", f"slot '{name}' (no ops)") for name in plain}
    kinds: dict[str, InputKind] = {}
    for slot, ops in slots.items():
        kind = ops_input_kind(ops)
        for name in _selected(ops):
            other = users.get(name)
            if other is not None and other[0] != kind:
                dense_user, id_user = (f"slot '{slot}'", other[1]) if kind == "dense" else (other[1], f"slot '{slot}'")
                raise ValueError(
                    f"input '{name}' is bucketized (dense values) by {dense_user} but read as ids by {id_user}: "
                    "bucketize needs a dense input"
                )
            users.setdefault(name, (kind, f"slot '{slot}'"))
            kinds.setdefault(name, kind)
    return kinds
