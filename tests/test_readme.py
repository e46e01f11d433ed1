"""The README's examples are true: its tables are well-formed, its Endpoints table lists exactly
the routes the proxy serves, and its openai snippet runs and prints against a real proxy."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path
from typing import Any

from proxy.config import load_config
from proxy.server import build_app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def tables() -> list[list[str]]:
    """Markdown tables: runs of lines starting with '|'."""
    out: list[list[str]] = []
    current: list[str] = []
    for line in [*README.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(current)
            current = []
    return out


def cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def test_every_table_is_well_formed() -> None:
    for t in tables():
        assert len(t) >= 3, f"a table needs a header, a rule and rows: {t[0]}"
        assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", t[1].replace(" ", "")), t[:2]
        width = len(cells(t[0]))
        for row in t[2:]:
            assert len(cells(row)) == width, f"{row!r} has not {width} cells"


def test_endpoints_table_lists_every_route() -> None:
    table = next(t for t in tables() if cells(t[0]) == ["endpoint", "what"])
    documented = set()
    for row in table[2:]:  # "`POST /a`, `/b`, `GET /c`": a path without a method takes the last
        method = ""
        for item in re.findall(r"`([^`]+)`", cells(row)[0]):
            if " " in item:
                method, item = item.split(" ", 1)
            documented.add((method, item))
    app = build_app(load_config(env={}, tier_flags=["small=http://127.0.0.1:1"]))
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method in ("GET", "POST") and r.resource is not None
              and "{" not in r.resource.canonical and r.resource.canonical != "/admin"}
    assert documented == served


def snippet() -> str:
    block = re.search(r"```python\n(from openai import OpenAI\n.*?)```", README, re.S)
    assert block is not None
    return block.group(1)


async def test_openai_snippet_prints(make_proxy: Any) -> None:
    p = await make_proxy()
    code = snippet().replace("http://127.0.0.1:8080", p.url)
    out = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})

    await asyncio.to_thread(run)  # the sync client, off the proxy's loop
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("miss small ") and lines[1].startswith("hit-exact small ")
    assert lines[0].split(" ", 2)[2] == lines[1].split(" ", 2)[2] != ""
