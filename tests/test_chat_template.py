import json
from collections.abc import Mapping

import pytest

from tinylm.chat_template import (
    DEFAULT_TEMPLATE,
    TEMPLATES,
    ChatTemplate,
    find_template,
    get_template,
    validate_messages,
)
from tinylm.tokenizer import Tokenizer, train_tokenizer

# Only message contents, no template markup: a tokenizer trained on the markup could merge across turn
# boundaries, and then the mask test below could not ask for exact answer text.
CORPUS = [
    "Once upon a time, a little red Zorble lived in Pebbleford. It liked apples.",
    "The colour of the Zorble is red. 3 + 5 = 8. What is the capital of Pebbleford?",
    "从前，有一位面包师，名叫林雪。咕噜兽的颜色是红色。你好！请问你是谁？",
    "I am a helpful assistant 🙂 and I answer questions. 我是一个乐于助人的助手。",
] * 10

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
ENGLISH = [
    {"role": "user", "content": "What colour is the Zorble?"},
    {"role": "assistant", "content": "The Zorble is red."},
    {"role": "user", "content": "And 3 + 5?"},
    {"role": "assistant", "content": "3 + 5 = 8."},
]
CHINESE = [
    {"role": "user", "content": "你好！你是谁？"},
    {"role": "assistant", "content": "我是一个乐于助人的助手。"},
    {"role": "user", "content": "咕噜兽是什么颜色？"},
    {"role": "assistant", "content": "咕噜兽的颜色是红色。"},
]
EMOJI = [
    {"role": "user", "content": "Smile 🙂👍🏽 please"},
    {"role": "assistant", "content": "🙂 Sure! 👨‍👩‍👧‍👦"},
]
CONVERSATIONS = {
    "english": ENGLISH,
    "english+system": [SYSTEM, *ENGLISH],
    "chinese": CHINESE,
    "chinese+system": [{"role": "system", "content": "你是一个助手。"}, *CHINESE],
    "emoji+system": [SYSTEM, *EMOJI],
    "open-question": ENGLISH[:3],  # ends on the user: what a chat sends with add_generation_prompt
}

# What each template trains on per answer, written out here independently of the template definitions.
TRAINED_ANSWER = {
    "chatml": "{}<|im_end|>",
    "vicuna": " {}</s>",
    "llama-chinese": " {}</s>",
    "raw": "{}",
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def hf_tokenizers(tokenizer, tmp_path_factory) -> dict:
    """Per template: our tokenizer saved with it, loaded back by transformers."""
    transformers = pytest.importorskip("transformers")
    loaded = {}
    for name, template in TEMPLATES.items():
        directory = template.attach(tokenizer).save(tmp_path_factory.mktemp(name))
        loaded[name] = transformers.AutoTokenizer.from_pretrained(directory)
    return loaded


def masked_runs(tokenizer: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """The text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in [*runs, current] if run]


# -- the formats ---------------------------------------------------------------------------------

VICUNA_SENTENCE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TWO_TURNS = [
    SYSTEM,
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
EXPECTED_TEXT = {
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "vicuna": f"{VICUNA_SENTENCE} You are a helpful assistant.\nUSER: Hi ASSISTANT: Hello!</s>\nUSER: Bye ASSISTANT:",
    "llama-chinese": "<s>System: You are a helpful assistant.\n</s><s>Human: Hi\n</s><s>Assistant: Hello!</s>"
    "<s>Human: Bye\n</s><s>Assistant:",
    "raw": "You are a helpful assistant.HiHello!Bye",
}
EXPECTED_WITHOUT_SYSTEM = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n",
    "vicuna": f"{VICUNA_SENTENCE}\nUSER: Hi ",
    "llama-chinese": "<s>Human: Hi\n</s>",
    "raw": "Hi",
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_render_writes_the_documented_format(name):
    template = get_template(name)
    assert template.render(TWO_TURNS, add_generation_prompt=True) == EXPECTED_TEXT[name]
    assert template.render(TWO_TURNS[1:2]) == EXPECTED_WITHOUT_SYSTEM[name]


def test_registry_and_stop_markers(tokenizer):
    assert DEFAULT_TEMPLATE == "chatml" and set(TEMPLATES) == {"chatml", "vicuna", "llama-chinese", "raw"}
    with pytest.raises(ValueError, match="unknown chat template 'alpaca'; expected one of chatml, vicuna"):
        get_template("alpaca")
    chatml, vicuna, raw = get_template("chatml"), get_template("vicuna"), get_template("raw")
    assert chatml.stop_strings == ["<|im_end|>"] and chatml.stop_token_ids(tokenizer) == [2, tokenizer.eos_id]
    # </s> is three ordinary tokens in a tinylm tokenizer: the engine stops on the text, or on the eos id.
    assert vicuna.stop_strings == get_template("llama-chinese").stop_strings == ["</s>"]
    assert vicuna.stop_token_ids(tokenizer) == [tokenizer.eos_id]
    assert raw.stop_strings == [] and raw.stop_token_ids(tokenizer) == [tokenizer.eos_id]


# -- training labels -----------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_mask_covers_exactly_each_answer_and_its_end_of_turn(tokenizer, name, conversation, add_generation_prompt):
    template, messages = get_template(name), CONVERSATIONS[conversation]
    ids, mask = template.encode(tokenizer, messages, add_generation_prompt)
    assert ids == tokenizer.encode(template.render(messages, add_generation_prompt))  # tokenized once, as a whole
    assert len(mask) == len(ids)
    answers = [TRAINED_ANSWER[name].format(m["content"]) for m in messages if m["role"] == "assistant"]
    assert masked_runs(tokenizer, ids, mask) == answers


@pytest.mark.parametrize("name", ["vicuna", "llama-chinese"])
def test_end_of_turn_as_a_special_token_as_in_llama_tokenizers(tokenizer, name):
    """In a Llama vocabulary <s> and </s> are special tokens: </s> is then one stop id, and trained."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer.from_str(tokenizer.to_json())
    rust.add_special_tokens(
        [AddedToken("<s>", special=True, normalized=False), AddedToken("</s>", special=True, normalized=False)]
    )
    llama_like = Tokenizer(rust)
    template, messages = get_template(name), CONVERSATIONS["english+system"]
    end_id = llama_like.token_to_id("</s>")
    assert template.stop_token_ids(llama_like) == [end_id, llama_like.eos_id]
    ids, mask = template.encode(llama_like, messages)
    assert [trained for token, trained in zip(ids, mask) if token == end_id] == (
        [True, True] if name == "vicuna" else [False, False, True, False, True]
    )  # llama-chinese also closes prompts
    answers = [TRAINED_ANSWER[name].format(m["content"]) for m in messages if m["role"] == "assistant"]
    assert masked_runs(llama_like, ids, mask) == answers


def test_custom_template_is_a_few_lines(tokenizer):
    template = ChatTemplate(
        name="alpaca-like",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant_header="### Response:\n",
        assistant="{content}<|endoftext|>",
        separator="\n\n",
    )
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    ids, mask = template.encode(tokenizer, messages)
    assert template.render(messages) == "### Instruction:\nSay hi\n\n### Response:\nhi<|endoftext|>\n\n"
    assert masked_runs(tokenizer, ids, mask) == ["hi<|endoftext|>"]
    assert template.stop_token_ids(tokenizer) == [tokenizer.eos_id]
    with pytest.raises(ValueError, match=r"user must contain \{content\} exactly once"):
        ChatTemplate(
            name="broken", system="{content}", user="no placeholder", assistant_header="", assistant="{content}"
        )


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], "message 1: field 'role' is 'bot'"),
        ([{"role": "user", "content": "hi"}, SYSTEM], "message 1: field 'role' is 'system', but only the first"),
        ([SYSTEM, {"role": "user", "content": ["hi"]}], "message 1: field 'content' must be a string, got list"),
        ([{"role": "user"}], "message 0: field 'content' must be a string, got NoneType"),
        (["hi"], "message 0: expected a dict with 'role' and 'content', got str"),
        ({"role": "user", "content": "hi"}, "expected a list of messages, got dict"),
    ],
)
def test_invalid_conversations_name_the_message_and_field(tokenizer, messages, error):
    with pytest.raises(ValueError, match=error):
        validate_messages(messages)
    with pytest.raises(ValueError, match=error):
        get_template("chatml").encode(tokenizer, messages)


# -- the exported Jinja --------------------------------------------------------------------------


def test_jinja_renders_like_render_even_with_awkward_characters():
    """Quotes, backslashes, Jinja syntax and emoji in the pieces and contents survive the export."""
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ChatTemplate(
        name="awkward",
        system='[sys "{content}"]\t',
        user="{{ user }} {% x %}: {content} \\n\\",
        assistant_header="🤖 '",
        assistant="{content}{# end #}",
        no_system="none\r\n",
        separator="\n",
    )
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    compiled = environment.from_string(template.jinja(), globals={"raise_exception": raise_exception})
    contents = ["{content} {{ x }}", "'\"\\ 你好 🙂👍🏽", "\n\t end"]
    messages = [{"role": role, "content": c} for role, c in zip(["user", "assistant", "user"], contents)]
    for conversation in (messages, [SYSTEM, *messages], []):
        for add_generation_prompt in (False, True):
            expected = template.render(conversation, add_generation_prompt)
            assert compiled.render(messages=conversation, add_generation_prompt=add_generation_prompt) == expected
    with pytest.raises(jinja2.TemplateError, match="message 1: role system is not allowed here"):
        compiled.render(messages=[messages[0], SYSTEM], add_generation_prompt=False)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_transformers_renders_and_tokenizes_exactly_like_us(
    tokenizer, hf_tokenizers, name, conversation, add_generation_prompt
):
    template, messages, hf = get_template(name), CONVERSATIONS[conversation], hf_tokenizers[name]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == template.render(messages, add_generation_prompt)
    encoded = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded  # transformers 5 returns a BatchEncoding
    assert list(ids) == template.encode(tokenizer, messages, add_generation_prompt)[0]


def test_transformers_rejects_a_misplaced_system_message(hf_tokenizers):
    with pytest.raises(Exception, match="message 1: role system is not allowed here"):
        hf_tokenizers["chatml"].apply_chat_template([ENGLISH[0], SYSTEM], tokenize=False)


# -- saving with the tokenizer -------------------------------------------------------------------


def test_tokenizer_saves_and_loads_its_template(tokenizer, tmp_path):
    template = get_template("vicuna")
    directory = template.attach(tokenizer).save(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == template.jinja()
    assert (
        json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
        == template.jinja()
    )
    loaded = Tokenizer.load(directory)
    assert loaded.chat_template == template.jinja() and find_template(loaded.chat_template) is template
    assert tokenizer.chat_template is None and find_template(tokenizer.chat_template) is None  # attach made a new one

    Tokenizer.load(directory).with_chat_template(None).save(tmp_path)  # no template: no stale file left behind
    assert not (tmp_path / "chat_template.jinja").exists() and Tokenizer.load(tmp_path).chat_template is None


def test_load_finds_templates_where_transformers_puts_them(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))

    config_path.write_text(json.dumps({**config, "chat_template": "{{ 'only in the config' }}"}), encoding="utf-8")
    assert Tokenizer.load(tmp_path).chat_template == "{{ 'only in the config' }}"

    several = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    config_path.write_text(json.dumps({**config, "chat_template": several}), encoding="utf-8")
    assert Tokenizer.load(tmp_path).chat_template == "plain"

    config_path.write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from a processor"}), encoding="utf-8")
    assert Tokenizer.load(tmp_path).chat_template == "from a processor"

    (tmp_path / "chat_template.jinja").write_text("the file wins", encoding="utf-8")
    assert Tokenizer.load(tmp_path).chat_template == "the file wins"
    assert find_template(Tokenizer.load(tmp_path).chat_template) is None
