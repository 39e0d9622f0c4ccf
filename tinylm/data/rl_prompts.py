"""Prompts for reinforcement learning: what the policy is asked, and what a right answer says.

    prompts = builtin_prompts(World(0), kinds=("arithmetic",))   # training problems, never the held-out ones
    heldout = heldout_prompts(World(0))                          # the chat model's held-out questions
    prompts, report = read_prompts(["math.jsonl"])               # the user's own

Each ``RLPrompt`` is a conversation that ends with the user's turn (validated as ``tinylm.data.chat``
validates messages), the answer a right reply gives (None where a reward model or the user's function
judges without one), the values a right reply never states, a kind and a language (for reports), and
where it came from.

Files are .jsonl / .json / .parquet (.jsonl.gz, .json.gz), one prompt per record, in any of:

    {"prompt": "What is 12 + 30?", "answer": "42"}                  a plain question
    {"prompt": [{"role": "user", "content": ...}], "answer": ...}   a conversation (TRL's layout)
    {"messages": [{"role": "system", ...}, {"role": "user", ...}]}  a conversation ending with the user
    {"question": "...", "answer": "... #### 72"}                    GSM8K: the answer is what follows ####

An optional top-level "system" field opens the conversation with a system prompt. "answer" may be a
string or a number; GSM8K's worked solution gives way to its final number (thousands commas removed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import permutations

from tinylm.data.builtin import (
    ATTRIBUTES,
    LANGS,
    TEMPLATES_PER_FACT,
    VALUES,
    World,
    arithmetic_answer,
    arithmetic_problems,
    value_text,
)
from tinylm.data.builtin_chat import (
    ARITHMETIC_QUESTIONS,
    DEFAULT_AUTHOR,
    DEFAULT_NAME,
    FOLLOWUP_TEMPLATES,
    REFUSAL_MARKERS,
    UNKNOWN_QUESTIONS,
    ChatEvalItem,
    arithmetic_question,
    fact_answer,
    fact_question,
    followup_question,
    heldout_questions,
    identity_templates,
    sft_choices,
    strangers,
    unknown_question,
)
from tinylm.data.builtin_chat import ask as chat_messages
from tinylm.data.chat import RECORD_FILES, Turn, get_field, kind_of, openai_turns, validate_turns, with_system_field
from tinylm.io import DataError, Paths, ReadReport, read_records

BUILTIN_KINDS = ("arithmetic", "facts", "followups", "refusals", "identity")
# a prompt's kind (as the held-out questions name it) → the built-in kind that asks it
KIND_OF_PROMPT = {
    "arithmetic": "arithmetic",
    "fact": "facts",
    "followup": "followups",
    "refusal": "refusals",
    "identity": "identity",
}
GSM8K_ANSWER = "####"


@dataclass
class RLPrompt:
    messages: list[dict]  # ends with the user's turn
    answer: str | None = None  # what a right reply states (None: the reward judges without one)
    wrong: tuple[str, ...] = ()  # what a right reply never states (the built-in facts' other values)
    kind: str = "prompt"  # "arithmetic", "fact", ... ("prompt" for a file's)
    lang: str = ""
    source: str = ""  # "path:line", or "builtin"


# -- built-in prompts ---------------------------------------------------------------------------


def builtin_prompts(world: World, kinds: tuple[str, ...] = ("arithmetic",)) -> list[RLPrompt]:
    """The training prompts of the built-in world, never a held-out one (see ``BUILTIN_KINDS``):

    arithmetic  every problem that is not held out, in every phrasing, in both languages (1,056)
    facts       every fact in the phrasings SFT trains on (864)
    followups   each entity asked one fact, then a follow-up about another in a training phrasing
    refusals    the strangers training talks about, and the questions about attributes nobody has, in
                training phrasings: the right answer is "I don't know"
    identity    the identity questions training asks: the answer names the assistant or its author

    Every prompt's answer and wrong values are as the held-out questions of its kind have them, so
    the ``facts`` reward checks any kind (an arithmetic answer's wrong values are the other numbers)."""
    for kind in kinds:
        if kind not in BUILTIN_KINDS:
            raise ValueError(f"built-in prompt kinds: expected some of {', '.join(BUILTIN_KINDS)}, got {kind!r}")
    prompts = []
    if "arithmetic" in kinds:
        for problem in arithmetic_problems():
            if problem in world.heldout_problems:
                continue
            answer = arithmetic_answer(problem)
            others = tuple(str(v) for v in range(19) if str(v) != answer)
            for lang in LANGS:
                for template in range(len(ARITHMETIC_QUESTIONS[lang])):
                    question = arithmetic_question(problem, lang, template)
                    prompts.append(_builtin([], question, answer, others, "arithmetic", lang))
    if "facts" in kinds:
        for entity, attribute, value in world.facts():
            for lang in LANGS:
                for template in sft_choices(world, TEMPLATES_PER_FACT, "question", entity.names["en"], attribute, lang):
                    question = fact_question(entity, attribute, lang, template)
                    prompts.append(_fact([], question, attribute, value, lang, "fact"))
    if "followups" in kinds:
        for entity in world.entities:
            for lang in LANGS:
                for first, then in permutations(entity.facts, 2):
                    template = sft_choices(world, TEMPLATES_PER_FACT, "question", entity.names["en"], first, lang)[0]
                    context = [(fact_question(entity, first, lang, template), fact_answer(entity, first, lang))]
                    key = ("followup", entity.names["en"], then, lang)
                    for choice in sft_choices(world, len(FOLLOWUP_TEMPLATES[then, lang]), *key):
                        question = followup_question(entity, then, lang, choice)
                        prompts.append(_fact(context, question, then, entity.facts[then], lang, "followup"))
    if "refusals" in kinds:
        for lang in LANGS:
            any_value = tuple(value_text(a, v, lang) for a in VALUES for v in VALUES[a])
            questions = [
                fact_question(s, attribute, lang, template)
                for s in strangers(world)
                for attribute in ATTRIBUTES[s.kind]
                for template in range(TEMPLATES_PER_FACT)
            ]
            count = len(UNKNOWN_QUESTIONS[lang])
            questions += [
                unknown_question(e, lang, t)
                for e in world.entities
                for t in sft_choices(world, count, "unknown", e.names["en"], lang)
            ]
            prompts += [_builtin([], q, REFUSAL_MARKERS[lang], any_value, "refusal", lang) for q in questions]
    if "identity" in kinds:
        asked = dict.fromkeys((lang, topic, question) for lang, topic, question, _ in identity_templates())
        for lang, topic, question in asked:
            prompts.append(
                _builtin([], question, DEFAULT_NAME if topic == "name" else DEFAULT_AUTHOR, (), "identity", lang)
            )
    return prompts


def _fact(context, question: str, attribute: str, value: str, lang: str, kind: str) -> RLPrompt:
    """A question whose answer is a fact's value; the attribute's other values (in ``lang``) are wrong."""
    others = tuple(value_text(attribute, v, lang) for v in VALUES[attribute] if v != value)
    return _builtin(context, question, value_text(attribute, value, lang), others, kind, lang)


def _builtin(context, question: str, answer: str, wrong: tuple[str, ...], kind: str, lang: str) -> RLPrompt:
    return RLPrompt(chat_messages(context, question), answer, wrong, kind, lang, f"builtin {kind}")


def heldout_prompts(world: World) -> list[RLPrompt]:
    """The chat model's held-out questions (``builtin_chat.heldout_questions``: every kind), as prompts."""
    return [from_eval_item(item) for item in heldout_questions(world)]


def from_eval_item(item: ChatEvalItem) -> RLPrompt:
    return RLPrompt(item.messages, item.answer, item.wrong, item.kind, item.lang, "builtin held-out")


# -- files --------------------------------------------------------------------------------------


def read_prompts(paths: Paths, skip_bad: bool = False) -> tuple[list[RLPrompt], ReadReport]:
    """Every valid prompt of ``paths``, in order, and the read report; a bad record is a ``DataError``
    naming the file, the line and the field (with ``skip_bad``, skipped and counted by reason)."""
    found, report = read_records(paths, _normalize, skip_bad, **RECORD_FILES)
    return [RLPrompt(messages, answer, source=where) for where, (messages, answer) in found], report


def _normalize(record) -> tuple[str, tuple[list[dict], str | None]]:
    if not isinstance(record, dict):
        raise DataError(f"{kind_of(record)}; expected an object with a prompt (and an answer)", "wrong_type")
    answer = _answer(record) if "answer" in record else None
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            turns, record_format = [Turn("user", _text(record, "prompt"), "prompt", "prompt")], "prompt"
        elif isinstance(prompt, list) and prompt:
            turns, record_format = openai_turns({"messages": prompt}), "prompt"
            turns = [
                t._replace(role_field="prompt" + t.role_field[8:], content_field="prompt" + t.content_field[8:])
                for t in turns
            ]
        else:
            raise DataError(
                f"prompt: {kind_of(prompt)}; expected a string or a non-empty list of messages", "wrong_type"
            )
    elif "messages" in record:
        turns, record_format = openai_turns(record), "messages"
    elif "question" in record:  # GSM8K
        turns = [Turn("user", _text(record, "question"), "question", "question")]
        if answer is not None and GSM8K_ANSWER in answer:
            record_format, answer = "gsm8k", gsm8k_final(answer)
        else:
            record_format = "question"
    else:
        raise DataError(
            f"no prompt in the fields {', '.join(map(repr, record)) or '(none)'}; expected 'prompt', 'messages' "
            "or 'question' (GSM8K)",
            "missing_field",
        )
    return record_format, (prompt_messages(with_system_field(record, turns)), answer)


def prompt_messages(turns: list[Turn]) -> list[dict]:
    """The messages of a prompt: a valid conversation (tinylm.data.chat's rules) that ends with the user."""
    if turns and turns[-1].role == "assistant":
        raise DataError(
            f"{turns[-1].role_field}: the prompt ends with an assistant turn; it must end with the user's, "
            "which the policy answers",
            "last_not_user",
        )
    return validate_turns([*turns, Turn("assistant", "-", "", "")])[:-1]


def _text(record: dict, key: str) -> str:
    value = get_field(record, key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{key}: {kind_of(value)}; expected a non-empty string", "wrong_type")
    return value


def _answer(record: dict) -> str:
    value = record["answer"]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"answer: {kind_of(value)}; expected a string or a number", "wrong_type")
    text = str(value).strip()
    if not text:
        raise DataError("answer: an empty string; expected what a right reply states", "empty")
    return text


def gsm8k_final(answer: str) -> str:
    """GSM8K's answer field → its final number ("… #### 1,250" → "1250"); any other text as it is."""
    if GSM8K_ANSWER not in answer:
        return answer
    final = answer.rpartition(GSM8K_ANSWER)[2].strip().replace(",", "")
    if not final:
        raise DataError(f"answer: nothing follows {GSM8K_ANSWER}; expected the final answer there", "empty")
    return final


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def numbers_in(text: str) -> list[float]:
    """The numbers a text states, in order ("1,250" is 1250; "3." is 3)."""
    return [float(match.replace(",", "")) for match in NUMBER.findall(text)]
