"""One process of the data-parallel tests, started by ``python -m torch.distributed.run`` (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py \\
        WORK_DIR MODEL_DIR DATA_DIR

Runs, in one launch (processes start slowly): training through the CLI, a run interrupted after its
checkpoint and resumed, the :data:`VARIANTS` of the training step, and sharded indexing through the
CLI. ``test_distributed.py`` compares the
outputs with single-process runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import interrupt_at_step

from sbmoe.cli.main import main
from sbmoe.config.jobs import JobOptions
from sbmoe.config.presets import build_configs
from sbmoe.core.distributed import init_distributed, shutdown
from sbmoe.core.runtime import seed_everything
from sbmoe.data.beir import load_collection
from sbmoe.model.retriever import Retriever
from sbmoe.training.trainer import build_trainer, train

# Shared with test_distributed.py: the per-process batch is half the single process's.
TRAIN_ARGS = [
    "--num-experts",
    "3",
    "--no-noisy-gating",
    "--max-steps",
    "3",
    "--max-doc-length",
    "48",
    "--precision",
    "fp32",
    "--checkpoint-selection",
    "last",
    "--device",
    "cpu",
]


# Shared with test_distributed.py: steps that run differently under DDP, as (model, train) overrides.
# Gradient caching replays chunks under no_sync; paper gating leaves the gate without gradients.
VARIANTS = {
    "cached-negatives-symmetric": (
        {},
        {"grad_cache_chunk_size": 3, "hard_negatives": 1, "symmetric_loss": True},
    ),
    "head-only-paper-gating": ({"gating": "paper"}, {"head_only": True}),
}


def variant_configs(model: str, variant: str, batch_size: int):
    """The model and training configs of a :data:`VARIANTS` entry, ``batch_size`` pairs per process."""
    model_overrides, train_overrides = VARIANTS[variant]
    return build_configs(
        "default",
        {"backbone": model, "num_experts": 3, "noisy_gating": False, "max_doc_length": 48, **model_overrides},
        {
            "max_steps": 3,
            "batch_size": batch_size,
            "precision": "fp32",
            "checkpoint_selection": "last",
            "checkpoint_steps": None,
            **train_overrides,
        },
    )


def interrupted_then_resumed(model: str, data: str, output: Path, context) -> None:
    """Train with a checkpoint every step, stop every process before step 3, then run again."""
    model_config, train_config = build_configs(
        "default",
        {"backbone": model, "num_experts": 3, "noisy_gating": False, "max_doc_length": 48},
        {
            "max_steps": 3,
            "batch_size": 4,
            "precision": "fp32",
            "checkpoint_selection": "last",
            "checkpoint_steps": 1,
        },
    )
    collection = load_collection(data)
    seed_everything(train_config.seed)
    trainer = build_trainer(
        Retriever.from_config(model_config, device="cpu"),
        collection,
        train_config,
        output,
        JobOptions(show_progress=False),
        context,
    )
    interrupt_at_step(trainer, 2)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interruption did not happen")
    result = train(model_config, train_config, collection, output, JobOptions(show_progress=False), context)
    assert result.resumed_from_step == 2 and result.steps == 3, result


def run(work: Path, model: str, data: str) -> None:
    context = init_distributed("cpu")
    assert context.world_size == 2, context
    try:
        output = str(work / "ddp")
        arguments = ["--model", model, "--data", data, "--output", output, "--batch-size", "4", *TRAIN_ARGS]
        code = main(["-q", "train", *arguments])
        assert code == 0
        interrupted_then_resumed(model, data, work / "resumed", context)
        for variant in VARIANTS:
            model_config, train_config = variant_configs(model, variant, batch_size=4)
            train(
                model_config,
                train_config,
                load_collection(data),
                work / variant,
                JobOptions(show_progress=False),
                context,
            )
        code = main(
            [
                "-q",
                "index",
                "--model",
                str(work / "ddp"),
                "--data",
                data,
                "--output",
                str(work / "index-ddp"),
                "--precision",
                "fp32",
                "--device",
                "cpu",
            ]
        )
        assert code == 0
        context.barrier()
    finally:
        shutdown()


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
