"""`sbmoe index` resumes: a run killed mid-corpus, run again, encodes only the chunks it lacks."""

from __future__ import annotations

import math

import numpy as np
import pytest

import sbmoe.inference.encoding as encoding
import sbmoe.retrieval.indexing as retrieval
from sbmoe.config.jobs import EncodeConfig, JobOptions
from sbmoe.config.model import ModelConfig
from sbmoe.data.beir import load_collection
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.index import DenseIndex

ENCODE = EncodeConfig(backend="torch", precision="fp32")


def test_an_interrupted_index_resumes_at_its_unfinished_chunk(
    tiny_bert_dir, scifact_slice, tmp_path, monkeypatch
):
    monkeypatch.setattr(retrieval, "INDEX_CHUNK_SIZE", 16)
    retriever = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=2), device="cpu")
    collection = load_collection(scifact_slice)
    chunks = math.ceil(len(collection.corpus) / 16)
    assert chunks >= 4
    encoded: list[int] = []
    original = encoding._run_batches

    def interrupted_at_the_third_chunk(retriever, texts, *args, **kwargs):
        if len(encoded) == 2 and interrupt:
            raise KeyboardInterrupt  # as if killed while encoding the third chunk
        encoded.append(len(texts))
        return original(retriever, texts, *args, **kwargs)

    monkeypatch.setattr(encoding, "_run_batches", interrupted_at_the_third_chunk)
    output = tmp_path / "index"
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        retrieval.index_corpus(
            retriever, collection, output, encode=ENCODE, options=JobOptions(show_progress=False)
        )
    assert not output.exists() and len(list((tmp_path / ".index.chunks").glob("*.npy"))) == 2

    interrupt, encoded = False, []
    retrieval.index_corpus(
        retriever, collection, output, encode=ENCODE, options=JobOptions(show_progress=False)
    )
    assert len(encoded) == chunks - 2  # the two finished chunks came from disk
    assert not (tmp_path / ".index.chunks").exists()  # cleaned up once the index is saved
    documents = {d: collection.corpus[d].full_text for d in collection.corpus}
    whole = retrieval.build_index(retriever, documents, encode=ENCODE)  # one pass, no chunks
    np.testing.assert_allclose(DenseIndex.load(output).vectors(), whole.vectors(), atol=1e-6)
