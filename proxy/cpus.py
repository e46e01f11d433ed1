"""What CPU the process has: cores it may use (affinity and cgroup quota) and int8 features.

Used by the embedder (``semantic.embed_threads`` defaults to the cores of the CPU quota) and by
the benchmarks, which print and store the machine beside every figure (benchmarks/machine.py):
the embedder's speed depends on the CPU's int8 instructions (AVX2 vs AVX-512 VNNI vs AMX differ
by 4x at 10 tokens), so a figure without the CPU it ran on says little.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Final

#: /proc/cpuinfo flags that matter for int8 inference (onnxruntime's MLAS picks its kernels
#: from them): AVX2 (vpmaddubsw), AVX-VNNI / AVX-512 VNNI (vpdpbusd), AMX tiles.
INT8_FLAGS: Final = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                     "amx_tile", "amx_int8", "amx_bf16")


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"
                     ) -> float | None:
    """CPUs the process's cgroup may use per period (quota / period), or None if unlimited.

    cgroup v2 (``cpu.max``: "max 100000" or "200000 100000") and v1 (``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``), looked up at the process's own cgroup path and then at the mount
    root (containers usually see their own cgroup there). The smallest quota on the way wins.
    """
    rootp = Path(root)
    rel_v2, rel_v1 = "", ""
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            hid, _, rest = line.partition(":")
            ctrls, _, path = rest.partition(":")
            if hid == "0" and ctrls == "":
                rel_v2 = path
            elif "cpu" in ctrls.split(","):
                rel_v1 = path
    except OSError:
        pass
    quotas: list[float] = []
    for base in {rootp / rel_v2.lstrip("/"), rootp}:
        try:
            text = (base / "cpu.max").read_text().split()
        except OSError:
            continue
        if len(text) == 2 and text[0] != "max":
            quotas.append(int(text[0]) / int(text[1]))
    for v1 in (rootp / "cpu", rootp / "cpu,cpuacct"):
        for base in {v1 / rel_v1.lstrip("/"), v1}:
            try:
                q = int((base / "cpu.cfs_quota_us").read_text())
                p = int((base / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if q > 0 and p > 0:
                quotas.append(q / p)
    return min(quotas) if quotas else None


def affinity_cores() -> int:
    """Cores this process may be scheduled on (taskset / cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cores() -> int:
    """Whole cores the process can use: its affinity, capped by the cgroup quota (rounded
    up: a 1.5-CPU quota lets two threads run, each part of the time), at least 1."""
    n = affinity_cores()
    q = cgroup_cpu_quota()
    if q is not None:
        n = min(n, max(1, math.ceil(q - 1e-9)))
    return max(1, n)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'model name' of the first CPU (e.g. "AMD EPYC 9R14"), or platform's processor string."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_ids(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """vendor_id, cpu family, model, stepping of the first CPU (a bare "AMD EPYC" model name
    does not say which generation: family 25 model 17 is Zen 4)."""
    out: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("vendor_id", "cpu family", "model", "stepping") and k not in out:
                    out[k] = v.strip()
                if not line.strip():
                    break
    except OSError:
        pass
    return out


def int8_features(flags: set[str] | None = None) -> dict[str, bool]:
    """The int8-relevant instruction sets: avx2, avx512_vnni, avx_vnni, amx_int8, ..."""
    f = cpu_flags() if flags is None else flags
    return {name: name in f for name in INT8_FLAGS}


def int8_summary(feat: dict[str, bool]) -> str:
    """ "AVX2 yes, AVX-512 VNNI yes, AVX-VNNI no, AMX no" """
    def yn(b: bool) -> str:
        return "yes" if b else "no"

    return (f"AVX2 {yn(feat.get('avx2', False))}, AVX-512 VNNI {yn(feat.get('avx512_vnni', False))}"
            f", AVX-VNNI {yn(feat.get('avx_vnni', False))}, AMX {yn(feat.get('amx_int8', False))}")
