"""Share a saved model: (re)write its model card, push it to the Hugging Face Hub.

The push uploads the model's files (not ``training/``, not hidden temporaries) in one commit, with
a card that names the repository in its usage lines; the local folder is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sbmoe.core.artifacts import MODEL, TRAINING_RUN, writing_output
from sbmoe.core.errors import HubError, MissingInputError, UsageError, first_line
from sbmoe.core.io import atomic_open, read_json
from sbmoe.core.layouts import MODEL_FILES, TRAINING_FILES
from sbmoe.model.card import read_evaluation
from sbmoe.model.retriever import Retriever

# Kept beside a trained model but not part of it.
NOT_UPLOADED = frozenset({TRAINING_FILES.folder, MODEL_FILES.card})


def load_saved_model(directory: str | Path) -> Retriever:
    """Load the sbmoe model saved in ``directory`` (on the CPU), refusing any other folder.

    Raises:
        MissingInputError: ``directory`` does not exist.
        UsageError: it holds no saved sbmoe model.
        ModelLoadError: the model in it cannot be loaded.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingInputError(f"model directory {directory} does not exist")
    missing = [
        name for name in (MODEL_FILES.sbmoe_config, MODEL_FILES.modules) if not (directory / name).is_file()
    ]
    if missing:
        raise UsageError(
            f"{directory} is not a saved sbmoe model (no {' or '.join(missing)}): give the folder "
            "that `sbmoe train` wrote"
        )
    return Retriever.load(str(directory), device="cpu")


def model_card(
    directory: str | Path, evaluations: Sequence[str | Path] = (), model_id: str | None = None
) -> str:
    """The card of the model saved in ``directory``, with the test metrics of ``evaluations``.

    Args:
        directory: A saved sbmoe model.
        evaluations: ``sbmoe evaluate`` output folders of this model.
        model_id: How the usage lines name the model (default: a placeholder path).

    Raises:
        UsageError: an evaluation scored another model.
    """
    retriever = load_saved_model(directory)
    fingerprint = retriever.fingerprint()
    entries = [entry for path in evaluations for entry in read_evaluation(path, fingerprint)]
    saved = read_json(Path(directory) / MODEL_FILES.sbmoe_config)
    return retriever.model_card(saved, model_id, entries)


def write_model_card(directory: str | Path, evaluations: Sequence[str | Path] = ()) -> Path:
    """(Re)write ``directory/README.md`` atomically, with the test metrics of ``evaluations``.

    Refused while another sbmoe process writes ``directory`` (e.g. training into it).
    """
    if not Path(directory).is_dir():
        raise MissingInputError(f"model directory {directory} does not exist")
    with writing_output(directory, (MODEL, TRAINING_RUN)):
        card = model_card(directory, evaluations)
        path = Path(directory) / MODEL_FILES.card
        with atomic_open(path) as handle:
            handle.write(card)
    return path


def model_files(directory: str | Path) -> list[Path]:
    """The files of the model in ``directory``: not ``training/``, the card, or hidden entries."""
    directory = Path(directory)
    files = []
    for path in sorted(directory.rglob("*")):
        parts = path.relative_to(directory).parts
        if parts[0] in NOT_UPLOADED or any(part.startswith(".") for part in parts):
            continue
        if path.is_file():
            files.append(path)
    return files


def push_model(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    evaluations: Sequence[str | Path] = (),
) -> str:
    """Upload the model saved in ``directory`` to the hub repository ``repo_id`` (created if missing).

    Args:
        directory: A saved sbmoe model.
        repo_id: ``user/name`` or ``organisation/name``.
        private: Create the repository private (an existing one keeps its visibility).
        token: A Hugging Face token with write access (default: ``$HF_TOKEN`` or the one of
            ``hf auth login``).
        evaluations: ``sbmoe evaluate`` output folders of this model, whose test metrics go into
            the uploaded card.

    Returns:
        The URL of the commit.

    Raises:
        UsageError: not a saved sbmoe model, a malformed ``repo_id``, no token, or offline mode.
        HubError: the hub could not be reached or refused the upload.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise UsageError(f"repository id {repo_id!r}: {first_line(error)}") from error
    card = model_card(directory, evaluations, model_id=repo_id)
    if constants.HF_HUB_OFFLINE:
        raise UsageError("HF_HUB_OFFLINE is set: pushing needs the Hugging Face Hub; unset it to push")
    token = token or get_token()
    if not token:
        raise UsageError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token")
    directory = Path(directory)
    files = model_files(directory)
    operations = [CommitOperationAdd(path.relative_to(directory).as_posix(), str(path)) for path in files]
    operations.append(CommitOperationAdd(MODEL_FILES.card, card.encode("utf-8")))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message="Upload an sbmoe model")
    except Exception as error:  # the hub client raises its HTTP library's errors, OSError, ValueError
        raise HubError(
            f"could not push to https://huggingface.co/{repo_id} ({type(error).__name__}: "
            f"{first_line(error)}); check the internet connection, the token's write access and the "
            "repository id"
        ) from error
    return commit.commit_url
