"""The machine a benchmark ran on: CPU model, cores, cgroup quota, int8 features, load.

Every benchmark prints ``describe()`` and stores ``machine()`` in its JSON (key "machine"):
figures from different CPUs are not comparable (the int8 embedder is ~4x faster with AVX-512
VNNI than with AVX2 alone), and on a shared box the load average says how much noise to expect.

    python benchmarks/machine.py          # print it (and the JSON)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.cpus import (
    affinity_cores,
    available_cores,
    cgroup_cpu_quota,
    cpu_ids,
    cpu_model,
    int8_features,
    int8_summary,
)


def machine() -> dict[str, Any]:
    """A JSON-able description of this machine, now."""
    feat = int8_features()
    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = None
    return {
        "cpu_model": cpu_model(),
        "cpu_ids": cpu_ids(),
        "arch": platform.machine(),
        "cpus_online": os.cpu_count(),
        "affinity_cores": affinity_cores(),
        "cgroup_cpu_quota": cgroup_cpu_quota(),
        "available_cores": available_cores(),
        "int8": feat,
        "int8_summary": int8_summary(feat),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "onnxruntime": ort_version,
        "kernel": platform.release(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def describe(m: dict[str, Any] | None = None) -> str:
    """One line for the top of a benchmark's output."""
    m = m or machine()
    quota = m["cgroup_cpu_quota"]
    la = m["loadavg"]
    ids = m.get("cpu_ids") or {}
    gen = (f" family {ids['cpu family']} model {ids['model']}"
           if "cpu family" in ids and "model" in ids else "")
    return (f"machine: {m['cpu_model']}{gen} ({m['arch']}), {m['cpus_online']} CPUs online, "
            f"{m['affinity_cores']} in affinity, cgroup quota "
            f"{'none' if quota is None else f'{quota:g} CPUs'}; int8: {m['int8_summary']}; "
            f"load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}")


if __name__ == "__main__":
    m = machine()
    print(describe(m))
    print(json.dumps(m, indent=1))
