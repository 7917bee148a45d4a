"""The MoE head: formulas checked by hand, gradients of the two gating variants, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sbmoe.config.model import ModelConfig, MoEHeadConfig
from sbmoe.model.moe_head import MoEHead


def make_head(**kwargs) -> MoEHead:
    torch.manual_seed(0)
    return MoEHead(MoEHeadConfig(embedding_dimension=16, num_experts=4, **kwargs))


def expert(head: MoEHead, m: int, x: torch.Tensor) -> torch.Tensor:
    """E_m(x) = W2 relu(W1 x + b1) + b2, computed one expert at a time."""
    hidden = torch.relu(x @ head.expert_w1[m] + head.expert_b1[m])
    return hidden @ head.expert_w2[m] + head.expert_b2[m]


@pytest.mark.parametrize("gating", ["paper", "learned"])
def test_top1_inference_matches_the_formula(gating):
    head = make_head(gating=gating, expert_pooling="top1").eval()
    x = torch.randn(5, 16)
    y = head({"sentence_embedding": x})["sentence_embedding"]
    probabilities = torch.softmax(head.gate(x), dim=-1)
    for i in range(5):
        m = int(probabilities[i].argmax())
        e = expert(head, m, x[i])
        if gating == "paper":
            expected = F.normalize(probabilities[i, m] * e, dim=-1, eps=1e-6) + x[i]
        else:
            expected = x[i] + probabilities[i, m] * F.normalize(e, dim=-1, eps=1e-6)
        torch.testing.assert_close(y[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gating", ["paper", "learned"])
def test_all_pooling_is_the_softmax_weighted_sum(gating):
    head = make_head(gating=gating, expert_pooling="all").eval()
    x = torch.randn(3, 16)
    y = head({"sentence_embedding": x})["sentence_embedding"]
    probabilities = torch.softmax(head.gate(x), dim=-1)
    for i in range(3):
        outputs = torch.stack([expert(head, m, x[i]) for m in range(4)])
        if gating == "paper":
            expected = F.normalize(probabilities[i] @ outputs, dim=-1, eps=1e-6) + x[i]
        else:
            expected = x[i] + probabilities[i] @ F.normalize(outputs, dim=-1, eps=1e-6)
        torch.testing.assert_close(y[i], expected, rtol=1e-5, atol=1e-5)


def test_topk_keeps_k_experts():
    head = make_head(gating="learned", expert_pooling="topk", experts_top_k=2).eval()
    weights = head.gate_weights(head.gate(torch.randn(6, 16)))
    assert ((weights > 0).sum(dim=-1) == 2).all()


def test_paper_training_uses_top1_whatever_the_inference_rule():
    head = make_head(gating="paper", expert_pooling="all").train()
    weights = head.gate_weights(torch.randn(6, 4))
    assert ((weights > 0).sum(dim=-1) == 1).all()
    head.eval()
    assert ((head.gate_weights(torch.randn(6, 4)) > 0).sum(dim=-1) == 4).all()


def gradients(gating: str) -> dict[str, float]:
    """Largest absolute gradient of gate, noise and experts after one backward pass (0 if none)."""
    head = make_head(gating=gating, expert_pooling="top1").train()
    x = torch.randn(8, 16)
    torch.manual_seed(1)
    y = head({"sentence_embedding": x})["sentence_embedding"]
    loss = (y @ torch.randn(16, 8)).logsumexp(dim=-1).mean()
    loss.backward()

    def largest(parameters) -> float:
        return max((p.grad.abs().max().item() if p.grad is not None else 0.0) for p in parameters)

    return {
        "gate": largest(head.gate.parameters()),
        "noise": largest(head.noise.parameters()),
        "experts": largest([head.expert_w1, head.expert_w2]),
    }


def test_paper_gating_gives_gate_and_noise_exactly_zero_gradient():
    grads = gradients("paper")
    assert grads["experts"] > 1e-4  # the experts do learn
    assert grads["gate"] == 0.0
    assert grads["noise"] == 0.0


def test_learned_gating_trains_gate_and_noise():
    grads = gradients("learned")
    assert grads["experts"] > 1e-4
    assert grads["gate"] > 1e-4
    assert grads["noise"] > 1e-5


def test_noise_only_while_training():
    head = make_head(gating="learned")
    x = torch.randn(4, 16)
    head.eval()
    first = head({"sentence_embedding": x})["sentence_embedding"]
    second = head({"sentence_embedding": x})["sentence_embedding"]
    torch.testing.assert_close(first, second)
    head.train()
    noisy = head({"sentence_embedding": x.clone()})
    assert not torch.equal(noisy["router_noisy_logits"], noisy["router_logits"])


def test_normalize_input_normalises_before_the_head():
    head = make_head(gating="learned", normalize_input=True).eval()
    x = torch.randn(3, 16) * 7
    unit = make_head(gating="learned", normalize_input=False).eval()
    torch.testing.assert_close(
        head({"sentence_embedding": x})["sentence_embedding"],
        unit({"sentence_embedding": F.normalize(x, dim=-1, eps=1e-6)})["sentence_embedding"],
    )


def test_save_and_load_round_trip(tmp_path):
    head = make_head(gating="learned", expert_pooling="all").eval()
    head.save(str(tmp_path))
    loaded = MoEHead.load(str(tmp_path)).eval()
    assert loaded.config == head.config
    x = torch.randn(4, 16)
    torch.testing.assert_close(
        loaded({"sentence_embedding": x})["sentence_embedding"],
        head({"sentence_embedding": x})["sentence_embedding"],
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 0}, "at least one expert"),
        ({"gating": "magic"}, "gating"),
        ({"expert_pooling": "top3"}, "expert_pooling"),
        ({"expert_pooling": "topk", "experts_top_k": 9}, "experts_top_k"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEHead(MoEHeadConfig(embedding_dimension=8, **{"num_experts": 3, **kwargs}))


def test_random_gate_is_fixed_and_noise_free():
    head = make_head(gating="random", expert_pooling="top1").train()
    assert not any(p.requires_grad for p in (*head.gate.parameters(), *head.noise.parameters()))
    out = head({"sentence_embedding": torch.randn(5, 16)})
    torch.testing.assert_close(out["router_noisy_logits"], out["router_logits"])


def test_expert_dropout_hides_experts_only_while_training():
    head = make_head(gating="learned", expert_pooling="all", expert_dropout=0.5)
    x = torch.randn(64, 16)
    head.train()
    weights = head.gate_weights(head({"sentence_embedding": x})["router_noisy_logits"])
    zeros = (weights == 0).sum(dim=-1)
    assert zeros.float().mean() > 1.0  # about half of the 4 experts hidden per text
    assert (zeros < 4).all()  # never all of them
    head.eval()
    eval_weights = head.gate_weights(head({"sentence_embedding": x})["router_noisy_logits"])
    assert (eval_weights > 0).all()


def test_the_saved_record_is_the_config_in_the_model_config_names(tmp_path):
    """One record per head: its config.json holds MoEHeadConfig, whose settings are ModelConfig's."""
    head = make_head(gating="paper", expert_pooling="topk", experts_top_k=3, head_side="query")
    head.save(str(tmp_path))
    record = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert MoEHeadConfig(**record) == head.config
    model = ModelConfig(
        num_experts=4, gating="paper", expert_pooling="topk", experts_top_k=3, head_side="query"
    )
    assert head.config == MoEHeadConfig.from_model(model, 16, normalize_input=False)
    assert head.config.model_settings().items() <= model.to_dict().items()


def test_a_record_saved_by_0_1_loads_under_todays_names(tmp_path):
    """sbmoe 0.1 wrote ``top_k`` and no side: read as ``experts_top_k`` and ``head_side="both"``."""
    make_head(expert_pooling="topk", experts_top_k=3).save(str(tmp_path))
    old = {"embedding_dimension": 16, "num_experts": 4, "expert_pooling": "topk", "top_k": 3}
    (tmp_path / "config.json").write_text(json.dumps(old), encoding="utf-8")
    loaded = MoEHead.load(str(tmp_path))
    assert loaded.experts_top_k == 3 and loaded.head_side == "both"
