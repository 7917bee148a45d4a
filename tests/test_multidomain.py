"""Multi-Domain Benchmark -> BEIR conversion, on a tiny release-shaped fixture written in tmp_path."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

from sbmoe.core.errors import DataError, DataWarning
from sbmoe.data.beir import load_collection
from sbmoe.data.multidomain import MULTIDOMAIN_COLLECTIONS, QUERY_FILES, convert_multidomain

# Records shaped like the release's: retrieval fields plus some of the metadata it also carries.
DOCS = [
    {"id": "d1", "title": "Voting behaviour", "text": "Turnout in local elections.", "keywords": ["vote"]},
    {"id": "d2", "title": "Party systems", "text": "Fragmentation of parliaments.", "doi": None},
    {"id": "d3", "title": None, "text": "An abstract without a title."},
    {"id": 4, "title": "Numeric id", "text": "The id is a JSON number here."},
    {"id": "d5", "title": "Lobbying", "text": "Interest groups and access."},
    {"id": "d6", "text": "No title field at all."},
]


def _query(qid, text, rel):
    return {
        "id": qid,
        "text": text,
        "rel_doc_ids": rel,
        "user_id": "u1",
        "user_doc_ids": ["d5"],
        "bm25_doc_ids": ["d1", "d2"],
        "bm25_doc_scores": [3.5, 2.0],
        "timestamp": 1262304000,
    }


TRAIN = [
    _query("q1", "local election turnout", ["d1", "d2"]),
    _query("q2", "parliament fragmentation", ["d2"]),
    _query("q3", "interest groups", ["d5", "4", "d5"]),  # a repeated id is one judgement
]
VAL = [_query("q4", "abstracts", ["d3"])]
TEST = [_query("q5", "party systems", ["d2", "d1", "d6"]), _query(6, "numeric query id", [4])]


def _write_jsonl(path: Path, records, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_release(root: Path, folder: str = "political_science", compress: bool = False, **overrides) -> Path:
    """Write ``root/folder`` laid out like the extracted Zenodo archive; return the folder.

    ``overrides`` replaces a file's records: ``collection=``, ``train=``, ``val=``, ``test=``.
    """
    base = root / folder
    files = {"collection": DOCS, "train": TRAIN, "val": VAL, "test": TEST}
    files.update(overrides)
    _write_jsonl(base / "collection.jsonl", files["collection"], compress)
    for split in ("train", "val", "test"):
        _write_jsonl(base / split / "queries.jsonl", files[split], compress)
    (base / "authors.jsonl").write_text('{"id": "u1", "name": "A. Author"}\n', encoding="utf-8")
    return base


def test_layout_constants_match_the_release():
    assert set(MULTIDOMAIN_COLLECTIONS) == {"political-science", "computer-science"}
    assert MULTIDOMAIN_COLLECTIONS["political-science"].folder == "political_science"
    assert MULTIDOMAIN_COLLECTIONS["computer-science"].folder == "computer_science"
    for source in MULTIDOMAIN_COLLECTIONS.values():
        assert source.collection_file == "collection.jsonl"
        assert source.archive_url == f"https://zenodo.org/record/6606557/files/{source.folder}.zip"
        assert dict(source.query_files) == QUERY_FILES
    assert QUERY_FILES == {
        "train": "train/queries.jsonl",
        "dev": "val/queries.jsonl",
        "test": "test/queries.jsonl",
    }


def _check_converted(target: Path) -> None:
    collection = load_collection(target)
    assert collection.name == target.name
    assert len(collection.corpus) == 6
    assert collection.corpus["d1"].title == "Voting behaviour"
    assert collection.corpus["d1"].text == "Turnout in local elections."
    assert collection.corpus["d3"].title == ""
    assert collection.corpus["d6"].full_text == "No title field at all."
    assert collection.corpus["4"].title == "Numeric id"
    assert set(collection.queries) == {"q1", "q2", "q3", "q4", "q5", "6"}
    assert collection.queries["q2"] == "parliament fragmentation"
    assert collection.splits() == ["train", "dev", "test"]
    assert collection.qrels["train"] == {
        "q1": {"d1": 1, "d2": 1},
        "q2": {"d2": 1},
        "q3": {"d5": 1, "4": 1},
    }
    assert collection.qrels["dev"] == {"q4": {"d3": 1}}
    assert collection.qrels["test"] == {"q5": {"d2": 1, "d1": 1, "d6": 1}, "6": {"4": 1}}
    for split in ("train", "dev", "test"):
        lines = (target / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        assert lines[0] == "query-id\tcorpus-id\tscore"
    corpus_lines = (target / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(corpus_lines[0]) == {"_id": "d1", "title": "Voting behaviour", "text": DOCS[0]["text"]}
    assert json.loads((target / "queries.jsonl").read_text(encoding="utf-8").splitlines()[0]) == {
        "_id": "q1",
        "text": "local election turnout",
    }


def test_convert_by_name_from_the_extraction_folder(tmp_path):
    write_release(tmp_path / "datasets")
    target = tmp_path / "beir" / "political-science"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean release converts without warnings
        result = convert_multidomain(tmp_path / "datasets", target, name="political-science")
    assert result == target
    _check_converted(target)
    assert not [p for p in target.parent.iterdir() if p.name != "political-science"]  # no leftovers


@pytest.mark.parametrize("name", [None, "computer_science", "Computer-Science"])
def test_convert_from_the_collection_folder(tmp_path, name):
    source = write_release(tmp_path, folder="computer_science")
    target = convert_multidomain(source, tmp_path / "cs", name=name)
    _check_converted(target)


def test_gzipped_files_are_read(tmp_path):
    source = write_release(tmp_path, compress=True)
    assert (source / "collection.jsonl.gz").is_file() and not (source / "collection.jsonl").exists()
    _check_converted(convert_multidomain(source, tmp_path / "ps"))


def test_bom_crlf_and_blank_lines_are_tolerated(tmp_path):
    source = write_release(tmp_path)
    path = source / "collection.jsonl"
    text = path.read_text(encoding="utf-8").replace("\n", "\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + ("\r\n" + text + "\n  \n").encode("utf-8"))
    _check_converted(convert_multidomain(source, tmp_path / "ps"))


def test_existing_target_is_replaced_on_success(tmp_path):
    source = write_release(tmp_path)
    target = tmp_path / "ps"
    (target / "qrels").mkdir(parents=True)
    (target / "stale.txt").write_text("old", encoding="utf-8")
    convert_multidomain(source, target)
    assert not (target / "stale.txt").exists()
    _check_converted(target)


def test_unknown_relevant_documents_are_skipped_with_one_warning_per_file(tmp_path):
    train = [*TRAIN, _query("q7", "gone", ["missing-1", "missing-2"])]
    test = [_query("q5", "party systems", ["d2", "missing-3"]), *TEST[1:]]
    source = write_release(tmp_path, train=train, test=test)
    with pytest.warns(DataWarning) as caught:
        target = convert_multidomain(source, tmp_path / "ps")
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 2
    train_message = next(m for m in messages if m.startswith(str(source / "train")))
    assert "skipped 2 relevant-document ids" in train_message
    assert '"missing-1" on line 4' in train_message
    assert "1 queries are left without a relevant document" in train_message
    test_message = next(m for m in messages if m.startswith(str(source / "test")))
    assert "skipped 1 relevant-document ids" in test_message and "left without" not in test_message

    collection = load_collection(target)
    assert "q7" in collection.queries  # the query is kept; it just has no judgements
    assert "q7" not in collection.qrels["train"]
    assert collection.qrels["test"]["q5"] == {"d2": 1}


def _bad(field_value):
    return {"id": "dx", "title": "t", "text": "x", **field_value}


# (file to corrupt, records or raw text, fragments the message must contain)
ERROR_CASES = {
    "invalid json": (
        "collection",
        '{"id": "d1", "text": "a"}\n{"id": "d2", "text": \n',
        ["line 2", "invalid JSON"],
    ),
    "not an object": ("collection", '["d1", "text"]\n', ["line 1", "expected a JSON object, got array"]),
    "missing id": ("collection", [*DOCS[:2], {"title": "t", "text": "x"}], ["line 3", 'missing field "id"']),
    "null id": (
        "collection",
        [{"id": None, "text": "x"}],
        ["line 1", 'field "id" must be a string, got null'],
    ),
    "boolean id": (
        "collection",
        [{"id": True, "text": "x"}],
        ["line 1", 'field "id" must be a string, got boolean'],
    ),
    "float id": (
        "collection",
        [{"id": 1.5, "text": "x"}],
        ["line 1", 'field "id" must be a string, got number'],
    ),
    "empty id": ("collection", [{"id": "  ", "text": "x"}], ["line 1", 'field "id" is empty']),
    "tab in id": (
        "collection",
        [{"id": "a\tb", "text": "x"}],
        ["line 1", "field \"id\" 'a\\tb' holds whitespace"],
    ),
    "missing text": ("collection", [DOCS[0], {"id": "d2", "title": "t"}], ["line 2", 'missing field "text"']),
    "null text": (
        "collection",
        [{"id": "d1", "text": None}],
        ["line 1", 'field "text" must be a string, got null'],
    ),
    "numeric title": (
        "collection",
        [_bad({"title": 3})],
        ["line 1", 'field "title" must be a string, got number'],
    ),
    "duplicate doc id": (
        "collection",
        [*DOCS, DOCS[1]],
        ["line 7", "duplicate \"id\" 'd2'", "first on line 2"],
    ),
    "duplicate int/str doc id": ("collection", [*DOCS, {"id": "4", "text": "x"}], ["line 7", "duplicate"]),
    "empty collection": ("collection", "\n\n", ["no documents"]),
    "bad utf-8": ("collection", b'{"id": "d1", "text": "\xff"}\n', ["line 1", "not valid UTF-8"]),
    "query missing id": (
        "train",
        [{"text": "q", "rel_doc_ids": ["d1"]}],
        ["train", "line 1", 'missing field "id"'],
    ),
    "query missing text": (
        "val",
        [{"id": "q9", "rel_doc_ids": ["d1"]}],
        ["val", "line 1", 'missing field "text"'],
    ),
    "query text not string": (
        "test",
        [{"id": "q9", "text": ["a"], "rel_doc_ids": []}],
        ['"text" must be a string'],
    ),
    "missing rel_doc_ids": (
        "train",
        [*TRAIN[:1], {"id": "q9", "text": "q"}],
        ["line 2", 'missing field "rel_doc_ids"'],
    ),
    "rel_doc_ids not a list": (
        "test",
        [_query("q9", "q", "d1")],
        ["line 1", '"rel_doc_ids" must be an array, got string'],
    ),
    "bad rel doc id": (
        "test",
        [_query("q9", "q", ["d1", None])],
        ["line 1", 'field "rel_doc_ids[1]" must be a string'],
    ),
    "duplicate query id": (
        "train",
        [*TRAIN, TRAIN[0]],
        ["train", "line 4", "duplicate \"id\" 'q1'", "line 1"],
    ),
    "query id repeated across splits": (
        "test",
        [*TEST, _query("q2", "again", ["d1"])],
        ["test", "line 3", "train"],
    ),
    "empty query file": ("val", "", ["val", "no queries"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_malformed_input_raises_data_error_naming_file_line_and_field(tmp_path, case):
    which, content, fragments = ERROR_CASES[case]
    source = write_release(tmp_path)
    path = source / ("collection.jsonl" if which == "collection" else f"{which}/queries.jsonl")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        _write_jsonl(path, content)
    target = tmp_path / "out" / "ps"
    with pytest.raises(DataError) as info:
        convert_multidomain(source, target)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    # Atomic: nothing under the target name, no staging folder left behind.
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_failed_conversion_keeps_the_previous_target(tmp_path):
    source = write_release(tmp_path)
    target = convert_multidomain(source, tmp_path / "ps")
    _write_jsonl(source / "test" / "queries.jsonl", [{"id": "q9"}])
    with pytest.raises(DataError):
        convert_multidomain(source, target)
    _check_converted(target)


@pytest.mark.parametrize("split", ["collection.jsonl", "train/queries.jsonl", "val/queries.jsonl"])
def test_missing_file(tmp_path, split):
    source = write_release(tmp_path)
    (source / split).unlink()
    with pytest.raises(DataError, match=rf"missing {split}"):
        convert_multidomain(source, tmp_path / "ps")
    assert not (tmp_path / "ps").exists()


def test_bad_gzip_file(tmp_path):
    source = write_release(tmp_path)
    (source / "collection.jsonl").unlink()
    (source / "collection.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"collection\.jsonl\.gz: not a readable gzip file"):
        convert_multidomain(source, tmp_path / "ps")


def test_unknown_name_and_missing_source(tmp_path):
    write_release(tmp_path)
    with pytest.raises(DataError, match="unknown Multi-Domain Benchmark collection 'physics'"):
        convert_multidomain(tmp_path, tmp_path / "out", name="physics")
    with pytest.raises(DataError, match="not a directory"):
        convert_multidomain(tmp_path / "nowhere", tmp_path / "out")


@pytest.mark.parametrize("relative", [".", ".."])
def test_target_may_not_replace_the_source(tmp_path, relative):
    source = write_release(tmp_path)
    with pytest.raises(DataError, match="would replace the source"):
        convert_multidomain(source, source / relative)
    assert (source / "collection.jsonl").is_file()
