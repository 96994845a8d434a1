#!/usr/bin/env python3
"""Markdown table of medians from bench/compare.sh's results directory."""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])


def shape_name(row):
    s = row["shape"]
    if isinstance(s, str):
        return s
    return "tiny" if s["hidden"] == 256 else "small"


runs = defaultdict(list)
matmul = defaultdict(list)
for who in ("peer", "posttrain"):
    for line in (out / f"{who}.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = who if who == "peer" else f"posttrain {row['backend']}"
        if row["bench"] == "matmul":
            matmul[name].append(row["gflops_best"])
        else:
            runs[(row["bench"], shape_name(row), name)].append(row)

cases = sorted({(b, s) for b, s, _ in runs}, key=lambda k: (k[0] != "train", k[1] != "tiny"))
names = sorted({n for _, _, n in runs}, key=lambda n: (n != "peer", n))
print("| case | " + " | ".join(f"{n} tokens/s (peak RSS MB)" for n in names) + " | "
      + " | ".join(f"{n} / peer" for n in names if n != "peer") + " |")
print("|---" * (1 + 2 * len(names) - 1) + "|")
for bench, shape in cases:
    med = {}
    cells = []
    for n in names:
        rows = runs.get((bench, shape, n), [])
        if not rows:
            cells.append("–")
            continue
        med[n] = statistics.median(r["tokens_per_s"] for r in rows)
        rss = max(r["peak_rss_mb"] for r in rows)
        cells.append(f"{med[n]:,.0f} ({rss:,.0f})")
    ratios = [f"{med[n] / med['peer']:.2f}x" if n in med and "peer" in med else "–"
              for n in names if n != "peer"]
    label = "train step" if bench == "train" else "sampling"
    print(f"| {label} `{shape}` | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
if matmul:
    med = {n: statistics.median(v) for n, v in matmul.items()}
    cells = [f"{med[n]:,.0f} GFLOP/s" if n in med else "–" for n in names]
    ratios = [f"{med[n] / med['peer']:.2f}x" if n in med and "peer" in med else "–"
              for n in names if n != "peer"]
    print("| fp32 2048³ matmul | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
mfu = {k: statistics.median(r["mfu"] for r in rows) for k, rows in runs.items()
       if all("mfu" in r for r in rows)}
if mfu:
    print("\nMFU (model FLOPs / that process's or round's matmul peak): " + "; ".join(
        f"{b} {s} {n} {v:.2f}" for (b, s, n), v in sorted(mfu.items())))
print(f"\n{len(next(iter(runs.values())))} rounds; medians; peak RSS is the largest seen.")
