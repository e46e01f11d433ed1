"""proxy.cpus: the cgroup CPU quota (v1 and v2 layouts) and the core count the embedder uses."""

from __future__ import annotations

from pathlib import Path

from proxy import cpus


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "0::/kubepods/pod1\n")
    _write(tmp_path / "cg/kubepods/pod1/cpu.max", "150000 100000\n")
    assert cpus.cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "proc")) == 1.5


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "0::/\n")
    _write(tmp_path / "cg/cpu.max", "max 100000\n")
    assert cpus.cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "proc")) is None


def test_cgroup_v1_quota_smallest_wins(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "4:cpu,cpuacct:/docker/abc\n0::/\n")
    _write(tmp_path / "cg/cpu/docker/abc/cpu.cfs_quota_us", "300000\n")
    _write(tmp_path / "cg/cpu/docker/abc/cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "cg/cpu/cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "cg/cpu/cpu.cfs_period_us", "100000\n")
    assert cpus.cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "proc")) == 2.0


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "4:cpu,cpuacct:/\n")
    _write(tmp_path / "cg/cpu/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cg/cpu/cpu.cfs_period_us", "100000\n")
    assert cpus.cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "proc")) is None


def test_available_cores_rounds_quota_up_and_caps_by_affinity(monkeypatch) -> None:
    monkeypatch.setattr(cpus, "affinity_cores", lambda: 4)
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 1.5)
    assert cpus.available_cores() == 2
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 0.2)
    assert cpus.available_cores() == 1
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: None)
    assert cpus.available_cores() == 4


def test_int8_features_from_flags() -> None:
    feat = cpus.int8_features({"avx2", "avx512_vnni", "fma"})
    assert feat["avx2"] and feat["avx512_vnni"] and not feat["amx_int8"]
    assert cpus.int8_summary(feat) == "AVX2 yes, AVX-512 VNNI yes, AVX-VNNI no, AMX no"
