"""No code a model folder brings with it ever runs: every route is refused, naming the file, first.

Each folder carries a payload that writes a marker file when imported; each test asserts the
command exits 2 with one line naming the file and the marker was never written.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from sbmoe.cli.main import main
from sbmoe.core.errors import ModelLoadError
from sbmoe.model.retriever import Retriever

SAVED_MODEL = Path(__file__).parent / "fixtures" / "saved-0.1" / "moe"
TRANSFORMER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "sentence_bert_config.json",
)


def payload(marker: Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"


def update_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **changes}), encoding="utf-8")


def refused_with_no_code_run(
    capsys, model: Path | str, data: Path, output: Path, verb: str, *expected: str
) -> None:
    """``sbmoe VERB --model model`` exits 2 with one line naming ``expected``; no marker was written."""
    capsys.readouterr()
    argv = [verb, "--model", str(model), "--data", str(data), "--output", str(output)]
    assert main(["-q", *argv, *(["--max-steps", "1"] if verb == "train" else [])]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith(f"sbmoe {verb}: error:"), lines
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    assert not output.exists()


def add_auto_map(folder: Path, config_file: str, marker: Path) -> None:
    """``auto_map`` in ``config_file`` naming a configuration and a model class in the folder's files."""
    (folder / "configuration_evil.py").write_text(payload(marker), encoding="utf-8")
    (folder / "modeling_evil.py").write_text(payload(marker), encoding="utf-8")
    update_json(
        folder / config_file,
        auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    )


@pytest.mark.parametrize("verb", ["index", "train"])
def test_an_extra_stage_named_under_sbmoe_with_a_file_of_that_name_never_runs(
    scifact_slice, tmp_path, capsys, verb
):
    """``sbmoe.Evil`` passed a prefix check, and sentence-transformers took it from the folder's sbmoe.py."""
    model, marker = tmp_path / "model", tmp_path / "ran"
    shutil.copytree(SAVED_MODEL, model)
    (model / "sbmoe.py").write_text(payload(marker) + "class Evil:\n    pass\n", encoding="utf-8")
    modules = json.loads((model / "modules.json").read_text(encoding="utf-8"))
    modules.append({"idx": 4, "name": "4", "path": "4_Evil", "type": "sbmoe.Evil"})
    (model / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (model / "4_Evil").mkdir()
    refused_with_no_code_run(
        capsys, model, scifact_slice, tmp_path / "out", verb, "modules.json", "'sbmoe.Evil'"
    )
    assert not marker.exists()


def test_a_transformer_stage_folder_linked_elsewhere_is_checked_through_the_link(
    scifact_slice, tmp_path, capsys
):
    """The stage's config.json (with auto_map) lies behind a symbolic link to another folder."""
    model, elsewhere, marker = tmp_path / "model", tmp_path / "elsewhere", tmp_path / "ran"
    shutil.copytree(SAVED_MODEL, model)
    elsewhere.mkdir()
    for name in TRANSFORMER_FILES:
        shutil.move(model / name, elsewhere / name)
    add_auto_map(elsewhere, "config.json", marker)
    for code in elsewhere.glob("*.py"):  # transformers takes the code from the model's root
        shutil.copy(code, model)
    (model / "0_Transformer").symlink_to(elsewhere, target_is_directory=True)
    modules = json.loads((model / "modules.json").read_text(encoding="utf-8"))
    modules[0]["path"] = "0_Transformer"
    (model / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    refused_with_no_code_run(
        capsys, model, scifact_slice, tmp_path / "out", "index", "0_Transformer/config.json", "auto_map"
    )
    assert not marker.exists()


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_a_transformers_folder_with_auto_map_is_refused_naming_file_and_key(
    tiny_bert_dir, scifact_slice, tmp_path, capsys, config_file
):
    """Before, it loaded silently with the built-in BERT classes, while the README said it is refused."""
    model, marker = tmp_path / "model", tmp_path / "ran"
    shutil.copytree(tiny_bert_dir, model)
    add_auto_map(model, config_file, marker)
    refused_with_no_code_run(
        capsys, model, scifact_slice, tmp_path / "out", "index", f"{model / config_file}: auto_map"
    )
    assert not marker.exists()


def test_a_dense_activation_outside_torch_is_refused(tmp_path):
    """sentence-transformers imports a Dense stage's activation by its dotted name."""
    from sbmoe.core.errors import ModelLoadError

    model = tmp_path / "model"
    shutil.copytree(SAVED_MODEL, model)
    modules = json.loads((model / "modules.json").read_text(encoding="utf-8"))
    modules[2]["type"] = "sentence_transformers.models.Dense"
    (model / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    update_json(model / "2_MoEHead" / "config.json", activation_function="os.system")
    with pytest.raises(ModelLoadError, match=r"2_MoEHead/config\.json: activation_function 'os\.system'"):
        Retriever.load(str(model), device="cpu")


def test_a_folder_with_a_link_loop_loads(tmp_path):
    """Links are followed, each real folder once: a loop ends instead of walking forever."""
    model = tmp_path / "model"
    shutil.copytree(SAVED_MODEL, model)
    os.symlink(model, model / "1_Pooling" / "back", target_is_directory=True)
    assert Retriever.load(str(model), device="cpu").head is not None


class Payload:
    """Unpickled, it runs ``code`` (what a hostile ``pytorch_model.bin`` can hold)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.mark.parametrize("stage", ["", "2_MoEHead"])
def test_pickled_weights_without_safetensors_are_refused_unread(scifact_slice, tmp_path, capsys, stage):
    """Before, transformers and sentence-transformers unpickled them (a torch.load traceback here)."""
    model, marker = tmp_path / "model", tmp_path / "ran"
    shutil.copytree(SAVED_MODEL, model)
    pickled = model / stage / "pytorch_model.bin"
    pickled.write_bytes(pickle.dumps(Payload(payload(marker))))
    (model / stage / "model.safetensors").unlink()
    refused_with_no_code_run(
        capsys, model, scifact_slice, tmp_path / "out", "index", f"{pickled}: weights pickled", "safetensors"
    )
    assert not marker.exists()


def test_pickled_weights_beside_safetensors_are_never_read(tmp_path):
    """Loaders take the safetensors file; the pickle beside it (as on the hub) stays unread."""
    model, marker = tmp_path / "model", tmp_path / "ran"
    shutil.copytree(SAVED_MODEL, model)
    for stage in ("", "2_MoEHead"):
        (model / stage / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(payload(marker))))
    assert Retriever.load(str(model), device="cpu").head is not None
    assert not marker.exists()


@pytest.mark.parametrize("what", ["pickle", "auto_map"])
def test_a_hub_download_is_checked_as_a_folder_is(scifact_slice, tmp_path, monkeypatch, capsys, what):
    """A hub name whose copy (here: the Hugging Face cache, offline) holds only ``pytorch_model.bin``
    or an ``auto_map``: before, it went to the loaders unchecked."""
    from huggingface_hub import constants

    marker, revision = tmp_path / "ran", "a" * 40
    repository = tmp_path / "hub" / "models--someone--model"
    snapshot = repository / "snapshots" / revision
    shutil.copytree(SAVED_MODEL, snapshot, ignore=shutil.ignore_patterns("sbmoe.json", "2_MoEHead"))
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision, encoding="utf-8")
    modules = json.loads((snapshot / "modules.json").read_text(encoding="utf-8"))
    (snapshot / "modules.json").write_text(json.dumps(modules[:2]), encoding="utf-8")
    if what == "pickle":
        (snapshot / "model.safetensors").unlink()
        (snapshot / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(payload(marker))))
        expected = ("pytorch_model.bin: weights pickled", "safetensors")
    else:
        add_auto_map(snapshot, "config.json", marker)
        expected = ("config.json: auto_map",)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    refused_with_no_code_run(capsys, "someone/model", scifact_slice, tmp_path / "out", "index", *expected)
    assert not marker.exists()


def test_a_hub_repository_listing_only_pickled_weights_is_refused_before_any_download(tmp_path, monkeypatch):
    """Online, the hub's file list decides, before sentence-transformers fetches (and unpickles) them."""
    import huggingface_hub
    from huggingface_hub import constants

    from sbmoe.core.errors import ModelLoadError
    from sbmoe.model.folder_check import check_hub_repository

    listing = ["config.json", "tokenizer.json", "pytorch_model.bin", "1_Pooling/config.json"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, name: listing)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin of hub repository 'someone/model'"):
        check_hub_repository("someone/model")
    listing.append("model.safetensors")  # as most hub repositories: the pickle is never read
    check_hub_repository("someone/model")


@pytest.mark.parametrize("path", ["no-such-stage", "../../..", "/etc"])
def test_a_stage_folder_missing_or_outside_the_model_is_refused_in_one_line(tmp_path, path):
    """Before: a TypeError traceback (MoEHead built without its config), or a folder outside read."""
    model = tmp_path / "model"
    shutil.copytree(SAVED_MODEL, model)
    modules = json.loads((model / "modules.json").read_text(encoding="utf-8"))
    modules[2]["path"] = path
    (model / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=rf"modules\.json: stage MoEHead names the folder '{path}'"):
        Retriever.load(str(model), device="cpu")


def test_a_link_to_the_root_inside_a_model_folder_ends_the_check_in_one_line(tmp_path):
    """Before, the check walked the whole disk through the link (and could find anything there)."""
    model = tmp_path / "model"
    shutil.copytree(SAVED_MODEL, model)
    os.symlink("/", model / "1_Pooling" / "root", target_is_directory=True)
    with pytest.raises(ModelLoadError, match="more than 10,000 files are reachable from it"):
        Retriever.load(str(model), device="cpu")
