"""What a training step optimises and how: AdamW's parameter groups, the learning-rate schedule, the loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sbmoe.config.train import TrainConfig
from sbmoe.core.distributed import DistributedContext
from sbmoe.model.retriever import Retriever
from sbmoe.training.gradient_cache import GradientCache
from sbmoe.training.losses import InBatchContrastiveLoss, RetrievalLoss, RouterLoss
from sbmoe.training.training_data import TrainingData


def learning_rate_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rates at a given step."""
    warmup = int(config.warmup_ratio * total_steps) if config.scheduler != "constant" else 0

    def factor(step: int) -> float:
        if config.scheduler == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if config.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def build_optimizer(
    retriever: Retriever, config: TrainConfig, frozen_backbone: bool
) -> torch.optim.Optimizer:
    """AdamW with one learning rate for the backbone and one for the head; a frozen backbone has none.

    A frozen backbone's parameters stop requiring gradients here.
    """
    backbone_params, head_params = retriever.parameter_groups()
    groups = [{"params": head_params, "lr": config.lr_head, "name": "head"}] if head_params else []
    if frozen_backbone:
        for parameter in backbone_params:
            parameter.requires_grad_(False)
    else:
        groups.insert(0, {"params": backbone_params, "lr": config.lr_backbone, "name": "backbone"})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured schedule (constant, linear or cosine after warm-up) over ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config, total_steps))


def build_loss(
    model: torch.nn.Module,
    retriever: Retriever,
    data: TrainingData,
    config: TrainConfig,
    router: RouterLoss | None,
    context: DistributedContext,
) -> torch.nn.Module:
    """The one loss object a step calls: contrastive (+ router losses), gradient-cached if configured.

    Args:
        model: The (data-parallel) encoder the loss runs.
        retriever: The model being trained (its device).
        data: The training data (its judgements mask false negatives, if configured).
        config: Training settings.
        router: The router's losses, for a learned MoE gate.
        context: The data-parallel job.
    """
    qrels = data.train_qrels if config.mask_false_negatives else None
    contrastive = InBatchContrastiveLoss(config.temperature, qrels, config.symmetric_loss, context)
    loss = RetrievalLoss(model, contrastive, router, context)
    if config.grad_cache_chunk_size:
        return GradientCache(loss, config.grad_cache_chunk_size, retriever.device)
    return loss
