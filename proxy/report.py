"""``edge-proxy report``: cost, savings and hit rate by namespace, tier and hour, from the event
log (JSON-lines files, or the Redis Stream), as tables and, with ``--plot DIR``, PNG charts
(matplotlib: ``pip install matplotlib``, or the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

HITS: Final = ("hit-exact", "hit-semantic")
DIMENSIONS: Final = ("namespace", "tier", "hour", "endpoint", "model", "outcome")


def hour_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:00", time.gmtime(ts))


def read_files(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], int]:
    """Events from JSON-lines files; returns (events, lines that were not an event)."""
    events, bad = [], 0
    for path in paths:
        with open(path, "rb") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    e = orjson.loads(line)
                except orjson.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(e, dict) and "outcome" in e:
                    events.append(e)
                else:
                    bad += 1
    return events, bad


async def read_stream(url: str, key: str, batch: int = 10_000) -> tuple[list[dict[str, Any]], int]:
    """Events from the Redis Stream (XRANGE, oldest first)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    events, bad, start = [], 0, "-"
    try:
        while True:
            recs = await client.xrange(key, min=start, max="+", count=batch)
            if not recs:
                break
            for _, fields in recs:
                raw = (fields or {}).get(b"event")
                try:
                    events.append(orjson.loads(raw or b""))
                except orjson.JSONDecodeError:
                    bad += 1
            last = recs[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    finally:
        await client.aclose()
    return events, bad


@dataclass
class Row:
    key: tuple[str, ...]
    requests: int = 0
    hits: int = 0
    semantic_hits: int = 0
    errors: int = 0
    spent_usd: float = 0.0
    saved_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        answered = self.requests - self.errors
        return self.hits / answered if answered else 0.0

    @property
    def saving(self) -> float:
        total = self.spent_usd + self.saved_usd
        return self.saved_usd / total if total else 0.0

    def as_dict(self, by: tuple[str, ...]) -> dict[str, Any]:
        return {**dict(zip(by, self.key, strict=True)), "requests": self.requests,
                "hits": self.hits, "semantic_hits": self.semantic_hits, "errors": self.errors,
                "hit_rate": round(self.hit_rate, 4), "spent_usd": round(self.spent_usd, 8),
                "saved_usd": round(self.saved_usd, 8), "saving": round(self.saving, 4),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


def _value(e: dict[str, Any], dim: str) -> str:
    if dim == "hour":
        return hour_of(float(e.get("ts") or 0))
    v = e.get(dim)
    return "" if v is None else str(v)


def aggregate(events: Iterable[dict[str, Any]], by: tuple[str, ...]) -> list[Row]:
    """One row per distinct value of ``by`` (hour: UTC), most spent first (hours in order)."""
    rows: dict[tuple[str, ...], Row] = {}
    for e in events:
        key = tuple(_value(e, d) for d in by)
        r = rows.get(key)
        if r is None:
            r = rows[key] = Row(key)
        r.requests += 1
        outcome = e.get("outcome")
        if outcome in HITS:
            r.hits += 1
            r.semantic_hits += outcome == "hit-semantic"
        elif outcome == "error":
            r.errors += 1
        r.spent_usd += float(e.get("cost_usd") or 0)
        r.saved_usd += float(e.get("saved_usd") or 0)
        r.prompt_tokens += int(e.get("prompt_tokens") or 0)
        r.completion_tokens += int(e.get("completion_tokens") or 0)
    out = list(rows.values())
    if "hour" in by:
        out.sort(key=lambda r: r.key)
    else:
        out.sort(key=lambda r: (-r.spent_usd, -r.saved_usd, r.key))
    return out


def table(rows: list[Row], by: tuple[str, ...]) -> str:
    """A plain-text table with a total line."""
    head = [*by, "requests", "hit rate", "semantic", "errors", "spent $", "saved $", "saving"]
    total = Row(tuple("total" if i == 0 else "" for i in range(len(by))))
    lines = []
    for r in [*rows, total]:
        if r is not total:
            for f in ("requests", "hits", "semantic_hits", "errors", "spent_usd", "saved_usd"):
                setattr(total, f, getattr(total, f) + getattr(r, f))
        lines.append([*r.key, str(r.requests), f"{r.hit_rate:.1%}", str(r.semantic_hits),
                      str(r.errors), f"{r.spent_usd:.6f}", f"{r.saved_usd:.6f}",
                      f"{r.saving:.1%}"])
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    n = len(by)

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < n else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep, *map(fmt, lines[:-1]), sep, fmt(lines[-1])])


def plot(events: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """PNG charts: spent vs saved by namespace and by tier, and per hour with the hit rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dim in ("namespace", "tier"):
        rows = aggregate(events, (dim,))[:15]
        fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * max(len(rows), 2)))
        names = [r.key[0] or "(none)" for r in rows][::-1]
        spent = [r.spent_usd for r in rows][::-1]
        saved = [r.saved_usd for r in rows][::-1]
        ax.barh(names, spent, color="#f04438", label="spent")
        ax.barh(names, saved, left=spent, color="#12b76a", label="saved by the cache")
        ax.set_xlabel("USD")
        ax.set_title(f"Cost by {dim}")
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = out_dir / f"cost_by_{dim}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    rows = aggregate(events, ("hour",))
    fig, ax = plt.subplots(figsize=(9, 4))
    hours = [r.key[0][5:] for r in rows]
    ax.plot(hours, [r.spent_usd for r in rows], marker="o", color="#f04438", label="spent")
    ax.plot(hours, [r.saved_usd for r in rows], marker="o", color="#12b76a", label="saved")
    ax.set_ylabel("USD per hour")
    ax2 = ax.twinx()
    ax2.plot(hours, [r.hit_rate for r in rows], ls="--", color="#2e90fa", label="hit rate")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("hit rate")
    ax.set_title("Cost and hit rate per hour (UTC)")
    fig.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    path = out_dir / "cost_by_hour.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", help="event log files (JSON lines)")
    p.add_argument("--redis", metavar="URL", help="read the Redis Stream instead")
    p.add_argument("--stream", default="ep:v1:events", help="stream key (default ep:v1:events)")
    p.add_argument("--by", action="append", metavar="DIM[,DIM]",
                   help=f"group by these ({', '.join(DIMENSIONS)}); repeat for several tables; "
                   "default: namespace, tier, hour")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of tables")
    p.add_argument("--plot", metavar="DIR", help="also write PNG charts into DIR (matplotlib)")


def run(args: argparse.Namespace) -> int:
    if args.redis:
        events, bad = asyncio.run(read_stream(args.redis, args.stream))
    elif args.files:
        try:
            events, bad = read_files(args.files)
        except OSError as exc:
            print(f"edge-proxy report: {exc}", file=sys.stderr)
            return 2
    else:
        print("edge-proxy report: give event log files or --redis URL", file=sys.stderr)
        return 2
    groupings = []
    for spec in args.by or ["namespace", "tier", "hour"]:
        by = tuple(d.strip() for d in spec.split(",") if d.strip())
        unknown = [d for d in by if d not in DIMENSIONS]
        if unknown or not by:
            print(f"edge-proxy report: --by {spec!r}: dimensions are {', '.join(DIMENSIONS)}",
                  file=sys.stderr)
            return 2
        groupings.append(by)
    if args.json:
        out = {",".join(by): [r.as_dict(by) for r in aggregate(events, by)] for by in groupings}
        print(orjson.dumps({"events": len(events), "skipped_lines": bad, "tables": out},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"{len(events)} events" + (f" ({bad} lines skipped)" if bad else ""))
        for by in groupings:
            print()
            print(table(aggregate(events, by), by))
    if args.plot:
        try:
            paths = plot(events, Path(args.plot))
        except ImportError:
            print("edge-proxy report: --plot needs matplotlib (pip install matplotlib)",
                  file=sys.stderr)
            return 2
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)
    return 0


