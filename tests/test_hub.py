"""`sbmoe push`: refusals before any upload, and one clear line when the hub cannot be reached."""

from __future__ import annotations

import threading

import pytest
from huggingface_hub import constants

from sbmoe.cli.main import main
from sbmoe.model.hub import model_files


def refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error
    return error


@pytest.mark.parametrize("what", ["missing", "foreign", "transformers model"])
def test_push_refuses_a_folder_that_is_not_a_saved_sbmoe_model(tmp_path, tiny_bert_dir, capsys, what):
    folder = {"missing": tmp_path / "none", "foreign": tmp_path, "transformers model": tiny_bert_dir}[what]
    if what == "foreign":
        (folder / "notes.txt").write_text("not a model")
    error = refused(capsys, ["push", str(folder), "someone/model", "--token", "hf_unused"])
    assert str(folder) in error
    assert ("does not exist" if what == "missing" else "is not a saved sbmoe model") in error


def test_push_refuses_a_malformed_repository_id(tensorboard_run, capsys):
    output, _, _ = tensorboard_run
    assert "repository id 'not a repo'" in refused(capsys, ["push", str(output), "not a repo"])


def test_push_without_network_fails_in_one_line(tensorboard_run, monkeypatch, capsys):
    """A real upload attempt: this machine cannot reach huggingface.co (on CI the fake token is refused)."""
    output, _, _ = tensorboard_run
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # really try, whatever the environment says
    argv = ["-q", "push", str(output), "sbmoe-tests/never-pushed", "--token", "hf_not_a_real_token"]
    capsys.readouterr()
    exit_code = []
    # In a thread, so that a network that swallows packets fails the test instead of hanging it.
    attempt = threading.Thread(target=lambda: exit_code.append(main(argv)), daemon=True)
    attempt.start()
    attempt.join(timeout=120)
    assert not attempt.is_alive(), "sbmoe push still waits for the hub after 120 s"
    error = capsys.readouterr().err.strip()
    assert exit_code == [2] and error.count("\n") == 0, error
    assert error.startswith(
        "sbmoe push: error: could not push to https://huggingface.co/sbmoe-tests/never-pushed ("
    )
    assert error.endswith("check the internet connection, the token's write access and the repository id")


def test_push_in_offline_mode_or_without_token_says_so(tensorboard_run, tmp_path, monkeypatch, capsys):
    output, _, _ = tensorboard_run
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    assert "HF_HUB_OFFLINE is set" in refused(capsys, ["push", str(output), "someone/model"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert "no Hugging Face token" in refused(capsys, ["push", str(output), "someone/model"])


def test_the_upload_is_the_model_without_training_state_or_temporaries(tensorboard_run):
    output, _, _ = tensorboard_run
    names = {path.relative_to(output).as_posix() for path in model_files(output)}
    assert {"sbmoe.json", "modules.json", "model.safetensors", "2_MoEHead/config.json"} <= names
    assert not [name for name in names if name.startswith(("training", ".")) or name == "README.md"]
    assert (output / "training" / "tensorboard").is_dir()  # there, but not uploaded
