"""Experiment grids: loading, expansion, running with skip/resume, failures recorded."""

from __future__ import annotations

import time

import pytest
import yaml

from sbmoe.config.jobs import JobOptions
from sbmoe.core.io import read_json
from sbmoe.study.experiments import run_experiment
from sbmoe.study.grid import cell_configs, expand, load_grid, save_grid

REPO_EXPERIMENTS = __import__("pathlib").Path(__file__).resolve().parents[1] / "experiments"

QUIET = JobOptions(show_progress=False)


def write_grid(path, **values):
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def tiny_grid(tmp_path, tiny_bert_dir, collections, max_steps, **values):
    """The fine-tuned baseline and SB-MoE (2 experts) on ``collections``, two seeds, a few steps."""
    return load_grid(
        write_grid(
            tmp_path / "grid.yaml",
            name="tiny",
            backbones=[str(tiny_bert_dir)],
            collections=collections,
            seeds=[1, 2],
            experts=[2],
            variants={"fine-tuned": {"num_experts": 0}, "sb-moe": {"gating": "learned"}},
            model={"max_doc_length": 32},
            train={"max_steps": max_steps, "batch_size": 8, "precision": "fp32"},
            **values,
        )
    )


def test_shipped_grids_load_and_expand():
    paper = load_grid(REPO_EXPERIMENTS / "paper.yaml")
    cells = expand(paper)
    # 4 backbones x 4 collections x (1 fine-tuned + 4 expert counts) x 1 seed
    assert len(cells) == 80
    tinybert = next(c for c in cells if c.backbone == "tinybert" and c.experts == 3)
    model, train = cell_configs(paper, tinybert)
    assert model.backbone == "huawei-noah/TinyBERT_General_4L_312D" and model.gating == "paper"
    assert (train.epochs, train.temperature, train.lr_head, train.lr_backbone) == (30, 1.0, 1e-4, 1e-6)
    contriever = next(c for c in cells if c.backbone == "contriever")
    assert cell_configs(paper, contriever)[1].temperature == 0.05
    cpu = expand(load_grid(REPO_EXPERIMENTS / "scifact-cpu.yaml"))
    assert len(cpu) == 2 * (1 + 3 + 2 * 3)  # zero-shot once; fine-tuned and SB-MoE per seed


def test_saved_grid_loads_back(tmp_path):
    grid = load_grid(REPO_EXPERIMENTS / "beyond-paper.yaml")
    assert load_grid(save_grid(grid, tmp_path / "again.yaml")) == grid


def test_expansion_ids_are_unique_and_overrides_layer(tmp_path):
    grid = load_grid(
        write_grid(
            tmp_path / "g.yaml",
            backbones=["bb"],
            collections=["c1", "c2"],
            seeds=[1, 2],
            experts=[2, 4],
            variants={"base": {"num_experts": 0, "train": {"lr_backbone": 1e-4}}, "moe": {"gating": "paper"}},
            train={"epochs": 3},
            transfer={"c1": ["c2"]},
        )
    )
    cells = expand(grid)
    assert len(cells) == 2 * (2 + 2 * 2)
    assert len({c.cell_id for c in cells}) == len(cells)
    base = next(c for c in cells if c.variant == "base")
    model, train = cell_configs(grid, base)
    assert (
        model.num_experts == 0 and train.lr_backbone == 1e-4 and train.epochs == 3 and train.seed == base.seed
    )
    moe = next(c for c in cells if c.variant == "moe" and c.experts == 4)
    assert cell_configs(grid, moe)[0].num_experts == 4 and cell_configs(grid, moe)[0].gating == "paper"
    # Every cell is evaluated on its own collection first, then on the grid's others (transfer).
    assert base.evaluate_on == (["c1", "c2"] if base.collection == "c1" else ["c2", "c1"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backbones": ["b"], "collections": ["c"]}, "variants"),
        ({"backbones": ["b"], "collections": ["c"], "variants": {"v": {}}, "colour": 1}, "unknown keys"),
        (
            {"backbones": ["b"], "collections": ["c"], "variants": {"v": {"experts": 3}}},
            "variant 'v' has unknown settings",
        ),
        ({"backbones": ["b"], "collections": ["c"], "variants": {"v": {}}, "train": {"lr": 1}}, "`train`"),
        ({"backbones": "b", "collections": ["c"], "variants": {"v": {}}}, "must be a list"),
        (
            {"backbones": ["b"], "collections": ["c"], "variants": {"v": {}}, "name": "../../x"},
            "plain folder name",
        ),
        # before, each cell failed on its own, after the cells before it had trained
        (
            {"backbones": ["b"], "collections": ["c"], "variants": {"v": {}}, "seeds": [-1]},
            "cell b__c__v__n6__s-1: seed must be",
        ),
        (
            {"backbones": ["b"], "collections": ["c"], "variants": {"v": {}}, "experts": [-3]},
            "`experts` must be whole numbers >= 1",
        ),
        (  # also where no variant uses the axis (the campaign's G-experts-neg: silently accepted)
            {
                "backbones": ["b"],
                "collections": ["c"],
                "variants": {"v": {"num_experts": 0}},
                "experts": [-3],
            },
            "`experts` must be whole numbers >= 1",
        ),
        (
            {"backbones": ["b"], "collections": ["c"], "variants": {"v": {}}, "train": {"epochs": 0}},
            "epochs must be",
        ),
    ],
)
def test_bad_grid_files_name_the_problem(tmp_path, values, message):
    path = write_grid(tmp_path / "bad.yaml", **values)
    with pytest.raises(ValueError, match=message) as info:
        load_grid(path)
    assert "bad.yaml" in str(info.value)


@pytest.mark.parametrize(
    ("axes", "named"),
    [
        (
            {"variants": {"zs a": {"gating": "learned"}, "zs_a": {"gating": "paper"}}},
            "variant 'zs a' and 'zs_a'",
        ),
        ({"variants": {"ZS": {}, "zs": {"gating": "paper"}}}, "variant 'ZS' and 'zs'"),
        ({"backbones": ["bb one", "bb/one"]}, "backbone 'bb one' and 'bb/one'"),
        ({"collections": ["c 1", "c_1"]}, "'c 1' and 'c_1' would share the evaluation folder 'c-1'"),
        ({"seeds": [1, 1]}, "a repeated entry would share the cell folder"),
    ],
)
def test_cells_that_would_share_a_folder_refuse_the_grid_before_any_work(tmp_path, capsys, axes, named):
    """Before, the second of two such cells was found "already finished" and never ran."""
    from sbmoe.cli.main import main

    values = {"backbones": ["bb"], "collections": ["c"], "variants": {"v": {}}, **axes}
    grid = write_grid(tmp_path / "grid.yaml", **values)
    output = tmp_path / "out"
    assert main(["-q", "experiment", str(grid), "--output", str(output)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(grid) in lines[0] and named in lines[0], lines
    assert not output.exists()


GRID_HEAD = "backbones: [bb]\ncollections: [c]\n"
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]\n"
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (GRID_HEAD + "variants: {v: 5}", "`variants` must be a mapping of name -> settings, got {'v': 5}"),
        (GRID_HEAD + "variants: {v: {}}\nmodel: 5", "`model` must be a mapping of settings, got 5"),
        ("backbones: [123]\ncollections: [c]\nvariants: {v: {}}", "`backbones` must be a list of names"),
        ("backbones: [[a]]\ncollections: [c]\nvariants: {v: {}}", "`backbones` must be a list of names"),
        ("backbones: [a]\ncollections: [[c]]\nvariants: {v: {}}", "`collections` must be a list of names"),
        (GRID_HEAD + "variants: {v: {}}\ntrain: 'epochs=2'", "`train` must be a mapping of settings"),
        (GRID_HEAD + "variants: {v: {train: 5}}", "variant 'v': `train` must be false or a mapping"),
        (GRID_HEAD + "variants: {v: {num_experts: [2]}}", "variant 'v': num_experts must be int, got [2]"),
        (
            GRID_HEAD + "variants: {v: {}}\ntransfer: {c: [[x]]}",
            "`transfer` must be true, false or a mapping",
        ),
        (GRID_HEAD + "variants: {v: {}}\nseeds: []", "`seeds` must be whole numbers (a non-empty list)"),
        (GRID_HEAD + "variants: {v: {}}\nvariants: {w: {}}", "key 'variants' is given twice at line 4"),
        ("", "expected a mapping of grid keys"),
        (LAUGHS + GRID_HEAD + "variants: {v: {model: *i}}", "aliases expand to more than 100,000 values"),
        (GRID_HEAD + "variants: &v {v: *v}", "an alias refers to the value that holds it"),
    ],
)
def test_a_malformed_grid_file_is_refused_in_one_line_naming_the_field(tmp_path, capsys, text, named):
    """Wrong types ended in a TypeError traceback; a second key was silently dropped; aliases could
    stand for billions of values."""
    from sbmoe.cli.main import main

    grid = tmp_path / "grid.yaml"
    grid.write_text(text + "\n", encoding="utf-8")
    started = time.perf_counter()
    assert main(["-q", "experiment", str(grid), "--output", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 10
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{grid}: " in lines[0] and named in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_grid_runs_skips_finished_cells_and_records_failures(
    tiny_bert_dir, scifact_slice, tmp_path, monkeypatch
):
    monkeypatch.setenv("SBMOE_DATA_DIR", str(scifact_slice.parent))
    grid = tiny_grid(
        tmp_path,
        tiny_bert_dir,
        [scifact_slice.name, "no-such-collection"],
        max_steps=2,
        transfer=False,
        evaluate={"expert_poolings": ["top1", "all"]},
    )
    output = tmp_path / "out"
    first = run_experiment(grid, output, JobOptions(show_progress=False, command=["sbmoe", "experiment"]))
    assert len(first.finished) == 4 and len(first.failed) == 4  # the missing collection fails alone
    failed = next(iter(first.failed))
    assert "no-such-collection" in read_json(output / "cells" / failed / "error.json")["error"]
    moe = next(c for c in first.finished if "sb-moe" in c)
    done = read_json(output / "cells" / moe / "done.json")
    assert set(done["evaluations"][scifact_slice.name]) == {"top1", "all"}
    routing = read_json(output / "cells" / moe / "eval" / scifact_slice.name / "routing.json")
    assert sum(routing["documents"]["usage"]) == pytest.approx(1.0)

    assert done["eval_seconds"][scifact_slice.name] > 0
    assert read_json(output / "experiment.json")["provenance"]["command"] == ["sbmoe", "experiment"]

    second = run_experiment(grid, output, QUIET)
    assert sorted(second.skipped) == sorted(first.finished) and not second.finished
    assert len(second.failed) == 4

    # A finished cell is reused only with the settings it was run with.
    grid.train["max_steps"] = 3
    with pytest.raises(ValueError, match=r"other settings \(max_steps 2 -> 3\)"):
        run_experiment(grid, output, QUIET)


def test_workers_split_a_grid_between_processes_sharing_one_output(
    tiny_bert_dir, scifact_slice, tmp_path, monkeypatch
):
    monkeypatch.setenv("SBMOE_DATA_DIR", str(scifact_slice.parent))
    grid = tiny_grid(tmp_path, tiny_bert_dir, [scifact_slice.name], max_steps=1)
    cells = [cell.cell_id for cell in expand(grid)]
    output = tmp_path / "out"
    first = run_experiment(grid, output, QUIET, worker=(0, 2))
    second = run_experiment(grid, output, QUIET, worker=(1, 2))
    assert first.finished == cells[0::2] and second.finished == cells[1::2]
    assert sorted(run_experiment(grid, output, QUIET).skipped) == sorted(cells)
    with pytest.raises(ValueError, match="worker 2/2 is invalid; I/N means part I of N"):
        run_experiment(grid, output, QUIET, worker=(2, 2))
