"""Losses: a hand-computed contrastive case, false-negative masking, router auxiliary losses."""

from __future__ import annotations

import math

import pytest
import torch

from sbmoe.training.losses import in_batch_contrastive_loss, load_balancing_loss, router_z_loss


def test_contrastive_loss_matches_hand_computation():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    documents = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # scores / 0.5: row 0 = [2.0, 1.2] (target 0), row 1 = [0.0, 1.6] (target 1)
    expected = (-(2.0 - math.log(math.exp(2.0) + math.exp(1.2))) - (1.6 - math.log(1 + math.exp(1.6)))) / 2
    loss = in_batch_contrastive_loss(queries, documents, temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_masking_removes_a_planted_false_negative():
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    documents = torch.tensor([[0.9, 0.1], [1.0, 0.0]])  # document 1 suits query 0 even better
    mask = torch.tensor([[False, True], [True, False]])  # each is relevant to the other query too
    masked = in_batch_contrastive_loss(queries, documents, 1.0, false_negative_mask=mask)
    unmasked = in_batch_contrastive_loss(queries, documents, 1.0)
    assert masked.item() == pytest.approx(0.0, abs=1e-7)  # only the positive is left in each row
    assert unmasked.item() > 0.5


def test_mask_never_hides_the_positive():
    queries, documents = torch.eye(2), torch.eye(2)
    everything = torch.ones(2, 2, dtype=torch.bool)
    loss = in_batch_contrastive_loss(queries, documents, 1.0, false_negative_mask=everything)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-7)


def test_load_balancing_is_one_when_uniform_and_higher_when_collapsed():
    uniform = load_balancing_loss(torch.zeros(8, 4), torch.arange(8) % 4)
    assert uniform.item() == pytest.approx(1.0)
    collapsed_logits = torch.tensor([[5.0, 0, 0, 0]]).repeat(8, 1)
    collapsed = load_balancing_loss(collapsed_logits, torch.zeros(8, dtype=torch.long))
    assert collapsed.item() > 3.5  # 4 * 1.0 * p_0, p_0 ~ 0.98


def test_router_z_loss_is_squared_log_partition():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
