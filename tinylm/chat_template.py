"""Chat templates: how a conversation becomes one string, and which of its tokens a model learns.

A chat model sees a conversation as plain text with markers around each turn, for example ChatML::

    <|im_start|>system\\nBe brief.<|im_end|>\\n
    <|im_start|>user\\nHi!<|im_end|>\\n
    <|im_start|>assistant\\nHello.<|im_end|>\\n

(one string: the line breaks here are only for reading; each turn ends in a ``\\n`` character)

Two programs must agree on that text exactly: the SFT data pipeline, which tokenizes it and trains the
model only on the assistant's answers, and whatever serves the model later (our engine, transformers'
``apply_chat_template``, vLLM, llama.cpp), which writes the same markers around a new conversation and
stops generating when the model writes its end-of-turn marker. If the two drift apart by one character
the model never sees, at inference, the text it learned to stop on ("the model never stops").

So each template here is ONE small definition, a ``ChatTemplate`` of format pieces, and everything is
derived from it:

- ``render`` / ``encode``: the text, the token ids and the assistant-only loss mask for training;
- ``jinja``: the Jinja ``chat_template`` saved with the tokenizer, which transformers runs;
- ``stop_strings`` / ``stop_token_ids``: where the inference engine stops.

The loss mask is True on the assistant's content AND its end-of-turn marker (``<|im_end|>``, ``</s>``),
so the model learns to stop; it is False on the system prompt, the user's turns and the role headers.

Adding a template is a few lines: a new ``ChatTemplate(...)`` in ``TEMPLATES``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tinylm.tokenizer import THINK, THINK_END

if TYPE_CHECKING:
    from tinylm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
CONTENT = "{content}"  # where a message's content goes in a format piece

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format as a handful of strings. ``{content}`` marks where a message's text goes.

    A conversation is rendered as: ``system`` (filled with the system message) or ``no_system`` when the
    conversation has none; then, per message, ``user`` for a user turn, or ``assistant_header`` +
    ``assistant`` + ``separator`` for an assistant turn; then, when a reply is wanted, ``assistant_header``
    alone, which is the generation prompt.

    The ``assistant`` piece is what the model is trained to write, so it holds the end-of-turn marker
    after ``{content}``; that marker is also the stop string. Everything else is context: its tokens are
    masked out of the loss.
    """

    name: str
    system: str
    user: str
    assistant_header: str
    assistant: str
    no_system: str = ""
    separator: str = ""

    def __post_init__(self):
        for field in ("system", "user", "assistant"):
            if getattr(self, field).count(CONTENT) != 1:
                raise ValueError(
                    f"template {self.name!r}: {field} must contain {CONTENT} exactly once, got {getattr(self, field)!r}"
                )

    # -- text ----------------------------------------------------------------------------------

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, trained)`` pieces in order; joined, they are ``render``.

        ``trained`` is True for exactly the assistant pieces (content + end-of-turn marker)."""
        validate_messages(messages)
        pieces = []
        if not messages or messages[0]["role"] != "system":
            pieces.append((self.no_system, False))
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "assistant":
                pieces += [
                    (self.assistant_header, False),
                    (_fill(self.assistant, content), True),
                    (self.separator, False),
                ]
            else:
                pieces.append((_fill(self.system if role == "system" else self.user, content), False))
        if add_generation_prompt:
            pieces.append((self.assistant_header, False))
        return [(text, trained) for text, trained in pieces if text]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as the model sees it; with ``add_generation_prompt`` it ends where the
        assistant's reply should begin."""
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of ``render(...)`` and the loss mask: True where the model is trained to predict.

        The whole text is tokenized ONCE, so the ids are exactly what inference sees (tokenizing turn by
        turn and concatenating would differ where BPE merges across a turn boundary). Each token is then
        labelled by where its first character lies: inside an assistant piece → trained. A token that BPE
        merged across the end of an answer (e.g. ``>`` + ``\\n`` after ``</s>``) thus counts as the answer's.
        """
        segments = self.segments(messages, add_generation_prompt)
        text = "".join(piece for piece, _ in segments)
        ids, offsets = tokenizer.encode_with_offsets(text)
        trained_chars = []
        for piece, trained in segments:
            trained_chars += [trained] * len(piece)
        mask = [start < len(text) and trained_chars[start] for start, _ in offsets]
        return ids, mask

    def markup_token_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The special tokens this template writes around turns, and the reasoning markers: what a model
        fine-tuned into a chat model meets for the first time when its base never saw a chat. Sorted ids."""
        pieces = [self.system, self.user, self.assistant_header, self.assistant, self.no_system, self.separator]
        text = "".join(pieces) + THINK + THINK_END
        return sorted({i for i in tokenizer.encode(text) if i in tokenizer.special_ids.values()})

    # -- inference -----------------------------------------------------------------------------

    @property
    def end_of_turn(self) -> str:
        """What the assistant writes after its answer: the ``assistant`` piece after ``{content}``."""
        return self.assistant.partition(CONTENT)[2]

    @property
    def stop_strings(self) -> list[str]:
        """Text at which the engine ends a reply (cut before it): the end-of-turn marker, if any."""
        return [self.end_of_turn] if self.end_of_turn else []

    def stop_token_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Ids that end a reply: each stop string that ``tokenizer`` encodes as one token (``<|im_end|>`` in
        tinylm and Qwen vocabularies, ``</s>`` in Llama ones; in ours ``</s>`` is three tokens and the
        engine matches the text instead), then the tokenizer's end-of-document id, so a model that
        writes it stops too."""
        single = [ids[0] for ids in map(tokenizer.encode, self.stop_strings) if len(ids) == 1]
        return list(dict.fromkeys([*single, tokenizer.eos_id]))

    # -- export --------------------------------------------------------------------------------

    def jinja(self) -> str:
        """The Jinja ``chat_template`` that renders exactly like ``render``, generated from the same
        pieces. Written for transformers' environment (``trim_blocks``, ``raise_exception``); every
        character of output comes from a ``{{- ... -}}`` expression, so the layout here adds nothing."""
        lines = [f"{{#- tinylm chat template {self.name}: generated by tinylm.chat_template, edit it there -#}}"]
        if self.no_system:
            lines += [
                "{%- if not messages or messages[0]['role'] != 'system' -%}",
                f"    {{{{- {_jinja_text(self.no_system)} -}}}}",
                "{%- endif -%}",
            ]
        lines += [
            "{%- for message in messages -%}",
            "    {%- if message['role'] == 'system' and loop.first -%}",
            f"        {{{{- {_jinja_text(self.system)} -}}}}",
            "    {%- elif message['role'] == 'user' -%}",
            f"        {{{{- {_jinja_text(self.user)} -}}}}",
            "    {%- elif message['role'] == 'assistant' -%}",
            f"        {{{{- {_jinja_text(self.assistant_header, self.assistant, self.separator)} -}}}}",
            "    {%- else -%}",
            "        {{- raise_exception('message ' ~ loop.index0 ~ ': role ' ~ message['role'] ~ "
            "' is not allowed here (expected system first, then user or assistant)') -}}",
            "    {%- endif -%}",
            "{%- endfor -%}",
        ]
        if self.assistant_header:
            lines += [
                "{%- if add_generation_prompt -%}",
                f"    {{{{- {_jinja_text(self.assistant_header)} -}}}}",
                "{%- endif -%}",
            ]
        return "\n".join(lines) + "\n"

    def attach(self, tokenizer: Tokenizer) -> Tokenizer:
        """``tokenizer`` carrying this template's Jinja, so ``Tokenizer.save`` exports it."""
        return tokenizer.with_chat_template(self.jinja())


def _fill(piece: str, content: str) -> str:
    """``piece`` with its ``{content}`` replaced (not ``str.format``: contents may hold braces)."""
    before, _, after = piece.partition(CONTENT)
    return before + content + after


def _jinja_text(*pieces: str) -> str:
    """A Jinja expression joining format pieces with ``+``: literal text quoted, ``{content}`` → the
    message's content, empty text dropped."""
    operands = []
    for piece in pieces:
        before, found, after = piece.partition(CONTENT)
        operands += [_jinja_string(before), "message['content']" if found else "", _jinja_string(after)]
    return " + ".join(operand for operand in operands if operand)


def _jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal ("" for no text). JSON string syntax is valid Jinja string
    syntax (``\\n``, ``\\"``, ``\\\\``); with ``ensure_ascii=False`` an emoji stays one character
    instead of a JSON surrogate pair, which Jinja would decode into two broken halves."""
    return json.dumps(text, ensure_ascii=False) if text else ""


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise ValueError naming the message index and field unless ``messages`` is a list of
    ``{"role", "content"}`` dicts: roles system/user/assistant, a system message only first, string contents."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"expected a list of messages, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(
                f"message {index}: expected a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index}: field 'role' is {role!r}, expected one of {', '.join(ROLES)}")
        if role == "system" and index != 0:
            raise ValueError(
                f"message {index}: field 'role' is 'system', but only the first message may be a system prompt"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {index}: field 'content' must be a string, got {type(content).__name__}")


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, ChatTemplate] = {
    template.name: template
    for template in (
        ChatTemplate(
            # ChatML (Qwen, MiniMind): the model learns to end with the special token <|im_end|>; the "\n" after
            # it is written by the template, not the model. No system turn unless the conversation has one.
            name="chatml",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_header="<|im_start|>assistant\n",
            assistant="{content}<|im_end|>",
            separator="\n",
        ),
        ChatTemplate(
            # XTuner's vicuna: the system line always opens the chat (the default sentence alone when there is
            # no system message), "USER: ... ASSISTANT:" per turn, "\n" between turns. The answer's leading
            # space is the model's to write, so the prompt ends at "ASSISTANT:" (a prompt ending in a space
            # tokenizes unlike anything seen in training). The end-of-turn is the text </s>: Llama's eos token,
            # and three ordinary tokens in a tinylm tokenizer, where the engine stops on the string.
            name="vicuna",
            system=VICUNA_SYSTEM + " {content}\n",
            no_system=VICUNA_SYSTEM + "\n",
            user="USER: {content} ",
            assistant_header="ASSISTANT:",
            assistant=" {content}</s>",
            separator="\n",
        ),
        ChatTemplate(
            # Llama-Chinese (FlagAlpha): <s>Human: ...\n</s><s>Assistant: ...</s>. A system prompt is a turn of its
            # own in the same shape, "<s>System: ...\n</s>", before the first Human turn.
            name="llama-chinese",
            system="<s>System: {content}\n</s>",
            user="<s>Human: {content}\n</s>",
            assistant_header="<s>Assistant:",
            assistant=" {content}</s>",
        ),
        ChatTemplate(
            # For base models: the contents back to back, with no roles and no markers, so a chat is a text the
            # model continues. Nothing to stop on but the end-of-document token and the length limit.
            name="raw",
            system="{content}",
            user="{content}",
            assistant_header="",
            assistant="{content}",
        ),
    )
}
DEFAULT_TEMPLATE = "chatml"


def get_template(name: str) -> ChatTemplate:
    """The registered template called ``name``."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def find_template(jinja: str | None) -> ChatTemplate | None:
    """The registered template whose generated Jinja is exactly ``jinja``, else None (a foreign or
    edited template: training labels can then no longer be derived from it)."""
    return next((template for template in TEMPLATES.values() if template.jinja() == jinja), None)


# -- reasoning ------------------------------------------------------------------------------------


def split_thinking(reply: str) -> tuple[str | None, str]:
    """(the reasoning, the answer) of a reply: what lies between ``<|think|>`` and ``<|think_end|>`` at
    its start, and what follows; (None, the whole reply) when it does not open with reasoning. A reply
    that opens reasoning and never closes it has no answer: (its reasoning, "")."""
    text = reply.lstrip()
    if not text.startswith(THINK):
        return None, reply.strip()
    thinking, closed, answer = text[len(THINK) :].partition(THINK_END)
    return thinking.strip(), answer.strip() if closed else ""
