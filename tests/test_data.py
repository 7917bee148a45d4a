"""Tests for sbmoe.data.beir: loading and validating BEIR folders, finding/downloading them, splits."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import pytest

from sbmoe.core.errors import DataError, DataWarning
from sbmoe.data.beir import (
    BeirCollection,
    Document,
    load_collection,
    positive_pairs,
    resolve_data,
    train_dev_split,
)
from sbmoe.data.download import DownloadSource

REAL_DATA = Path(
    os.environ.get("SBMOE_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)

DOCS = [
    {"_id": f"d{i}", "title": f"Title {i}" if i % 3 else "", "text": f"Text of document {i}."}
    for i in range(10)
]
QUERIES = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(8)]
TRAIN = [("q0", "d0", 1), ("q0", "d1", 2), ("q1", "d2", 1), ("q2", "d3", 0), ("q3", "d4", 1), ("q4", "d5", 1)]
TEST = [("q5", "d6", 1), ("q6", "d7", 1), ("q7", "d8", 2)]


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def tsv(rows: list[tuple], header: bool = True) -> str:
    lines = ["query-id\tcorpus-id\tscore"] if header else []
    lines += ["\t".join(str(c) for c in row) for row in rows]
    return "".join(line + "\n" for line in lines)


def write_beir(
    root: Path,
    corpus: str | None = None,
    queries: str | None = None,
    qrels: dict[str, str] | None = None,
) -> Path:
    """Write a tiny BEIR folder; any file given as text replaces the default one."""
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(jsonl(DOCS) if corpus is None else corpus, encoding="utf-8")
    (root / "queries.jsonl").write_text(jsonl(QUERIES) if queries is None else queries, encoding="utf-8")
    if qrels is None:
        qrels = {"train": tsv(TRAIN), "test": tsv(TEST)}
    for split, text in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "tiny")


# --- loading -------------------------------------------------------------------------------------


def test_load_tiny_collection(tiny: Path) -> None:
    col = load_collection(tiny)
    assert col.name == "tiny" and col.root == tiny
    assert len(col.corpus) == 10 and len(col.queries) == 8
    assert col.corpus["d1"] == Document("Title 1", "Text of document 1.")
    assert col.corpus["d0"].title == ""
    assert col.splits() == ["train", "test"]
    assert col.split_qrels("train") == {
        "q0": {"d0": 1, "d1": 2},
        "q1": {"d2": 1},
        "q2": {"d3": 0},
        "q3": {"d4": 1},
        "q4": {"d5": 1},
    }
    assert {q: col.queries[q] for q in col.split_qrels("test")} == {
        "q5": "query 5",
        "q6": "query 6",
        "q7": "query 7",
    }


def test_split_order_and_missing_split(tmp_path: Path) -> None:
    root = write_beir(
        tmp_path / "c", qrels={"test": tsv(TEST), "dev": tsv(TRAIN[:1]), "extra": tsv(TEST[:1])}
    )
    col = load_collection(root)
    assert col.splits() == ["dev", "test", "extra"]
    with pytest.raises(DataError, match=r'no split "train" \(available: dev, test, extra\)'):
        col.split_qrels("train")


def test_load_only_named_splits(tiny: Path) -> None:
    col = load_collection(tiny, splits=["test"])
    assert col.splits() == ["test"]
    assert load_collection(tiny, splits="train").splits() == ["train"]
    with pytest.raises(DataError, match=r"'dev' \(available: test, train\)"):
        load_collection(tiny, splits=["train", "dev"])


def test_full_text() -> None:
    assert Document("A title", "Some text.").full_text == "A title Some text."
    assert Document("", "Some text.").full_text == "Some text."
    assert Document("  ", " Some text. ").full_text == "Some text."
    assert Document("Only title", "").full_text == "Only title"
    assert Document("", "").full_text == ""


def test_numeric_ids_become_strings_and_title_is_optional(tmp_path: Path) -> None:
    corpus = jsonl([{"_id": 7, "text": "seven"}, {"_id": "8", "title": None, "text": ""}])
    queries = jsonl([{"_id": 1, "text": "one"}])
    root = write_beir(tmp_path / "c", corpus=corpus, queries=queries, qrels={"test": tsv([(1, 7, 1)])})
    with pytest.warns(DataWarning) as caught:
        col = load_collection(root)
    # One warning per file, counting the converted ids and naming the first (issue 22: not silent).
    numeric = sorted(str(w.message) for w in caught if "JSON numbers" in str(w.message))
    assert numeric == [
        f"{root / 'corpus.jsonl'}: 1 ids are JSON numbers, read as their decimal strings "
        '(e.g. field "_id" 7 on line 1)',
        f"{root / 'queries.jsonl'}: 1 ids are JSON numbers, read as their decimal strings "
        '(e.g. field "_id" 1 on line 1)',
    ]
    assert col.corpus == {"7": Document("", "seven"), "8": Document("", "")}  # empty text is allowed
    assert col.queries == {"1": "one"}
    assert col.split_qrels("test") == {"1": {"7": 1}}


def test_crlf_bom_blank_lines_and_headerless_qrels(tmp_path: Path) -> None:
    root = tmp_path / "c"
    (root / "qrels").mkdir(parents=True)
    bom = "\ufeff"
    (root / "corpus.jsonl").write_bytes((bom + jsonl(DOCS).replace("\n", "\r\n") + "\r\n").encode())
    (root / "queries.jsonl").write_bytes((bom + jsonl(QUERIES).replace("\n", "\r\n")).encode())
    (root / "qrels" / "train.tsv").write_bytes((bom + tsv(TRAIN).replace("\n", "\r\n")).encode())
    (root / "qrels" / "test.tsv").write_bytes(tsv(TEST, header=False).encode())
    col = load_collection(root)
    assert set(col.corpus) == {d["_id"] for d in DOCS}
    assert "q0" in col.queries and col.queries["q0"] == "query 0"
    assert col.split_qrels("train")["q0"] == {"d0": 1, "d1": 2}
    assert col.split_qrels("test") == {"q5": {"d6": 1}, "q6": {"d7": 1}, "q7": {"d8": 2}}


BAD_RECORDS = [
    ("{not json", "invalid JSON", None),
    ('["d9", "a list"]', "expected a JSON object, got array", None),
    ('{"title": "t", "text": "x"}', 'missing field "_id"', "_id"),
    ('{"_id": "", "text": "x"}', 'field "_id" is empty', "_id"),
    ('{"_id": null, "text": "x"}', 'field "_id" must be a string, got null', "_id"),
    ('{"_id": ["a"], "text": "x"}', 'field "_id" must be a string, got array', "_id"),
    ('{"_id": {"a": 1}, "text": "x"}', 'field "_id" must be a string, got object', "_id"),
    ('{"_id": true, "text": "x"}', 'field "_id" must be a string, got boolean', "_id"),
    ('{"_id": "d99", "title": "t"}', 'missing field "text"', "text"),
    ('{"_id": "d99", "text": null}', 'field "text" must be a string, got null', "text"),
    ('{"_id": "d99", "text": 3}', 'field "text" must be a string, got number', "text"),
    ('{"_id": "d99", "title": ["t"], "text": "x"}', 'field "title" must be a string, got array', "title"),
    ('{"_id": "d2", "text": "again"}', 'duplicate "_id"', "_id"),
    ('{"_id": "d99", "text": "a \\ud800 b"}', "lone UTF-16 surrogate", "text"),
    ('{"_id": "d99", "text": "x", "meta": {"tags": ["\\udc00"]}}', "lone UTF-16 surrogate", "meta.tags[0]"),
    # before, accepted: a TREC run (run.trec, search --output) then had a column too many
    ('{"_id": "d 99", "text": "x"}', "field \"_id\" 'd 99' holds whitespace", "_id"),
    ('{"_id": "d\\t99", "text": "x"}', "holds whitespace, which no TREC run", "_id"),
]


@pytest.mark.parametrize(("line", "expected", "field"), BAD_RECORDS)
def test_bad_corpus_line_names_file_line_and_field(tmp_path: Path, line: str, expected: str, field) -> None:
    lines = [json.dumps(d) for d in DOCS[:4]]
    lines.insert(3, line)  # becomes line 4
    root = write_beir(tmp_path / "c", corpus="\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_collection(root)
    message = str(info.value)
    assert message.startswith(f"{root / 'corpus.jsonl'} line 4: ")
    assert expected in message
    if field:
        assert f'"{field}"' in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"_id": "q1", "text": "dup"}', 'line 3: duplicate "_id"'),
        ('{"_id": "q9"}', 'line 3: missing field "text"'),
        ("42", "line 3: expected a JSON object, got number"),
    ],
)
def test_bad_queries_line(tmp_path: Path, line: str, expected: str) -> None:
    text = jsonl(QUERIES[:2]) + line + "\n" + jsonl(QUERIES[2:])
    root = write_beir(tmp_path / "c", queries=text)
    with pytest.raises(DataError, match=expected) as info:
        load_collection(root)
    assert str(root / "queries.jsonl") in str(info.value)


@pytest.mark.parametrize("name", ["corpus.jsonl", "qrels/test.tsv"])
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda path: path.mkdir(), "is a directory, not a file"),
        (lambda path: path.symlink_to(path.name), "is a symbolic link that loops"),
        (lambda path: path.symlink_to("nothing"), "is a symbolic link to nothing"),
    ],
    ids=["directory", "link-loop", "broken-link"],
)
def test_a_data_file_that_is_no_file_is_named_with_the_reason(tmp_path: Path, name, make, reason) -> None:
    """Before, a folder or a link loop in the corpus's place was 'missing', in the qrels' a traceback."""
    root = write_beir(tmp_path / "c")
    (root / name).unlink()
    make(root / name)
    with pytest.raises(DataError) as info:
        load_collection(root)
    assert str(info.value).startswith(f"{root / name}: {reason}")


def test_a_surrogate_pair_is_text(tmp_path: Path) -> None:
    """Only a lone surrogate is refused: an escaped pair is one character (here an emoji)."""
    root = write_beir(tmp_path / "c")
    (root / "corpus.jsonl").write_text(jsonl(DOCS) + '{"_id": "x", "text": "\\ud83d\\ude00"}\n')
    assert load_collection(root).corpus["x"].text == "\U0001f600"


def test_invalid_utf8_reports_line(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "c")
    (root / "corpus.jsonl").write_bytes(jsonl(DOCS[:2]).encode() + b'{"_id": "x", "text": "\xff"}\n')
    with pytest.raises(DataError, match=r"corpus\.jsonl line 3: not valid UTF-8"):
        load_collection(root)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("q0\td0", "line 3: expected 3 tab-separated columns"),
        ("q0\td0\t1\textra", "line 3: expected 3 tab-separated columns"),
        ("q0 d0 1", "line 3: expected 3 tab-separated columns"),
        ("q0\td0\thigh", 'line 3: field "score" is not an integer'),
        ("q0\td0\t1.5", 'line 3: field "score" is not an integer'),
        ("\td0\t1", 'line 3: field "query-id" is empty'),
        # before, the last row silently won
        ("q1\td2\t0", "line 3: query 'q1' and document 'd2' are judged again, with score 0 after 1"),
    ],
)
def test_bad_qrels_row(tmp_path: Path, row: str, expected: str) -> None:
    text = "query-id\tcorpus-id\tscore\nq1\td2\t1\n" + row + "\nq3\td4\t1\n"
    root = write_beir(tmp_path / "c", qrels={"train": text})
    with pytest.raises(DataError, match=expected) as info:
        load_collection(root)
    assert str(root / "qrels" / "train.tsv") in str(info.value)


def test_missing_or_empty_files(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "c", corpus="\n")
    with pytest.raises(DataError, match=r"corpus\.jsonl: no documents"):
        load_collection(root)
    (root / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=r"missing queries\.jsonl"):
        load_collection(root)
    with pytest.raises(DataError, match="not a directory"):
        load_collection(tmp_path / "absent")


def test_unknown_ids_skipped_with_one_warning_per_file(tmp_path: Path) -> None:
    train = tsv([*TRAIN, ("q0", "nope", 1), ("ghost", "d1", 1), ("ghost2", "d2", 1)])
    root = write_beir(tmp_path / "c", qrels={"train": train, "test": tsv([*TEST, ("q5", "missing", 1)])})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        col = load_collection(root)
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 2
    train_msg = next(m for m in messages if "train.tsv" in m)
    assert "skipped 3 qrels rows" in train_msg and 'corpus-id "nope" on line 8' in train_msg
    assert "skipped 1 qrels rows" in next(m for m in messages if "test.tsv" in m)
    assert col.split_qrels("train")["q0"] == {"d0": 1, "d1": 2}
    assert "ghost" not in col.split_qrels("train")


# --- resolve_data --------------------------------------------------------------------------------


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No data dir from the environment, a private cache, and a cwd without collections."""
    monkeypatch.delenv("SBMOE_DATA_DIR", raising=False)
    monkeypatch.setenv("SBMOE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def test_resolve_existing_path(isolated: Path) -> None:
    root = write_beir(isolated / "somewhere" / "mine")
    assert resolve_data(str(root)) == root


def test_resolve_order_data_dir_then_cache(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = write_beir(isolated / "cache" / "data" / "tiny")
    assert resolve_data("tiny") == cached  # cache from $SBMOE_CACHE_DIR/data
    env_dir = write_beir(isolated / "envdata" / "tiny")
    monkeypatch.setenv("SBMOE_DATA_DIR", str(isolated / "envdata"))
    assert resolve_data("tiny") == env_dir  # data dir beats cache
    explicit = write_beir(isolated / "explicit" / "tiny")
    assert resolve_data("tiny", data_dir=isolated / "explicit") == explicit
    assert resolve_data("tiny", data_dir=isolated / "nothing") == cached
    other_cache = write_beir(isolated / "other" / "tiny")
    monkeypatch.delenv("SBMOE_DATA_DIR")
    assert resolve_data("tiny", cache_dir=isolated / "other") == other_cache


def test_resolve_unknown_name_lists_places_and_known_names(isolated: Path) -> None:
    with pytest.raises(DataError) as info:
        resolve_data("no-such-set", data_dir=isolated / "d")
    message = str(info.value)
    assert str(isolated / "d" / "no-such-set") in message
    assert str(isolated / "cache" / "data" / "no-such-set") in message
    assert "scifact" in message and "nfcorpus" in message


def test_resolve_known_name_without_download(isolated: Path) -> None:
    with pytest.raises(DataError, match="download is off") as info:
        resolve_data("scifact", download=False)
    assert str(isolated / "cache" / "data" / "scifact") in str(info.value)


def make_archive(tmp_path: Path, name: str = "tiny", top_folder: bool = True) -> tuple[str, str]:
    """Zip a tiny collection like the BEIR server does; return (url template, md5)."""
    src = write_beir(tmp_path / "src" / name)
    server = tmp_path / "server"
    server.mkdir(exist_ok=True)
    archive = server / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src.parent if top_folder else src).as_posix()
            zipped.write(path, rel)
    return server.as_uri() + "/{name}.zip", hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.mark.parametrize("top_folder", [True, False])
def test_download_verifies_and_extracts(isolated: Path, top_folder: bool) -> None:
    url, md5 = make_archive(isolated, top_folder=top_folder)
    path = resolve_data("tiny", source=DownloadSource(url, {"tiny": md5}))
    assert path == isolated / "cache" / "data" / "tiny"
    col = load_collection(path)
    assert len(col.corpus) == 10 and col.splits() == ["train", "test"]
    assert sorted(p.name for p in (isolated / "cache" / "data").iterdir()) == ["tiny"]  # no zip, no temp dirs
    (isolated / "server" / "tiny.zip").unlink()
    assert resolve_data("tiny", source=DownloadSource(url, {"tiny": md5})) == path  # now a cache hit


def test_download_checksum_mismatch_leaves_nothing(isolated: Path) -> None:
    url, _ = make_archive(isolated)
    with pytest.raises(DataError, match=r"MD5 mismatch: expected 0{32}, got [0-9a-f]{32}") as info:
        resolve_data("tiny", source=DownloadSource(url, {"tiny": "0" * 32}))
    assert "not found locally" in str(info.value) and str(isolated / "cache" / "data" / "tiny") in str(
        info.value
    )
    assert not (isolated / "cache" / "data").exists() or list((isolated / "cache" / "data").iterdir()) == []


def test_download_failure_is_a_data_error(isolated: Path) -> None:
    url = (isolated / "offline").as_uri() + "/{name}.zip"
    with pytest.raises(DataError, match="could not be downloaded from file://") as info:
        resolve_data("tiny", source=DownloadSource(url, {"tiny": "0" * 32}))
    assert str(isolated / "cache" / "data" / "tiny") in str(info.value)


def test_download_rejects_unsafe_archive(isolated: Path) -> None:
    (isolated / "server").mkdir()
    archive = isolated / "server" / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("../escape.txt", "x")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    url = (isolated / "server").as_uri() + "/{name}.zip"
    with pytest.raises(DataError, match="unsafe path"):
        resolve_data("evil", source=DownloadSource(url, {"evil": md5}))
    assert not (isolated / "escape.txt").exists() and not (isolated / "cache" / "data" / "evil").exists()


# --- training data -------------------------------------------------------------------------------


def test_positive_pairs_sorted_and_filtered() -> None:
    qrels = {"q2": {"b": 1, "a": 2}, "q1": {"z": 0, "c": 1}, "q10": {"x": 3}}
    assert positive_pairs(qrels) == [("q1", "c"), ("q10", "x"), ("q2", "a"), ("q2", "b")]
    assert positive_pairs(qrels, min_score=2) == [("q10", "x"), ("q2", "a")]
    assert positive_pairs(qrels, min_score=0)[0] == ("q1", "c")
    assert len(positive_pairs(qrels, min_score=0)) == 5


def test_train_dev_split_uses_existing_dev(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "c", qrels={"train": tsv(TRAIN), "dev": tsv(TEST)})
    col = load_collection(root)
    train, dev = train_dev_split(col)
    assert train == col.split_qrels("train") and dev == col.split_qrels("dev")
    train["q0"]["d0"] = 5  # fresh dicts: the collection is untouched
    assert col.split_qrels("train")["q0"]["d0"] == 1


def test_train_dev_split_removes_overlap_from_train(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "c", qrels={"train": tsv(TRAIN), "dev": tsv([("q0", "d9", 1)])})
    with pytest.warns(DataWarning, match="1 queries are in both"):
        train, dev = train_dev_split(load_collection(root))
    assert "q0" not in train and dev == {"q0": {"d9": 1}}


def make_collection(n_queries: int, with_dev: bool = False) -> BeirCollection:
    train = {f"q{i:03d}": {f"d{i}": 1} for i in range(n_queries)}
    qrels = {"train": train}
    if with_dev:
        qrels["dev"] = {"qdev": {"d0": 1}}
    return BeirCollection("synthetic", Path("."), {}, {}, qrels)


def test_train_dev_split_holdout_is_seeded_and_disjoint() -> None:
    col = make_collection(50)
    train, dev = train_dev_split(col, dev_fraction=0.2, seed=7)
    assert len(dev) == 10 and len(train) == 40
    assert not train.keys() & dev.keys()
    assert train.keys() | dev.keys() == col.split_qrels("train").keys()
    assert all(dev[q] == col.split_qrels("train")[q] for q in dev)
    again = train_dev_split(col, dev_fraction=0.2, seed=7)
    assert again == (train, dev)
    assert train_dev_split(col, dev_fraction=0.2, seed=8)[1].keys() != dev.keys()
    # The draw must not depend on the order the qrels were read in.
    shuffled = BeirCollection("s", Path("."), {}, {}, {"train": dict(reversed(col.qrels["train"].items()))})
    assert train_dev_split(shuffled, dev_fraction=0.2, seed=7)[1].keys() == dev.keys()


def test_train_dev_split_holdout_edge_cases() -> None:
    train, dev = train_dev_split(make_collection(3), dev_fraction=0.01)
    assert len(dev) == 1 and len(train) == 2  # at least one dev query
    train, dev = train_dev_split(make_collection(20, with_dev=True), dev_split=None)
    assert len(dev) == 2 and "qdev" not in dev  # dev_split=None forces a hold-out
    train, dev = train_dev_split(make_collection(20, with_dev=True))
    assert dev == {"qdev": {"d0": 1}} and len(train) == 20
    with pytest.raises(DataError, match="too few"):
        train_dev_split(make_collection(1))
    with pytest.raises(ValueError, match="dev_fraction"):
        train_dev_split(make_collection(10), dev_fraction=1.0)
    with pytest.raises(DataError, match="no split"):
        train_dev_split(make_collection(10), train_split="nope")


# --- the real collections ------------------------------------------------------------------------


def real(name: str) -> Path:
    path = REAL_DATA / name
    if not (path / "corpus.jsonl").is_file():
        pytest.skip(f"{path} not available")
    return path


def test_real_scifact() -> None:
    path = real("scifact")
    col = load_collection(path)
    assert len(col.corpus) == 5183 and len(col.queries) == 1109
    assert col.splits() == ["train", "test"]
    for split, n_queries, n_qrels in (("train", 809, 919), ("test", 300, 339)):
        qrels = col.split_qrels(split)
        assert len(qrels) == n_queries
        assert sum(len(docs) for docs in qrels.values()) == n_qrels
        assert len(positive_pairs(qrels)) == n_qrels  # all SciFact scores are 1
    assert len({q: col.queries[q] for q in col.split_qrels("test")}) == 300
    train, dev = train_dev_split(col)  # no dev split: 10% of train held out
    assert len(dev) == 81 and len(train) == 728 and not train.keys() & dev.keys()


def test_real_nfcorpus() -> None:
    path = real("nfcorpus")
    col = load_collection(path)
    assert len(col.corpus) == 3633 and len(col.queries) == 3237
    assert col.splits() == ["train", "dev", "test"]
    assert sum(len(docs) for docs in col.split_qrels("train").values()) == 110575
    dev = col.split_qrels("dev")
    assert len(dev) == 324 and sum(len(d) for d in dev.values()) == 11385
    assert sum(score == 2 for docs in dev.values() for score in docs.values()) == 521
    train, dev_used = train_dev_split(col)
    assert dev_used == dev and len(train) == 2590
