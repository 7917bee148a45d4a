"""``irds:`` collections: real SciFact read through ir_datasets' own beir/scifact handler, no network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
import zipfile

import pytest

from sbmoe.core.errors import DataError
from sbmoe.data.beir import load_collection, resolve_data


@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory) -> dict[str, object]:
    """``irds:beir/scifact/test`` and ``irds:beir/scifact`` from a local copy in $IR_DATASETS_HOME.

    ir_datasets finds the BEIR archive at ``$IR_DATASETS_HOME/beir/scifact/source.zip`` and reads it
    without downloading. It fixes its home when first imported (ranx imports it), so the export runs
    in a fresh interpreter.
    """
    work = tmp_path_factory.mktemp("irds")
    archive = work / "home" / "beir" / "scifact" / "source.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
            zipped.write(data_dir / "scifact" / name, f"scifact/{name}")
    code = (
        "import sys\nfrom sbmoe.data.beir import resolve_data\n"
        "for name in sys.argv[2:]:\n    print(resolve_data(name, cache_dir=sys.argv[1]))\n"
    )
    names = ["irds:beir/scifact/test", "irds:beir/scifact"]
    env = {**os.environ, "IR_DATASETS_HOME": str(work / "home")}
    result = subprocess.run(
        [sys.executable, "-c", code, str(work / "cache"), *names],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    paths = result.stdout.split()
    return {name: load_collection(path) for name, path in zip(names, paths, strict=True)}


def test_a_split_dataset_is_the_collection_with_that_split(exported, data_dir):
    original = load_collection(data_dir / "scifact")
    collection = exported["irds:beir/scifact/test"]
    assert collection.name == "beir__scifact__test"
    assert collection.corpus == original.corpus
    assert collection.splits() == ["test"]
    assert collection.split_qrels("test") == original.split_qrels("test")
    assert collection.queries == {q: original.queries[q] for q in original.split_qrels("test")}


def test_a_dataset_without_qrels_takes_its_subsets_as_splits(exported, data_dir):
    original = load_collection(data_dir / "scifact")
    collection = exported["irds:beir/scifact"]
    assert collection.corpus == original.corpus and collection.queries == original.queries
    assert collection.qrels == original.qrels


def test_no_network_and_no_local_copy_is_one_clear_line(tmp_path):
    import ir_datasets
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.formats import TrecQrels, TsvDocs, TsvQueries
    from ir_datasets.util import Download, RequestsDownload

    with socket.socket() as probe:  # a port nothing listens on: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/docs.tsv"
    name = f"sbmoe-test/unreachable-{uuid.uuid4().hex}"
    ir_datasets.registry.register(
        name,
        Dataset(
            TsvDocs(Download([RequestsDownload(url)])),
            TsvQueries(Download([RequestsDownload(url)])),
            TrecQrels(Download([RequestsDownload(url)]), {}),
        ),
    )
    with pytest.raises(DataError) as caught:
        resolve_data(f"irds:{name}", cache_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"irds:{name}: ir_datasets could not read or download it (ConnectionError")
    assert "$IR_DATASETS_HOME" in message and "\n" not in message
    assert not (tmp_path / "irds" / name.replace("/", "__")).exists()  # nothing half-written is kept

    with pytest.raises(DataError, match="irds:no-such/dataset: not a dataset ir_datasets knows"):
        resolve_data("irds:no-such/dataset", cache_dir=tmp_path)


def test_grades_that_mean_non_relevant_to_their_collection_are_named():
    """ANTIQUE grades non-answers 1 and 2; sbmoe counts every grade above 0, and says what they mean."""
    import ir_datasets

    from sbmoe.core.errors import DataWarning
    from sbmoe.data.irds import _warn_grades

    with pytest.warns(DataWarning, match=r"irds:antique/test: every grade above 0 counts as relevant.*1 = "):
        _warn_grades("antique/test", {"test": ir_datasets.load("antique/test")})
