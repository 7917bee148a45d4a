"""Write the docs-ready summary of a before/after pair of campaign runs (WORK/results-*.jsonl)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

CLASSES = (
    "REFUSED",
    "TOLERATED",
    "CODE-EXEC",
    "DATA-LOSS",
    "HANG",
    "TRACEBACK",
    "SILENT-ACCEPT",
    "SILENT-WRONG",
    "UNCLEAR",
    "WRONG-REFUSAL",
    "SKIPPED",
)
FAIL = CLASSES[2:10]


def load(path: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["id"]] = row  # a case run twice: its last result
    return rows


def esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("`", "'").replace("\n", " ")[:220]


def main(work: str, target: str, notes_file: str) -> None:
    before, after = load(Path(work) / "results-before.jsonl"), load(Path(work) / "results-after.jsonl")
    notes = json.loads(Path(notes_file).read_text(encoding="utf-8"))
    cb, ca = Counter(r["cls"] for r in before.values()), Counter(r["cls"] for r in after.values())
    out = [notes["head"], "", "| class | before fixes | after fixes |", "|---|---:|---:|"]
    out += [f"| {k} | {cb.get(k, 0)} | {ca.get(k, 0)} |" for k in CLASSES]
    out += [f"| **cases** | **{len(before)}** | **{len(after)}** |", ""]
    verbs = Counter(r["verb"] for r in after.values())
    out += ["Cases per verb (after): " + ", ".join(f"{v} {n}" for v, n in sorted(verbs.items())) + ".", ""]
    out += [
        "## What the first run found, and what became of it",
        "",
        "| case | class before | what | what became of it | class after |",
        "|---|---|---|---|---|",
    ]
    for cid, row in before.items():
        if row["cls"] in FAIL:
            now = after.get(cid, {}).get("cls", "not run")
            out.append(
                f"| {cid} | {row['cls']} | {esc(row['what'])} — {esc(row['msg'])[:120]} | "
                f"{esc(notes['fate'].get(cid, ''))} | {now} |"
            )
    out += ["", "## Failures left after the fixes", ""]
    left = [r for r in after.values() if r["cls"] in FAIL]
    if not left:
        out.append("None.")
    else:
        out += ["| case | verb | class | message | why |", "|---|---|---|---|---|"]
        out += [
            f"| {r['id']} | {r['verb']} | {r['cls']} | {esc(r['msg'])} | {esc(notes['left'].get(r['id'], ''))} |"
            for r in left
        ]
    out += ["", notes.get("tail", "")]
    Path(target).write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:4])
