"""The inference engine: cached decoding is exact, batches are exact, sampling knobs do what they say,
streamed text is whole characters and never a stop string."""

import math

import pytest
import torch
from conftest import ScriptedLM, reply_text

from tinylm.infer.engine import Engine, IncrementalDecoder, StopStringMatcher
from tinylm.infer.sampling import SamplingSettings, apply_repetition_penalty, sample_rows, truncate
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.modeldir import save_model_dir
from tinylm.tokenizer import train_tokenizer

MIXED_TEXT = "Hello 你好, world! 中文 and emoji 🙂🚀 — déjà vu.\nUser: ok"


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE with so few merges that Chinese characters and emoji span several tokens."""
    texts = ["the cat sat on the mat. the dog ran.", "User: hi\nAssistant: hello there", "你好 世界"] * 20
    return train_tokenizer(texts, vocab_size=300)


def make_model(vocab_size=300, seed=0, **overrides) -> CausalLM:
    """A random ~100k-parameter model, its weights spread wide enough that greedy picks vary."""
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96
    )
    model = CausalLM(ModelConfig(vocab_size=vocab_size, **{**shape, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def greedy(n, **kwargs) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=n, temperature=0, stop_token_ids=[], **kwargs)


def recompute_greedy(model, prompt, n, penalty=1.0) -> list[int]:
    """Reference decoding with no cache: run the whole sequence through the model for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[:, -1]
            if penalty != 1.0:
                seen = torch.zeros_like(logits, dtype=torch.bool)
                seen[0, ids] = True
                logits = apply_repetition_penalty(logits, seen, penalty)
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


# -- decoding is exact ---------------------------------------------------------------------------


def test_cached_greedy_equals_full_recomputation():
    model = make_model()
    prompt = [5, 17, 42, 8, 99]
    out = Engine(model).generate([prompt], greedy(24))[0]
    assert out == recompute_greedy(model, prompt, 24)
    assert len(set(out)) > 3  # the model is not stuck on one token, so the comparison means something


def test_left_padded_batch_rows_equal_their_own_runs():
    model = make_model()
    engine = Engine(model)
    prompts = [[3, 4, 5], list(range(20, 33)), [7, 250, 1, 9, 60, 61, 62], [11]]
    batch = engine.generate(prompts, greedy(12))
    for prompt, row in zip(prompts, batch):
        assert row == engine.generate([prompt], greedy(12))[0]
        assert row == recompute_greedy(model, prompt, 12)


def test_a_repeated_prompt_is_prefilled_once_and_decodes_as_alone():
    """A group of answers to one prompt (RL's rollouts) shares one prefill; each row is still its own:
    greedy rows equal a lone run, and sampled rows draw from seed + row as they would unshared."""
    model = make_model()
    engine = Engine(model)
    p, q = [5, 17, 42, 8], [3, 4, 5, 6, 7, 8, 9]
    prefilled = []
    prefill = engine.prefill
    engine.prefill = lambda prompts, *args, **kw: prefilled.append(len(prompts)) or prefill(prompts, *args, **kw)
    assert engine.generate([p, q, p, p], greedy(10)) == [engine.generate([x], greedy(10))[0] for x in (p, q, p, p)]
    assert prefilled[0] == 2  # two distinct prompts for four rows
    logits, cache, padding = engine.shared_prefill([p, q, p], room=4)
    want_logits, want_cache, want_padding = prefill([p, q, p], room=4)
    assert torch.allclose(logits, want_logits, atol=1e-5) and torch.equal(padding, want_padding)
    assert torch.allclose(cache.k[:, :, :, : cache.length], want_cache.k[:, :, :, : cache.length], atol=1e-5)
    sampled = SamplingSettings(max_new_tokens=12, temperature=1.0, seed=7, stop_token_ids=[])
    group = engine.generate([p] * 4, sampled)
    assert len({tuple(g) for g in group}) > 1  # different samples from one prompt
    shifted = engine.generate([q, p, p, p, p], sampled)[1:]  # the same rows, one place later: seeds 8..11
    assert group[1:] == shifted[:3]


def test_rows_stop_independently_on_their_stop_token():
    engine = Engine(make_model())
    prompts = [[3, 4, 5], list(range(20, 33))]
    free = engine.generate(prompts, greedy(12))
    stop = free[0][4]  # a token row 0 produces; wherever it first appears, that row must end there
    rows = engine.run(prompts, SamplingSettings(max_new_tokens=12, temperature=0, stop_token_ids=[stop]))
    for completion, full in zip(rows, free):
        if stop in full:
            assert completion.token_ids == full[: full.index(stop) + 1] and completion.finish_reason == "stop"
        else:
            assert completion.token_ids == full and completion.finish_reason == "length"


def test_matches_transformers_greedy_generate():
    transformers = pytest.importorskip("transformers", reason="interop test compares against transformers")
    model = make_model()
    hf_config = transformers.AutoConfig.for_model(**model.config.to_hf_dict())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").eval()
    hf.load_state_dict(model.state_dict())
    engine, prompt, n = Engine(model), [5, 17, 42, 8, 99, 3], 20

    def theirs(eos):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0
            )
        return out[0, len(prompt) :].tolist()

    # never stopping: transformers has no eos to look for, we have no stop token
    free = engine.generate([prompt], greedy(n))[0]
    assert free == theirs(eos=[]) and len(free) == n
    # stopping on the same eos: both end right after its first occurrence, eos included
    eos = free[7]
    stopped = engine.generate([prompt], SamplingSettings(max_new_tokens=n, temperature=0, stop_token_ids=[eos]))[0]
    assert stopped == free[: free.index(eos) + 1] == theirs(eos=eos)


@pytest.mark.slow
def test_compiled_decode_step_decodes_the_same():
    model = make_model()
    prompt = list(range(20, 33))
    assert Engine(model, compile=True).generate([prompt], greedy(16)) == Engine(model).generate([prompt], greedy(16))


# -- sampling ------------------------------------------------------------------------------------


def test_repetition_penalty_follows_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def apply_top_k(logits, k):
    return truncate(logits, torch.tensor([k]), torch.tensor([1.0]))


def apply_top_p(logits, p):
    return truncate(logits, torch.tensor([0]), torch.tensor([p]))


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[True, False, False, True]]
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def kept(p):
        return (~torch.isinf(apply_top_p(logits, p))).sum().item()

    assert kept(0.7) == 2  # 0.5 alone is not enough, 0.5 + 0.3 is
    assert kept(0.85) == 3
    assert kept(1e-6) == 1  # the most likely token always stays
    shuffled = logits[:, [2, 0, 3, 1]]  # the rule depends on probabilities, not on positions
    assert torch.isinf(apply_top_p(shuffled, 0.7)).tolist() == [[True, False, True, False]]


def test_top_k_and_top_p_are_per_row():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]] * 3)
    kept = ~torch.isinf(truncate(logits, torch.tensor([1, 0, 3]), torch.tensor([1.0, 1e-6, 1.0])))
    assert kept.tolist() == [[False, True, False, False], [False, True, False, False], [False, True, True, True]]


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(4000, 1)
    top_share = {}
    for t in (0.5, 1.0, 2.0):
        rows = logits.shape[0]
        uniform = torch.rand(rows, generator=torch.Generator().manual_seed(0))
        draws = sample_rows(
            logits, torch.full((rows,), t), torch.zeros(rows, dtype=torch.long), torch.ones(rows), uniform
        )
        top_share[t] = (draws == 0).float().mean().item()
    expected = {t: math.exp(2 / t) / sum(math.exp(v / t) for v in (2, 1, 0, -1)) for t in top_share}
    for t in top_share:
        assert abs(top_share[t] - expected[t]) < 0.03
    assert top_share[0.5] > top_share[1.0] > top_share[2.0]


def test_seed_makes_sampling_reproducible():
    engine = Engine(make_model())
    prompts = [[5, 17, 42], [9, 8]]

    def sampled(seed):
        return engine.generate(
            prompts, SamplingSettings(max_new_tokens=16, temperature=1.5, seed=seed, stop_token_ids=[])
        )

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)
    assert sampled(1) != engine.generate(prompts, greedy(16))


def test_top_k_one_and_tiny_top_p_are_greedy():
    engine = Engine(make_model())
    prompt = [[5, 17, 42, 8]]
    reference = engine.generate(prompt, greedy(16))
    for knob in (dict(top_k=1), dict(top_p=1e-6)):
        settings = SamplingSettings(max_new_tokens=16, temperature=1.5, seed=3, stop_token_ids=[], **knob)
        assert engine.generate(prompt, settings) == reference


def test_repetition_penalty_counts_prompt_and_output():
    model = make_model()
    prompt = [5, 17, 42, 8]
    out = Engine(model).generate([prompt], greedy(20, repetition_penalty=1.8))[0]
    assert out == recompute_greedy(model, prompt, 20, penalty=1.8)
    assert out != recompute_greedy(model, prompt, 20)


# -- text: whole characters, stop strings ---------------------------------------------------------


def test_incremental_decoder_never_emits_half_a_character(tokenizer):
    ids = tokenizer.encode(MIXED_TEXT)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the test needs characters split over tokens"
    decoder = IncrementalDecoder(tokenizer)
    pieces, longest_window = [], 0
    for i in ids:
        pieces.append(decoder.push(i))
        longest_window = max(longest_window, len(decoder.window))
    pieces.append(decoder.flush())
    assert "".join(pieces) == MIXED_TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert longest_window <= 4  # a few tokens, however long the text: constant work per token


def test_incremental_decoder_lets_malformed_bytes_through(tokenizer):
    """Lead bytes that never get their continuation must not hold back the output forever."""
    lead = tokenizer.encode("🙂")[0]
    assert tokenizer.decode([lead]) == "\ufffd"
    ids = [lead] * 20 + tokenizer.encode("abc def")
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert pieces[IncrementalDecoder.MAX_PENDING] != ""  # gave up waiting for the character
    assert len(decoder.window) <= IncrementalDecoder.MAX_PENDING
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids)


def test_stop_string_matcher_holds_back_possible_starts():
    matcher = StopStringMatcher(["\nUser:"])
    assert [matcher.feed(p) for p in ["Hi", " there\nU", "s", "er", ": more"]] == ["Hi", " there", "", "", ""]
    assert matcher.stopped
    matcher = StopStringMatcher(["\nUser:", "END"])
    out = [matcher.feed(p) for p in ["a\nU", "nder", " EN", "ough"]] + [matcher.flush()]
    assert "".join(out) == "a\nUnder ENough" and not matcher.stopped
    assert out[0] == "a"  # "\nU" waited until "nder" showed it was not a stop string


def test_stream_is_whole_characters_and_matches_complete(tokenizer):
    prompt = tokenizer.encode("User: hi\nAssistant:")
    script = [*tokenizer.encode(MIXED_TEXT.replace("\nUser: ok", "")), tokenizer.eos_id]
    engine = Engine(ScriptedLM(tokenizer.vocab_size, script, len(prompt)), tokenizer)
    settings = SamplingSettings(max_new_tokens=100, temperature=0)
    stream = engine.stream(prompt, settings)
    pieces = list(stream)
    assert "".join(pieces) == tokenizer.decode(script[:-1])
    assert not any("\ufffd" in piece for piece in pieces)
    assert stream.completion.finish_reason == "stop" and stream.completion.token_ids == script
    assert engine.complete([tokenizer.decode(prompt)], settings) == ["".join(pieces)]


def test_stop_string_spanning_tokens_ends_stream_and_complete(tokenizer):
    prompt = tokenizer.encode("Assistant:")
    script = tokenizer.encode(" 中文 ok\nUser: and more text that must not appear")
    assert not any("\nUser:" in tokenizer.decode([i]) for i in script), "the stop string should span tokens"
    engine = Engine(ScriptedLM(tokenizer.vocab_size, script, len(prompt)), tokenizer)
    settings = SamplingSettings(max_new_tokens=100, temperature=0, stop_strings=["\nUser:"])
    stream = engine.stream(prompt, settings)
    assert "".join(stream) == " 中文 ok"
    assert stream.completion.finish_reason == "stop"
    assert engine.complete(["Assistant:"], settings) == [" 中文 ok"]


def test_stream_of_a_real_model_equals_decoded_ids(tokenizer):
    engine = Engine(make_model(tokenizer.vocab_size), tokenizer)
    settings = SamplingSettings(max_new_tokens=30, temperature=0.9, seed=0, stop_token_ids=[])
    text = "".join(engine.stream("the cat", settings))
    ids = engine.generate([tokenizer.encode("the cat")], settings)[0]
    # the text leaves out special tokens, except the reasoning markers, which are part of a reply
    assert text == engine.complete(["the cat"], settings)[0] == reply_text(tokenizer, ids)
    assert tokenizer.token_to_id("<|think_end|>") in ids, "this seed writes a reasoning marker: it must show"


# -- limits, loading --------------------------------------------------------------------------------


def test_context_limits():
    engine = Engine(make_model(max_position_embeddings=32))
    with pytest.raises(ValueError, match="40 tokens long but the model's context is 32"):
        engine.generate([list(range(1, 41))], greedy(4))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], greedy(4))
    clipped = engine.run([list(range(1, 29))], greedy(100))[0]  # 28 + 4 fill the context
    assert len(clipped.token_ids) == 4 and clipped.finish_reason == "length"


def test_text_needs_a_tokenizer():
    engine = Engine(make_model())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.complete(["hello"], greedy(4))


def test_from_dir_generates_like_the_saved_model(tokenizer, tmp_path):
    model = make_model(tokenizer.vocab_size)
    save_model_dir(model, tmp_path / "model", tokenizer=tokenizer)
    loaded = Engine.from_dir(tmp_path / "model", device="cpu")
    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    assert loaded.complete(["the dog"], settings) == Engine(model, tokenizer).complete(["the dog"], settings)
