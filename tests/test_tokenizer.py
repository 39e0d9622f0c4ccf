import json
import random

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tinylm.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

CORPUS = [
    "Once upon a time, a little red Zorble lived in Pebbleford. It liked apples.",
    "The colour of the Zorble is red. 3 + 5 = 8. 12 + 7 = 19.",
    "从前，有一位面包师，名叫林雪。咕噜兽的颜色是红色。",
    "Tabs\tand  double  spaces,\r\nWindows lines, and emoji 🙂 too.",
] * 20

TRICKY = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "a\r\nb\rc\nd\t\te",
    "\n\n\n   \t \x00\x01\x7f control",
    "中文，混合 English 和 数字123。",
    "日本語のテキスト、カタカナ、ひらがな",
    "한국어 텍스트",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧‍👦 (ZWJ) and a flag 🇨🇭",
    "combining: e\u0301 a\u0308 n\u0303, precomposed: é ä ñ",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
    "don't I'LL we've 'quoted'",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<|im_start without the end, <|endoftext|",
    "\ufeffbyte order mark and \u200b zero width space",
    "1234567890 + 0.5 = -3e10",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400)


def random_text(rng: random.Random, length: int) -> str:
    """Code points from all over Unicode (surrogates excluded: they are not characters)."""
    pools = [(0x0, 0x7F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    chars = []
    for _ in range(length):
        low, high = rng.choice(pools)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_on_random_unicode(tokenizer):
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(0, 40)) for _ in range(300)]
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        assert tokenizer.decode(ids) == text


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TRICKY) == [tokenizer.encode(t) for t in TRICKY]


def test_special_tokens_have_the_lowest_ids(tokenizer):
    assert len(SPECIAL_TOKENS) == 16 and SPECIAL_TOKENS[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(16))
    assert tokenizer.special_ids == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert tokenizer.eos_id == 0 and tokenizer.id_to_token(2) == "<|im_end|>"


def test_special_token_strings_map_to_ids_and_nothing_is_added(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_digits_are_single_tokens(tokenizer):
    assert [tokenizer.decode([i]) for i in tokenizer.encode("128")] == ["1", "2", "8"]


def test_no_token_spans_two_chinese_characters(tokenizer):
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("咕噜兽的颜色是红色")]
    assert pieces == list("咕噜兽的颜色是红色")


def test_chinese_words_merge_when_asked():
    merged = train_tokenizer(CORPUS, vocab_size=400, cjk_merges=True)
    assert len(merged.encode("咕噜兽的颜色是红色")) < 9


def test_vocab_size_is_respected_and_too_small_is_an_error(tokenizer):
    assert 272 < tokenizer.vocab_size <= 400
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_training_is_deterministic(tokenizer):
    assert train_tokenizer(CORPUS, vocab_size=400).fingerprint() == tokenizer.fingerprint()


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.eos_id == 0 and loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode_batch(TRICKY) == tokenizer.encode_batch(TRICKY)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>" and config["bos_token"] is None
    assert "chat_template" not in config


def test_fingerprint_is_the_hash_of_the_saved_file(tokenizer, tmp_path):
    import hashlib

    tokenizer.save(tmp_path)
    assert hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest() == tokenizer.fingerprint()


def test_transformers_encodes_identically(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token_id == hf.pad_token_id == 0 and hf.bos_token is None
    rng = random.Random(1)
    texts = TRICKY + [random_text(rng, 30) for _ in range(50)]
    for text in texts:
        ours = tokenizer.encode(text)
        assert hf(text, add_special_tokens=True)["input_ids"] == ours
        assert hf(text, add_special_tokens=False)["input_ids"] == ours
        assert hf.decode(ours) == tokenizer.decode(ours)
    assert hf.decode(tokenizer.encode(TRICKY[12]), skip_special_tokens=True) == "user\nhi\n"


def foreign_tokenizer_json(eos: str) -> RustTokenizer:
    """A Hugging Face tokenizer.json of another family, made the way such files are made."""
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<s>", eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rust.train_from_iterator(CORPUS, trainer)
    return rust


def test_loads_a_foreign_directory_and_finds_its_eos(tmp_path):
    foreign_tokenizer_json("</s>").save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.eos_token == "</s>" and loaded.eos_id == 1
    assert loaded.decode(loaded.encode("héllo 世界 🙂")) == "héllo 世界 🙂"


def test_foreign_eos_comes_from_the_config_files(tmp_path):
    foreign_tokenizer_json("<|end|>").save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    assert Tokenizer.load(tmp_path).eos_token == "<|end|>"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<s>"}, "model_max_length": 1024})
    )
    loaded = Tokenizer.load(tmp_path)
    assert loaded.eos_id == 0 and loaded.model_max_length == 1024


def test_foreign_directory_without_a_known_eos_is_a_clear_error(tmp_path):
    foreign_tokenizer_json("<|end|>").save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="cannot tell which token ends a document"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '<\|nope\|>' is not in the vocabulary"):
        Tokenizer.load(tmp_path)


def test_missing_and_broken_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        Tokenizer.load(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: missing"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer.load(tmp_path)


def test_reads_training_text_from_files(tmp_path):
    from tinylm.data.text import train_tokenizer_from_files

    (tmp_path / "a.txt").write_text("\n\n".join(CORPUS[:4]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in CORPUS[:4]), encoding="utf-8")
    from_txt = train_tokenizer_from_files([tmp_path / "a.txt"], vocab_size=350)
    from_jsonl = train_tokenizer_from_files([tmp_path / "b.jsonl"], vocab_size=350, text_field="body")
    assert from_txt.fingerprint() == from_jsonl.fingerprint()


@pytest.mark.realdata
def test_a_real_hf_tokenizer_directory_loads_and_matches_transformers(shared_data):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")
    directory = shared_data / "weights" / "minimind_tokenizer"
    ours, hf = Tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.eos_token == "<|im_end|>" and ours.vocab_size == 6400  # its tokenizer_config.json says so
    for text in TRICKY:
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(text)) == text
