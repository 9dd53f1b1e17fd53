#!/usr/bin/env python3
"""The honest update norms of federations, against --max-update-norm-ratio's bound.

norm_ratios.py DIR... reads every metrics.jsonl under the DIRs (coordinators' state directories,
say those of the federation tests kept with FEDLORA_KEEP_SCRATCH=1) and prints, per run and over
all, the largest ratio of an update's norm ‖s·B·A‖_F (the metrics line's "update_norms") to the
lower median of its round's norms: the ratio the coordinator's median bound compares with K.
Rounds with fewer than two updates, or a median of 0, say nothing and are skipped; so are rounds where the
bound left an update out ("norm_outliers": the tests' deliberately hostile clients).
"""
import json
import pathlib
import sys


def round_ratios(line):
    if line.get("norm_outliers"):
        return None
    norms = sorted(line.get("update_norms", {}).values())
    if len(norms) < 2:
        return None
    median = norms[(len(norms) - 1) // 2]
    if median <= 0:
        return None
    return norms[-1] / median


def main(dirs):
    overall = (0.0, None)
    runs = rounds = 0
    for d in dirs:
        for path in sorted(pathlib.Path(d).rglob("metrics.jsonl")):
            worst = (0.0, None)
            for text in path.read_text(errors="replace").splitlines():
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue  # the tests' deliberately damaged files
                ratio = round_ratios(line)
                if ratio is None:
                    continue
                rounds += 1
                if ratio > worst[0]:
                    worst = (ratio, f"{path} round {line['round']} ({len(line['update_norms'])} updates)")
            if worst[1] is None:
                continue
            runs += 1
            print(f"{worst[0]:8.4f}  {worst[1]}")
            overall = max(overall, worst, key=lambda w: w[0])
    print(f"largest honest ratio {overall[0]:.4f} over {rounds} rounds of {runs} runs: {overall[1]}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: norm_ratios.py DIR...")
    main(sys.argv[1:])
