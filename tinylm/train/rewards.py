"""Rewards for reinforcement learning: a number for each reply the policy writes.

    reward = build_reward("arithmetic", tokenizer)        # a built-in verifier
    reward = build_reward("arithmetic+think", tokenizer)   # the sum of two
    reward = build_reward("rm:runs/rm/final", tokenizer)   # a reward model trained with tinylm rm
    reward = build_reward("python:my_rewards:score", tokenizer)   # the user's own function
    scores = reward(prompts, replies)                      # one float per (RLPrompt, reply text)

The built-in verifiers read the reply's answer, what follows its reasoning (``split_thinking``):

    arithmetic  1 when the answer states a number and every number it states equals the prompt's
                answer (so "The answer is 7." is right for 3 + 4, "7 or 8" is not), else 0
    facts       1 when the answer states the prompt's answer as whole words and none of the values a
                right reply never states (the built-in facts' other values), else 0
    think       1 when the reply reasons first: <|think|>, some reasoning, <|think_end|>, then an answer

A reward model scores the whole conversation, the reply included, as ``tinylm rm`` trained it; its
tokenizer must be the policy's (the same ids for the same text). A user's function is called as
``function(messages, reply, answer)``, per reply, and must return a finite number: an exception or
anything else is an error that names the function and the prompt, never a silent zero.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from tinylm.chat_template import split_thinking
from tinylm.data.builtin_chat import says
from tinylm.data.rl_prompts import RLPrompt, numbers_in
from tinylm.modeldir import is_reward_dir, load_reward_dir
from tinylm.train.rm import score_conversations

BUILTIN = ("arithmetic", "facts", "think")


class RewardError(ValueError):
    """A reward that cannot be computed: a bad name, a function that raised or returned no number."""


def arithmetic_reward(prompt: RLPrompt, reply: str) -> float:
    stated = numbers_in(split_thinking(reply)[1])
    expected = numbers_in(prompt.answer)
    return float(len(expected) == 1 and bool(stated) and all(n == expected[0] for n in stated))


def facts_reward(prompt: RLPrompt, reply: str) -> float:
    answer = split_thinking(reply)[1]
    return float(says(answer, prompt.answer) and not any(says(answer, w) for w in prompt.wrong))


def think_reward(prompt: RLPrompt, reply: str) -> float:
    thinking, answer = split_thinking(reply)
    return float(bool(thinking) and bool(answer))


VERIFIERS: dict[str, Callable[[RLPrompt, str], float]] = {
    "arithmetic": arithmetic_reward,
    "facts": facts_reward,
    "think": think_reward,
}
NEEDS_ANSWER = ("arithmetic", "facts")


class Reward(ABC):
    """Scores replies: ``reward(prompts, replies)`` → one float each."""

    name: str = ""

    def check(self, prompts: list[RLPrompt]) -> None:
        """Raise now, before training, if some prompt cannot be scored; every prompt can, unless a
        reward says otherwise (a verifier needs the prompt's answer)."""
        return None

    @abstractmethod
    def __call__(self, prompts: list[RLPrompt], replies: list[str]) -> list[float]:
        """One reward per (prompt, reply)."""


class Verifiers(Reward):
    """The sum of built-in verifiers ("arithmetic+think")."""

    def __init__(self, names: list[str]):
        self.names, self.name = names, "+".join(names)

    def check(self, prompts: list[RLPrompt]) -> None:
        needing = [n for n in self.names if n in NEEDS_ANSWER]
        if needing and (missing := next((p for p in prompts if p.answer is None), None)) is not None:
            raise RewardError(
                f"{missing.source}: the {needing[0]} reward compares replies with the prompt's answer, and this "
                'prompt has none: add an "answer" field, or use a reward model (rm:DIR) or your own function'
            )
        if "arithmetic" in needing and (bad := next((p for p in prompts if len(numbers_in(p.answer)) != 1), None)):
            raise RewardError(
                f"{bad.source}: the arithmetic reward needs an answer that is one number, got {bad.answer!r}"
            )

    def __call__(self, prompts, replies):
        return [sum(VERIFIERS[n](p, r) for n in self.names) for p, r in zip(prompts, replies)]


class FunctionReward(Reward):
    """``function(messages, reply, answer) -> number``, from ``module:function`` or ``path/file.py:function``."""

    def __init__(self, spec: str):
        self.name = f"python:{spec}"
        module_name, _, function_name = spec.rpartition(":")
        if not module_name or not function_name:
            raise RewardError(f"--reward python:{spec}: expected python:MODULE:FUNCTION or python:FILE.py:FUNCTION")
        module = load_module(module_name)
        function = getattr(module, function_name, None)
        if not callable(function):
            raise RewardError(f"--reward python:{spec}: {module_name} has no function {function_name!r}")
        self.function = function

    def __call__(self, prompts, replies):
        scores = []
        for prompt, reply in zip(prompts, replies):
            try:
                value = self.function(prompt.messages, reply, prompt.answer)
            except Exception as e:
                raise RewardError(
                    f"the reward {self.name} raised {type(e).__name__}: {e} on the prompt from {prompt.source} "
                    f"({_question(prompt)}), reply {reply[:80]!r}"
                ) from e
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardError(
                    f"the reward {self.name} returned {value!r} ({type(value).__name__}) on the prompt from "
                    f"{prompt.source} ({_question(prompt)}); expected a finite number"
                )
            scores.append(float(value))
        return scores


def load_module(name: str):
    """A module by import name, or a Python file by path."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise RewardError(f"--reward python:{name}:...: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise RewardError(f"--reward python:{name}:...: cannot import {name} ({e}); is it on PYTHONPATH?") from e


def _question(prompt: RLPrompt) -> str:
    text = prompt.messages[-1]["content"]
    return repr(text if len(text) <= 60 else text[:57] + "...")


class RewardModelReward(Reward):
    """The score of a reward-model directory (``tinylm rm``) on the whole conversation."""

    def __init__(self, path: str, policy_tokenizer, device=None):
        self.name = f"rm:{path}"
        if not is_reward_dir(path):
            raise RewardError(
                f"--reward rm:{path}: not a reward-model directory (tinylm rm writes one: a config.json "
                "with a ...ForSequenceClassification architecture and num_labels 1)"
            )
        self.model, self.tokenizer = load_reward_dir(path)
        if self.tokenizer is None:
            raise RewardError(f"--reward rm:{path}: the reward model has no tokenizer.json")
        if self.tokenizer.fingerprint() != policy_tokenizer.fingerprint():
            raise RewardError(
                f"--reward rm:{path}: the reward model's tokenizer differs from the policy's (tokenizer.json "
                "SHA-256 differs), so it would read the policy's replies as other tokens: train the reward model "
                "from the same chat model (tinylm rm --init)"
            )
        self.model = self.model.float().eval().requires_grad_(False)

    def __call__(self, prompts, replies):
        conversations = [[*p.messages, {"role": "assistant", "content": r}] for p, r in zip(prompts, replies)]
        return score_conversations(self.model, self.tokenizer, conversations).tolist()


def build_reward(spec: str, policy_tokenizer) -> Reward:
    """The reward ``spec`` names: built-in verifiers joined by "+", rm:DIR, or python:MODULE:FUNCTION."""
    if spec.startswith("rm:"):
        return RewardModelReward(spec[3:], policy_tokenizer)
    if spec.startswith("python:"):
        return FunctionReward(spec[7:])
    names = spec.split("+")
    unknown = [n for n in names if n not in VERIFIERS]
    if unknown or not spec:
        raise RewardError(
            f"--reward {spec!r}: expected built-in verifiers ({', '.join(BUILTIN)}, joined by +), rm:DIR or "
            "python:MODULE:FUNCTION"
        )
    return Verifiers(names)
