#!/usr/bin/env python3
"""Two builds of the benches side by side, in interleaved rounds.

    benches/compare_versions.py OLD_TARGET NEW_TARGET [ROUNDS]

OLD_TARGET and NEW_TARGET are cargo target directories in which
`cargo bench --no-run --features wal,testing` was run (e.g. a git worktree
of the old commit with its own target). Each round runs every phase below
with the old build, then the new one (alternating which goes first), and
collects each `... ratio R` line the benches print (ours / bare SQL in the
same run). Prints the median ratio of each line per build and their quotient.
Sizes are reduced from the benches' defaults so a round takes minutes.
"""
import glob, os, re, statistics, subprocess, sys

PHASES = [
    ("durable", {"BENCH_PHASES": "publish,consume", "BENCH_SINGLE": "2000",
                 "BENCH_BATCHED": "20000", "BENCH_BACKLOG": "200000",
                 "BENCH_PUBLISH_RUNS": "6", "BENCH_CONSUME_RUNS": "1"}),
    ("queue", {"BENCH_SINGLE": "2000", "BENCH_BATCHED": "50000",
               "BENCH_WORK": "30000", "BENCH_CHURN": "0", "BENCH_ENQUEUE_RUNS": "6"}),
    ("throughput", {"BENCH_PHASES": "receive", "BENCH_MESSAGES": "500000",
                    "BENCH_RUNS": "1"}),
]


def binary(target, name):
    found = [p for p in glob.glob(os.path.join(target, "release", "deps", name + "-*"))
             if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not found:
        sys.exit(f"no {name} bench in {target}: run cargo bench --no-run there first")
    return max(found, key=os.path.getmtime)


def run(path, env):
    full = dict(os.environ, **env)
    full.pop("DATABASE_URL", None)
    out = subprocess.run([path, "--bench"], env=full, capture_output=True, text=True)
    ratios = {}
    for line in out.stdout.splitlines():
        cols = [c.strip() for c in line.split("|")]
        # The throughput bench's table: case | msgs | wall | msgs/s | ratio | cpu | cpu ratio | ...
        if len(cols) > 6 and cols[0].startswith("(") and re.fullmatch(r"[\d.]+", cols[4]):
            ratios[cols[0] + " (throughput)"] = float(cols[4])
            ratios[cols[0] + " (cpu, lower is better)"] = float(cols[6])
            continue
        if "ratio" in line and ", run " not in line:
            m = re.search(r"ratio\s+([\d.]+)", line)
            what = re.split(r"\s{2,}", line.strip())[0]
            if m:
                ratios[what] = float(m.group(1))
    if out.returncode != 0:
        print(out.stdout, out.stderr, file=sys.stderr)
    return ratios


def main():
    old, new = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    only = os.environ.get("COMPARE_ONLY")
    phases = [p for p in PHASES if not only or p[0] in only.split(",")]
    seen = {"old": {}, "new": {}}
    for r in range(rounds):
        for name, env in phases:
            order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
            for label, target in order:
                for what, ratio in run(binary(target, name), env).items():
                    seen[label].setdefault((name, what), []).append(ratio)
                    print(f"round {r + 1} {label} {name}: {what} ratio {ratio:.2f}", flush=True)
    print()
    print(f"| bench | line | old (median ratio to bare) | new | new / old |")
    print("|---|---|---|---|---|")
    for key in sorted(set(seen["old"]) | set(seen["new"])):
        o = statistics.median(seen["old"].get(key, [float("nan")]))
        n = statistics.median(seen["new"].get(key, [float("nan")]))
        print(f"| {key[0]} | {key[1]} | {o:.2f} | {n:.2f} | {n / o:.2f} |")


if __name__ == "__main__":
    main()
