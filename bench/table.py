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


STEPS = {"trl_rloo": "rlhf", "rlhf_step": "rlhf", "trl_reward": "reward", "reward_step": "reward"}
runs = defaultdict(list)
steps = defaultdict(list)
matmul = defaultdict(list)
bandwidth = []
for who in ("peer", "posttrain"):
    for line in (out / f"{who}.jsonl").read_text().splitlines():
        if not line.startswith('{"'):
            continue  # TRL prints its log dicts to stdout too
        row = json.loads(line)
        if row["bench"] == "bandwidth":
            bandwidth.append(row["read_gbs_best"])
            continue
        name = who if who == "peer" else f"posttrain {row['backend']}"
        if row["bench"] == "matmul":
            matmul[name].append(row["gflops_best"])
        elif row["bench"] == "trl_rloo":
            # TRL at β 0 runs no reference model; at β 0.1 it runs one, as posttrain does
            kind = "rlhf" if row.get("beta", 0.0) > 0 else "rlhf-b0"
            steps[(kind, shape_name(row), name)].append(row)
        elif row["bench"] == "rlhf_step":
            for kind in ("rlhf", "rlhf-b0"):
                steps[(kind, shape_name(row), name)].append(row)
        elif row["bench"] in STEPS:
            steps[(STEPS[row["bench"]], shape_name(row), name)].append(row)
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
       if all(isinstance(r.get("mfu"), float) for r in rows)}
if mfu:
    print("\nMFU (model FLOPs / that process's or round's matmul peak): " + "; ".join(
        f"{b} {s} {n} {v:.2f}" for (b, s, n), v in sorted(mfu.items())))
bound = {k: statistics.median(r["of_bandwidth_bound"] for r in rows) for k, rows in runs.items()
         if all(isinstance(r.get("of_bandwidth_bound"), float) for r in rows)}
if bound:
    print(f"\nSampling against its bandwidth bound (batch × read GB/s / weight bytes; read rate "
          f"{statistics.median(bandwidth) if bandwidth else float('nan'):.1f} GB/s): " + "; ".join(
              f"{s} {n} {v:.2f}" for (b, s, n), v in sorted(bound.items())))
print(f"\n{len(next(iter(runs.values())))} rounds; medians; peak RSS is the largest seen.")
if steps:
    print("\n| step | " + " | ".join(f"{n} s/step (peak RSS MB)" for n in names) + " | "
          + " | ".join(f"peer / {n}" for n in names if n != "peer") + " | parts (median s) |")
    print("|---" * (2 + 2 * len(names) - 1) + "|")
    for kind, shape in sorted({(k, s) for k, s, _ in steps}):
        med, cells, parts = {}, [], []
        for n in names:
            rows = steps.get((kind, shape, n), [])
            if not rows:
                cells.append("–")
                continue
            med[n] = statistics.median(r["step_s_median"] for r in rows)
            cells.append(f"{med[n]:.3f} ({max(r['peak_rss_mb'] for r in rows):,.0f})")
            split = [k for k in ("rollout_s_median", "reward_s_median", "logprob_s_median", "update_s_median")
                     if all(r.get(k) is not None for r in rows)]
            if split:
                parts.append(f"{n}: " + ", ".join(
                    f"{k[:-9]} {statistics.median(r[k] for r in rows):.3f}" for k in split))
        ratios = [f"{med['peer'] / med[n]:.2f}x" if n in med and "peer" in med else "–"
                  for n in names if n != "peer"]
        label = {"rlhf": "RLHF (RLOO), both β 0.1", "rlhf-b0": "RLHF (RLOO), TRL at β 0",
                 "reward": "reward model"}[kind]
        print(f"| {label} `{shape}` | " + " | ".join(cells) + " | " + " | ".join(ratios) + " | "
              + "; ".join(parts) + " |")
