"""Training files: real SciFact written as Tevatron JSONL, triples (TSV, JSONL) and a Hugging Face dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sbmoe.cli.main import main
from sbmoe.core.errors import DataError, DataWarning, MissingInputError
from sbmoe.core.io import read_json
from sbmoe.data.beir import load_collection
from sbmoe.data.training_files import load_training_file

FORMATS = ("tevatron", "triples-jsonl", "triples-tsv", "hf")


@pytest.fixture(scope="module")
def examples(data_dir) -> list[dict]:
    """40 SciFact training queries, each with its judged positives and two unjudged documents as negatives."""
    collection = load_collection(data_dir / "scifact", splits=["train"])
    doc_ids = list(collection.corpus)
    chosen = []
    for position, (query_id, judged) in enumerate(list(collection.split_qrels("train").items())[:40]):
        # Queries go in twos that share candidate negatives: repeated passages must merge.
        start = 7 * (position // 2)
        negatives = [d for d in doc_ids[start : start + 4] if d not in judged][:2]
        passages = {
            kind: [(d, collection.corpus[d].title, collection.corpus[d].text) for d in ids]
            for kind, ids in (("positives", sorted(judged)), ("negatives", negatives))
        }
        chosen.append({"id": query_id, "query": collection.queries[query_id], **passages})
    return chosen


def full_text(title: str, text: str) -> str:
    return f"{title} {text}" if title else text


def write(kind: str, examples: list[dict], folder: Path) -> Path:
    """``examples`` in one training-file format; triples carry passages as "title text" strings."""
    if kind == "tevatron":
        path = folder / "train.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for example in examples:
                record = {"query_id": example["id"], "query": example["query"]}
                for field, key in (("positive_passages", "positives"), ("negative_passages", "negatives")):
                    record[field] = [{"docid": d, "title": t, "text": x} for d, t, x in example[key]]
                out.write(json.dumps(record) + "\n")
        return path
    rows = [
        (example["query"], full_text(title, text), [full_text(t, x) for _, t, x in example["negatives"]])
        for example in examples
        for _, title, text in example["positives"]
    ]
    if kind == "triples-jsonl":
        path = folder / "triples.jsonl"
        lines = [json.dumps({"anchor": q, "positive": p, "negative": n}) for q, p, n in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "triples-tsv":
        path = folder / "triples.tsv"
        assert not any("\t" in text or "\n" in text for q, p, n in rows for text in (q, p, *n))
        lines = ["query\tpositive\tnegative"] + ["\t".join([q, p, *n]) for q, p, n in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        import datasets

        path = folder / "hf-dataset"
        columns = {"query": [q for q, _, _ in rows], "positive": [p for _, p, _ in rows]}
        for i in range(2):  # sentence-transformers' n-tuple columns; a query with one negative has None
            columns[f"negative_{i + 1}"] = [n[i] if i < len(n) else None for _, _, n in rows]
        datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def content(collection) -> dict[str, tuple[list[str], list[str]]]:
    """Query text -> (sorted positive texts, sorted negative texts): what the file says, ids aside."""
    texts = {doc_id: doc.full_text for doc_id, doc in collection.corpus.items()}
    return {
        text: (
            sorted(texts[d] for d in collection.qrels["train"][query_id]),
            sorted(texts[d] for d in collection.negatives.get(query_id, [])),
        )
        for query_id, text in collection.queries.items()
    }


def test_every_format_reads_into_the_same_training_collection(examples, tmp_path):
    expected = {
        e["query"]: tuple(sorted(full_text(t, x) for _, t, x in e[key]) for key in ("positives", "negatives"))
        for e in examples
    }
    distinct = {full_text(t, x) for e in examples for key in ("positives", "negatives") for _, t, x in e[key]}
    for kind in FORMATS:
        collection = load_training_file(write(kind, examples, tmp_path))
        assert content(collection) == expected, kind
        assert len(collection.corpus) == len(distinct), kind  # repeated passages are one document
        assert collection.splits() == ["train"]
        if kind == "tevatron":  # given ids are kept
            assert sorted(collection.queries) == sorted(e["id"] for e in examples)
            assert {d for e in examples for key in ("positives", "negatives") for d, _, _ in e[key]} == set(
                collection.corpus
            )


@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_trains_a_model_end_to_end(kind, examples, tiny_bert_dir, tmp_path):
    path = write(kind, examples, tmp_path)
    output = tmp_path / "model"
    common = [
        "-q",
        "train",
        "--model",
        str(tiny_bert_dir),
        "--train-file",
        str(path),
        "--output",
        str(output),
    ]
    settings = ["--num-experts", "2", "--max-steps", "2", "--batch-size", "8", "--max-doc-length", "48"]
    assert main([*common, *settings, "--precision", "fp32", "--hard-negatives", "1"]) == 0

    collection = load_training_file(path)
    run = read_json(output / "training" / "config.json")
    assert run["train_config"]["train_file"] == str(path)
    assert run["data"]["name"] == path.name
    log = [json.loads(line) for line in (output / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2]
    # Dev queries were held out of the file and scored over its passages; training used the rest.
    dev = [r for r in log if r["event"] == "dev"]
    assert dev and all(0.0 <= r["dev_ndcg@10"] <= 1.0 for r in dev)
    used = read_json(output / "training" / "negatives.json")
    assert 0 < len(used) < len(collection.queries)
    assert all(used[q] == collection.negatives[q] for q in used)
    assert read_json(output / "sbmoe.json")["training"]["steps"] == 2


def test_listed_negatives_are_used_unless_turned_off(examples, tiny_bert_dir, tmp_path):
    path = write("triples-tsv", examples[:12], tmp_path)
    arguments = ["-q", "train", "--model", str(tiny_bert_dir), "--train-file", str(path)]
    arguments += ["--num-experts", "0", "--max-steps", "1", "--batch-size", "4"]
    arguments += ["--max-doc-length", "32", "--precision", "fp32"]
    assert main([*arguments, "--output", str(tmp_path / "used")]) == 0
    start = read_json(tmp_path / "used" / "training" / "config.json")
    assert start["train_config"]["hard_negatives"] == 1  # one listed negative per query, by default
    assert (tmp_path / "used" / "training" / "negatives.json").exists()
    with pytest.warns(DataWarning, match=r"negatives it lists are not used \(--no-file-negatives\)"):
        assert main([*arguments, "--output", str(tmp_path / "unused"), "--no-file-negatives"]) == 0
    assert read_json(tmp_path / "unused" / "training" / "config.json")["train_config"]["hard_negatives"] == 0


def test_train_takes_a_collection_or_a_training_file(examples, scifact_slice, tmp_path, capsys):
    path = write("triples-jsonl", examples[:4], tmp_path)
    common = ["train", "--model", "unused", "--output", str(tmp_path / "m")]
    assert main([*common, "--data", str(scifact_slice), "--train-file", str(path)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(common) == 2
    assert "give a collection (--data) or a training file (--train-file)" in capsys.readouterr().err


TEVATRON_LINE = {"query_id": "1", "query": "q", "positive_passages": [{"docid": "d1", "text": "a"}]}


@pytest.mark.parametrize(
    ("name", "lines", "message"),
    [
        ("t.jsonl", [TEVATRON_LINE, {"query": "q2"}], r'line 2: missing field "positive_passages"'),
        (
            "t.jsonl",
            [{**TEVATRON_LINE, "positive_passages": [{"docid": "d1", "text": 7}]}],
            r'line 1: field "positive_passages\[0\].text" must be a string, got number',
        ),
        (
            "t.jsonl",
            [{**TEVATRON_LINE, "negative_passages": [{"title": "", "text": " "}]}],
            r'line 1: field "negative_passages\[0\]" has an empty title and text',
        ),
        ("t.jsonl", [TEVATRON_LINE, {**TEVATRON_LINE, "positive_passages": []}], r"line 2: .* is empty"),
        (
            "t.jsonl",
            [
                TEVATRON_LINE,
                {**TEVATRON_LINE, "query_id": "2", "positive_passages": [{"docid": "d1", "text": "b"}]},
            ],
            r"line 2: docid 'd1' names another passage",
        ),
        (
            "t.jsonl",
            [TEVATRON_LINE, {**TEVATRON_LINE, "query": "other"}],
            r'line 2: field "query_id" .1. had another',
        ),
        ("p.jsonl", [{"anchor": "q", "query": "q", "positive": "p"}], r'line 1: .* both field "query" and'),
        ("p.jsonl", [{"anchor": "q", "positive": 3}], r'line 1: field "positive" must be a string or a list'),
        (
            "p.jsonl",
            [{"query": "q", "positive": "p", "negative": ["n", None]}],
            r'"negative\[1\]" .* got null',
        ),
        ("p.jsonl", [{"query": "q", "positive": "p"}, "{not json"], r"line 2: invalid JSON"),
        ("p.jsonl", [{"query": "", "positive": "p"}], r'line 1: field "query" is empty'),
        ("p.tsv", ["q\tp\tn", "", "only one column"], r"line 3: expected tab-separated .* got 1 column"),
        ("p.tsv", ["q\t \tn"], r'line 1: field "positive" is empty'),
        ("p.tsv", [b"q\tp\xff"], r"line 1: not valid UTF-8"),
        ("p.tsv", [""], r"no training examples"),
    ],
)
def test_bad_training_files_name_file_line_and_field(name, lines, message, tmp_path):
    path = tmp_path / name
    encoded = [
        line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode()
        for line in lines
    ]
    path.write_bytes(b"\n".join(encoded) + b"\n")
    with pytest.raises(DataError, match=f"^{path}.*{message}"):
        load_training_file(path)


def test_a_dataset_dict_gives_its_train_split_and_bad_folders_are_named(scifact_slice, tmp_path):
    import datasets

    pairs = datasets.Dataset.from_dict({"query": ["a", "b"], "positive": ["x", "y"]})
    datasets.DatasetDict({"train": pairs, "test": pairs.select([0])}).save_to_disk(tmp_path / "dict")
    assert sorted(load_training_file(tmp_path / "dict").queries.values()) == ["a", "b"]
    datasets.DatasetDict({"dev": pairs, "test": pairs}).save_to_disk(tmp_path / "no-train")
    with pytest.raises(DataError, match=r"no-train: no 'train' split among \['dev', 'test'\]"):
        load_training_file(tmp_path / "no-train")
    dataset = tmp_path / "pairs"
    datasets.Dataset.from_dict({"anchor": ["a", "b", "c"], "positive": ["x", "y", None]}).save_to_disk(
        dataset
    )
    with pytest.raises(DataError, match=f'^{dataset} row 2: field "positive" must be a string, got null'):
        load_training_file(dataset)
    no_positive = tmp_path / "anchors"
    datasets.Dataset.from_dict({"anchor": ["a"], "text": ["x"]}).save_to_disk(no_positive)
    with pytest.raises(DataError, match=f'^{no_positive} row 0: missing field "positive"'):
        load_training_file(no_positive)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        load_training_file(tmp_path / "empty")
    with pytest.raises(DataError, match="is a BEIR folder: train on it with --data"):
        load_training_file(scifact_slice)
    with pytest.raises(MissingInputError, match="no such training file"):
        load_training_file(tmp_path / "absent.jsonl")


def test_a_negative_that_is_also_a_positive_stays_a_positive(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"query": "q", "positive": "a", "negative": ["b", "c"]}, {"query": "q", "positive": "b"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    with pytest.warns(DataWarning, match="1 listed negatives are also positives"):
        collection = load_training_file(path)
    (query_id,) = collection.queries
    texts = {doc_id: doc.text for doc_id, doc in collection.corpus.items()}
    assert sorted(texts[d] for d in collection.qrels["train"][query_id]) == ["a", "b"]
    assert [texts[d] for d in collection.negatives[query_id]] == ["c"]


def test_a_passage_given_with_and_without_its_docid_is_not_its_own_negative(tmp_path):
    path = tmp_path / "tevatron.jsonl"
    record = {
        "query_id": "1",
        "query": "a",
        "positive_passages": [{"docid": "1", "text": "x"}],
        "negative_passages": [{"text": "x"}, {"text": "y"}],
    }
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.warns(DataWarning, match="1 listed negatives are also positives"):
        collection = load_training_file(path)
    assert [collection.corpus[d].text for d in collection.negatives["1"]] == ["y"]


def test_trailing_tabs_in_a_tsv_line_are_ignored(tmp_path):
    path = tmp_path / "triples.tsv"
    path.write_text("q1\tp1\t\nq2\tp2\tn2\t\t\n", encoding="utf-8")
    collection = load_training_file(path)
    assert len(collection.queries) == 2
    assert sum(len(negatives) for negatives in collection.negatives.values()) == 1
