"""Where the deploy templates the code reads are: TorchServe's ``config.*.properties`` and
``log4j2.xml`` (``deploy/torchserve/``) and the example configs (``deploy/examples/``).

``deploy/`` in the repository is their only source. A wheel ships a copy made at build time
(``setup.py`` copies ``deploy/torchserve`` and ``deploy/examples`` to ``archiver/_deploy``), so
the same relative path resolves in an installed package and in a source checkout.

Example:
    >>> template("torchserve/config.local.properties").name
    'config.local.properties'
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
#: the copy inside an installed wheel
PACKAGED = _HERE / "_deploy"
#: ``deploy/`` of a source checkout
CHECKOUT = _HERE.parent / "deploy"


def template(relative: str) -> Path:
    """The file ``deploy/<relative>`` (e.g. ``torchserve/log4j2.xml``), from the wheel or the checkout.

    Raises:
        FileNotFoundError: neither has it.
    """
    for root in (PACKAGED, CHECKOUT):
        if (root / relative).is_file():
            return root / relative
    raise FileNotFoundError(f"deploy template {relative!r} is neither in {PACKAGED} nor in {CHECKOUT}")
