"""Packing conversations into rows: the packed loss is the unpacked loss; fitting to the context
drops whole exchanges from the left; batches resume where they stopped."""

import random
from functools import partial

import pytest
import torch

from tinylm.data.chat_rows import (
    PAD_SEGMENT,
    Encoded,
    encode_conversations,
    encode_for_training,
    fit_conversation,
    pack,
    rows_batch,
)
from tinylm.data.walk import Batches
from tinylm.model.llama import CausalLM, ModelConfig, segment_mask
from tinylm.model.loss import IGNORE
from tinylm.train.objectives import NextTokenLoss

VOCAB = 64
ROLE_IDS = {"system": 1, "user": 2, "assistant": 3}
END = 4


class ToyTemplate:
    """A stand-in chat template: [role id] + the content's ids + END per message; the assistant's
    content and its END are in the loss mask. Contents are lists of ints (the 'tokenizer' is identity)."""

    def encode(self, tokenizer, messages):
        ids, mask = [], []
        for message in messages:
            trained = message["role"] == "assistant"
            ids += [ROLE_IDS[message["role"]], *message["content"], END]
            mask += [False] + [trained] * (len(message["content"]) + 1)
        return ids, mask


def conversation(rng, exchanges, system=False):
    messages = [{"role": "system", "content": [rng.randrange(10, VOCAB) for _ in range(3)]}] if system else []
    for _ in range(exchanges):
        messages.append({"role": "user", "content": [rng.randrange(10, VOCAB) for _ in range(rng.randrange(1, 8))]})
        messages.append(
            {"role": "assistant", "content": [rng.randrange(10, VOCAB) for _ in range(rng.randrange(1, 10))]}
        )
    return messages


def test_labels_are_the_next_assistant_tokens():
    example = encode_for_training([2, 11, 4, 3, 12, 13, 4], [False, False, False, False, True, True, True])
    assert example.input_ids == [2, 11, 4, 3, 12, 13]
    assert example.labels == [IGNORE, IGNORE, IGNORE, 12, 13, 4]  # the answer and its end-of-turn token


def test_too_long_conversations_lose_whole_exchanges_from_the_left_keeping_the_system_prompt():
    rng = random.Random(0)
    messages = conversation(rng, exchanges=5, system=True)
    full, _ = ToyTemplate().encode(None, messages)
    ids, mask, dropped = fit_conversation(ToyTemplate(), None, messages, len(full) - 1)
    assert dropped >= 1 and len(ids) < len(full)
    kept = [messages[0], *messages[1 + 2 * dropped :]]
    assert (ids, mask) == ToyTemplate().encode(None, kept)  # exactly the system prompt + the last exchanges
    last_alone, _ = ToyTemplate().encode(None, [messages[0], *messages[-2:]])
    assert fit_conversation(ToyTemplate(), None, messages, len(last_alone) - 1) is None


def test_encode_reports_what_it_shortened_and_skipped():
    rng = random.Random(1)
    conversations = [
        conversation(rng, 1),
        conversation(rng, 6),
        [{"role": "user", "content": [9] * 40}, {"role": "assistant", "content": [9] * 40}],
    ]
    examples, report = encode_conversations(conversations, ToyTemplate(), None, seq_len=30)
    assert report.kept == len(examples) == 2 and report.shortened == 1 and report.skipped_too_long == 1
    assert all(len(e) <= 30 for e in examples)
    assert "1 skipped" in report.summary()


def test_best_fit_packing_keeps_every_token_once_and_uses_few_rows():
    rng = random.Random(2)
    examples = [Encoded(list(range(n)), list(range(n))) for n in (rng.randrange(3, 40) for _ in range(60))]
    rows = pack(examples, seq_len=64)
    assert rows.real_tokens == sum(len(e) for e in examples)
    assert len(rows) <= sum(len(e) for e in examples) // 64 + 3  # nearly full rows
    unpacked = pack(examples, seq_len=64, packed=False)
    assert len(unpacked) == 60 and unpacked.real_tokens == rows.real_tokens
    for r in range(len(rows)):  # positions restart at 0 for every conversation in a row
        segments, positions = rows.segments[r], rows.positions[r]
        for s in set(segments.tolist()) - {PAD_SEGMENT}:
            assert positions[segments == s].tolist() == list(range((segments == s).sum()))


def test_segment_mask_keeps_attention_inside_each_conversation():
    mask = segment_mask(torch.tensor([[0, 0, 1, 1, 1, PAD_SEGMENT]]))[0, 0]
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert mask[4].tolist() == [False, False, True, True, True, False]
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees only itself: no empty softmax row


def test_packed_loss_and_gradients_equal_each_conversation_alone():
    torch.manual_seed(0)
    model = CausalLM(
        ModelConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    rng = random.Random(3)
    examples, _ = encode_conversations(
        [conversation(rng, rng.randrange(1, 3), system=rng.random() < 0.5) for _ in range(12)], ToyTemplate(), None, 48
    )
    rows = pack(examples, seq_len=48)
    assert len(rows) < len(examples)  # several conversations do share rows

    packed_loss = NextTokenLoss()(model, rows_batch(rows, range(len(rows))))
    packed_loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = sum(model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])) for e in examples)
    alone.backward()
    assert packed_loss.item() == pytest.approx(alone.item(), rel=1e-5)
    for packed, single in zip(packed_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(packed, single, atol=1e-5)


def row_batches(rows):
    return Batches(len(rows), 3, partial(rows_batch, rows), seed=7)


def test_row_batches_resume_where_they_stopped():
    examples = [Encoded([i] * 5, [i] * 5) for i in range(40)]
    rows = pack(examples, seq_len=16)
    straight = row_batches(rows)
    expected = [straight.next_batch()["input_ids"] for _ in range(10)]
    first = row_batches(rows)
    seen = [first.next_batch()["input_ids"] for _ in range(4)]
    resumed = row_batches(rows)
    resumed.load_state_dict(first.state_dict())
    seen += [resumed.next_batch()["input_ids"] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(expected, seen))
    with pytest.raises(ValueError, match="packed rows"):
        row_batches(pack(examples[:10], seq_len=16)).load_state_dict(first.state_dict())
