"""The training checkpoint: exact round trip, no pickle, old pickles refused unread, kill -9 in a write."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_safety import REPO, refused, train_args, train_steps

from sbmoe.cli.main import main
from sbmoe.core.errors import UsageError
from sbmoe.core.io import read_json, write_json
from sbmoe.training.checkpoint import Checkpoint, RandomState, read_checkpoint, write_checkpoint

RUN = ["--max-steps", "4", "--checkpoint-steps", "1", "--checkpoint-selection", "last"]


def optimised_model(
    steps: int,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = [{"params": model[0].parameters(), "name": "a"}, {"params": model[1].parameters(), "lr": 0.1}]
    optimizer = torch.optim.AdamW(groups, lr=0.01, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(steps):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_a_checkpoint_round_trips_exactly_and_holds_no_pickle(tmp_path):
    model, optimizer, scheduler = optimised_model(steps=3)
    np.random.seed(1)
    random.seed(2)
    np.random.randn()  # leaves a cached Gaussian in numpy's state, which must survive too
    rng = RandomState.capture(torch.device("cpu"))
    expected = draws()
    selection = {"best_score": 0.25, "best_step": 2, "dev_history": [{"step": 2, "dev_ndcg@10": 0.25}]}
    saved = Checkpoint(
        3, 1, 4, 1234, selection, model.state_dict(), optimizer.state_dict(), scheduler.state_dict(), [rng]
    )
    write_checkpoint(tmp_path / "checkpoint", saved)

    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary left beside it

    loaded = read_checkpoint(tmp_path / "checkpoint")
    assert (loaded.step, loaded.epoch, loaded.batch_index, loaded.log_bytes) == (3, 1, 4, 1234)
    assert loaded.selection == selection and loaded.scheduler == json.loads(
        json.dumps(scheduler.state_dict())
    )
    assert all(torch.equal(loaded.model[k], v) for k, v in model.state_dict().items())

    fresh_model, fresh_optimizer, fresh_scheduler = optimised_model(steps=0)
    fresh_optimizer.load_state_dict(loaded.optimizer)
    fresh_scheduler.load_state_dict(loaded.scheduler)
    fresh_model.load_state_dict(loaded.model)
    original, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]  # betas are a tuple again
    for index, state in original["state"].items():
        assert all(torch.equal(restored["state"][index][k], v) for k, v in state.items())
    # One more step of each gives the same weights, bit for bit.
    for m, o in ((model, optimizer), (fresh_model, fresh_optimizer)):
        torch.manual_seed(5)
        m(torch.randn(5, 4)).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True))

    draws()  # move every generator on, then go back
    loaded.rng[0].restore(torch.device("cpu"))
    assert draws() == expected


def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    marker = tmp_path / "the-pickle-ran"
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"optimizer": Payload()}, folder / "optimizer.pt")  # the layout of sbmoe 0.1.0
    write_json(folder / "state.json", {"step": 2, "epoch": 0, "batch_index": 2})
    with pytest.raises(
        UsageError, match=r"optimizer\.pt is a pickle that could run code.*not read"
    ) as refusal:
        read_checkpoint(folder)
    assert "\n" not in str(refusal.value)
    assert not marker.exists()
    torch.load(folder / "optimizer.pt", weights_only=False)  # the payload is live: sbmoe 0.1.0's load runs it
    assert marker.is_dir()


def test_resuming_from_a_pickled_checkpoint_is_refused_in_one_line(
    whole_run, tiny_bert_dir, scifact_slice, tmp_path, capsys
):
    output = tmp_path / "run"
    shutil.copytree(whole_run, output)
    (output / "training" / "done.json").unlink()  # a run that stopped after its last checkpoint
    checkpoint = output / "training" / "checkpoint"
    marker = tmp_path / "the-pickle-ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    # What sbmoe 0.1.0 left: weights, a pickle of the optimiser and random states, state.json.
    for name in ("optimizer.safetensors", "rng.safetensors"):
        (checkpoint / name).unlink()
    torch.save({"optimizer": Payload()}, checkpoint / "optimizer.pt")
    write_json(checkpoint / "state.json", {"step": 3, "epoch": 0, "batch_index": 3, "log_bytes": 10})
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    argv = train_args(tiny_bert_dir, scifact_slice, output, *RUN)
    refused(capsys, argv, str(checkpoint), "a pickle that could run code", "sbmoe 0.1.0")
    assert not marker.exists()
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------------------ kill -9 in a write
# The killed process runs the real CLI; only the moment of its death is arranged: SIGKILL to itself
# at a chosen point of the second checkpoint's write (the one of step 2).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import sbmoe.core.io as io
    import sbmoe.training.checkpoint as checkpoint
    from sbmoe.cli.main import main

    point, writes = sys.argv[1], []

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def write_checkpoint(directory, state):
        writes.append(state.step)
        return original_write(directory, state)

    def write_json(path, data):  # state.json, the last file written into the temporary folder
        if point == "inside" and len(writes) == 2:
            die()
        return original_json(path, data)

    def replace(source, target):
        real_replace(source, target)
        if point == "between-renames" and len(writes) == 2 and str(target).endswith(".checkpoint.old"):
            die()  # the previous checkpoint is moved aside, the new one not yet in place

    original_write, checkpoint.write_checkpoint = checkpoint.write_checkpoint, write_checkpoint
    original_json, checkpoint.write_json = checkpoint.write_json, write_json
    real_replace, io.os.replace = io.os.replace, replace
    import sbmoe.training.trainer as trainer
    trainer.write_checkpoint = write_checkpoint
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def whole_run(tiny_bert_dir, scifact_slice, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("whole") / "run"
    assert main(["-q", *train_args(tiny_bert_dir, scifact_slice, output, *RUN)]) == 0
    return output


def train_records(output: Path) -> list[dict]:
    lines = (output / "training" / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


def weight_files(output: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = [p for p in output.rglob("*.safetensors") if p.relative_to(output).parts[0] != "training"]
    return {str(p.relative_to(output)): load_file(str(p)) for p in files}


def leftovers(output: Path) -> list[str]:
    return [str(p) for p in output.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("point", ["inside", "between-renames"])
def test_kill_9_inside_a_checkpoint_write_then_the_same_command_ends_identically(
    whole_run, tiny_bert_dir, scifact_slice, tmp_path, capsys, point
):
    output = tmp_path / "run"
    argv = ["-q", *train_args(tiny_bert_dir, scifact_slice, output, *RUN)]
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, point, *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert train_steps(output) == [1, 2]  # died writing the checkpoint of step 2
    assert leftovers(output)  # the interrupted write left its temporary (or the set-aside copy)
    assert read_json(output / "training" / "config.json")["world_size"] == 1

    capsys.readouterr()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 1
    assert leftovers(output) == []
    assert train_records(output) == train_records(whole_run)  # step 2 again, the same losses
    expected, actual = weight_files(whole_run), weight_files(output)
    assert expected.keys() == actual.keys() and expected
    for name, tensors in expected.items():
        assert tensors.keys() == actual[name].keys()
        assert all(torch.equal(tensors[key], actual[name][key]) for key in tensors), name
