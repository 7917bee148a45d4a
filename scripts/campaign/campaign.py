"""Issue 31's verification campaign: ~290 hostile or careless inputs against every sbmoe verb.

Run it as a user would (``python scripts/campaign/campaign.py --work /work/campaign31``, niced);
it builds its fixtures (a 200-document SciFact slice, a 2-step splade-tiny SB-MoE model, an index,
an evaluation) once under WORK/base, then runs every case in its own folder under WORK/run and
writes WORK/results.md (case, verb, class, first line of the message) and WORK/results.json.

Classes: REFUSED (non-zero exit, no traceback, one error line naming the cause), TOLERATED (exit 0
as documented, output checked), and the failures: CODE-EXEC (a payload's marker file appeared),
DATA-LOSS (a planted user file changed or vanished), HANG (timeout), TRACEBACK, SILENT-ACCEPT (exit
0 where the input must be refused), SILENT-WRONG (exit 0 with a wrong output), UNCLEAR (refused but
the line does not name the cause), WRONG-REFUSAL (a valid input refused). SKIPPED: cannot run here.

To keep 2 shared cores usable, the CLI cases run in forked children of one process that imported
sbmoe, torch and transformers once (``main(argv)`` with stdout/stderr on files, an uncaught
exception printed as Python would); the serve, kill -9, lock and concurrency drills run the real
``python -m sbmoe.cli`` in subprocesses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = Path(os.environ.get("SBMOE_SRC", REPO / "src"))  # the sbmoe under test (a frozen copy for "before")
SHARED = Path(os.environ.get("SBMOE_SHARED", "/work/shared"))
SPLADE = SHARED / "models" / "splade-tiny"
PY = sys.executable
FAIL = (
    "CODE-EXEC",
    "DATA-LOSS",
    "HANG",
    "TRACEBACK",
    "SILENT-ACCEPT",
    "SILENT-WRONG",
    "UNCLEAR",
    "WRONG-REFUSAL",
)

CASES: list[dict] = []


def case(cid, verb, what, argv, expect="refuse", names=(), check=None, timeout=150, plant=None, env=None):
    """Register one case. ``argv`` is a function of the case folder returning the CLI arguments
    (or a callable runner for drills); ``names``: text the error line must hold; ``check(d)``
    returns None or what is wrong with an accepted output; ``plant``: output folders to plant
    user files in."""
    CASES.append(
        dict(
            id=cid,
            verb=verb,
            what=what,
            argv=argv,
            expect=expect,
            names=tuple(names),
            check=check,
            timeout=timeout,
            plant=plant,
            env=env,
        )
    )


# ----------------------------------------------------------------------------------- fixtures
def build_base(work: Path) -> Path:
    base = work / "base"
    if (base / "ok").exists():
        return base
    base.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_beir_slice

    write_beir_slice(SHARED / "data" / "scifact", base / "sf", 40, 20, 130)
    run_cli = [PY, "-m", "sbmoe.cli", "-q"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for argv in (
        [
            "train",
            "--model",
            str(SPLADE),
            "--data",
            "sf",
            "--output",
            "model",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--max-doc-length",
            "64",
            "--checkpoint-selection",
            "last",
        ],
        ["index", "--model", "model", "--data", "sf", "--output", "idx"],
        ["evaluate", "--model", "model", "--data", "sf", "--output", "ev"],
    ):
        subprocess.run(run_cli + argv, cwd=base, env=env, check=True)
    # a copy of the model without its training folder, for the cases that edit it
    shutil.copytree(base / "model", base / "model-lite", ignore=shutil.ignore_patterns("training"))
    (base / "ok").write_text("ok")
    return base


def digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def plant_user_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "NOTES.md").write_text("my notes\n")
    (folder / "mydata").mkdir(exist_ok=True)
    (folder / "mydata" / "keep.txt").write_text("keep me\n")


def user_files_intact(folder: Path) -> bool:
    try:
        return (folder / "NOTES.md").read_text() == "my notes\n" and (
            folder / "mydata" / "keep.txt"
        ).read_text() == "keep me\n"
    except OSError:
        return False


# ------------------------------------------------------------------------------------- runners
def run_forked(argv, d: Path, timeout: float, env: dict | None):
    """``sbmoe argv`` in a forked child of this process (imports already paid)."""
    out, err = d / "stdout.txt", d / "stderr.txt"
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.chdir(d)
            for k, v in (env or {}).items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fe = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            from sbmoe.cli.main import main

            try:
                rc = main(["-q", *argv])
            except SystemExit as exit_:
                rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc or 0)
        except BaseException:
            os._exit(99)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rc = None
            break
        time.sleep(0.05)
    return rc, out.read_text(errors="replace"), err.read_text(errors="replace")


def cli(*args):
    return [PY, "-m", "sbmoe.cli", "-q", *args]


def sub_env(extra=None):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.update(extra or {})
    return env


def run_sub(args, d: Path, timeout=180, env=None):
    try:
        p = subprocess.run(
            cli(*args),
            cwd=d,
            env=sub_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            errors="replace",
        )
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return None, decode(e.stdout), decode(e.stderr)


# --------------------------------------------------------------------------------- classifying
def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def classify(c, d: Path, rc, out, err, markers, planted):
    msg = last_line(err) if rc else (last_line(err) or last_line(out))
    failed_cells = [x.strip() for x in out.splitlines() if x.strip().startswith("failed:")]
    if c.get("verb") == "experiment" and rc == 1 and failed_cells:  # a failing cell, recorded: say which
        msg = "sbmoe experiment: error: (cell recorded as failed) " + failed_cells[0]
    if any(m.exists() for m in markers):
        return "CODE-EXEC", msg
    for folder in planted:
        if not user_files_intact(folder):
            return "DATA-LOSS", f"user files in {folder.name} gone; " + msg
    if rc is None:
        return "HANG", f"no answer in {c['timeout']} s; " + msg
    if "Traceback (most recent call last)" in err or "Traceback (most recent call last)" in out:
        tb = [x for x in err.splitlines() if x.strip()]
        return "TRACEBACK", (tb[-1] if tb else msg)
    if c["expect"] == "refuse":
        if rc == 0:
            return "SILENT-ACCEPT", msg
        if ": error:" not in msg or any(n.lower() not in msg.lower() for n in c["names"]):
            return "UNCLEAR", msg
        return "REFUSED", msg
    # expected to be accepted
    if rc != 0:
        return "WRONG-REFUSAL", msg
    if c["check"] is not None:
        try:
            wrong = c["check"](d, out, err)
        except Exception as e:  # noqa: BLE001
            wrong = f"check failed: {type(e).__name__}: {e}"
        if wrong:
            return "SILENT-WRONG", wrong
    return "TOLERATED", msg


# ------------------------------------------------------------------------------------- payloads
MARKERS = Path("/tmp/campaign31-markers")


def payload(marker: Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def evil_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": Evil(marker)}))


def upd(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def main_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/campaign31")
    ap.add_argument("--only", default="", help="comma-separated case-id prefixes")
    ap.add_argument("--out", default="results")
    ap.add_argument("--run-dir", default="run", help="folder (under WORK) of the cases' folders")
    ap.add_argument("--start-at", default="", help="skip the cases before this id (resume a crashed run)")
    ap.add_argument("--shard", default="0/1", help="I/N: run every N-th case from the I-th (drills: shard 0)")
    ap.add_argument("--no-drills", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="write OUT.md from OUT.jsonl")
    return ap.parse_args()


# ------------------------------------------------------------------------------- the campaign
def define(base: Path, work: Path) -> None:  # noqa: C901, PLR0915
    SF, MODEL, LITE, IDX, EV = (base / n for n in ("sf", "model", "model-lite", "idx", "ev"))
    marker_of = lambda cid: MARKERS / cid  # noqa: E731

    def slice_copy(d: Path, name="data") -> Path:
        shutil.copytree(SF, d / name)
        return d / name

    def lite(d: Path, name="m") -> Path:
        shutil.copytree(LITE, d / name, symlinks=True)
        return d / name

    def has_index(d: Path, name="out"):
        return None if (d / name / "index.faiss").is_file() else f"no index at {name}"

    # ---------------- A. corpus files, through index and evaluate
    corpus_lines = (SF / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(corpus_lines[0])

    def corpus_case(key, what, mutate, expect="refuse", names=("corpus.jsonl",), check=None):
        both = key in ("surrogate", "dir", "badjson", "empty", "dupid", "bom")
        for verb in ("index", "evaluate") if both else ("index",):

            def argv(d, mutate=mutate, verb=verb):
                data = slice_copy(d)
                mutate(data / "corpus.jsonl")
                return [verb, "--model", str(MODEL), "--data", str(data), "--output", str(d / "out")]

            case(f"A-corpus-{key}-{verb}", verb, what, argv, expect, names, check)

    def W(text):
        return lambda p: (
            p.write_text(text, encoding="utf-8") if isinstance(text, str) else p.write_bytes(text)
        )

    rest = "\n".join(corpus_lines[1:]) + "\n"
    corpus_case("empty", "empty corpus file", W(""))
    corpus_case("blank", "corpus of blank lines", W("\n\n  \n"))
    corpus_case("garbage", "binary garbage", W(os.urandom(3000)))
    corpus_case(
        "badjson",
        "a line that is not JSON (line 3)",
        lambda p: p.write_text("\n".join(corpus_lines[:2] + ["{not json"] + corpus_lines[2:]) + "\n"),
        names=("corpus.jsonl", "3"),
    )
    corpus_case(
        "noid",
        "a document without _id",
        lambda p: p.write_text(json.dumps({"title": "t", "text": "x"}) + "\n" + rest),
        names=("_id",),
    )
    corpus_case(
        "intid",
        "_id a JSON number (read as its string, with a warning, as documented)",
        lambda p: p.write_text(json.dumps({**first, "_id": 12345}) + "\n" + rest),
        expect="ok",
        check=lambda d, o, e: None if "JSON numbers" in e else "no warning",
    )
    corpus_case(
        "dupid",
        "two documents with the same _id",
        lambda p: p.write_text(corpus_lines[0] + "\n" + corpus_lines[0] + "\n" + rest),
        names=("_id",),
    )
    corpus_case(
        "textnum",
        "text is a number",
        lambda p: p.write_text(json.dumps({**first, "text": 5}) + "\n" + rest),
        names=("text",),
    )
    corpus_case(
        "textnull",
        "text is null",
        lambda p: p.write_text(json.dumps({**first, "text": None}) + "\n" + rest),
        names=("text",),
    )
    corpus_case("array", "a line that is a JSON array", lambda p: p.write_text("[1,2]\n" + rest))
    corpus_case(
        "surrogate",
        "a lone surrogate in a text",
        lambda p: p.write_text(json.dumps({**first, "text": "a \ud800 b"}) + "\n" + rest),
        names=("corpus.jsonl", "1"),
    )
    corpus_case(
        "latin1",
        "Latin-1 bytes (not UTF-8)",
        lambda p: p.write_bytes(
            json.dumps({**first, "text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
            + b"\n"
            + rest.encode()
        ),
    )
    corpus_case(
        "nul",
        "NUL bytes inside a line",
        lambda p: p.write_bytes(b"\x00\x00" + (SF / "corpus.jsonl").read_bytes()),
    )
    corpus_case("dir", "corpus.jsonl is a directory", lambda p: (p.unlink(), p.mkdir()))
    corpus_case("loop", "corpus.jsonl is a symlink loop", lambda p: (p.unlink(), p.symlink_to(p.name)))
    corpus_case(
        "dangling", "corpus.jsonl links to nothing", lambda p: (p.unlink(), p.symlink_to("/nonexistent/x"))
    )
    corpus_case("missing", "no corpus.jsonl", lambda p: p.unlink())

    def doc_ids_of(d):
        return (
            json.loads((d / "out" / "doc_ids.json").read_text())
            if (d / "out" / "doc_ids.json").exists()
            else None
        )

    def idx_check(pred, why):
        def check(d, out, err):
            if not (d / "out").is_dir():
                return None  # evaluate: checked by metrics below
            ids = doc_ids_of(d)
            if ids is not None and not pred(ids):
                return why
            return None

        return check

    corpus_case(
        "bom",
        "a UTF-8 BOM before the first line",
        lambda p: p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes()),
        expect="ok",
        check=idx_check(lambda ids: ids[0] == first["_id"], "BOM kept in the first id"),
    )
    corpus_case(
        "crlf",
        "CRLF line ends",
        lambda p: p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n")),
        expect="ok",
        check=idx_check(lambda ids: all("\r" not in i for i in ids), "CR kept in ids"),
    )
    corpus_case(
        "nonl",
        "no newline after the last line",
        lambda p: p.write_text(p.read_text().rstrip("\n")),
        expect="ok",
        check=idx_check(lambda ids: len(ids) == len(corpus_lines), "a document lost"),
    )
    corpus_case(
        "unicodeid",
        "unicode ids (Greek, emoji, RTL)",
        lambda p: p.write_text(json.dumps({**first, "_id": "\u03b1\u03b2-\U0001f600-\u05d0"}) + "\n" + rest),
        expect="ok",
        check=idx_check(lambda ids: ids[0] == "\u03b1\u03b2-\U0001f600-\u05d0", "unicode id changed"),
    )
    corpus_case(
        "hugeline",
        "one 5 MB document text",
        lambda p: p.write_text(json.dumps({**first, "text": "word " * 1_000_000}) + "\n" + rest),
        expect="ok",
        check=idx_check(lambda ids: len(ids) == len(corpus_lines), "a document lost"),
    )
    corpus_case(
        "blankmid",
        "blank lines between documents",
        lambda p: p.write_text("\n\n".join(corpus_lines) + "\n"),
        expect="ok",
        check=idx_check(lambda ids: len(ids) == len(corpus_lines), "a document lost"),
    )
    corpus_case(
        "extrafield",
        "extra fields in documents",
        lambda p: p.write_text(
            "\n".join(json.dumps({**json.loads(x), "extra": [1, 2]}) for x in corpus_lines) + "\n"
        ),
        expect="ok",
    )
    corpus_case(
        "notitle",
        "documents without a title",
        lambda p: p.write_text(
            "\n".join(
                json.dumps({k: v for k, v in json.loads(x).items() if k != "title"}) for x in corpus_lines
            )
            + "\n"
        ),
        expect="ok",
    )
    corpus_case(
        "tabid",
        "an id with a tab (breaks TREC runs)",
        lambda p: p.write_text(json.dumps({**first, "_id": "a\tb"}) + "\n" + rest),
        names=("_id",),
    )
    corpus_case(
        "spaceid",
        "an id with a space (breaks TREC runs)",
        lambda p: p.write_text(json.dumps({**first, "_id": "a b"}) + "\n" + rest),
        names=("_id",),
    )
    corpus_case(
        "emptyid",
        "an empty id",
        lambda p: p.write_text(json.dumps({**first, "_id": ""}) + "\n" + rest),
        names=("_id",),
    )

    # ---------------- B. queries and qrels, through evaluate (and train)
    query_lines = (SF / "queries.jsonl").read_text().splitlines()
    q0 = json.loads(query_lines[0])
    qrest = "\n".join(query_lines[1:]) + "\n"

    def data_case(cid, verb, what, file, mutate, expect="refuse", names=(), check=None):
        if verb == "train" and cid.startswith(train_only):
            return

        def argv(d):
            data = slice_copy(d)
            mutate(data / file)
            extra = ["--max-steps", "1", "--batch-size", "4"] if verb == "train" else []
            return [
                verb,
                "--model",
                str(MODEL if verb != "train" else SPLADE),
                "--data",
                str(data),
                "--output",
                str(d / "out"),
                *extra,
            ]

        case(cid, verb, what, argv, expect, names or (Path(file).name,), check)

    train_only = (
        "B-queries-badjson",
        "B-queries-dir",
        "B-queries-notext",
        "B-queries-bom",
        "B-queries-crlf",
        "B-qrels-header",
        "B-qrels-twocols",
        "B-qrels-loop",
        "B-qrels-crlf",
        "B-qrels-bom",
        "B-qrels-noheader",
        "B-qrels-conflict",
    )
    for verb in ("evaluate", "train"):
        data_case(f"B-queries-empty-{verb}", verb, "empty queries file", "queries.jsonl", W(""))
        data_case(
            f"B-queries-badjson-{verb}",
            verb,
            "a query line that is not JSON",
            "queries.jsonl",
            lambda p: p.write_text("{oops\n" + qrest),
            names=("queries.jsonl", "1"),
        )
        data_case(
            f"B-queries-surrogate-{verb}",
            verb,
            "lone surrogate in a query",
            "queries.jsonl",
            lambda p: p.write_text(json.dumps({**q0, "text": "\udfff"}) + "\n" + qrest),
        )
        data_case(
            f"B-queries-dupid-{verb}",
            verb,
            "the same query id twice (different texts)",
            "queries.jsonl",
            lambda p: p.write_text(
                query_lines[0] + "\n" + json.dumps({**q0, "text": "other"}) + "\n" + qrest
            ),
            names=("_id",),
        )
        data_case(
            f"B-queries-dir-{verb}",
            verb,
            "queries.jsonl is a directory",
            "queries.jsonl",
            lambda p: (p.unlink(), p.mkdir()),
        )
        data_case(
            f"B-queries-notext-{verb}",
            verb,
            "a query without text",
            "queries.jsonl",
            lambda p: p.write_text(json.dumps({"_id": q0["_id"]}) + "\n" + qrest),
            names=("text",),
        )
        data_case(
            f"B-queries-bom-{verb}",
            verb,
            "queries with a BOM",
            "queries.jsonl",
            lambda p: p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes()),
            expect="ok",
        )
        data_case(
            f"B-queries-crlf-{verb}",
            verb,
            "queries with CRLF",
            "queries.jsonl",
            lambda p: p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n")),
            expect="ok",
        )
        split = "test" if verb == "evaluate" else "train"
        qf = f"qrels/{split}.tsv"
        header = "query-id\tcorpus-id\tscore\n"
        qrows = (SF / qf).read_text().splitlines()[1:]
        data_case(f"B-qrels-empty-{verb}", verb, "empty qrels file", qf, W(""), names=(f"{split}.tsv",))
        data_case(
            f"B-qrels-header-{verb}", verb, "qrels with only a header", qf, W(header), names=(f"{split}.tsv",)
        )
        data_case(
            f"B-qrels-zeros-{verb}",
            verb,
            "every judgement 0",
            qf,
            lambda p: p.write_text(header + "".join(r.rsplit("\t", 1)[0] + "\t0\n" for r in qrows)),
            names=(f"{split}.tsv",),
        )
        data_case(
            f"B-qrels-badscore-{verb}",
            verb,
            "a score that is not a number",
            qf,
            lambda p: p.write_text(
                header + qrows[0].rsplit("\t", 1)[0] + "\thigh\n" + "\n".join(qrows[1:]) + "\n"
            ),
            names=(f"{split}.tsv", "2"),
        )
        data_case(
            f"B-qrels-twocols-{verb}",
            verb,
            "a row with two columns",
            qf,
            lambda p: p.write_text(header + "1\t2\n" + "\n".join(qrows) + "\n"),
            names=(f"{split}.tsv", "2"),
        )
        data_case(
            f"B-qrels-allunknown-{verb}",
            verb,
            "qrels whose ids are all unknown",
            qf,
            W(header + "nosuchq\tnosuchd\t1\n"),
            names=(f"{split}.tsv",),
        )
        data_case(
            f"B-qrels-unknowndoc-{verb}",
            verb,
            "one judgement of an unknown document (skipped, counted)",
            qf,
            lambda p: p.write_text(
                header + "\n".join(qrows) + f"\n{qrows[0].split(chr(9))[0]}\tnosuchdoc\t1\n"
            ),
            expect="ok",
            check=lambda d, o, e: None if "nosuchdoc" in e or "unknown" in e.lower() else "no warning",
        )
        data_case(
            f"B-qrels-dir-{verb}",
            verb,
            "qrels file is a directory",
            qf,
            lambda p: (p.unlink(), p.mkdir()),
            names=(f"{split}.tsv",),
        )
        data_case(
            f"B-qrels-loop-{verb}",
            verb,
            "qrels file is a symlink loop",
            qf,
            lambda p: (p.unlink(), p.symlink_to(p.name)),
            names=(f"{split}.tsv",),
        )
        data_case(
            f"B-qrels-crlf-{verb}",
            verb,
            "qrels with CRLF",
            qf,
            lambda p: p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n")),
            expect="ok",
        )
        data_case(
            f"B-qrels-bom-{verb}",
            verb,
            "qrels with a BOM",
            qf,
            lambda p: p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes()),
            expect="ok",
        )
        data_case(
            f"B-qrels-noheader-{verb}",
            verb,
            "qrels without a header",
            qf,
            lambda p: p.write_text("\n".join(qrows) + "\n"),
            expect="ok",
        )
        data_case(
            f"B-qrels-conflict-{verb}",
            verb,
            "the same pair judged 1 and 0",
            qf,
            lambda p: p.write_text(header + "\n".join(qrows) + "\n" + qrows[0].rsplit("\t", 1)[0] + "\t0\n"),
            names=(f"{split}.tsv",),
        )
        data_case(
            f"B-qrels-missing-{verb}",
            verb,
            "the split's qrels file missing",
            qf,
            lambda p: p.unlink(),
            names=(f"{split}",),
        )

    def eval_unknown_split(d):
        return [
            "evaluate",
            "--model",
            str(MODEL),
            "--data",
            str(SF),
            "--output",
            str(d / "out"),
            "--split",
            "dev",
        ]

    case(
        "B-split-missing",
        "evaluate",
        "--split dev where there is no dev qrels",
        eval_unknown_split,
        names=("dev",),
    )

    def eval_neg(d):
        data = slice_copy(d)
        qf = data / "qrels" / "test.tsv"
        rows = qf.read_text().splitlines()
        qf.write_text("\n".join(rows) + "\n" + rows[1].split("\t")[0] + "\t" + first["_id"] + "\t-1\n")
        return ["evaluate", "--model", str(MODEL), "--data", str(data), "--output", str(d / "out")]

    case(
        "B-qrels-negative",
        "evaluate",
        "a negative score (counted as 0 with a warning)",
        eval_neg,
        "ok",
        check=lambda d, o, e: None if "negative" in e.lower() else "no warning about the negative score",
    )

    # ---------------- C. settings
    def flag_case(cid, verb, flags, names, what=None, expect="refuse", check=None):
        def argv(d):
            if verb == "train":
                base_args = [
                    "train",
                    "--model",
                    str(SPLADE),
                    "--data",
                    str(SF),
                    "--output",
                    str(d / "out"),
                    "--max-steps",
                    "1",
                    "--batch-size",
                    "4",
                ]
            elif verb == "evaluate":
                base_args = ["evaluate", "--model", str(MODEL), "--data", str(SF), "--output", str(d / "out")]
            elif verb == "index":
                base_args = ["index", "--model", str(MODEL), "--data", str(SF), "--output", str(d / "out")]
            elif verb == "search":
                base_args = ["search", "--model", str(MODEL), "--index", str(IDX), "--query", "vitamin d"]
            elif verb == "report":
                base_args = ["report", str(work / "base" / "exp")]
            return base_args + flags

        case(cid, verb, what or " ".join(flags), argv, expect, names, check)

    bad_train = [
        (["--epochs", "0"], ("epochs",)),
        (["--epochs", "-1"], ("epochs",)),
        (["--epochs", "nan"], ("epochs",)),
        (["--lr-backbone", "nan"], ("lr",)),
        (["--lr-backbone", "-1e-5"], ("lr",)),
        (["--lr-head", "inf"], ("lr",)),
        (["--batch-size", "0"], ("batch",)),
        (["--batch-size", "1"], ("batch",)),
        (["--batch-size", "100000"], ("batch",)),
        (["--num-experts", "-1"], ("experts",)),
        (["--num-experts", "100000"], ("experts",)),
        (["--seed", "-1"], ("seed",)),
        (["--seed", "99999999999"], ("seed",)),
        (["--max-doc-length", "0"], ("max",)),
        (["--max-doc-length", "100000"], ("max_doc_length",)),
        (["--max-query-length", "-3"], ("max",)),
        (["--warmup-ratio", "2"], ("warmup",)),
        (["--dev-fraction", "1.5"], ("dev",)),
        (["--expert-dropout", "1.5"], ("dropout",)),
        (["--temperature", "0"], ("temperature",)),
        (["--temperature", "-1"], ("temperature",)),
        (["--max-grad-norm", "-1"], ("grad",)),
        (["--hard-negatives", "-2"], ("negatives",)),
        (["--hard-negatives", "100000"], ("negatives",)),
        (["--negatives-source", str(SF / "nonexistent.jsonl")], ("nonexistent.jsonl",)),
        (["--experts-top-k", "0", "--expert-pooling", "topk"], ("top",)),
        (["--experts-top-k", "99", "--expert-pooling", "topk"], ("top",)),
        (["--max-steps", "0"], ("steps",)),
        (["--eval-steps", "0"], ("eval",)),
        (["--checkpoint-steps", "-5"], ("checkpoint",)),
        (["--precision", "int8"], ("int8",)),
        (["--train-split", "nosuch"], ("nosuch",)),
        (["--train-file", str(SF / "nosuch.jsonl")], ("nosuch.jsonl",)),
        (["--train-file", str(SF)], ("",)),
        (["--load-balancing-coef", "-1"], ("load",)),
        (["--collapse-threshold", "2"], ("collapse",)),
        (["--dev-max-docs", "0"], ("dev",)),
        (["--dev-max-docs", "-1"], ("dev_max_docs",)),
        (["--document-index", str(SF / "nosuch")], ("document_index",)),
        (["--weight-decay", "-1"], ("decay",)),
        (["--negatives-depth", "0"], ("depth",)),
        (["--lr-backbone", "1e9", "--lr-head", "1e9", "--max-steps", "3"], ("lr",)),
    ]
    for i, (flags, names) in enumerate(bad_train):
        flag_case(f"C-train-{i:02d}", "train", flags, names)
    bad_eval = [
        (["--top-k", "0"], ("top",)),
        (["--top-k", "-5"], ("top",)),
        (["--top-k", "1000000000"], ("top",)),
        (["--metrics", "ndcg@ten"], ("ndcg@ten",)),
        (["--metrics", "bogus"], ("bogus",)),
        (["--encode-batch-size", "0"], ("batch",)),
        (["--encode-batch-size", "99999999"], ("batch",)),
        (["--device", "cuda:7"], ("cuda",)),
        (["--device", "banana"], ("banana",)),
        (["--max-doc-length", "100000"], ("max_doc_length",)),
        (["--index", str(SF)], ("",)),
        (["--cache-dir", str(SF / "corpus.jsonl")], ("corpus.jsonl",)),
        (["--backend", "onnx", "--precision", "bf16"], ("",)),
    ]
    for i, (flags, names) in enumerate(bad_eval):
        flag_case(f"C-eval-{i:02d}", "evaluate", flags, names)
    bad_index = [
        (["--shard", "3/2"], ("shard",)),
        (["--shard", "0/0"], ("shard",)),
        (["--shard", "a/b"], ("shard",)),
        (["--shard", "-1/2"], ("shard",)),
        (["--nlist", "0", "--index-type", "ivf"], ("nlist",)),
        (["--nlist", "100000", "--index-type", "ivf"], ("nlist",)),
        (["--nprobe", "0", "--index-type", "ivf"], ("nprobe",)),
        (["--encode-batch-size", "-1"], ("batch",)),
        (["--device", "mps"], ("mps",)),
        (["--store", "milvus:"], ("milvus",)),
        (["--store", "mysql://x"], ("mysql",)),
    ]
    for i, (flags, names) in enumerate(bad_index):

        def fix(flags=flags):
            return flags

        if "--store" in flags:
            case(
                f"C-index-{i:02d}",
                "index",
                " ".join(flags),
                lambda d, flags=flags: ["index", "--model", str(MODEL), "--data", str(SF), *flags],
                "refuse",
                names,
            )
        else:
            flag_case(f"C-index-{i:02d}", "index", flags, names)
    bad_search = [
        (["--top-k", "0"], ("top",)),
        (["--top-k", "-1"], ("top",)),
        (["--top-k", "99999999999"], ("top",)),
        (["--query", ""], ("query",)),
        (["--query", "   "], ("query",)),
    ]
    for i, (flags, names) in enumerate(bad_search):
        flag_case(f"C-search-{i:02d}", "search", flags, names)
    flag_case(
        "C-search-topk-over",
        "search",
        ["--top-k", "5000"],
        (),
        "top-k larger than the corpus (tolerated)",
        expect="ok",
        check=lambda d, o, e: None if o.count("\n") <= 172 else "more hits than documents",
    )
    flag_case(
        "C-search-hugequery",
        "search",
        ["--query", "vitamin " * 50000],
        (),
        "a 400 KB query (cut at the limit)",
        expect="ok",
    )
    flag_case(
        "C-search-unicode",
        "search",
        ["--query", "\u0641\u064a\u062a\u0627\u0645\u064a\u0646 \U0001f9ec \u7ef4\u751f\u7d20"],
        (),
        "an Arabic/emoji/CJK query",
        expect="ok",
    )

    # ---------------- D. outputs and what sbmoe must never overwrite
    def out_case(cid, verb, what, make_out, expect="refuse", names=(), plant=True, extra=(), check=None):
        def argv(d):
            out = make_out(d)
            if verb == "train":
                a = [
                    "train",
                    "--model",
                    str(SPLADE),
                    "--data",
                    str(SF),
                    "--output",
                    str(out),
                    "--max-steps",
                    "1",
                    "--batch-size",
                    "4",
                    *extra,
                ]
            elif verb == "search":
                a = [
                    "search",
                    "--model",
                    str(MODEL),
                    "--index",
                    str(IDX),
                    "--query",
                    "x",
                    "--output",
                    str(out),
                    *extra,
                ]
            elif verb == "report":
                a = ["report", str(work / "base" / "exp"), "--output", str(out), "--no-plots", *extra]
            else:
                a = [verb, "--model", str(MODEL), "--data", str(SF), "--output", str(out), *extra]
            return a

        case(cid, verb, what, argv, expect, names, check, plant=plant)

    def mk_user_dir(d):
        plant_user_files(d / "out")
        return d / "out"

    def mk_file(d):
        (d / "out").write_text("my file\n")
        return d / "out"

    def under_file(d):
        (d / "notes.txt").write_text("mine\n")
        return d / "notes.txt" / "run"

    def copy_of(src):
        def make(d):
            shutil.copytree(src, d / "out", ignore=shutil.ignore_patterns("training"))
            plant_user_files(d / "out")
            return d / "out"

        return make

    def file_unchanged(d, name="out", text="my file\n"):
        return (d / name).read_text() == text

    for verb in ("train", "evaluate", "index"):
        out_case(
            f"D-{verb}-userdir", verb, "--output: a folder of the user's files", mk_user_dir, names=("out",)
        )
        out_case(f"D-{verb}-file", verb, "--output: a regular file", mk_file, names=("out",))
        out_case(f"D-{verb}-root", verb, "--output /", lambda d: Path("/"), names=("/",))
        out_case(
            f"D-{verb}-underfile", verb, "--output under a regular file", under_file, names=("notes.txt",)
        )
        out_case(f"D-{verb}-model", verb, "--output: a saved model folder", copy_of(LITE), names=("out",))
        out_case(
            f"D-{verb}-plaintf",
            verb,
            "--output: a transformers model folder",
            copy_of(SPLADE),
            names=("out",),
        )
        if verb != "index":
            continue
        out_case(
            f"D-{verb}-longname",
            verb,
            "--output with a 300-character name",
            lambda d: d / ("x" * 300),
            names=("x" * 20,),
        )
        out_case(
            f"D-{verb}-newline",
            verb,
            "--output with a newline in its name (tolerated)",
            lambda d: d / "a\nb",
            expect="ok",
            plant=False,
        )
        out_case(
            f"D-{verb}-devnull", verb, "--output /dev/null", lambda d: Path("/dev/null"), names=("/dev/null",)
        )
        out_case(
            f"D-{verb}-proc",
            verb,
            "--output under /proc",
            lambda d: Path("/proc/sbmoe-out"),
            names=("/proc",),
        )
    out_case(
        "D-index-rebuild-same",
        "index",
        "rebuild an index with the same settings beside the user's files",
        copy_of(IDX),
        expect="ok",
        check=lambda d, o, e: has_index(d),
    )
    out_case(
        "D-index-rebuild-other",
        "index",
        "other settings without --overwrite",
        copy_of(IDX),
        extra=("--index-type", "hnsw"),
        names=("index_type",),
    )
    out_case(
        "D-index-rebuild-overwrite",
        "index",
        "other settings with --overwrite keeps the user's files",
        copy_of(IDX),
        expect="ok",
        extra=("--index-type", "hnsw", "--overwrite"),
        check=lambda d, o, e: has_index(d),
    )
    out_case(
        "D-eval-rewrite-same",
        "evaluate",
        "evaluate again over an evaluation with the user's files",
        copy_of(EV),
        expect="ok",
    )
    out_case(
        "D-eval-other",
        "evaluate",
        "evaluate with other metrics over an evaluation",
        copy_of(EV),
        extra=("--top-k", "50"),
        names=("top",),
    )
    out_case(
        "D-eval-over-index", "evaluate", "evaluation into an index folder", copy_of(IDX), names=("index",)
    )
    out_case(
        "D-index-over-eval", "index", "index into an evaluation folder", copy_of(EV), names=("evaluation",)
    )
    out_case(
        "D-train-over-eval", "train", "train into an evaluation folder", copy_of(EV), names=("evaluation",)
    )
    out_case("D-train-over-index", "train", "train into an index folder", copy_of(IDX), names=("index",))
    out_case("D-search-dir", "search", "search --output: a directory", mk_user_dir, names=("out",))
    out_case(
        "D-search-note",
        "search",
        "search --output: the user's note",
        mk_file,
        names=("out",),
        plant=False,
    )
    out_case(
        "D-search-empty",
        "search",
        "search --output: an empty file (written)",
        lambda d: (d / "out").touch() or d / "out",
        expect="ok",
        plant=False,
        check=lambda d, o, e: None if (d / "out").read_text().count("Q0") else "empty run",
    )
    out_case(
        "D-search-underfile",
        "search",
        "search --output under a file",
        under_file,
        names=("notes.txt",),
        plant=False,
    )

    def symlink_out(d):
        real = d / "real"
        plant_user_files(real)
        (d / "out").symlink_to(real)
        return d / "out"

    out_case(
        "D-index-symlink-userdir",
        "index",
        "--output: a symlink to the user's folder",
        symlink_out,
        names=("out",),
    )

    # ---------------- E. model folders that bring code (payload must never run)
    def model_case(cid, what, make, names, verbs=("index", "evaluate", "train", "search")):
        for verb in verbs:

            def argv(d, make=make, verb=verb, cid=cid):
                m = make(d, marker_of(f"{cid}-{verb}"))
                if verb == "search":
                    return ["search", "--model", str(m), "--index", str(IDX), "--query", "x"]
                a = [verb, "--model", str(m), "--data", str(SF), "--output", str(d / "out")]
                return a + (["--max-steps", "1", "--batch-size", "4"] if verb == "train" else [])

            case(f"{cid}-{verb}", verb, what, argv, "refuse", names)

    def evil_stage(d, marker):
        m = lite(d)
        (m / "sbmoe.py").write_text(payload(marker) + "class Evil:\n    pass\n")
        mods = json.loads((m / "modules.json").read_text())
        mods.append({"idx": 4, "name": "4", "path": "4_Evil", "type": "sbmoe.Evil"})
        (m / "modules.json").write_text(json.dumps(mods))
        (m / "4_Evil").mkdir()
        return m

    model_case(
        "E-stage-sbmoe-evil", "modules.json stage sbmoe.Evil with sbmoe.py", evil_stage, ("modules.json",)
    )

    def foreign_stage(typ):
        def make(d, marker):
            m = lite(d)
            (m / "evilmod.py").write_text(payload(marker) + "class X:\n    pass\n")
            mods = json.loads((m / "modules.json").read_text())
            mods[1]["type"] = typ
            (m / "modules.json").write_text(json.dumps(mods))
            return m

        return make

    model_case(
        "E-stage-foreign",
        "modules.json stage evilmod.X",
        foreign_stage("evilmod.X"),
        ("modules.json",),
        verbs=("index", "train"),
    )
    model_case(
        "E-stage-os",
        "modules.json stage os.system",
        foreign_stage("os.system"),
        ("modules.json",),
        verbs=("index", "evaluate"),
    )
    model_case(
        "E-stage-lookalike",
        "stage sbmoe.model.moe_head.MoEHeadX",
        foreign_stage("sbmoe.model.moe_head.MoEHeadX"),
        ("modules.json",),
        verbs=("index", "evaluate"),
    )

    def auto_map_in(config_file, link=False):
        def make(d, marker):
            m = lite(d)
            target = m
            if link:
                real = d / "elsewhere"
                shutil.copytree(SPLADE, real)
                for f in (
                    "model.safetensors",
                    "config.json",
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "sentence_bert_config.json",
                ):
                    if (m / f).exists():
                        shutil.copy(m / f, real / f)
                target = real
            (target / "configuration_evil.py").write_text(payload(marker))
            (target / "modeling_evil.py").write_text(payload(marker))
            upd(
                target / config_file,
                auto_map={
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModel": "modeling_evil.EvilModel",
                    "AutoTokenizer": ["tokenization_evil.T", None],
                },
            )
            if link:
                (m / "inner").symlink_to(real, target_is_directory=True)
                mods = json.loads((m / "modules.json").read_text())
                mods[0]["path"] = "inner"
                (m / "modules.json").write_text(json.dumps(mods))
            return m

        return make

    model_case(
        "E-automap-config", "auto_map in config.json", auto_map_in("config.json"), ("config.json", "auto_map")
    )
    model_case(
        "E-automap-tokcfg",
        "auto_map in tokenizer_config.json",
        auto_map_in("tokenizer_config.json"),
        ("tokenizer_config.json",),
        verbs=("index", "evaluate"),
    )
    model_case(
        "E-automap-symlinked-stage",
        "Transformer stage folder a symlink to a folder with auto_map",
        auto_map_in("config.json", link=True),
        ("auto_map",),
    )

    def plain_tf_automap(d, marker):
        m = d / "tf"
        shutil.copytree(SPLADE, m)
        (m / "modeling_evil.py").write_text(payload(marker))
        upd(m / "config.json", auto_map={"AutoModel": "modeling_evil.EvilModel"})
        return m

    model_case(
        "E-automap-plaintf",
        "plain transformers folder with auto_map",
        plain_tf_automap,
        ("auto_map",),
        verbs=("index", "train"),
    )

    def pickle_only(stage=False):
        def make(d, marker):
            if stage:
                m = lite(d)
                (m / "2_MoEHead" / "model.safetensors").unlink()
                evil_pickle(m / "2_MoEHead" / "pytorch_model.bin", marker)
                return m
            m = d / "tf"
            shutil.copytree(SPLADE, m)
            (m / "model.safetensors").unlink()
            evil_pickle(m / "pytorch_model.bin", marker)
            return m

        return make

    model_case(
        "E-pickle-root",
        "a plain folder with only a pickled pytorch_model.bin",
        pickle_only(),
        ("pytorch_model.bin",),
        verbs=("index", "train", "evaluate"),
    )
    model_case(
        "E-pickle-stage",
        "the head stage with only a pickle",
        pickle_only(True),
        ("pytorch_model.bin",),
        verbs=("index", "evaluate"),
    )

    def sharded_pickle(d, marker):
        m = d / "tf"
        shutil.copytree(SPLADE, m)
        (m / "model.safetensors").unlink()
        evil_pickle(m / "pytorch_model-00001-of-00002.bin", marker)
        (m / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"x": "pytorch_model-00001-of-00002.bin"}})
        )
        return m

    model_case(
        "E-pickle-sharded",
        "sharded pickled weights only",
        sharded_pickle,
        ("pytorch_model",),
        verbs=("index",),
    )

    def dense_activation(d, marker):
        m = lite(d)
        (m / "2_Dense").mkdir()
        (m / "2_Dense" / "config.json").write_text(
            json.dumps(
                {"in_features": 128, "out_features": 128, "bias": True, "activation_function": "os.system"}
            )
        )
        mods = json.loads((m / "modules.json").read_text())
        mods.insert(
            2, {"idx": 9, "name": "9", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        )
        (m / "modules.json").write_text(json.dumps(mods))
        return m

    model_case(
        "E-dense-activation",
        "a Dense stage whose activation_function is os.system",
        dense_activation,
        ("activation_function",),
        verbs=("index", "evaluate"),
    )

    def path_traversal(d, marker):
        m = lite(d)
        mods = json.loads((m / "modules.json").read_text())
        mods[1]["path"] = "../../../../etc"
        (m / "modules.json").write_text(json.dumps(mods))
        return m

    model_case(
        "E-path-traversal",
        "a stage path ../../../../etc",
        path_traversal,
        ("../../../../etc",),
        verbs=("index", "evaluate"),
    )

    def link_loop(d, marker):
        m = lite(d)
        (m / "loop").symlink_to(m, target_is_directory=True)
        return m

    case(
        "E-link-loop-index",
        "index",
        "a model folder with a link back to itself (tolerated, no hang)",
        lambda d: [
            "index",
            "--model",
            str(link_loop(d, None)),
            "--data",
            str(SF),
            "--output",
            str(d / "out"),
        ],
        "ok",
        check=lambda d, o, e: has_index(d),
    )

    def model_link_root(d, marker):
        m = lite(d)
        (m / "rootlink").symlink_to("/", target_is_directory=True)
        return m

    case(
        "E-link-root-index",
        "index",
        "a model folder holding a link to / (bounded check, no hang)",
        lambda d: [
            "index",
            "--model",
            str(model_link_root(d, None)),
            "--data",
            str(SF),
            "--output",
            str(d / "out"),
        ],
        "refuse",
        ("/m",),
        timeout=120,
    )

    def py_in_model(name):
        def make(d, marker):
            m = lite(d)
            (m / name).write_text(payload(marker))
            return m

        return make

    for name in ("sbmoe.py", "transformers.py", "torch.py", "__init__.py"):
        case(
            f"E-pyfile-{name}",
            "index",
            f"a stray {name} in the model folder (must not run)",
            lambda d, name=name: [
                "index",
                "--model",
                str(py_in_model(name)(d, marker_of(f"E-pyfile-{name}"))),
                "--data",
                str(SF),
                "--output",
                str(d / "out"),
            ],
            "ok",
        )

    def cwd_payload(d):
        (d / "sitecustomize.py").write_text(payload(marker_of("E-cwd-sitecustomize")))
        return ["index", "--model", str(MODEL), "--data", str(SF), "--output", str(d / "out")]

    case("E-cwd-sitecustomize", "index", "a sitecustomize.py in the working folder", cwd_payload, "ok")

    def broken_model(kind):
        def make(d):
            m = lite(d)
            if kind == "sbmoe-json-bad":
                (m / "sbmoe.json").write_text("{bad")
            elif kind == "sbmoe-json-types":
                upd(m / "sbmoe.json", model_config={"num_experts": "six"})
            elif kind == "sbmoe-json-list":
                (m / "sbmoe.json").write_text("[]")
            elif kind == "safetensors-truncated":
                p = m / "model.safetensors"
                p.write_bytes(p.read_bytes()[:1000])
            elif kind == "safetensors-empty":
                (m / "model.safetensors").write_bytes(b"")
            elif kind == "safetensors-hugeheader":
                (m / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
            elif kind == "safetensors-missing":
                (m / "model.safetensors").unlink()
            elif kind == "head-missing":
                shutil.rmtree(m / "2_MoEHead")
            elif kind == "head-experts":
                upd(m / "2_MoEHead" / "config.json", num_experts=3)
            elif kind == "hidden-size":
                upd(m / "config.json", hidden_size=256)
            elif kind == "tokenizer-garbage":
                (m / "tokenizer.json").write_text("garbage")
            elif kind == "modules-bad":
                (m / "modules.json").write_text("{")
            elif kind == "modules-empty":
                (m / "modules.json").write_text("[]")
            elif kind == "config-missing":
                (m / "config.json").unlink()
            elif kind == "vocab-size":
                upd(m / "config.json", vocab_size=10)
            return m

        return make

    for kind, names in [
        ("sbmoe-json-bad", ("sbmoe.json",)),
        ("sbmoe-json-types", ("sbmoe.json",)),
        ("sbmoe-json-list", ("sbmoe.json",)),
        ("safetensors-truncated", ("/m",)),
        ("safetensors-empty", ("/m",)),
        ("safetensors-hugeheader", ("/m",)),
        ("safetensors-missing", ("",)),
        ("head-missing", ("2_MoEHead",)),
        ("head-experts", ("config.json",)),
        ("hidden-size", ("config.json",)),
        ("tokenizer-garbage", ("/m",)),
        ("modules-bad", ("modules.json",)),
        ("modules-empty", ("/m",)),
        ("config-missing", ("config.json",)),
        ("vocab-size", ("config.json",)),
    ]:
        for verb in (
            ("index", "evaluate") if kind in ("sbmoe-json-bad", "head-experts", "hidden-size") else ("index",)
        ):
            case(
                f"E-broken-{kind}-{verb}",
                verb,
                f"model folder: {kind}",
                lambda d, kind=kind, verb=verb: [
                    verb,
                    "--model",
                    str(broken_model(kind)(d)),
                    "--data",
                    str(SF),
                    "--output",
                    str(d / "out"),
                ],
                "refuse",
                names,
            )
    for verb, what, arg, names in [
        ("index", "--model: a missing folder", "./nosuch-model", ("nosuch-model",)),
        ("index", "--model: a file", str(SF / "corpus.jsonl"), ("corpus.jsonl",)),
        ("index", "--model: an empty folder", "EMPTY", ("EMPTY",)),
        ("index", "--model: a hub name offline", "nosuchorg/nosuchmodel", ("nosuchorg/nosuchmodel",)),
        ("index", "--model: a hub-like name with ..", "../x", ("../x",)),
        ("evaluate", "--model: a data folder", str(SF), ("sf",)),
        ("evaluate", "--model: an index folder", str(IDX), ("idx",)),
        ("train", "--model: an evaluation folder", str(EV), ("ev",)),
        ("search", "--model: another model than the index's", str(SPLADE), ("index",)),
    ]:

        def argv(d, verb=verb, arg=arg):
            if arg == "EMPTY":
                (d / "EMPTY").mkdir()
            if verb == "search":
                return ["search", "--model", arg, "--index", str(IDX), "--query", "x"]
            a = [verb, "--model", arg, "--data", str(SF), "--output", str(d / "out")]
            return a + (["--max-steps", "1"] if verb == "train" else [])

        case(
            f"E-model-{verb}-{what[9:20].replace(' ', '_')}",
            verb,
            what,
            argv,
            "refuse",
            names,
            env={"HF_HUB_OFFLINE": "1"},
        )

    def checkpoint_pickle(d):
        out = d / "out"
        shutil.copytree(MODEL, out)
        for p in (out / "training" / "checkpoint").glob("*"):
            if p.is_file():
                p.unlink()
        (out / "training" / "done.json").unlink()
        evil_pickle(out / "training" / "checkpoint" / "optimizer.pt", marker_of("E-ckpt-pickle"))
        return [
            "train",
            "--model",
            str(SPLADE),
            "--data",
            str(SF),
            "--output",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--max-doc-length",
            "64",
        ]

    case(
        "E-ckpt-pickle",
        "train",
        "resume from a checkpoint whose optimizer.pt is a pickle",
        checkpoint_pickle,
        "refuse",
        ("optimizer.pt",),
    )

    def hub_pickle(d):
        # a hub repository in the Hugging Face cache whose only weights are a pickle
        hub = d / "hf" / "hub" / "models--evil--repo"
        snap = hub / "snapshots" / ("a" * 40)
        snap.mkdir(parents=True)
        (hub / "refs").mkdir()
        (hub / "refs" / "main").write_text("a" * 40)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(SPLADE / f, snap / f)
        evil_pickle(snap / "pytorch_model.bin", marker_of("E-hub-pickle"))
        return ["index", "--model", "evil/repo", "--data", str(SF), "--output", str(d / "out")]

    case(
        "E-hub-pickle",
        "index",
        "a hub download holding only pytorch_model.bin",
        hub_pickle,
        "refuse",
        ("pytorch_model.bin",),
        env={"HF_HOME": "HFHOME", "HF_HUB_OFFLINE": "1"},
    )

    def hub_automap(d):
        hub = d / "hf" / "hub" / "models--evil--automap"
        snap = hub / "snapshots" / ("b" * 40)
        snap.mkdir(parents=True)
        (hub / "refs").mkdir()
        (hub / "refs" / "main").write_text("b" * 40)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            shutil.copy(SPLADE / f, snap / f)
        (snap / "modeling_evil.py").write_text(payload(marker_of("E-hub-automap")))
        upd(snap / "config.json", auto_map={"AutoModel": "modeling_evil.EvilModel"})
        return ["index", "--model", "evil/automap", "--data", str(SF), "--output", str(d / "out")]

    case(
        "E-hub-automap",
        "index",
        "a hub download whose config has auto_map",
        hub_automap,
        "refuse",
        ("auto_map",),
        env={"HF_HOME": "HFHOME", "HF_HUB_OFFLINE": "1"},
    )

    def hub_modules(d):
        hub = d / "hf" / "hub" / "models--evil--st"
        snap = hub / "snapshots" / ("c" * 40)
        snap.mkdir(parents=True)
        (hub / "refs").mkdir()
        (hub / "refs" / "main").write_text("c" * 40)
        for p in LITE.iterdir():
            if p.name != "sbmoe.json":
                (shutil.copytree if p.is_dir() else shutil.copy)(p, snap / p.name)
        (snap / "evilmod.py").write_text(payload(marker_of("E-hub-modules")) + "class X:\n    pass\n")
        mods = json.loads((snap / "modules.json").read_text())
        mods[1]["type"] = "evilmod.X"
        (snap / "modules.json").write_text(json.dumps(mods))
        return ["index", "--model", "evil/st", "--data", str(SF), "--output", str(d / "out")]

    case(
        "E-hub-modules",
        "index",
        "a hub sentence-transformers download with a foreign stage",
        hub_modules,
        "refuse",
        ("modules.json",),
        env={"HF_HOME": "HFHOME", "HF_HUB_OFFLINE": "1"},
    )

    # ---------------- F. index folders for search
    def index_case(cid, what, mutate, names=("",), expect="refuse", verify=False, check=None):
        def argv(d):
            shutil.copytree(IDX, d / "ix")
            mutate(d / "ix")
            return [
                "search",
                "--model",
                str(MODEL),
                "--index",
                str(d / "ix"),
                "--query",
                "vitamin",
                *(["--verify"] if verify else []),
            ]

        case(cid, "search", what, argv, expect, names, check)

    index_case("F-meta-missing", "meta.json missing", lambda ix: (ix / "meta.json").unlink(), ("meta.json",))
    index_case(
        "F-meta-bad", "meta.json not JSON", lambda ix: (ix / "meta.json").write_text("{"), ("meta.json",)
    )
    index_case(
        "F-meta-types",
        "meta.json dimension a string",
        lambda ix: (
            upd(ix / "meta.json", dimension="128")
            if "dimension" in json.loads((ix / "meta.json").read_text())
            else upd(ix / "meta.json", dim="x")
        ),
        ("meta.json",),
    )
    index_case(
        "F-docids-short",
        "doc_ids.json one id short",
        lambda ix: (ix / "doc_ids.json").write_text(
            json.dumps(json.loads((ix / "doc_ids.json").read_text())[:-1])
        ),
        ("doc_ids.json",),
    )
    index_case(
        "F-docids-types",
        "doc_ids.json holds numbers",
        lambda ix: (ix / "doc_ids.json").write_text(
            json.dumps(list(range(len(json.loads((ix / "doc_ids.json").read_text())))))
        ),
        ("doc_ids.json",),
    )
    index_case(
        "F-docids-dupe",
        "doc_ids.json with a repeated id",
        lambda ix: (ix / "doc_ids.json").write_text(
            json.dumps(
                [json.loads((ix / "doc_ids.json").read_text())[0]]
                * len(json.loads((ix / "doc_ids.json").read_text()))
            )
        ),
        ("doc_ids.json",),
    )
    index_case(
        "F-faiss-truncated",
        "index.faiss truncated",
        lambda ix: (ix / "index.faiss").write_bytes((ix / "index.faiss").read_bytes()[:500]),
        ("index.faiss",),
    )
    index_case(
        "F-faiss-empty",
        "index.faiss zero bytes",
        lambda ix: (ix / "index.faiss").write_bytes(b""),
        ("index.faiss",),
    )
    index_case(
        "F-faiss-missing", "index.faiss missing", lambda ix: (ix / "index.faiss").unlink(), ("index.faiss",)
    )

    def flip(ix):
        data = bytearray((ix / "index.faiss").read_bytes())
        data[len(data) // 2 + 7] ^= 0xFF
        (ix / "index.faiss").write_bytes(bytes(data))

    index_case("F-faiss-flip-verify", "one flipped byte, --verify", flip, ("index.faiss",), verify=True)
    index_case(
        "F-faiss-dir",
        "index.faiss a directory",
        lambda ix: ((ix / "index.faiss").unlink(), (ix / "index.faiss").mkdir()),
        ("index.faiss",),
    )
    index_case(
        "F-index-empty", "an empty index folder", lambda ix: [p.unlink() for p in ix.iterdir()], ("ix",)
    )
    case(
        "F-index-file",
        "search",
        "--index: a file",
        lambda d: ["search", "--model", str(MODEL), "--index", str(SF / "corpus.jsonl"), "--query", "x"],
        "refuse",
        ("corpus.jsonl",),
    )
    case(
        "F-index-missing",
        "search",
        "--index: a missing folder",
        lambda d: ["search", "--model", str(MODEL), "--index", "nosuch", "--query", "x"],
        "refuse",
        ("nosuch",),
    )
    case(
        "F-index-model",
        "search",
        "--index: a model folder",
        lambda d: ["search", "--model", str(MODEL), "--index", str(LITE), "--query", "x"],
        "refuse",
        ("model-lite",),
    )

    def search_queries(mutate, name="q.jsonl"):
        def argv(d):
            p = d / name
            mutate(p)
            return [
                "search",
                "--model",
                str(MODEL),
                "--index",
                str(IDX),
                "--queries",
                str(p),
                "--output",
                str(d / "run.trec"),
            ]

        return argv

    for key, what, mutate, expect, names in [
        ("empty", "an empty queries file", W(""), "refuse", ("q.jsonl",)),
        ("badjson", "a queries line that is not JSON", W("{x\n"), "refuse", ("q.jsonl", "1")),
        (
            "surrogate",
            "a lone surrogate",
            W(json.dumps({"_id": "1", "text": "\ud800"}) + "\n"),
            "refuse",
            ("q.jsonl",),
        ),
        ("tsv", "a TSV file given as queries.jsonl", W("1\tvitamin d\n"), "refuse", ("q.jsonl",)),
        (
            "bom",
            "a BOM",
            lambda p: p.write_bytes(b"\xef\xbb\xbf" + (SF / "queries.jsonl").read_bytes()),
            "ok",
            (),
        ),
        (
            "unicodeid",
            "unicode query ids",
            W(json.dumps({"_id": "\u00e9\u00e8-\u4e2d", "text": "vitamin"}) + "\n"),
            "ok",
            (),
        ),
        (
            "spaceid",
            "a query id with a space (breaks TREC)",
            W(json.dumps({"_id": "a b", "text": "vitamin"}) + "\n"),
            "refuse",
            ("a b",),
        ),
        (
            "emptytext",
            "an empty query text (counted in a warning, as documented)",
            W(json.dumps({"_id": "1", "text": ""}) + "\n"),
            "ok",
            (),
        ),
        ("dir", "the queries path is a directory", lambda p: p.mkdir(), "refuse", ("q.jsonl",)),
    ]:
        case(f"F-queries-{key}", "search", what, search_queries(mutate), expect, names)

    # ---------------- G. grid files (experiment)
    def grid_case(
        cid, what, text, names=("grid.yaml",), expect="refuse", extra=("--list",), binary=False, check=None
    ):
        def argv(d):
            g = d / "grid.yaml"
            (g.write_bytes if binary else g.write_text)(text)
            return ["experiment", str(g), "--output", str(d / "out"), *extra]

        case(cid, "experiment", what, argv, expect, names, check, timeout=90)

    good = {
        "name": "g",
        "backbones": [str(SPLADE)],
        "collections": [str(SF)],
        "variants": {"zs": {"num_experts": 0, "train": False}},
        "seeds": [1],
    }
    gy = lambda **kw: json.dumps({**good, **kw})  # noqa: E731  (JSON is YAML)
    grid_case("G-variant-int", "a variant that is an int", gy(variants={"a": 5}), ("a",))
    grid_case("G-model-int", "model: 5", gy(model=5), ("model",))
    grid_case("G-backbones-int", "backbones: [123]", gy(backbones=[123]), ("backbones",))
    grid_case("G-nested", "nested lists in seeds", gy(seeds=[[1, 2]]), ("seeds",))
    grid_case("G-train-str", "train: 'epochs=2'", gy(train="epochs=2"), ("train",))
    grid_case("G-seeds-str", "seeds: 'one'", gy(seeds="one"), ("seeds",))
    grid_case("G-seed-neg", "seeds: [-1]", gy(seeds=[-1]), ("seed",))
    grid_case("G-experts-neg", "experts: [-3]", gy(experts=[-3]), ("experts",))
    grid_case("G-experts-float", "experts: [2.5]", gy(experts=[2.5]), ("experts",))
    grid_case("G-unknown-key", "an unknown top-level key", gy(colections=["x"]), ("colections",))
    grid_case(
        "G-unknown-setting",
        "an unknown setting in a variant",
        gy(variants={"a": {"num_expert": 3}}),
        ("num_expert",),
    )
    grid_case(
        "G-bad-setting-value",
        "num_experts: many",
        gy(variants={"a": {"num_experts": "many"}}),
        ("num_experts",),
    )
    grid_case("G-train-bad-value", "train: {epochs: 0}", gy(train={"epochs": 0}), ("epochs",))
    grid_case(
        "G-collection-missing",
        "an unknown collection (checked before work)",
        gy(collections=["nosuchcollection"]),
        ("nosuchcollection",),
        extra=(),
    )
    grid_case(
        "G-backbone-missing",
        "a missing backbone folder",
        gy(backbones=["/nonexistent/model"]),
        ("/nonexistent/model",),
        extra=(),
    )
    grid_case("G-empty-file", "an empty file", "")
    grid_case("G-empty-variants", "variants: {}", gy(variants={}), ("variants",))
    grid_case("G-empty-seeds", "seeds: []", gy(seeds=[]), ("seeds",))
    grid_case("G-list-top", "the file is a YAML list", "- a\n- b\n")
    grid_case("G-scalar-top", "the file is one scalar", "hello\n")
    grid_case("G-binary", "binary garbage", os.urandom(2000), binary=True)
    grid_case("G-not-yaml", "a tab-indented, broken YAML", "name: g\n\tvariants: [\n")
    grid_case(
        "G-dupkey", "a key given twice", "name: g\nseeds: [1]\nseeds: [2]\n" + "backbones: [x]\n", ("seeds",)
    )
    bomb = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
        f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
        for i in range(9)
    )
    grid_case("G-bomb-list", "billion laughs (--list)", bomb)
    grid_case("G-bomb-run", "billion laughs (run)", bomb, extra=())
    grid_case(
        "G-python-tag",
        "!!python/object/apply:os.system",
        "name: !!python/object/apply:os.system ['touch " + str(marker_of("G-python-tag")) + "']\n",
    )
    grid_case("G-huge", "a 2 MB grid file", "# " + "x" * 2_000_000 + "\n" + gy(), ("grid.yaml",))
    grid_case(
        "G-collide",
        "variants 'zs a' and 'zs_a'",
        gy(
            variants={
                "zs a": {"num_experts": 0, "train": False},
                "zs_a": {"num_experts": 0, "train": False, "max_doc_length": 32},
            }
        ),
        ("zs a", "zs_a"),
    )
    grid_case(
        "G-collide-case",
        "variants 'ZS' and 'zs'",
        gy(
            variants={
                "ZS": {"num_experts": 0, "train": False},
                "zs": {"num_experts": 0, "train": False, "max_doc_length": 32},
            }
        ),
        ("ZS", "zs"),
    )
    grid_case("G-seed-repeat", "seeds: [1, 1]", gy(seeds=[1, 1]), ("seed",))
    grid_case("G-bom", "a grid with a BOM (tolerated)", "\ufeff" + gy(), expect="ok")
    grid_case(
        "G-crlf",
        "a grid with CRLF (tolerated)",
        "name: g\r\nseeds: [1]\r\nbackbones: ["
        + str(SPLADE)
        + "]\r\ncollections: ["
        + str(SF)
        + "]\r\nvariants:\r\n  zs: {num_experts: 0, train: false}\r\n",
        expect="ok",
    )
    grid_case("G-worker-over", "--worker 2/2", gy(), ("worker",), extra=("--worker", "2/2", "--list"))
    grid_case("G-worker-zero", "--worker 0/0", gy(), ("worker",), extra=("--worker", "0/0", "--list"))
    grid_case("G-name-slash", "name: ../../escape", gy(name="../../escape"), ("name",))
    grid_case(
        "G-variant-slash",
        "a variant named ../x",
        gy(variants={"../x": {"num_experts": 0, "train": False}}),
        ("../x",),
    )
    grid_case("G-self-alias", "an alias referring to itself", "a: &a [*a]\n")
    grid_case("G-deep-nesting", "10,000 nested lists", "[" * 10000 + "]" * 10000 + "\n")
    case(
        "G-grid-dir",
        "experiment",
        "the grid path is a directory",
        lambda d: ["experiment", str(SF), "--list"],
        "refuse",
        ("sf",),
    )
    case(
        "G-grid-missing",
        "experiment",
        "the grid file is missing",
        lambda d: ["experiment", "nosuch.yaml", "--list"],
        "refuse",
        ("nosuch.yaml",),
    )
    grid_case(
        "G-run-zeroshot",
        "a one-cell zero-shot grid runs (and a user's files in its output stay)",
        gy(),
        expect="ok",
        extra=(),
        check=lambda d, o, e: None if list((d / "out").rglob("metrics.json")) else "no metrics",
    )

    # ---------------- H. report
    def report_argv(src, *extra):
        return lambda d: ["report", str(src(d) if callable(src) else src), "--no-plots", *extra]

    exp = work / "base" / "exp"
    case(
        "H-report-missing", "report", "a missing folder", report_argv("nosuch-exp"), "refuse", ("nosuch-exp",)
    )
    case(
        "H-report-empty",
        "report",
        "an empty folder",
        report_argv(lambda d: (d / "e").mkdir() or d / "e"),
        "refuse",
        ("e",),
    )
    case("H-report-notexp", "report", "a data folder", report_argv(SF), "refuse", ("sf",))
    case("H-report-file", "report", "a file", report_argv(SF / "corpus.jsonl"), "refuse", ("corpus.jsonl",))
    case(
        "H-report-metric",
        "report",
        "--metric bogus",
        report_argv(exp, "--metric", "bogus", "--output", "r"),
        "refuse",
        ("bogus",),
    )
    case(
        "H-report-alpha",
        "report",
        "--alpha 2",
        report_argv(exp, "--alpha", "2", "--output", "r"),
        "refuse",
        ("alpha",),
    )
    case(
        "H-report-alpha0",
        "report",
        "--alpha 0",
        report_argv(exp, "--alpha", "0", "--output", "r"),
        "refuse",
        ("alpha",),
    )
    case(
        "H-report-baseline",
        "report",
        "--baseline nosuch",
        report_argv(exp, "--baseline", "nosuch", "--output", "r"),
        "refuse",
        ("nosuch",),
    )
    case(
        "H-report-ok",
        "report",
        "a report of a one-cell experiment",
        report_argv(exp, "--output", "r", "--baseline", "zs"),
        "ok",
    )
    case(
        "H-report-userdir",
        "report",
        "--output: a folder of the user's files",
        lambda d: (plant_user_files(d / "r"), ["report", str(exp), "--no-plots", "--output", str(d / "r")])[
            1
        ],
        "refuse",
        ("r",),
        plant=["r"],
    )
    case(
        "H-report-badmetrics",
        "report",
        "an experiment whose metrics.json is garbage",
        lambda d: (
            shutil.copytree(exp, d / "e"),
            [p.write_text("{") for p in (d / "e").rglob("metrics.json")],
            ["report", str(d / "e"), "--no-plots", "--output", str(d / "r")],
        )[2],
        "refuse",
        ("metrics.json",),
    )
    case(
        "H-report-perquery-bad",
        "report",
        "per_query.json a list",
        lambda d: (
            shutil.copytree(exp, d / "e"),
            [p.write_text("[]") for p in (d / "e").rglob("per_query.json")],
            ["report", str(d / "e"), "--no-plots", "--output", str(d / "r")],
        )[2],
        "refuse",
        ("per_query.json",),
    )

    # ---------------- I. model-card / merge-index / push
    case(
        "I-card-notmodel",
        "model-card",
        "model-card of a data folder",
        lambda d: ["model-card", str(SF)],
        "refuse",
        ("sf",),
    )
    case(
        "I-card-missing",
        "model-card",
        "model-card of a missing folder",
        lambda d: ["model-card", "nosuch"],
        "refuse",
        ("nosuch",),
    )

    def card_check(d, out, err):
        text = (d / "m" / "README.md").read_text()
        return "the card tells users to trust remote code" if "trust_remote_code=True)" in text else None

    case(
        "I-card-no-remote-code",
        "model-card",
        "the model card never tells users to trust remote code",
        lambda d: ["model-card", str(lite(d))],
        "ok",
        check=card_check,
    )
    case(
        "I-merge-missing",
        "merge-index",
        "merge-index of a missing folder",
        lambda d: ["merge-index", "--index", "nosuch", "--output", str(d / "out")],
        "refuse",
        ("nosuch",),
    )
    case(
        "I-merge-notsharded",
        "merge-index",
        "merge-index of a plain index",
        lambda d: ["merge-index", "--index", str(IDX), "--output", str(d / "out")],
        "refuse",
        ("idx",),
    )
    case(
        "I-push-offline",
        "push",
        "push with no network",
        lambda d: ["push", str(LITE), "me/repo"],
        "refuse",
        ("",),
        env={"HF_HUB_OFFLINE": "1"},
        timeout=240,
    )

    # ---------------- J. store
    def store_argv(uri_fn, *extra):
        return lambda d: ["index", "--model", str(MODEL), "--data", str(SF), "--store", uri_fn(d), *extra]

    case(
        "J-store-userfile",
        "index",
        "--store onto the user's own file",
        store_argv(lambda d: ((d / "my.db").write_text("mine\n"), f"milvus:{d / 'my.db'}")[1]),
        "refuse",
        ("my.db",),
        check=None,
    )
    case(
        "J-store-dir",
        "index",
        "--store onto a directory",
        store_argv(lambda d: (d / "x.db").mkdir() or f"milvus:{d / 'x.db'}"),
        "refuse",
        ("x.db",),
    )
    case(
        "J-store-badcoll",
        "index",
        "--store with collection name '1 bad'",
        store_argv(lambda d: f"milvus:{d / 's.db'}?collection=1%20bad"),
        "refuse",
        ("collection",),
    )
    case(
        "J-store-underfile",
        "index",
        "--store under a regular file",
        store_argv(lambda d: ((d / "f").write_text("x"), f"milvus:{d / 'f' / 's.db'}")[1]),
        "refuse",
        ("f",),
    )
    case(
        "J-store-port",
        "index",
        "--store milvus://localhost:99999",
        store_argv(lambda d: "milvus://localhost:99999"),
        "refuse",
        ("99999",),
        timeout=60,
    )
    case(
        "J-store-unreachable",
        "index",
        "--store on a server that is not there",
        store_argv(lambda d: "milvus://127.0.0.1:1"),
        "refuse",
        ("127.0.0.1",),
        timeout=120,
    )
    case(
        "J-store-ok",
        "index",
        "--store into a new Milvus Lite file (and search it)",
        store_argv(lambda d: f"milvus:{d / 's.db'}"),
        "ok",
        timeout=200,
    )
    case(
        "J-store-search-missing",
        "search",
        "search a store file that does not exist",
        lambda d: ["search", "--model", str(MODEL), "--index", f"milvus:{d / 'none.db'}", "--query", "x"],
        "refuse",
        ("none.db",),
        timeout=120,
    )


# ------------------------------------------------------------------------------------ drills
def drills(base: Path, work: Path, results: list, run_root: Path) -> None:  # noqa: C901, PLR0915
    SF, MODEL, IDX = base / "sf", base / "model", base / "idx"

    def record(cid, verb, what, cls, msg):
        results.append(
            dict(
                id=cid,
                verb=verb,
                what=what,
                cls=cls,
                msg=msg.strip().splitlines()[0][:300] if msg.strip() else "",
            )
        )
        print(f"{cid:40s} {cls:14s} {msg.strip()[:150]!r}", flush=True)

    def fresh(cid):
        d = run_root / cid
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    # --- serve over HTTP
    d = fresh("K-serve")
    port = free_port()
    key = "sekrit"
    server = subprocess.Popen(
        cli(
            "serve",
            "--model",
            str(MODEL),
            "--index",
            str(IDX),
            "--data",
            str(SF),
            "--port",
            str(port),
            "--api-key",
            key,
            "--max-texts",
            "8",
            "--max-top-k",
            "50",
            "--max-request-bytes",
            "100000",
        ),
        cwd=d,
        env=sub_env(),
        stdout=open(d / "out.txt", "w"),
        stderr=open(d / "err.txt", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except Exception:  # noqa: BLE001
            time.sleep(0.5)

    def req(path, body=None, raw=None, auth=True, method=None, headers=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json", **(headers or {})}
        if auth:
            h["Authorization"] = f"Bearer {key}"
        r = urllib.request.Request(url + path, data=data, headers=h, method=method)
        try:
            with urllib.request.urlopen(r, timeout=60) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except Exception as e:  # noqa: BLE001
            return None, f"{type(e).__name__}: {e}"

    http_cases = [
        ("no-key", "/search", {"queries": ["x"]}, None, False, 401),
        ("bad-json", "/search", None, b"{not json", True, 422),
        ("surrogate", "/search", None, b'{"queries": ["\\ud800"]}', True, 422),
        ("surrogate-embed", "/embed", None, b'{"texts": ["\\udfff x"]}', True, 422),
        ("topk-huge", "/search", {"queries": ["x"], "top_k": 10**9}, None, True, 422),
        ("topk-neg", "/search", {"queries": ["x"], "top_k": -1}, None, True, 422),
        ("topk-str", "/search", {"queries": ["x"], "top_k": "ten"}, None, True, 422),
        ("topk-float", "/search", {"queries": ["x"], "top_k": 2.5}, None, True, 422),
        ("queries-empty", "/search", {"queries": []}, None, True, 422),
        ("queries-str", "/search", {"queries": "x"}, None, True, 422),
        ("queries-int", "/search", {"queries": [5]}, None, True, 422),
        ("queries-null", "/search", {"queries": [None]}, None, True, 422),
        ("too-many", "/search", {"queries": ["x"] * 9}, None, True, 422),
        ("body-huge", "/search", {"queries": ["x" * 200000]}, None, True, 413),
        ("missing-field", "/search", {}, None, True, 422),
        ("unknown-field", "/search", {"queries": ["x"], "evil": 1}, None, True, 422),
        ("empty-text", "/search", {"queries": [""]}, None, True, 422),
        ("get-search", "/search", None, None, True, 405),
        ("nosuch-path", "/../../etc/passwd", None, None, True, 404),
        ("ok-unicode", "/search", {"queries": ["\u7ef4\u751f\u7d20 D \U0001f9ec"]}, None, True, 200),
        ("ok", "/search", {"queries": ["vitamin d"], "top_k": 3}, None, True, 200),
        ("embed-ok", "/embed", {"texts": ["a", "b"]}, None, True, 200),
        ("health", "/health", None, None, False, 200),
    ]
    for name, path, body, raw, auth, want in http_cases:
        method = "GET" if body is None and raw is None else "POST"
        status, text = req(path, body, raw, auth, method)
        if status == want:
            cls = "REFUSED" if want >= 400 else "TOLERATED"
        elif status is None:
            cls = "HANG" if "timed out" in text else "TRACEBACK"
        elif status >= 500:
            cls = "TRACEBACK"
        elif status == 200:
            cls = "SILENT-ACCEPT"
        else:
            cls = "REFUSED" if want >= 400 and 400 <= status < 500 else "WRONG-REFUSAL"
        record(
            f"K-http-{name}",
            "serve",
            f"{method} {path} {str(body or raw)[:60]}",
            cls,
            f"HTTP {status}: {text[:200]}",
        )
    # 200 concurrent requests, byte-identical to the same query alone
    alone = req("/search", {"queries": ["vitamin d deficiency"], "top_k": 10})
    answers = []

    def worker():
        answers.append(req("/search", {"queries": ["vitamin d deficiency"], "top_k": 10}))

    threads = [threading.Thread(target=worker) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    same = sum(a == alone for a in answers)
    record(
        "K-http-concurrent-200",
        "serve",
        "200 concurrent identical requests",
        "TOLERATED" if same == 200 else "SILENT-WRONG",
        f"{same}/200 byte-identical to the query alone",
    )
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
    err = (d / "err.txt").read_text(errors="replace")
    record(
        "K-serve-log",
        "serve",
        "the server's log after all of that",
        "TRACEBACK" if "Traceback" in err else "TOLERATED",
        last_line(err) or "no traceback",
    )
    for name, flags, names in [
        ("port-big", ["--port", "70000"], "port"),
        ("port-neg", ["--port", "-1"], "port"),
        ("host-bad", ["--host", "not a host"], "host"),
        ("maxtopk-0", ["--max-top-k", "0"], "top"),
        ("public-nokey", ["--host", "0.0.0.0"], "api-key"),
    ]:
        d = fresh(f"K-serve-{name}")
        rc, out, err = run_sub(
            ["serve", "--model", str(MODEL), "--index", str(IDX), "--port", str(free_port()), *flags],
            d,
            timeout=300,
            env={"SBMOE_API_KEY": ""} if name == "public-nokey" else None,
        )
        c = dict(expect="refuse", names=(names,), check=None, timeout=300)
        cls, msg = classify(c, d, rc, out, err, [], [])
        record(f"K-serve-{name}", "serve", " ".join(flags), cls, msg)

    # --- kill -9 and resume: index
    d = fresh("K-kill-index")
    big = d / "big"
    shutil.copytree(SF, big)
    lines = (SF / "corpus.jsonl").read_text().splitlines()
    with (big / "corpus.jsonl").open("w") as fh:  # 5,000 docs: two chunks of 4,096 to resume from
        for i in range(5000):
            doc = json.loads(lines[i % len(lines)])
            doc["_id"] = f"{doc['_id']}-{i}" if i >= len(lines) else doc["_id"]
            doc["text"] = doc["text"][:200]
            fh.write(json.dumps(doc) + "\n")
    args = [
        "index",
        "--model",
        str(MODEL),
        "--data",
        str(big),
        "--output",
        str(d / "out"),
        "--encode-batch-size",
        "256",
    ]
    p = subprocess.Popen(cli(*args), cwd=d, env=sub_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    for _ in range(600):
        time.sleep(0.5)
        chunks = list(d.glob(".out.chunks/*"))
        if chunks:
            os.kill(p.pid, signal.SIGKILL)
            killed = True
            break
        if p.poll() is not None:
            break
    p.wait()
    rc, out, err = run_sub(args, d, timeout=400)
    rc2, _, err2 = run_sub(
        [
            "index",
            "--model",
            str(MODEL),
            "--data",
            str(big),
            "--output",
            str(d / "ref"),
            "--encode-batch-size",
            "256",
        ],
        d,
        timeout=400,
    )
    same = (
        rc == 0
        and rc2 == 0
        and all(
            (d / "out" / f).read_bytes() == (d / "ref" / f).read_bytes()
            for f in ("index.faiss", "doc_ids.json")
        )
    )
    record(
        "K-kill9-index-resume",
        "index",
        "kill -9 after the first chunk, run again",
        ("TOLERATED" if same else "SILENT-WRONG") if killed else "SKIPPED",
        f"killed={killed} resumed rc={rc}; byte-identical to an uninterrupted run: {same}; " + last_line(err),
    )
    record(
        "K-kill9-index-chunks-gone",
        "index",
        "the chunks are removed after the resumed run",
        "TOLERATED" if not (d / ".out.chunks").exists() else "SILENT-WRONG",
        "chunks folder removed",
    )

    # --- kill -9 and resume: train
    d = fresh("K-kill-train")
    targs = [
        "train",
        "--model",
        str(SPLADE),
        "--data",
        str(SF),
        "--output",
        "OUT",
        "--max-steps",
        "6",
        "--checkpoint-steps",
        "2",
        "--batch-size",
        "8",
        "--max-doc-length",
        "32",
        "--checkpoint-selection",
        "last",
        "--seed",
        "3",
    ]
    a = [x if x != "OUT" else str(d / "out") for x in targs]
    p = subprocess.Popen(cli(*a), cwd=d, env=sub_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    for _ in range(600):
        time.sleep(0.3)
        st = d / "out" / "training" / "checkpoint" / "state.json"
        if (
            list((d / "out" / "training" / "checkpoint").glob("*"))
            if (d / "out" / "training" / "checkpoint").exists()
            else []
        ):
            time.sleep(0.5)
            os.kill(p.pid, signal.SIGKILL)
            killed = True
            break
        if p.poll() is not None:
            break
    p.wait()
    rc, out, err = run_sub(a, d, timeout=400)
    ref = [x if x != "OUT" else str(d / "ref") for x in targs]
    rc2, _, _ = run_sub(ref, d, timeout=400)
    same = (
        rc == 0
        and rc2 == 0
        and (d / "out" / "model.safetensors").read_bytes() == (d / "ref" / "model.safetensors").read_bytes()
        and (d / "out" / "2_MoEHead" / "model.safetensors").read_bytes()
        == (d / "ref" / "2_MoEHead" / "model.safetensors").read_bytes()
    )
    record(
        "K-kill9-train-resume",
        "train",
        "kill -9 after the first checkpoint, run again",
        ("TOLERATED" if same else "SILENT-WRONG") if killed else "SKIPPED",
        f"killed={killed} resumed rc={rc}; weights byte-identical to an uninterrupted run: {same}; "
        + last_line(err),
    )
    rc, out, err = run_sub(a, d, timeout=200)
    record(
        "K-train-finished-again",
        "train",
        "the same training run a third time (reported, left as is)",
        "TOLERATED"
        if rc == 0
        and (d / "out" / "model.safetensors").read_bytes() == (d / "ref" / "model.safetensors").read_bytes()
        else ("TRACEBACK" if "Traceback" in err else "WRONG-REFUSAL"),
        last_line(err) or last_line(out),
    )

    # --- SIGTERM during evaluate: nothing half-written under the output's name
    d = fresh("K-sigterm-eval")
    eargs = ["evaluate", "--model", str(MODEL), "--data", str(SF), "--output", str(d / "out")]
    p = subprocess.Popen(cli(*eargs), cwd=d, env=sub_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(9)
    p.terminate()
    p.wait()
    leftovers = [x.name for x in d.iterdir() if x.name not in ("out",)]
    rc, out, err = run_sub(eargs, d, timeout=200)
    record(
        "K-sigterm-eval",
        "evaluate",
        "SIGTERM mid-run, then run again",
        "TOLERATED"
        if rc == 0 and not any(x.endswith(".tmp") for x in leftovers)
        else ("TRACEBACK" if "Traceback" in err else "SILENT-WRONG"),
        f"rc={rc}, leftovers={leftovers}; " + last_line(err),
    )

    # --- concurrent writers: two indexes into one output
    d = fresh("K-concurrent-index")
    iargs = [
        "index",
        "--model",
        str(MODEL),
        "--data",
        str(big if big.exists() else SF),
        "--output",
        str(d / "out"),
    ]
    p1 = subprocess.Popen(
        cli(*iargs), cwd=d, env=sub_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    for _ in range(200):
        time.sleep(0.2)
        if (d / ".out.lock").exists():
            break
    rc, out, err = run_sub(iargs, d, timeout=120)
    p1.wait()
    c = dict(expect="refuse", names=("out",), check=None, timeout=120)
    cls, msg = classify(c, d, rc, out, err, [], [])
    record(
        "K-concurrent-second-writer",
        "index",
        "a second index into the same output while the first runs",
        cls,
        msg,
    )
    record(
        "K-concurrent-first-finishes",
        "index",
        "the first writer finishes with a whole index",
        "TOLERATED" if p1.returncode == 0 and (d / "out" / "index.faiss").exists() else "SILENT-WRONG",
        f"rc={p1.returncode}",
    )
    # --- stale lock of a dead process (taken over with a warning), lock of another host (refused)
    for name, lock, expect, names in [
        ("stale-lock", {"pid": 999999, "host": socket.gethostname()}, "ok", ()),
        ("foreign-host-lock", {"pid": 1, "host": "some-other-host"}, "refuse", ("some-other-host",)),
        ("garbage-lock", None, "ok", ()),
        ("empty-lock", "", "ok", ()),
    ]:
        d = fresh(f"K-{name}")
        lp = d / ".out.lock"
        lp.write_text(
            json.dumps(lock) if isinstance(lock, dict) else ("\x00garbage" if lock is None else lock)
        )
        rc, out, err = run_sub(
            ["index", "--model", str(MODEL), "--data", str(SF), "--output", str(d / "out")], d, 200
        )
        c = dict(expect=expect, names=names, check=None, timeout=200)
        cls, msg = classify(c, d, rc, out, err, [], [])
        record(f"K-{name}", "index", f"a .out.lock: {name}", cls, msg)

    # --- a full disk (tmpfs), a cache on another device, and the lock when there is no room
    mnt = run_root / "tmpfs"
    mnt.mkdir(exist_ok=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        for name in ("full-index", "full-train", "full-eval", "full-cache", "full-lock", "full-store"):
            record(f"K-disk-{name}", "index", "full disk", "SKIPPED", "cannot mount a tmpfs here (not root)")
        return
    try:
        # fill it
        (mnt / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 + 512 * 1024))
        for name, args, names in [
            (
                "full-index",
                ["index", "--model", str(MODEL), "--data", str(big), "--output", str(mnt / "idx")],
                ("no space",),
            ),
            (
                "full-train",
                [
                    "train",
                    "--model",
                    str(SPLADE),
                    "--data",
                    str(SF),
                    "--output",
                    str(mnt / "m"),
                    "--max-steps",
                    "1",
                    "--batch-size",
                    "4",
                ],
                ("no space",),
            ),
            (
                "full-eval",
                ["evaluate", "--model", str(MODEL), "--data", str(SF), "--output", str(mnt / "ev")],
                ("no space",),
            ),
            (
                "full-store",
                ["index", "--model", str(MODEL), "--data", str(big), "--store", f"milvus:{mnt / 's.db'}"],
                ("no space",),
            ),
            (
                "full-cache",
                [
                    "index",
                    "--model",
                    str(MODEL),
                    "--data",
                    str(big),
                    "--output",
                    "OUT",
                    "--cache-dir",
                    str(mnt / "cache"),
                ],
                ("no space", "cache"),
            ),
        ]:
            d = fresh(f"K-disk-{name}")
            args = [x if x != "OUT" else str(d / "out") for x in args]
            rc, out, err = run_sub(args, d, timeout=300)
            c = dict(expect="refuse", names=names, check=None, timeout=300)
            cls, msg = classify(c, d, rc, out, err, [], [])
            record(f"K-disk-{name}", args[0], f"{name} on a full 3 MB tmpfs", cls, msg)
        # no room at all: not even for the lock
        (mnt / "filler2").write_bytes(b"\0" * (3 * 1024 * 1024)) if False else None
        with open(mnt / "filler2", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
            except OSError:
                pass
        d = fresh("K-disk-full-lock")
        rc, out, err = run_sub(
            ["index", "--model", str(MODEL), "--data", str(SF), "--output", str(mnt / "idx2")], d, 200
        )
        c = dict(expect="refuse", names=("no space",), check=None, timeout=200)
        cls, msg = classify(c, d, rc, out, err, [], [])
        leftover = [p.name for p in mnt.iterdir() if p.name.startswith(".")]
        if cls == "REFUSED" and leftover:
            cls, msg = "SILENT-WRONG", f"left behind {leftover}; " + msg
        record("K-disk-full-lock", "index", "a disk with no room even for the lock", cls, msg)
    finally:
        subprocess.run(["umount", str(mnt)])


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------------------- main
def main() -> int:
    opts = main_args()
    work = Path(opts.work)
    if opts.report_only:
        rows = [json.loads(x) for x in (work / f"{opts.out}.jsonl").read_text().splitlines() if x.strip()]
        latest = {r["id"]: r for r in rows}  # a case run twice (a resumed run): its last result
        write_results(work, opts.out, list(latest.values()), 0)
        return 0
    journal = (work / f"{opts.out}.jsonl").open("a")
    base = build_base(work)
    exp = base / "exp"
    if not (exp / "done").exists():  # a one-cell experiment for the report cases
        grid = base / "exp.yaml"
        grid.write_text(
            json.dumps(
                {
                    "name": "exp",
                    "backbones": [str(SPLADE)],
                    "collections": [str(base / "sf")],
                    "variants": {
                        "zs": {"num_experts": 0, "train": False},
                        "zs2": {"num_experts": 0, "train": False, "max_doc_length": 32},
                    },
                    "seeds": [1],
                }
            )
        )
        subprocess.run(
            cli("experiment", str(grid), "--output", str(exp)), cwd=base, env=sub_env(), check=True
        )
        (exp / "done").write_text("")
    base_digest = digest_tree(base)
    define(base, work)
    MARKERS.mkdir(parents=True, exist_ok=True)
    for m in MARKERS.iterdir():
        m.unlink()
    # imports paid once; the children are forked from here
    import faiss  # noqa: F401
    import sentence_transformers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import sbmoe.cli.main  # noqa: F401

    only = [x for x in opts.only.split(",") if x]
    results = []
    run_root = work / opts.run_dir
    run_root.mkdir(exist_ok=True)
    t0 = time.time()
    shard, shards = map(int, opts.shard.split("/"))
    started = not opts.start_at
    for number, c in enumerate(CASES):
        started = started or c["id"] == opts.start_at
        if not started or number % shards != shard:
            continue
        if only and not any(c["id"].startswith(o) for o in only):
            continue
        d = run_root / c["id"].replace("/", "_")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        env = dict(c["env"] or {})
        if env.get("HF_HOME") == "HFHOME":
            env["HF_HOME"] = str(d / "hf")
        try:
            argv = c["argv"](d)
        except Exception as e:  # noqa: BLE001
            results.append(
                dict(id=c["id"], verb=c["verb"], what=c["what"], cls="SKIPPED", msg=f"setup failed: {e}")
            )
            journal.write(json.dumps(results[-1], ensure_ascii=False) + "\n")
            print(f"{c['id']:40s} SKIPPED setup {e}", flush=True)
            continue
        planted = []
        if "--output" in argv:
            o = Path(argv[argv.index("--output") + 1])
            o = o if o.is_absolute() else d / o
            try:
                if user_files_intact(o):
                    planted.append(o)
            except OSError:  # a name too long, ...: nothing planted there
                pass
        for p in c["plant"] if isinstance(c["plant"], list) else []:
            if isinstance(p, str):
                planted.append(d / p)
        markers = (
            [MARKERS / x for x in os.listdir(MARKERS)]
            + [MARKERS / c["id"]]
            + [MARKERS / f"{c['id']}-{v}" for v in ("index", "evaluate", "train", "search")]
        )
        before = set(os.listdir(MARKERS))
        start = time.time()
        if env:  # environment read at import time (HF_HUB_OFFLINE, HF_HOME): a real process
            rc, out, err = run_sub(argv, d, c["timeout"], env)
        else:
            rc, out, err = run_forked(argv, d, c["timeout"], env)
        new_markers = set(os.listdir(MARKERS)) - before
        cls, msg = classify(c, d, rc, out, err, [MARKERS / m for m in new_markers] or markers[:0], planted)
        results.append(
            dict(
                id=c["id"],
                verb=c["verb"],
                what=c["what"],
                cls=cls,
                msg=msg[:300],
                rc=rc,
                s=round(time.time() - start, 1),
            )
        )
        journal.write(json.dumps(results[-1], ensure_ascii=False) + "\n")
        journal.flush()
        print(f"{c['id']:40s} {cls:14s} rc={rc} {time.time() - start:5.1f}s {msg[:140]!r}", flush=True)
    if not opts.no_drills and shard == 0 and (not only or any(o.startswith("K") for o in only)):
        before_drills = len(results)
        drills(base, work, results, run_root)
        for r in results[before_drills:]:
            journal.write(json.dumps(r, ensure_ascii=False) + "\n")
    if digest_tree(base) != base_digest:
        results.append(
            dict(
                id="Z-base-unchanged",
                verb="*",
                what="the fixtures every case read stay unchanged",
                cls="DATA-LOSS",
                msg="a fixture changed",
            )
        )
    else:
        results.append(
            dict(
                id="Z-base-unchanged",
                verb="*",
                what="the fixtures every case read stay unchanged",
                cls="TOLERATED",
                msg="unchanged",
            )
        )
    journal.write(json.dumps(results[-1], ensure_ascii=False) + "\n")
    journal.close()
    write_results(work, opts.out, results, time.time() - t0)
    return 0


def write_results(work: Path, name: str, results: list, seconds: float) -> None:
    from collections import Counter

    counts = Counter(r["cls"] for r in results)
    (work / f"{name}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    took = f" ({seconds / 60:.1f} min)" if seconds else ""
    lines = [f"# Campaign 31: {len(results)} cases{took}", "", "| class | cases |", "|---|---:|"]
    for k in ("REFUSED", "TOLERATED", *FAIL, "SKIPPED"):
        lines.append(f"| {k} | {counts.get(k, 0)} |")
    lines += ["", "## Failures", "", "| case | verb | class | message |", "|---|---|---|---|"]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    for r in results:
        if r["cls"] in FAIL:
            lines.append(f"| {r['id']} | {r['verb']} | {r['cls']} | {esc(r['msg'])[:200]} |")
    lines += [
        "",
        "## All cases",
        "",
        "| case | verb | what | class | first line of the message |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['id']} | {r['verb']} | {esc(r['what'])[:80]} | {r['cls']} | {esc(r['msg'])[:200]} |"
        )
    (work / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:14]))


if __name__ == "__main__":
    sys.exit(main())
