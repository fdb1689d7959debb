"""Exec probes of the TorchServe pod (deploy/k8s/base/torchserve.yaml); standard library only.

    python3 ctrserve_probe.py model-ready --model deepctr [--management http://127.0.0.1:8081]
    python3 ctrserve_probe.py management  [--management http://127.0.0.1:8081]

``model-ready`` exits 0 only when the model's default version has workers and every one of them is
READY (``GET /models/<name>``, TorchServe's describe-model): TorchServe's ``/ping`` says Healthy
while a worker crash-loops or before any version is registered. ``management`` exits 0 when the
management API answers (the publisher container's probe: without it nothing can be published).
Any other answer, or none within ``--timeout`` seconds, exits 1 with one line saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def _get(url: str, timeout: float) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URL from the probe)
        return json.loads(response.read() or b"null")


def model_ready(management: str, model: str, timeout: float) -> str | None:
    """None when every worker of ``model``'s default version is READY, else why not."""
    described = _get(f"{management}/models/{model}", timeout)
    versions = described if isinstance(described, list) else [described]
    if not versions:
        return f"model {model} is not registered"
    # describe-model answers the default version (only it when a name is given).
    workers = versions[0].get("workers") or []
    if not workers:
        return f"model {model} has no workers"
    not_ready = [w.get("id") for w in workers if w.get("status") != "READY"]
    if not_ready:
        return f"model {model}: workers not READY: {not_ready}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["model-ready", "management"])
    parser.add_argument("--management", default="http://127.0.0.1:8081")
    parser.add_argument("--model", default="deepctr")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        if args.check == "management":
            _get(f"{args.management}/models", args.timeout)
            return 0
        why = model_ready(args.management, args.model, args.timeout)
    except urllib.error.HTTPError as e:
        why = f"{e.url}: HTTP {e.code}"
    except (OSError, ValueError) as e:
        why = f"{args.management}: {e}"
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
