"""The loss computed block by block from hidden states equals cross-entropy on the full logits,
value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.model.loss import IGNORE, linear_cross_entropy


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_linear_cross_entropy_equals_cross_entropy_on_full_logits(block_rows):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (50,))
    labels[::6] = IGNORE  # some rows carry no loss

    theirs = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE, reduction="sum")
    (0.3 * theirs).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ours = linear_cross_entropy(hidden, weight, labels, block_rows=block_rows)
    (0.3 * ours).backward()

    assert torch.allclose(ours, theirs, rtol=1e-6)
    assert torch.allclose(hidden.grad, grads[0], atol=1e-6)
    assert torch.allclose(weight.grad, grads[1], atol=1e-6)
    assert hidden.grad[::6].abs().max() == 0  # unlabelled rows get no gradient
    with torch.no_grad():  # the evaluation path computes the same value without gradients
        assert torch.allclose(linear_cross_entropy(hidden, weight, labels, block_rows=block_rows), theirs, rtol=1e-6)


def test_model_loss_with_labels_matches_its_logits_and_trains_tied_weights():
    torch.manual_seed(0)
    model = CausalLM(
        ModelConfig(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    ids = torch.randint(0, 97, (3, 12))
    labels = torch.randint(0, 97, (3, 12))
    labels[0, :4] = IGNORE

    F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum").backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = model(ids, labels=labels)
    loss.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-5), name


def test_linear_cross_entropy_under_bf16_autocast_is_close():
    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 32, requires_grad=True), torch.randn(50, 32, requires_grad=True)
    labels = torch.randint(0, 50, (64,))
    exact = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, block_rows=16)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - exact.item()) / exact.item() < 2e-2
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
