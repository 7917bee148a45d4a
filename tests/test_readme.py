"""The Python examples of the README and of the documentation site run as written.

As tests/test_model_card.py does for model cards. The README keeps the quickstart; the other
examples moved to ``docs/`` (the model, training files, the Python API), so the blocks are collected
from the README and every page, each compiled under the name of the file it lives in, and a block
that two files share runs once.

No substitution in the code: the examples name all-MiniLM-L6-v2, which loads here from its offline
copy, and SciFact, which ``resolve_data`` finds in ``$SBMOE_DATA_DIR``. There the test puts a real
slice of SciFact under that name (60 test queries, 60 training queries, their positives and 150
other documents: about 300 of the 5,183), so the real MiniLM encodes it in seconds rather than
minutes on 2 cores; the examples run unchanged. The Python API example runs first, since the others
load the model it trains (``runs/moe``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_beir_slice

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def documented_python_blocks() -> list[tuple[str, str]]:
    """(file relative to the repository, block) for every Python block, each distinct block once."""
    files = [README, *sorted(DOCS.rglob("*.md"))]
    blocks: dict[str, str] = {}
    for path in files:
        for block in python_blocks(path.read_text(encoding="utf-8")):
            blocks.setdefault(block, str(path.relative_to(REPO)))
    return [(where, block) for block, where in blocks.items()]


def test_the_readme_has_python_examples_that_import():
    assert python_blocks(README.read_text(encoding="utf-8")), "the README lost its Python quickstart"
    blocks = documented_python_blocks()
    where = {name for name, _ in blocks}
    # The examples that moved to the site: the model, a Hugging Face training file, the Python API.
    assert {"docs/model.md", "docs/guide/training-files.md", "README.md"} <= where, where
    for name, block in blocks:  # at least every import resolves, in every run of the suite
        imports = "\n".join(line for line in block.splitlines() if line.startswith(("from ", "import ")))
        exec(compile(imports, name, "exec"), {})


@pytest.mark.integration
def test_the_readme_python_examples_run_as_written(data_dir, tmp_path, monkeypatch, capsys):
    sliced = tmp_path / "data"
    write_beir_slice(data_dir / "scifact", sliced / "scifact", n_train=60, n_test=60, n_other_docs=150)
    monkeypatch.setenv("SBMOE_DATA_DIR", str(sliced))
    monkeypatch.chdir(tmp_path)  # the examples write under runs/
    blocks = documented_python_blocks()
    blocks.sort(key=lambda item: "sbmoe.train(" not in item[1])  # the quickstart first (stable)
    namespaces = []
    for name, block in blocks:
        namespaces.append({})
        exec(compile(block, name, "exec"), namespaces[-1])
    printed = capsys.readouterr().out
    scores = re.search(r"\{'top1': ([0-9.]+), 'all': ([0-9.]+)\}", printed)
    assert scores and all(0.5 < float(value) < 1 for value in scores.groups()), printed
    assert (tmp_path / "runs" / "moe-index" / "meta.json").is_file()
    # The model card's promise: the same embeddings in plain sentence-transformers as in sbmoe.
    from sbmoe.config.jobs import EncodeConfig
    from sbmoe.data.training_files import load_training_file
    from sbmoe.inference.encoding import encode_texts

    [loaded] = [namespace for namespace in namespaces if "embeddings" in namespace]
    ours = encode_texts(loaded["retriever"], ["a query"], "query", EncodeConfig(precision="fp32"))
    np.testing.assert_allclose(loaded["embeddings"], ours, atol=2e-5)
    pairs = load_training_file(tmp_path / "pairs")
    assert list(pairs.queries.values()) == ["vitamin D and depression"] and len(pairs.corpus) == 3
