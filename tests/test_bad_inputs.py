"""Bad inputs that used to be accepted silently or end in a traceback: damaged models, odd qrels,
empty texts, mistyped grids, sizes no machine has, unknown metrics. Each ends in one line (exit 2),
before any work, or in a counted warning, as a user meets it.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from test_safety import refused, tree_hash

from sbmoe.cli.main import main
from sbmoe.config.checks import RANX_METRICS, is_metric_name
from sbmoe.config.jobs import EncodeConfig, EvaluateConfig, JobOptions, ReportConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core.errors import DataWarning, UsageError
from sbmoe.data.beir import load_collection, read_queries
from sbmoe.evaluation.evaluate import evaluate_model
from sbmoe.evaluation.metrics import evaluate_run
from sbmoe.model.retriever import Retriever


@pytest.fixture(scope="module")
def saved_model(tiny_bert_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad-inputs") / "model"
    Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=3), device="cpu").save(
        directory
    )
    return directory


def damaged_copy(saved_model, tmp_path, record="sbmoe.json", **config_changes):
    """A copy of ``saved_model`` with ``config_changes`` in ``record``: ``sbmoe.json``'s model config,
    or a stage's ``config.json`` (the head's settings are in the head's, ``2_MoEHead/config.json``)."""
    copy = tmp_path / "damaged"
    shutil.copytree(saved_model, copy)
    if config_changes:
        path = copy / record
        saved = json.loads(path.read_text(encoding="utf-8"))
        (saved["model_config"] if record == "sbmoe.json" else saved).update(config_changes)
        path.write_text(json.dumps(saved), encoding="utf-8")
    return copy


HEAD_RECORD = "2_MoEHead/config.json"


@pytest.mark.parametrize(
    ("record", "changes", "expected"),
    [
        (HEAD_RECORD, {"num_experts": "six"}, "num_experts must be int, got 'six'"),
        (HEAD_RECORD, {"expert_pooling": "bogus"}, "expert_pooling must be one of"),
        ("sbmoe.json", {"pooling": "median"}, "pooling must be one of"),
        (HEAD_RECORD, {"num_experts": 5}, "does not fit the weights beside it"),
    ],
)
def test_a_model_config_that_does_not_fit_is_refused_on_load(
    saved_model, tmp_path, capsys, record, changes, expected
):
    model = damaged_copy(saved_model, tmp_path, record, **changes)
    before = tree_hash(model)
    query = ["search", "--model", str(model), "--index", str(tmp_path / "none"), "--query", "cells"]
    refused(capsys, query, record, expected)
    assert tree_hash(model) == before


def test_truncated_or_empty_weights_end_in_one_line(saved_model, tmp_path, capsys):
    model = damaged_copy(saved_model, tmp_path)
    weights = model / "model.safetensors"
    for damage in (lambda data: data[: len(data) // 2], lambda data: b""):
        weights.write_bytes(damage((saved_model / "model.safetensors").read_bytes()))
        query = ["search", "--model", str(model), "--index", str(tmp_path / "none"), "--query", "cells"]
        refused(capsys, query, "could not load a model from directory", str(model))


@pytest.mark.parametrize(
    ("source", "config", "key", "expected"),
    [
        ("plain", "config.json", "hidden_size", "sets sizes (hidden_size, vocab_size...) that do not fit"),
        ("sbmoe", "config.json", "hidden_size", "sets sizes (hidden_size, vocab_size...) that do not fit"),
        (
            "sbmoe",
            "2_MoEHead/config.json",
            "num_experts",
            "does not fit the weights beside it (size mismatch",
        ),
    ],
)
def test_a_config_whose_sizes_do_not_fit_the_weights_is_named_in_one_line(
    saved_model, tiny_bert_dir, tmp_path, capsys, source, config, key, expected
):
    """Before, a RuntimeError traceback (after transformers' table of every mismatched weight)."""
    model = tmp_path / "model"
    shutil.copytree({"plain": tiny_bert_dir, "sbmoe": saved_model}[source], model)
    edited = model / config
    edited.write_text(
        json.dumps({**json.loads(edited.read_text(encoding="utf-8")), key: 48}), encoding="utf-8"
    )
    before = tree_hash(model)
    capsys.readouterr()
    query = ["search", "--model", str(model), "--index", str(tmp_path / "none"), "--query", "cells"]
    assert main(["-q", *query]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(edited) in err and expected in err, err
    assert tree_hash(model) == before


def test_negative_qrels_count_as_not_relevant_with_one_warning(scifact_slice, tmp_path):
    original = load_collection(scifact_slice)
    collection = tmp_path / "negative"
    shutil.copytree(scifact_slice, collection)
    query_id, judged = next(iter(original.split_qrels("test").items()))
    unjudged = next(d for d in original.corpus if d not in judged)
    with (collection / "qrels" / "test.tsv").open("a", encoding="utf-8") as handle:
        handle.write(f"{query_id}\t{unjudged}\t-1\n")
    with pytest.warns(DataWarning, match=r"test.tsv: 1 qrels rows have a negative score"):
        loaded = load_collection(collection)
    assert loaded.split_qrels("test")[query_id][unjudged] == 0
    # Ranked above the relevant documents, the -1 document costs nothing, as in BEIR: every score is
    # the one the collection without that row gives.
    run = {q: {unjudged: 2.0, **{d: 1.0 for d in docs}} for q, docs in original.split_qrels("test").items()}
    with_row = evaluate_run(loaded.split_qrels("test"), run).per_query
    assert with_row == evaluate_run(original.split_qrels("test"), run).per_query
    assert with_row["ndcg@10"][query_id] < 1.0  # the run does rank a non-relevant document first


def test_empty_queries_and_documents_are_counted(scifact_slice, tmp_path):
    collection = tmp_path / "empty"
    shutil.copytree(scifact_slice, collection)
    queries = [json.loads(line) for line in (collection / "queries.jsonl").read_text().splitlines()]
    queries[0]["text"] = queries[1]["text"] = "   "
    (collection / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    corpus = [json.loads(line) for line in (collection / "corpus.jsonl").read_text().splitlines()]
    corpus[0]["title"], corpus[0]["text"] = "", ""
    (collection / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_collection(collection)
        read_queries(collection / "queries.jsonl")
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("corpus.jsonl: 1 documents with an empty title and text" in m for m in messages)
    assert sum("queries.jsonl: 2 queries with an empty text" in m for m in messages) == 2


def test_a_grid_with_mistyped_experts_is_refused_before_any_cell(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: typo\nbackbones: [all-MiniLM-L6-v2]\ncollections: [scifact]\n"
        "variants: {sb-moe: {}}\nexperts: ['3']\n",
        encoding="utf-8",
    )
    refused(capsys, ["experiment", str(grid), "--list"], str(grid), "`experts` must be whole numbers")


@pytest.mark.parametrize(
    "damaged", ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
)
def test_a_damaged_checkpoint_on_resume_is_named_in_one_line(
    tiny_bert_dir, scifact_slice, tmp_path, capsys, monkeypatch, damaged
):
    from test_safety import train_args

    from sbmoe.training.trainer import Trainer

    output = tmp_path / "run"
    argv = [
        "-q",
        *train_args(tiny_bert_dir, scifact_slice, output, "--max-steps", "4", "--checkpoint-steps", "2"),
    ]
    original = Trainer.training_step

    def killed_at_step_3(self, positions):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self, positions)

    monkeypatch.setattr(Trainer, "training_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(Trainer, "training_step", original)
    target = output / "training" / "checkpoint" / damaged
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 3])
    refused(capsys, argv[1:], str(target))


def test_training_that_diverges_ends_in_one_line_and_claims_no_finished_model(
    tiny_bert_dir, scifact_slice, tmp_path, capsys
):
    """Before, a FloatingPointError traceback. Run again the same way, it diverges again, never 'finished'."""
    from test_safety import train_args, train_steps

    output = tmp_path / "run"
    argv = train_args(
        tiny_bert_dir,
        scifact_slice,
        output,
        "--max-steps",
        "6",
        "--checkpoint-steps",
        "1",
        "--lr-backbone",
        "1e9",
    )
    for _ in range(2):
        line = refused(
            capsys, argv, "the training loss became non-finite", "--lr-backbone 1e+09", "--overwrite"
        )
        assert f"at step {train_steps(output)[-1]}:" in line
        assert not (output / "sbmoe.json").exists() and not (output / "training" / "done.json").exists()
    refused(
        capsys, evaluate_args(output, scifact_slice, tmp_path / "eval"), "could not load a model", str(output)
    )


def test_a_grid_cell_that_diverges_says_which_grid_keys_to_lower_and_then_runs(
    tiny_bert_dir, scifact_slice, tmp_path, monkeypatch
):
    """Before, the cell's error suggested --lr-backbone and --overwrite, which `sbmoe experiment` lacks."""
    import yaml

    from sbmoe.study.experiments import run_experiment
    from sbmoe.study.grid import load_grid

    monkeypatch.setenv("SBMOE_DATA_DIR", str(scifact_slice.parent))
    settings = {
        "name": "diverging",
        "backbones": [str(tiny_bert_dir)],
        "collections": [scifact_slice.name],
        "seeds": [1],
        "experts": [2],
        "transfer": False,
        "variants": {"sb-moe": {"gating": "learned"}},
        "model": {"max_doc_length": 32},
        "train": {"max_steps": 3, "batch_size": 8, "precision": "fp32", "lr_backbone": 1e9, "lr_head": 1e9},
    }
    grid_file, output = tmp_path / "grid.yaml", tmp_path / "out"
    grid_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
    quiet = JobOptions(show_progress=False)
    ((cell, message),) = run_experiment(load_grid(grid_file), output, quiet).failed.items()
    assert "lr_backbone / lr_head (now 1e+09 / 1e+09)" in message and "--" not in message, message
    assert f"delete {output / 'cells' / cell}" in message
    settings["train"].update(lr_backbone=2e-5, lr_head=1e-3)
    grid_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
    shutil.rmtree(output / "cells" / cell)  # as the message says
    assert run_experiment(load_grid(grid_file), output, quiet).finished == [cell]


# ------------------------------------------------------------------------------------ checks before work
def evaluate_args(model, data, output, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--data", str(data), "--output", str(output), *extra]


@pytest.fixture
def no_encoding(monkeypatch):
    """Fail the test if anything is encoded: the refusals below must come before any encoding."""
    import sbmoe.inference.encoding as encoding

    def refuse(*args, **kwargs):
        raise AssertionError("encoding started before the bad setting was refused")

    monkeypatch.setattr(encoding, "_run_batches", refuse)


@pytest.mark.parametrize(
    ("flags", "cause"),
    [
        (["--num-experts", "100000"], "num_experts must be <= 256, got 100000: each expert holds"),
        (["--batch-size", "100000"], "batch_size 100000 with hard_negatives 0 makes 10,000,000,000"),
        (["--hard-negatives", "100000"], "hard_negatives must be <= 256, got 100000"),
        (["--encode-batch-size", "1000000"], "encode_batch_size must be <= 8192, got 1000000"),
        (["--negatives-depth", "10000000"], "negatives_depth must be <= 100000"),
        (["--seed", "-1"], "seed must be in [0, 2**32 - 1]"),
        (["--seed", str(2**70)], f"seed must be in [0, 2**32 - 1] (what NumPy accepts), got {2**70}"),
        (["--epochs", "-1", "--max-steps", "3"], "epochs must be >= 1, got -1"),
        (["--epochs", "0", "--max-steps", "3"], "epochs must be >= 1, got 0"),
        (
            ["--max-doc-length", "100000"],
            "max_doc_length (--max-doc-length) is 100000 tokens, more than the 128",
        ),
        (["--max-query-length", "129"], "max_query_length (--max-query-length) is 129 tokens"),
        (  # before, accepted without a word (and with --hard-negatives, failed after loading)
            ["--negatives-source", "no-such-negatives.json"],
            "negatives_source (--negatives-source) 'no-such-negatives.json' is neither bm25, dense",
        ),
    ],
)
def test_train_refuses_impossible_sizes_before_any_work(
    tiny_bert_dir, scifact_slice, tmp_path, capsys, no_encoding, flags, cause
):
    from test_safety import train_args

    refused(capsys, train_args(tiny_bert_dir, scifact_slice, tmp_path / "run", *flags), cause)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "cause"),
    [
        (["--metrics", "ndcg@10", "bogus@10"], "metric 'bogus@10' is not supported; use one of hits,"),
        (["--metrics", "ndcg@0"], "metric 'ndcg@0' is not supported"),
        (
            ["--max-doc-length", "100000"],
            "max_doc_length (--max-doc-length) is 100000 tokens, more than the 128",
        ),
        (["--top-k", "1000000000"], "top_k must be <= 100000"),
        (["--encode-batch-size", "1000000"], "encode_batch_size must be <= 8192"),
        # before, tracebacks: "PyTorch is not linked with support for mps devices", FileExistsError
        (["--device", "mps"], "device 'mps' is not available here: use auto, cpu, cuda or cuda:N"),
        (["--cache-dir", "note.txt/cache"], "--cache-dir note.txt/cache: note.txt is a file, not a folder"),
    ],
)
def test_evaluate_refuses_bad_settings_before_encoding(
    tiny_bert_dir, scifact_slice, tmp_path, capsys, no_encoding, flags, cause, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "note.txt").write_text("mine\n", encoding="utf-8")
    refused(capsys, evaluate_args(tiny_bert_dir, scifact_slice, tmp_path / "eval", *flags), cause)
    assert not (tmp_path / "eval").exists()


def test_every_metric_name_that_validation_accepts_is_computed_by_ranx():
    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}}
    run = {"q1": {"d1": 0.9, "d4": 0.8, "d2": 0.1}, "q2": {"d3": 0.5}}
    names = [f"{name}@10" for name in RANX_METRICS] + ["mrr", "ndcg@5-l2", "rbp.95"]
    assert all(is_metric_name(name) for name in names)
    assert set(evaluate_run(qrels, run, names).metrics) == set(names)
    for wrong in ("NDCG@10", "ndcg@", "ndcg@ten", "recal@100", "ndcg@10-l0", "rbp"):
        assert not is_metric_name(wrong), wrong


def test_a_report_with_an_unknown_metric_or_seed_is_refused():
    with pytest.raises(UsageError, match="metric: metric 'ndgc@10' is not supported"):
        ReportConfig(metric="ndgc@10").validate()
    with pytest.raises(UsageError, match=r"randomization_seed must be in \[0, 2\*\*32 - 1\]"):
        ReportConfig(randomization_seed=-3).validate()


# ------------------------------------------------------------------------------- nothing silently accepted
@pytest.mark.parametrize("all_zero", [True, False], ids=["all-zero", "header-only"])
def test_a_split_without_any_relevant_judgement_is_refused_naming_its_file(
    scifact_slice, tmp_path, tiny_bert_dir, capsys, no_encoding, all_zero
):
    collection = tmp_path / "zero"
    shutil.copytree(scifact_slice, collection)
    qrels = collection / "qrels" / "test.tsv"
    original = [line.split("\t") for line in qrels.read_text(encoding="utf-8").splitlines()[1:]]
    rows = [f"{q}\t{d}\t0" for q, d, _ in original] if all_zero else []
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    before = tree_hash(collection)
    refused(
        capsys,
        evaluate_args(tiny_bert_dir, collection, tmp_path / "eval"),
        str(qrels),
        "no relevant judgement",
    )
    assert tree_hash(collection) == before and not (tmp_path / "eval").exists()


def test_expert_pooling_without_an_moe_head_is_ignored_with_one_warning(
    tiny_bert_dir, scifact_slice, tmp_path
):
    for config in (
        ModelConfig(backbone=str(tiny_bert_dir), num_experts=0, expert_pooling="all"),
        ModelConfig(backbone=str(tiny_bert_dir), head="linear", expert_pooling="topk", experts_top_k=9),
    ):
        with pytest.warns(UserWarning, match=r"expert_pooling='(all|topk)' is ignored: the model has no MoE"):
            config.validate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retriever = Retriever.from_config(config, device="cpu")
    assert retriever.config.expert_pooling == "top1"  # recorded as what applies
    with pytest.warns(UserWarning, match=r"expert_poolings \['topk'\] are ignored: .* has no MoE head"):
        outputs = evaluate_model(
            retriever,
            load_collection(scifact_slice),
            tmp_path / "eval",
            EvaluateConfig(expert_poolings=["topk"]),
            EncodeConfig(backend="torch", precision="fp32"),
            options=JobOptions(show_progress=False),
        )
    assert [output.name for output in outputs] == ["model"]


def test_a_grid_with_an_unknown_metric_is_refused_before_any_cell(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: typo\nbackbones: [all-MiniLM-L6-v2]\ncollections: [scifact]\n"
        "variants: {sb-moe: {}}\nevaluate: {metrics: [ndcg@10, bogus@10]}\n",
        encoding="utf-8",
    )
    refused(capsys, ["experiment", str(grid), "--list"], str(grid), "metric 'bogus@10' is not supported")


def test_a_model_path_that_is_a_file_is_named_as_a_file(tmp_path):
    """Before: "model directory ... does not exist" for a file that does."""
    from sbmoe.core.errors import ModelLoadError

    (tmp_path / "notes.txt").write_text("mine\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"notes\.txt' is a file, not a folder holding a model"):
        Retriever.load(str(tmp_path / "notes.txt"), device="cpu")
