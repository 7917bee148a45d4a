"""The data axis of experiments/paper-regime-data.yaml as a table: per training-set size, each system
against the fine-tuned baseline of the same size (paired t-test over queries, scores averaged over
the seeds both have finished, Bonferroni over the size's comparisons).

    python scripts/data_axis_table.py runs/paper-regime-data [--metric ndcg@10]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from sbmoe.evaluation.statistics import bonferroni, compare_to_baseline

CELL = re.compile(r"__(?P<collection>[^_]+)__(?P<variant>[a-z-]+)-(?P<size>\d+k)(?:__n\d+)?__s(?P<seed>\d+)$")


def per_query_by_seed(output: Path, metric: str) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """(size, system) -> seed -> query -> score, for every finished cell and evaluation rule."""
    found: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    for cell in sorted((output / "cells").iterdir()):
        match = CELL.search(cell.name)
        if not match or not (cell / "done.json").is_file():
            continue
        for scores in sorted((cell / "eval").rglob("per_query.json")):
            rule = scores.parent.name if scores.parent.name in ("top1", "all") else None
            system = f"{match['variant']} ({rule})" if rule else match["variant"]
            found[(match["size"], system)][int(match["seed"])] = json.loads(scores.read_text())[metric]
    return found


def averaged(by_seed: dict[int, dict[str, float]], seeds: list[int]) -> dict[str, float]:
    return {query: sum(by_seed[s][query] for s in seeds) / len(seeds) for query in by_seed[seeds[0]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--metric", default="ndcg@10")
    args = parser.parse_args()
    found = per_query_by_seed(args.output, args.metric)
    print(f"| pairs | system | seeds | {args.metric} | baseline | difference | corrected p |")
    print("|---|---|---|---:|---:|---:|---:|")
    for size in sorted({size for size, _ in found}, key=lambda s: int(s[:-1])):
        baseline = found.get((size, "fine-tuned"), {})
        systems = {
            system: runs for (s, system), runs in found.items() if s == size and system != "fine-tuned"
        }
        comparisons = {}
        for system, runs in systems.items():
            seeds = sorted(set(runs) & set(baseline))
            if seeds:
                comparisons[system] = seeds
        if not comparisons:
            continue
        # Each system on the seeds it shares with the baseline; Bonferroni over the size's systems.
        rows = {}
        for system, seeds in sorted(comparisons.items()):
            scores = {"fine-tuned": averaged(baseline, seeds), system: averaged(systems[system], seeds)}
            [rows[system]] = compare_to_baseline(scores, "fine-tuned", metric=args.metric).comparisons
        corrected = bonferroni({system: row.p_value for system, row in rows.items()})
        for system, row in rows.items():
            mark = " *" if corrected[system] < 0.05 else ""
            print(
                f"| {size} | {system} | {','.join(map(str, comparisons[system]))} | {row.mean:.4f} | "
                f"{row.baseline_mean:.4f} | {row.mean_difference:+.4f}{mark} | {corrected[system]:.3f} |"
            )


if __name__ == "__main__":
    main()
