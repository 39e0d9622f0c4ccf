"""Byte-level BPE: text ↔ token ids, trained with the Hugging Face ``tokenizers`` library.

How a string becomes ids:

1. **Special tokens first.** Strings such as ``<|im_start|>`` are matched whole and map to their ids.
2. **Pre-tokenization** splits the rest into chunks that BPE never merges across, with the regex Qwen2
   uses (llama.cpp calls it the ``qwen2`` pre-tokenizer): contractions, a word with at most one leading
   non-letter (`` cat``), ONE digit at a time (so ``128`` is always ``1 2 8`` and arithmetic stays
   learnable), runs of punctuation, newlines, other whitespace.
3. **Bytes.** Each chunk is turned into its UTF-8 bytes, each byte shown as one printable character
   (the GPT-2 "byte-level" alphabet). All 256 bytes are in the vocabulary, so nothing is ever unknown.
4. **BPE merges**, learned from the training text, glue frequent neighbours into longer tokens
   (by default never two Chinese characters: see ``train_tokenizer``).

There is no normalizer and no added prefix space, so ``decode(encode(text)) == text`` for every string:
Chinese, emoji, ``\\r\\n``, tabs, runs of spaces, control characters.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from tinylm.hub.models import resolve_model
from tinylm.io import atomic_write_json, atomic_write_text, missing_directory, read_json

# The special tokens, at ids 0..15 in this order. Later stages give the reserved ones their meaning.
SPECIAL_TOKENS = (
    "<|endoftext|>",  # 0: ends every document in pretraining; eos and pad
    "<|im_start|>",  # 1: opens a chat turn: <|im_start|>user\n...
    "<|im_end|>",  # 2: closes a chat turn; an assistant stops here
    "<|image|>",  # 3: one image patch embedding goes here (vision-language models)
    "<|image_start|>",  # 4: before the patches of one image
    "<|image_end|>",  # 5: after them
    "<|tool_call|>",  # 6: the model starts a tool call (JSON follows)
    "<|tool_call_end|>",  # 7
    "<|tool_response|>",  # 8: a tool's answer, fed back to the model
    "<|tool_response_end|>",  # 9
    "<|think|>",  # 10: the model starts reasoning that is not shown as the answer
    "<|think_end|>",  # 11
    "<|reserved_0|>",  # 12-15: spare slots, so a new stage needs no new embedding rows
    "<|reserved_1|>",
    "<|reserved_2|>",
    "<|reserved_3|>",
)
THINK, THINK_END = "<|think|>", "<|think_end|>"  # around reasoning that comes before the answer
EOS_TOKEN = SPECIAL_TOKENS[0]

# Qwen2's pre-tokenizer regex (\p{L}: any letter, \p{N}: any digit, \s: whitespace).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# One Chinese character (Han) or Japanese kana.
CJK_CHARACTER = r"[\p{Han}\p{Hiragana}\p{Katakana}]"

# The longest input transformers encodes without a warning; the model's own limit is in config.json.
MODEL_MAX_LENGTH = 32768

# Names that mean "end of document" in other families, tried when a foreign directory does not say.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>")

# Where transformers keeps a chat template's Jinja next to tokenizer_config.json (and prefers it to the config key).
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The qwen2 regex split, then bytes → byte-level characters."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6400, *, cjk_merges: bool = False) -> Tokenizer:
    """Learn BPE merges from ``texts`` until the vocabulary (specials + 256 bytes + merges) has
    ``vocab_size`` entries, or fewer if the text runs out of pairs to merge.

    With ``cjk_merges`` False no merge joins two Chinese or Japanese characters, so each one is a
    token of its own. The qwen2 regex keeps a run of such characters in one piece (Chinese has no
    spaces), and on a small corpus BPE would fuse whole clauses (``，它的颜色是黄色``) into single
    tokens: a prompt ending inside one ("...颜色是") would then be tokenized unlike anything seen in
    training. Only training is affected; encoding always uses the plain qwen2 pre-tokenizer.
    """
    smallest = len(SPECIAL_TOKENS) + 256
    if vocab_size < smallest:
        raise ValueError(f"vocab_size {vocab_size} is too small: the specials and the 256 bytes alone take {smallest}")
    rust = RustTokenizer(models.BPE())  # no unknown token: every byte has its own id
    rust.decoder = decoders.ByteLevel()
    training_split = qwen2_pre_tokenizer()
    if not cjk_merges:
        one_char_each = pre_tokenizers.Split(Regex(CJK_CHARACTER), behavior="isolated")
        training_split = pre_tokenizers.Sequence([one_char_each, training_split])
    rust.pre_tokenizer = training_split
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # the library's bar prints blank lines into logs
    )
    rust.train_from_iterator(texts, trainer)
    rust.pre_tokenizer = qwen2_pre_tokenizer()  # what encoding uses, here and in transformers/llama.cpp
    return Tokenizer(rust)


class Tokenizer:
    """A trained tokenizer: ours, or any Hugging Face ``tokenizer.json`` (Qwen2, Llama 3, ...).

    ``encode`` never adds tokens of its own (no BOS, no EOS): the data pipeline and the chat template
    decide where special tokens go. Special-token strings written in the text do become their ids.

    ``chat_template`` is the Jinja text that transformers' ``apply_chat_template`` runs (see
    ``tinylm.chat_template``); it travels with the tokenizer through ``save`` and ``load``.
    """

    def __init__(
        self,
        rust: RustTokenizer,
        eos_token: str = EOS_TOKEN,
        bos_token: str | None = None,
        model_max_length: int = MODEL_MAX_LENGTH,
        chat_template: str | None = None,
    ):
        self._rust = rust
        self.eos_token, self.bos_token, self.model_max_length = eos_token, bos_token, model_max_length
        self.chat_template = chat_template
        eos_id = rust.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"the end-of-document token {eos_token!r} is not in the vocabulary")
        self.eos_id: int = eos_id
        vocab = rust.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1  # ids run 0..vocab_size-1 (foreign ones may have gaps)
        self.special_ids: dict[str, int] = {
            added.content: index for index, added in sorted(rust.get_added_tokens_decoder().items()) if added.special
        }

    def __repr__(self) -> str:
        template = "none" if self.chat_template is None else f"{len(self.chat_template)} characters of Jinja"
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, chat_template={template})"

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A copy of this tokenizer with ``tokens`` added as special tokens (new ids after the last one);
        tokens it already has keep their ids."""
        rust = RustTokenizer.from_str(self.to_json())
        rust.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in tokens])
        return Tokenizer(rust, self.eos_token, self.bos_token, self.model_max_length, self.chat_template)

    def with_chat_template(self, chat_template: str | None) -> Tokenizer:
        """The same tokenizer carrying another Jinja chat template (the vocabulary is shared, not copied)."""
        return Tokenizer(self._rust, self.eos_token, self.bos_token, self.model_max_length, chat_template)

    # -- text ↔ ids ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._rust.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode(text)`` and, per token, the ``(start, end)`` character span of ``text`` it came from.

        A character that BPE split into several byte tokens (an emoji, a rare Chinese character) gives
        each of them that character's span. The chat template uses the starts to label tokens."""
        encoding = self._rust.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once on all cores (Rust threads; cap them with RAYON_NUM_THREADS)."""
        return [encoding.ids for encoding in self._rust.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids → text. A prefix of a sequence can end inside a multi-byte character; that partial
        character decodes as U+FFFD, so stream text by decoding the whole sequence, not token by token."""
        return self._rust.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._rust.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """The vocabulary entry, in the byte alphabet (a leading space shows as ``Ġ``)."""
        return self._rust.id_to_token(index)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters: no token covers more characters of a text, so a
        text of C characters has at least C / max_token_chars tokens (a bound known before encoding)."""
        return max(len(entry) for entry in self._rust.get_vocab(with_added_tokens=True))

    def token_bytes(self, index: int) -> bytes:
        """The bytes one token stands for: part of a character, maybe (OpenAI's logprobs report them).

        Byte-level BPE writes every byte as a printable character (``Ġ`` is the space byte), so the
        entry maps back byte for byte; SentencePiece entries are text with ``▁`` for a space, or
        ``<0xE4>`` for a single byte. Special tokens are their text."""
        entry = self._rust.id_to_token(index)
        if entry is None:
            return b""
        if index in self.special_ids.values():
            return entry.encode("utf-8")
        if type(self._rust.decoder).__name__ == "ByteLevel":
            alphabet = _byte_alphabet()
            if all(ch in alphabet for ch in entry):
                return bytes(alphabet[ch] for ch in entry)
        if len(entry) == 6 and entry.startswith("<0x") and entry.endswith(">"):
            return bytes([int(entry[3:5], 16)])
        return entry.replace("\u2581", " ").encode("utf-8")

    # -- files ---------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The tokenizer.json text that ``save`` writes."""
        return self._rust.to_str(pretty=True)

    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer.json text: equal fingerprints encode every text identically."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by
        ``transformers.AutoTokenizer`` as a fast tokenizer that encodes exactly as ``encode`` does.
        A chat template is written twice, as ``chat_template`` in tokenizer_config.json and as
        chat_template.jinja (where transformers ≥ 4.50 looks first); without one, a stale
        chat_template.jinja is removed so that loading the directory gives back this tokenizer.

        No ``add_bos_token`` key is written: transformers would then rebuild the post-processor, and a
        foreign one (Llama 3 prepends its BOS that way) must survive a load/save round trip."""
        directory = Path(directory)
        roles = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.eos_token}
        added = sorted(self._rust.get_added_tokens_decoder().items())
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **roles,
            "unk_token": None,
            "additional_special_tokens": [t.content for _, t in added if t.special and t.content not in roles.values()],
            "clean_up_tokenization_spaces": False,  # decode spaces before punctuation exactly as encoded
            "model_max_length": self.model_max_length,
            "added_tokens_decoder": {
                str(index): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for index, t in added
            },
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        specials_map = {role: token for role, token in roles.items() if token is not None}
        atomic_write_text(directory / "tokenizer.json", self.to_json())
        atomic_write_json(directory / "tokenizer_config.json", config)
        atomic_write_json(directory / "special_tokens_map.json", specials_map)
        if self.chat_template is not None:
            atomic_write_text(directory / CHAT_TEMPLATE_FILE, self.chat_template)
        else:
            (directory / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a directory written by ``save``, or a Hugging Face tokenizer directory with a tokenizer.json
        (or the Hub id of a model that has one: ``tinylm.hub.models.resolve_model``).

        The end-of-document token is, in order: ``eos_token`` of tokenizer_config.json, ``eos_token_id``
        of generation_config.json, or the first of <|endoftext|>, </s>, <|end_of_text|> in the vocabulary.
        The chat template comes from where transformers puts it (see ``_chat_template``), or is None.
        """
        directory = resolve_model(directory)
        path = directory / "tokenizer.json"
        if not directory.is_dir():
            raise FileNotFoundError(missing_directory(directory, "tokenizer directory"))
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (a tokenizer directory needs a tokenizer.json)")
        try:
            rust = RustTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for any malformed file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        config = read_json(directory / "tokenizer_config.json", default={})
        max_length = config.get("model_max_length")
        return cls(
            rust,
            eos_token=_eos_token(rust, config, read_json(directory / "generation_config.json", default={}), directory),
            bos_token=_token_content(config.get("bos_token")),
            model_max_length=max_length if isinstance(max_length, int) and max_length < 2**40 else MODEL_MAX_LENGTH,
            chat_template=_chat_template(directory, config),
        )


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte, inverted: printable Latin-1 bytes stand for
    themselves, and the other bytes (controls, space, ...) take the characters from U+0100 on, in order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _token_content(token) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(directory: Path, config: dict) -> str | None:
    """The Jinja chat template of a tokenizer directory, looked for as transformers does: the
    chat_template.jinja file; else ``chat_template`` in tokenizer_config.json, either a string or a
    list of ``{"name", "template"}`` of which the one named "default"; else chat_template.json, where
    multimodal processors (LLaVA) keep it."""
    path = directory / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = read_json(directory / "chat_template.json", default={}).get("chat_template")
    if isinstance(template, list):
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{directory}: chat_template must be a Jinja string, got {type(template).__name__}")
    return template


def _eos_token(rust: RustTokenizer, config: dict, generation: dict, directory: Path) -> str:
    named = _token_content(config.get("eos_token"))
    if named is not None:
        if rust.token_to_id(named) is None:
            raise ValueError(f"{directory / 'tokenizer_config.json'}: eos_token {named!r} is not in the vocabulary")
        return named
    eos_ids = generation.get("eos_token_id")
    eos_id = eos_ids[0] if isinstance(eos_ids, list) and eos_ids else eos_ids
    if isinstance(eos_id, int) and rust.id_to_token(eos_id) is not None:
        return rust.id_to_token(eos_id)
    for candidate in KNOWN_EOS_TOKENS:
        if rust.token_to_id(candidate) is not None:
            return candidate
    raise ValueError(
        f"{directory}: cannot tell which token ends a document; set eos_token in tokenizer_config.json "
        f"(none of {', '.join(KNOWN_EOS_TOKENS)} is in the vocabulary)"
    )
