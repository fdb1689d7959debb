"""Bounded fuzzing of the decoders that read untrusted bytes (see :mod:`ctrserve.fuzz`).

Each target runs in a child process (a segfault in pyarrow or numpy is a failed test, not a
dead test run) under an address-space limit, with a per-input time bound and a traced
allocation bound; inputs start with fixed ones claiming 10^12 elements. The longer run is
``benchmarks/fuzz_long.py --inputs N``.
"""

from __future__ import annotations

import json

import pytest

from ctrserve.fuzz import TARGETS, run_in_subprocess

pytestmark = pytest.mark.process

#: Generated inputs per target in the default test run (about 15 s in all on 2 busy cores).
INPUTS = {"batch": 2000, "packet": 400, "request": 1500}
SEED = 20261123


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_decoder_survives_structure_aware_fuzzing(target):
    summary = run_in_subprocess(target, INPUTS[target], SEED, timeout=300, time_bound=2.0, address_space_mb=1536)
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}))
    assert summary["failures"] == [], json.dumps(summary["failures"][:5], indent=1)
    assert summary["inputs"] == INPUTS[target] + len(TARGETS[target].fixed())


def test_claimed_sizes_of_10e12_elements_allocate_nothing_under_a_tight_address_space():
    """Only the fixed huge-claim inputs, with 256 MiB of address space to spare."""
    for target in sorted(TARGETS):
        summary = run_in_subprocess(target, 0, SEED, timeout=120, address_space_mb=256)
        assert summary["failures"] == [], summary["failures"]
        assert summary["inputs"] == len(TARGETS[target].fixed()) and summary["max_peak_bytes"] < 64 << 20
