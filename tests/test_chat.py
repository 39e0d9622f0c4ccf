"""Terminal chat, driven by scripted input: turns, commands, history, interruption, a real engine."""

import io
import re

import pytest
import torch

from tinylm.infer.chat import PLAIN, render_plain, run_chat
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.tokenizer import train_tokenizer


class ByteTokenizer:
    """Just enough tokenizer for the chat's context accounting: one token per UTF-8 byte."""

    def encode(self, text):
        return list(text.encode())


class ScriptedEngine:
    """Replies from a script, word by word, and records every prompt it was given."""

    vlm = None  # no vision tower
    defaults = SamplingSettings(temperature=0)  # as a model directory's generation_config.json says

    def __init__(self, replies, context_length=10_000, interrupt_after=None):
        self.replies, self.prompts, self.settings = list(replies), [], []
        self.tokenizer, self.context_length = ByteTokenizer(), context_length
        self.interrupt_after = interrupt_after  # the next reply raises KeyboardInterrupt after this many pieces

    def encode(self, text, images=0):
        return self.tokenizer.encode(text)

    def stream(self, prompt, settings, images=None):
        self.prompts.append(prompt)
        self.settings.append(settings)
        interrupt_after, self.interrupt_after = self.interrupt_after, None  # only the next reply
        for n, word in enumerate(re.findall(r"\s*\S+", self.replies.pop(0))):
            if n == interrupt_after:
                raise KeyboardInterrupt
            yield word


def scripted_input(*lines):
    """An input() that returns ``lines`` in order, then signals end of input like Ctrl-D."""
    queue = list(lines)

    def input_fn(prompt):
        if not queue:
            raise EOFError
        return queue.pop(0)

    return input_fn


def test_turns_commands_and_rendered_history():
    engine = ScriptedEngine([" Hello! How can I help?", " Tom is a cat.", " Fresh start."])
    output = io.StringIO()
    history = run_chat(
        engine,
        system="Be brief.",
        input_fn=scripted_input(
            "hi", "who is Tom?", "/reset", "/system Answer in French.", "again", "/exit", "never read"
        ),
        output=output,
    )
    assert engine.prompts == [
        "System: Be brief.\nUser: hi\nAssistant:",
        "System: Be brief.\nUser: hi\nAssistant: Hello! How can I help?\nUser: who is Tom?\nAssistant:",
        "System: Answer in French.\nUser: again\nAssistant:",
    ]
    assert history == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "Fresh start."},
    ]
    shown = output.getvalue()
    assert "Hello! How can I help?\n" in shown and "(new conversation)" in shown and "Answer in French." in shown
    assert all("\nUser:" in s.stop_strings for s in engine.settings)  # the base-model format stops before the next turn


def test_end_of_input_exits_and_system_can_be_removed():
    engine = ScriptedEngine(["ok"])
    history = run_chat(engine, system="x", input_fn=scripted_input("/system", "", "/nope", "hey"), output=io.StringIO())
    assert engine.prompts == ["User: hey\nAssistant:"]
    assert history == [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "ok"}]


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on():
    engine = ScriptedEngine([" a long reply that goes on and on", " second"], interrupt_after=2)
    output = io.StringIO()
    history = run_chat(engine, input_fn=scripted_input("first", "next"), output=output)
    assert "a long [stopped]\n" in output.getvalue()
    assert history[1] == {"role": "assistant", "content": "a long"}  # what was shown stays in the history
    assert engine.prompts[1].endswith("User: first\nAssistant: a long\nUser: next\nAssistant:")


def test_oldest_exchanges_are_dropped_to_fit_the_context():
    engine = ScriptedEngine(["one", "two", "three"], context_length=120)
    settings = SamplingSettings(max_new_tokens=20)
    output = io.StringIO()
    run_chat(engine, settings=settings, input_fn=scripted_input("a" * 30, "b" * 30, "c" * 30, "d" * 200), output=output)
    assert engine.prompts[2] == f"User: {'b' * 30}\nAssistant: two\nUser: {'c' * 30}\nAssistant:"
    assert all(len(p) + 20 <= 120 for p in engine.prompts)
    assert "forgotten" in output.getvalue() and "too long" in output.getvalue()
    assert len(engine.prompts) == 3  # the message that cannot fit is not sent


def test_chat_over_a_real_engine():
    tokenizer = train_tokenizer(["User: hi\nAssistant: hello there, how are you?"] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=256,
    )
    engine = Engine(CausalLM(config), tokenizer)
    settings = SamplingSettings(max_new_tokens=8, temperature=0)
    output = io.StringIO()
    history = run_chat(engine, settings=settings, input_fn=scripted_input("hi", "and you?"), output=output)
    # each reply is what the engine completes for the rendered conversation so far, minus the edges' spaces
    stops = SamplingSettings(max_new_tokens=8, temperature=0, stop_strings=list(PLAIN.stop_strings))
    first = engine.complete([render_plain(history[:1])], stops)[0].strip()
    second = engine.complete([render_plain(history[:3])], stops)[0].strip()
    assert [m["content"] for m in history] == ["hi", first, "and you?", second]
    assert f"\n{first}\n{second}\n" in output.getvalue()  # each reply was shown, on its own line, in turn


def test_prompts_file_is_answered_in_one_batch(tmp_path):
    from tinylm.infer.chat import answer_prompts, read_prompts

    tokenizer = train_tokenizer(["User: hi\nAssistant: hello there, how are you?"] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=256,
    )
    engine = Engine(CausalLM(config), tokenizer)
    (tmp_path / "p.txt").write_text("hi\n\nwho are you?\n你好\n", encoding="utf-8")
    prompts = read_prompts(tmp_path / "p.txt")
    assert prompts == ["hi", "who are you?", "你好"]
    settings = SamplingSettings(max_new_tokens=6, temperature=0)
    records = answer_prompts(engine, prompts, system="Be brief.", settings=settings)
    stops = SamplingSettings(max_new_tokens=6, temperature=0, stop_strings=list(PLAIN.stop_strings))
    for record in records:  # the batch gives each prompt what it gets alone
        alone = engine.run(
            [render_plain([{"role": "system", "content": "Be brief."}, {"role": "user", "content": record["prompt"]}])],
            stops,
        )[0]
        assert record["answer"] == alone.text.strip() and record["finish_reason"] == alone.finish_reason
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n{"text": "no"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected an object with a string field 'prompt'"):
        read_prompts(tmp_path / "p.jsonl")
