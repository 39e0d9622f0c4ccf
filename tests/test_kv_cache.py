"""The int8 KV cache: its real size, its rounding error, what it changes in a trained model's logits,
and that the server's slots and the CLI use it as they use the model-dtype cache."""

import pytest
import torch

from tests.test_engine import greedy, make_model
from tests.test_scheduler import PROMPTS, run
from tinylm.cli import main
from tinylm.cli.args import build_parser
from tinylm.infer.engine import Engine
from tinylm.infer.scheduler import Scheduler
from tinylm.model.llama import Int8KVCache, KVCache, ModelConfig, dequantize_vectors, quantize_vectors
from tinylm.modeldir import save_model_dir
from tinylm.tokenizer import train_tokenizer


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_int8_cache_is_head_dim_plus_two_bytes_per_vector(head_dim):
    """Each vector: head_dim int8 numbers and a 2-byte scale, against 2 · head_dim bytes in bf16."""
    config = ModelConfig(hidden_size=4 * head_dim, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    int8 = Int8KVCache(config, batch_size=5, max_len=7)
    assert int8.bytes() == 2 * 3 * 5 * 2 * 7 * (head_dim + 2)  # k and v, layers, rows, kv heads, positions
    assert int8.bytes() / KVCache(config, 5, 7, dtype=torch.bfloat16).bytes() == (head_dim + 2) / (2 * head_dim)
    assert int8.bytes() / KVCache(config, 5, 7, dtype=torch.float32).bytes() == (head_dim + 2) / (4 * head_dim)


def test_dequantized_vectors_are_within_half_a_step():
    """Every number comes back within scale / 2 of itself, scale = max |x| / 127 of its vector, over
    vectors of very different sizes; zeros stay zeros."""
    torch.manual_seed(0)
    x = torch.randn(6, 50, 32) * 10 ** torch.empty(6, 50, 1).uniform_(-2, 2)
    x[0, 0] = 0
    packed = quantize_vectors(x)
    assert packed.dtype == torch.int8 and packed.shape == (6, 50, 34)
    back = dequantize_vectors(packed, torch.float32)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 * (1 + 1e-3)).all()
    assert (back[0, 0] == 0).all()
    assert dequantize_vectors(packed, torch.bfloat16).dtype == torch.bfloat16


def test_int8_cache_changes_a_trained_models_logits_little(trained_base):
    """Token by token through the cache (a prefill, then one token per step), the int8 cache moves the
    logits by 1% of their spread (standard deviation) on average and 10% at most (measured: 0.1% and
    4%), the same token comes out on top at every position, and greedy replies are the same text."""
    fp, int8 = Engine.from_dir(trained_base, device="cpu"), Engine.from_dir(trained_base, device="cpu", kv_cache="int8")
    ids = torch.tensor([fp.encode("What colour does Ann like? Ann likes blue. What colour does Tom like?")])
    logits = {}
    for engine in (fp, int8):
        cache = engine.new_cache(1, ids.shape[1])
        with torch.no_grad():
            steps = [engine.model(ids[:, :8], cache=cache)]
            steps += [engine.model(ids[:, i : i + 1], cache=cache) for i in range(8, ids.shape[1])]
        logits[engine.kv_cache] = torch.cat(steps, dim=1)[0]
    assert isinstance(cache, Int8KVCache)
    difference, spread = (logits["int8"] - logits["auto"]).abs(), logits["auto"].std()
    assert difference.mean() < 0.01 * spread and difference.max() < 0.1 * spread
    assert torch.equal(logits["int8"].argmax(-1), logits["auto"].argmax(-1))
    prompts = ["What colour does Tom like?", "What colour does 小明 like?", "Bob likes"]
    assert int8.complete(prompts, greedy(16)) == fp.complete(prompts, greedy(16))


def test_server_slots_with_an_int8_cache_get_what_each_request_gets_alone():
    """Six greedy requests through three slots, joining and leaving (fill, move, begin_step): each
    one's tokens equal the same engine's one-at-a-time generation with the int8 cache."""
    engine = Engine(make_model(), kv_cache="int8")
    scheduler = Scheduler(engine, max_batch=3)
    try:
        assert isinstance(scheduler.cache, Int8KVCache)
        collectors = []
        for i, prompt in enumerate(PROMPTS):
            collectors.append(run(scheduler, prompt, greedy(8 + 3 * i)))
            if i % 2:
                collectors[-1].wait_started()
        for i, (prompt, collector) in enumerate(zip(PROMPTS, collectors)):
            assert collector.wait().tokens[0] == engine.generate([prompt], greedy(8 + 3 * i))[0]
    finally:
        scheduler.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer(["the cat sat on the mat. the dog ran."] * 20, vocab_size=300)
    path = tmp_path_factory.mktemp("kv") / "model"
    save_model_dir(make_model(tokenizer.vocab_size), path, tokenizer=tokenizer)
    return path


def test_the_cli_flag_reaches_the_engine(model_dir, monkeypatch, capsys):
    caches, new_cache = [], Engine.new_cache

    def recorded(self, *args):
        caches.append(new_cache(self, *args))
        return caches[-1]

    monkeypatch.setattr(Engine, "new_cache", recorded)
    assert main(["generate", str(model_dir), "--prompt", "the cat", "--max-new-tokens", "4", "--kv-cache", "int8"]) == 0
    assert [type(cache) for cache in caches] == [Int8KVCache]
    for command in ("chat", "serve"):
        assert build_parser().parse_args([command, str(model_dir), "--kv-cache", "int8"]).kv_cache == "int8"
        assert build_parser().parse_args([command, str(model_dir)]).kv_cache == "auto"


def test_the_server_builds_its_slots_as_asked(model_dir):
    from tinylm.serve.app import build_server

    server = build_server(model_dir, device="cpu", kv_cache="int8", thread=False, max_batch=2, max_len=32)
    assert isinstance(server.scheduler.cache, Int8KVCache)


def test_an_unknown_kind_of_cache_is_a_clear_error(model_dir, capsys):
    with pytest.raises(ValueError, match="kv_cache: expected one of auto, int8, got 'fp8'"):
        Engine(make_model(), kv_cache="fp8")
    with pytest.raises(SystemExit):
        main(["generate", str(model_dir), "--prompt", "the cat", "--kv-cache", "fp8"])
    assert "argument --kv-cache: invalid choice: 'fp8'" in capsys.readouterr().err
