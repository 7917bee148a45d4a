"""Flags generated from the config dataclasses: one definition per setting, help and defaults shown."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest
from conftest import CONFIG_CLASSES

from sbmoe.cli.flags import flag_name, given_values
from sbmoe.cli.main import build_parser
from sbmoe.config.jobs import EncodeConfig, EvaluateConfig
from sbmoe.config.model import ModelConfig
from sbmoe.config.train import TrainConfig

CONFIGS = CONFIG_CLASSES
# What a verb reads or writes: the same flag names a different thing per verb by design.
INPUT_OUTPUT_FLAGS = {"--model", "--data", "--output", "--index", "-h", "--help", "-q", "--quiet"}


def verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def test_every_config_field_has_help_and_every_flag_shows_its_default():
    for config_class in CONFIGS:
        for item in dataclasses.fields(config_class):
            assert item.metadata.get("help"), f"{config_class.__name__}.{item.name} has no help"
    for verb, parser in verbs().items():
        for action in parser._actions:
            assert action.help, f"sbmoe {verb} {action.option_strings or action.dest} has no help"
            generated = action.dest in {f.name for c in CONFIGS for f in dataclasses.fields(c)}
            if generated and action.option_strings:
                assert "default" in action.help, f"sbmoe {verb} {action.option_strings[0]} hides its default"


def test_a_flag_means_the_same_setting_in_every_verb():
    meaning: dict[str, tuple[str, str]] = {}
    for verb, parser in verbs().items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag in INPUT_OUTPUT_FLAGS:
                    continue
                # evaluate's --expert-pooling takes several rules where train's takes one: the same
                # setting (how expert outputs are pooled at inference), evaluated several ways at once.
                dest = "expert_pooling" if action.dest == "expert_poolings" else action.dest
                first = meaning.setdefault(flag, (verb, dest))
                assert first[1] == dest, f"{flag} is {first[1]} in `{first[0]}` but {dest} in `{verb}`"
    # The two flags that used to mean two things per verb are now distinct.
    assert {"--batch-size", "--experts-top-k", "--encode-batch-size"} <= set(meaning)
    assert meaning["--batch-size"][1] == "batch_size" and meaning["--top-k"][1] == "top_k"


def test_every_model_and_training_setting_is_a_train_flag_and_reaches_the_configs():
    train = verbs()["train"]
    flags = {flag for action in train._actions for flag in action.option_strings}
    for config_class in (ModelConfig, TrainConfig):
        for item in dataclasses.fields(config_class):
            assert flag_name(item) in flags, f"{item.name} has no flag on `sbmoe train`"
    args = build_parser().parse_args(
        [
            "train",
            "--model",
            "m",
            "--data",
            "d",
            "--output",
            "o",
            "--num-experts",
            "3",
            "--no-noisy-gating",
            "--experts-top-k",
            "1",
            "--max-steps",
            "5",
            "--symmetric-loss",
            "-q",
        ]
    )
    assert given_values(args, ModelConfig) == {"num_experts": 3, "noisy_gating": False, "experts_top_k": 1}
    assert given_values(args, TrainConfig) == {"max_steps": 5, "symmetric_loss": True}
    assert args.quiet is True  # -q after the verb works too


def test_inference_flags_fill_their_configs():
    args = build_parser().parse_args(
        [
            "evaluate",
            "--model",
            "m",
            "--data",
            "d",
            "--output",
            "o",
            "--expert-pooling",
            "top1",
            "all",
            "--encode-batch-size",
            "8",
            "--top-k",
            "50",
            "--max-doc-length",
            "128",
        ]
    )
    assert EvaluateConfig(**given_values(args, EvaluateConfig)).expert_poolings == ["top1", "all"]
    assert EncodeConfig(**given_values(args, EncodeConfig)) == EncodeConfig(encode_batch_size=8)
    assert given_values(args, ModelConfig) == {"max_doc_length": 128}
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["search", "--model", "m", "--index", "i", "--query", "q", "--batch-size", "8"]
        )


def test_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom sbmoe.cli.main import build_parser\nparser = build_parser()\nparser.format_help()\n"
        "heavy = {'torch', 'sentence_transformers', 'transformers', 'faiss', 'numpy'}\n"
        "assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
