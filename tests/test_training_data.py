"""The training pairs: all of a split's judgements, or a seeded sample of them (the data axis)."""

from __future__ import annotations

import pytest

from sbmoe.config.model import ModelConfig
from sbmoe.config.train import TrainConfig
from sbmoe.core.errors import UsageError
from sbmoe.data.beir import load_collection
from sbmoe.model.retriever import Retriever
from sbmoe.training.training_data import prepare_training_data


@pytest.fixture(scope="module")
def retriever_and_collection(tiny_bert_dir, scifact_slice):
    return Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu"), (
        load_collection(scifact_slice)
    )


def pairs_of(retriever_and_collection, tmp_path, **settings):
    retriever, collection = retriever_and_collection
    config = TrainConfig(dev_split=None, dev_fraction=0.2, **settings)
    return prepare_training_data(retriever, collection, config, tmp_path)


def test_max_train_pairs_draws_a_seeded_sample_and_keeps_every_judgement(retriever_and_collection, tmp_path):
    everything = pairs_of(retriever_and_collection, tmp_path, seed=1)
    sample = pairs_of(retriever_and_collection, tmp_path, seed=1, max_train_pairs=10)
    again = pairs_of(retriever_and_collection, tmp_path, seed=1, max_train_pairs=10)
    other_seed = pairs_of(retriever_and_collection, tmp_path, seed=2, max_train_pairs=10)
    assert len(everything.pairs) > 10
    assert len(sample.pairs) == 10 and set(sample.pairs) < set(everything.pairs)
    assert sample.pairs == again.pairs
    assert set(other_seed.pairs) != set(sample.pairs)
    # Every judgement of the split still masks false negatives in a batch.
    assert sample.train_qrels == everything.train_qrels


def test_more_pairs_than_there_are_trains_on_all_of_them(retriever_and_collection, tmp_path):
    everything = pairs_of(retriever_and_collection, tmp_path, seed=1)
    more = pairs_of(retriever_and_collection, tmp_path, seed=1, max_train_pairs=10**6)
    assert more.pairs == everything.pairs


def test_a_sample_too_small_for_in_batch_negatives_is_refused():
    with pytest.raises(UsageError, match="max_train_pairs must be >= 2, got 1"):
        TrainConfig(max_train_pairs=1).validate()
