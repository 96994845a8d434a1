"""Markdown tables of `wide_beyond.sh`'s outputs: python3 wide_beyond_tables.py RUN/beyond"""

import json
import math
import os
import sys

os.chdir(sys.argv[1])


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wall(run):
    path = f"{run}.wall"
    return f"{float(open(path).read()):.0f} s" if os.path.exists(path) else "–"


MEMBERS = [f"rm_s{s}" for s in range(5)]
SHARED = ["rm_s0"] + [f"rm_h{s}" for s in range(1, 5)]
PAIRS = [("prefs_eval", "held-out pairs"), ("prefs_eval8", "held-out, 8 samples"),
         ("prefs_shift", "shifted: RL policies' samples")]


def scores(model, pairs):
    side = lambda s: [r["reward"] for r in jsonl(f"scores/{model}.{pairs}.{s}.jsonl")]
    return side("chosen"), side("rejected")


def accuracy(chosen, rejected):
    w = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(chosen, rejected)]
    m = sum(w) / len(w)
    return m, math.sqrt(m * (1 - m) / len(w)), len(w)


def ensemble(models, pairs):
    sides = [scores(m, pairs) for m in models]
    mean = lambda i: [sum(x) / len(x) for x in zip(*(s[i] for s in sides))]
    return mean(0), mean(1)


print("### WARM: pairwise accuracy (± binomial standard error)\n")
n = {p: accuracy(*scores("rm_s0", p))[2] for p, _ in PAIRS}
print("| reward model | " + " | ".join(f"{label} ({n[p]})" for p, label in PAIRS) + " |")
print("|---|" + "---|" * len(PAIRS))
rows = [(f"member, seed {m[-1]} (head seed {m[-1]})", lambda p, m=m: scores(m, p)) for m in MEMBERS]
rows += [
    ("prediction ensemble of 3 (mean score)", lambda p: ensemble(MEMBERS[:3], p)),
    ("prediction ensemble of 5", lambda p: ensemble(MEMBERS, p)),
    ("weight average of 3", lambda p: scores("warm3", p)),
    ("weight average of 5", lambda p: scores("warm5", p)),
]
rows += [(f"member, seed {m[-1]}, head seed 0", lambda p, m=m: scores(m, p)) for m in SHARED[1:]]
rows += [
    ("prediction ensemble of 3, head seed 0", lambda p: ensemble(SHARED[:3], p)),
    ("prediction ensemble of 5, head seed 0", lambda p: ensemble(SHARED, p)),
    ("**WARM of 3** (weight average, head seed 0)", lambda p: scores("warmh3", p)),
    ("**WARM of 5** (weight average, head seed 0)", lambda p: scores("warmh5", p)),
]
FROM_RM = [f"rm_f{s}" for s in range(1, 4)]
rows += [(f"member continued from rm, seed {m[-1]}", lambda p, m=m: scores(m, p)) for m in FROM_RM]
rows += [
    ("prediction ensemble of the 3 continued", lambda p: ensemble(FROM_RM, p)),
    ("**WARM of the 3 continued** (weight average)", lambda p: scores("warmf3", p)),
]
for name, get in rows:
    cells = []
    for p, _ in PAIRS:
        a, se, _ = accuracy(*get(p))
        cells.append(f"{a:.3f} ± {se:.3f}")
    print(f"| {name} | " + " | ".join(cells) + " |")

ev = {os.path.normpath(r["checkpoint"]): r for f in ("eval16.jsonl", "eval16_h.jsonl")
      for r in jsonl(f)}
ev_warm = {os.path.normpath(r["checkpoint"]): r for r in jsonl("eval16_warm5.jsonl")}
ev_warmh = {os.path.normpath(r["checkpoint"]): r for r in jsonl("eval16_warmh5.jsonl")}


def pm(row, key, digits=3):
    v, se = row.get(key), row.get(f"{key}_se")
    if v is None:
        return "–"
    return f"{v:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{v:.{digits}f}"


def cols(name):
    r = ev[os.path.normpath(name)]
    return f"{pm(r, 'reward')} | {pm(r, 'score')} | {r['accuracy']:.3f} | {pm(r, 'kl', 2)} | {r['length']:.1f}"


print("\n### RL against one reward model vs against WARM (16 samples per held-out prompt)\n")
print("Held-out eval: `rm` reward is the member's score (the seed-0 reward model); WARM reward the")
print("5-model average's (head seed 0) and, for the run against it, the average of members with")
print("their own heads'. Mean ± standard error over the 200 prompts.\n")
print("| policy | step | rm reward | WARM reward | true score | accuracy | KL to SFT | length |")
print("|---|---|---|---|---|---|---|---|")
for s in (0, 1):
    for run, label, wev in ((f"rl-rloo-k1-reward-s{s}", f"against rm, seed {s}", ev_warmh),
                            (f"rl-warmh5-s{s}", f"against WARM of 5, seed {s}", ev_warmh),
                            (f"rl-warm5-s{s}", f"against the own-head average of 5, seed {s}", ev_warm)):
        snaps = sorted(os.listdir(f"{run}/snapshots")) if os.path.isdir(f"{run}/snapshots") else []
        for ck in [f"{run}/snapshots/{x}" for x in snaps] + [run]:
            r = ev[os.path.normpath(ck)]
            step = int(ck.rsplit("-", 1)[1]) if "snapshots" in ck else "final"
            w = wev.get(os.path.normpath(ck))
            print(f"| {label} | {step} | {pm(r, 'reward')} | {pm(w, 'reward') if w else '–'} | "
                  f"{pm(r, 'score')} | {r['accuracy']:.3f} | {pm(r, 'kl', 2)} | {r['length']:.1f} |")
r, w = ev["../sft_live"], ev_warmh.get("../sft_live")
print(f"| SFT policy | 0 | {pm(r, 'reward')} | {pm(w, 'reward') if w else '–'} | {pm(r, 'score')} | "
      f"{r['accuracy']:.3f} | 0 | {r['length']:.1f} |")

print("\n### Advantages and KL placement (against rm, 16 samples per held-out prompt)\n")
print("| advantage, KL | seed | RM reward | true score | accuracy | KL to SFT | length | wall |")
print("|---|---|---|---|---|---|---|---|")
print(f"| SFT policy | – | {cols('../sft_live')} | – |")
for name, label in (("rloo-k1-reward", "RLOO, k1 in reward (the recipe)"),
                    ("drgrpo-k1-reward", "Dr. GRPO, k1 in reward"),
                    ("rloo-k3-reward", "RLOO, k3 in reward"),
                    ("grpo-k3-loss", "GRPO, k3 in loss")):
    for s in (0, 1):
        print(f"| {label} | {s} | {cols(f'rl-{name}-s{s}')} | {wall(f'rl-{name}-s{s}')} |")

print("\n### DPO vs RLHF (16 samples per held-out prompt)\n")
print("| run | seed | RM reward | true score | accuracy | KL to SFT | length | wall |")
print("|---|---|---|---|---|---|---|---|")
for s in (0, 1):
    print(f"| DPO on rm's training pairs | {s} | {cols(f'dpo-s{s}')} | {wall(f'dpo-s{s}')} |")
for s in (0, 1):
    print(f"| RLHF, RLOO k1 | {s} | {cols(f'rl-rloo-k1-reward-s{s}')} | {wall(f'rl-rloo-k1-reward-s{s}')} |")
