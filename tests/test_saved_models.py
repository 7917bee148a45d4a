"""Models saved by an earlier sbmoe keep loading, in sbmoe and in plain sentence-transformers.

``tests/fixtures/saved-0.1`` holds two tiny models saved by sbmoe 0.1.0 before the subpackage move
(their ``modules.json`` name ``sbmoe.moe_head.MoEHead`` and ``sbmoe.adapters.LinearAdapter``) with
the embeddings that code computed. They must load and give the same embeddings forever after.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from sbmoe.config.jobs import EncodeConfig
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.adapters import LinearAdapter
from sbmoe.model.moe_head import MoEHead
from sbmoe.model.retriever import Retriever

FIXTURES = Path(__file__).parent / "fixtures" / "saved-0.1"
FP32 = EncodeConfig(device="cpu", precision="fp32", backend="torch")
HEADS = {"moe": MoEHead, "linear": LinearAdapter}


def expected(name: str) -> dict:
    return json.loads((FIXTURES / name / "expected_embeddings.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_model_saved_by_0_1_loads_in_sbmoe_with_the_same_embeddings(name):
    retriever = Retriever.load(str(FIXTURES / name), device="cpu")
    assert isinstance(retriever.head_module, HEADS[name])
    saved = expected(name)
    for kind in ("query", "document"):
        embeddings = encode_texts(retriever, saved["texts"], kind, FP32)
        np.testing.assert_allclose(embeddings, np.array(saved["embeddings"][kind]), atol=1e-6)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_model_saved_by_0_1_loads_in_plain_sentence_transformers(name):
    model = SentenceTransformer(str(FIXTURES / name), device="cpu", trust_remote_code=True)
    assert isinstance(model[2], HEADS[name])
    saved = expected(name)
    embeddings = model.encode(saved["texts"], convert_to_numpy=True)
    np.testing.assert_allclose(embeddings, np.array(saved["embeddings"]["document"]), atol=1e-6)


def test_the_fixtures_name_the_old_import_paths():
    """What this test guards: the paths written by 0.1.0, not whatever today's code would write."""
    types = {name: json.loads((FIXTURES / name / "modules.json").read_text())[2]["type"] for name in HEADS}
    assert types == {"moe": "sbmoe.moe_head.MoEHead", "linear": "sbmoe.adapters.LinearAdapter"}


def test_a_model_folder_that_brings_its_own_code_is_refused_before_anything_runs(tmp_path):
    """Loading an sbmoe model lets sentence-transformers import its head; no other code may come along."""
    import shutil

    from sbmoe.core.errors import ModelLoadError

    marker = tmp_path / "ran"
    evil = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"

    with_auto_map = tmp_path / "auto-map"
    shutil.copytree(FIXTURES / "moe", with_auto_map)
    (with_auto_map / "evil.py").write_text(evil, encoding="utf-8")
    config = json.loads((with_auto_map / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (with_auto_map / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config\.json: auto_map names Python code"):
        Retriever.load(str(with_auto_map), device="cpu")

    foreign_stage = tmp_path / "foreign-stage"
    shutil.copytree(FIXTURES / "moe", foreign_stage)
    modules = json.loads((foreign_stage / "modules.json").read_text())
    modules[2]["type"] = "evil.EvilStage"
    (foreign_stage / "modules.json").write_text(json.dumps(modules))
    (foreign_stage / "evil.py").write_text(evil, encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"modules\.json: stage type 'evil\.EvilStage'"):
        Retriever.load(str(foreign_stage), device="cpu")
    assert not marker.exists()
