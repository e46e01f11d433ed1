"""pytest-benchmark micro benchmarks (`make micro`): print the machine in the header and store
it in the benchmark JSON (machine_info.edge_proxy), like every other benchmark here."""

from __future__ import annotations

from typing import Any

import pytest
from machine import describe, machine


def pytest_report_header(config: pytest.Config) -> str:
    return describe()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config,
                                         machine_info: dict[str, Any]) -> None:
    machine_info["edge_proxy"] = machine()
