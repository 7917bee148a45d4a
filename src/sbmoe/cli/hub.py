"""``sbmoe push`` (a saved model and its card to the Hugging Face Hub) and ``sbmoe model-card``."""

from __future__ import annotations

import argparse
from typing import Any

from sbmoe.cli.common import add_evaluation_flag, add_verb


def register(commands: Any) -> None:
    push = add_verb(commands, "push", "upload a saved model with its model card to the Hugging Face Hub")
    push.add_argument("directory", help="saved model folder (from `sbmoe train`); training/ is not uploaded")
    push.add_argument("repo_id", help="hub repository, e.g. USER/scifact-sbmoe (created when missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument(
        "--token", help="token with write access (default: $HF_TOKEN, else the one of `hf auth login`)"
    )
    add_evaluation_flag(push)
    push.set_defaults(run=run_push)

    card = add_verb(commands, "model-card", "(re)write a saved model's README.md model card")
    card.add_argument("directory", help="saved model folder (from `sbmoe train`)")
    add_evaluation_flag(card)
    card.set_defaults(run=run_model_card)


def run_push(args: argparse.Namespace) -> int:
    from sbmoe.model.hub import push_model

    url = push_model(
        args.directory, args.repo_id, private=args.private, token=args.token, evaluations=args.evaluation
    )
    print(f"pushed {args.directory} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


def run_model_card(args: argparse.Namespace) -> int:
    from sbmoe.model.hub import write_model_card

    print(f"wrote {write_model_card(args.directory, args.evaluation)}")
    return 0
