"""From logits to tokens: the one sampler that ``tinylm generate``, ``tinylm chat``, the Python API and
the server all use, so the same seed and settings give the same tokens everywhere.

    settings = SamplingSettings(temperature=0.8, top_p=0.95, seed=0)
    sampler = BatchSampler(vocab_size, device)
    sampler.add(settings, prompt_ids)            # a row: its settings, its random generator, its penalties
    tokens = sampler.sample(logits)              # logits [rows, vocab] → one token per row
    sampler.observe(tokens)                      # what the rows wrote counts for the penalties

Per row, in this order: the repetition penalty (CTRL's rule, over prompt and output), OpenAI's presence
and frequency penalties (over the output), then greedy argmax at temperature 0, or the temperature, the
top-k and top-p cut, and one draw. Each row has its own ``torch.Generator`` on the CPU, seeded from its
settings (``seed`` + the row's choice index), and the token is read off the row's cumulative distribution
at that generator's next uniform draw: a row's tokens depend on its own seed and logits only, never on
the other rows of the batch, the device, or how many requests the server is running.

Defaults come from one place: the model directory's ``generation_config.json`` (``do_sample: false``,
as tinylm saves it, means greedy), then whatever the command line or the request says.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from tinylm.io import read_json

__all__ = [
    "BatchSampler",
    "SamplingSettings",
    "apply_repetition_penalty",
    "generation_defaults",
    "generation_eos_ids",
    "sample_rows",
    "truncate",
]


@dataclass
class SamplingSettings:
    """How to pick each new token, and when to stop.

    max_new_tokens      at most this many new tokens (fewer when the context runs out).
    temperature         0 picks the most likely token (greedy); otherwise logits are divided by it
                        before sampling: below 1 sharper and safer, above 1 flatter and wilder.
    top_k               sample only among the k most likely tokens (0 = off).
    top_p               sample only among the most likely tokens whose probabilities add up to p (1.0 = off).
    repetition_penalty  make tokens already in the prompt or the output less likely (1.0 = off; 1.1–1.3 typical).
    seed                None draws a seed from torch's global random state; an int makes the output reproducible.
    stop_token_ids      a row ends after sampling one of these (it is kept in the ids, not in the text).
                        None means the tokenizer's end-of-sequence token; [] never stops on a token.
    stop_strings        a row also ends when its text contains one of these; the text is cut before it.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")

    def updated(self, **given) -> SamplingSettings:
        """These settings with every field that ``given`` sets to something other than None replaced
        (the command line over the model's defaults)."""
        known = {f.name for f in fields(self)}
        if unknown := sorted(set(given) - known):
            raise ValueError(f"unknown sampling settings {unknown}; expected some of {sorted(known)}")
        return replace(self, **{key: value for key, value in given.items() if value is not None})


def generation_defaults(directory: str | Path | None) -> SamplingSettings:
    """The sampling defaults a model directory's generation_config.json sets: ``do_sample: false`` is
    greedy; temperature, top_k, top_p, repetition_penalty and max_new_tokens are taken as they are.
    Without the file (or a directory), ``SamplingSettings()``."""
    config = read_json(Path(directory) / "generation_config.json", default={}) if directory else {}
    given = {}
    if config.get("do_sample") is False:
        given["temperature"] = 0.0
    elif _number(config.get("temperature")):
        given["temperature"] = float(config["temperature"])
    for key, kind in (("top_p", float), ("top_k", int), ("repetition_penalty", float), ("max_new_tokens", int)):
        if _number(config.get(key)) and (kind is float or isinstance(config[key], int)):
            given[key] = kind(config[key])
    try:
        return SamplingSettings(**given)
    except ValueError as e:
        raise ValueError(f"{Path(directory) / 'generation_config.json'}: {e}") from None


def generation_eos_ids(directory: str | Path) -> list[int]:
    """The ``eos_token_id`` (one or a list) of a model directory's generation_config.json: where a chat
    model says it may end (Qwen's instruct models name two tokens there)."""
    eos = read_json(Path(directory) / "generation_config.json", default={}).get("eos_token_id")
    return [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the arithmetic, per row -------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float) -> torch.Tensor:
    """Make every token already seen less likely, by CTRL's rule (Keskar et al., 2019).

    A positive logit is divided by ``penalty`` and a negative one multiplied by it, so for a penalty
    above 1 both move down. ``seen`` is a boolean [batch, vocab] mask of the tokens in prompt + output;
    ``penalty`` a number or one per row ([batch, 1]).
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's logits [rows, vocab] with all but its ``top_k`` most likely tokens (0 = off) and then all
    but its nucleus (Holtzman et al., 2019: the fewest most likely tokens whose probabilities add up to
    ``top_p``; 1 = off) set to -inf. The most likely token always stays. ``top_k``, ``top_p``: [rows]."""
    vocab = logits.shape[-1]
    ranked, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    drop = rank >= torch.where(top_k > 0, top_k, vocab)[:, None]
    probs = ranked.masked_fill(drop, float("-inf")).float().softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # the probability of every token ranked above this one
    drop |= (mass_above >= top_p[:, None]) & (top_p < 1)[:, None]
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """One token per row from logits [rows, vocab], each row with its own settings (tensors [rows]).

    A temperature of 0 is greedy. Otherwise the logits are divided by the temperature, cut to the top k
    and the nucleus (``truncate``, skipped when no row asks for it: the sort is most of the cost), and the
    token is read off the cumulative distribution at ``uniform`` (a draw in [0, 1) from the row's own
    generator).
    """
    greedy = logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    scaled = logits.float() / temperature.clamp(min=1e-5)[:, None]
    if bool(((top_k > 0) & (top_k < vocab)).any() or (top_p < 1).any()):
        scaled = truncate(scaled, top_k, top_p)
    cumulative = scaled.softmax(dim=-1).cumsum(dim=-1)
    # the first token whose cumulative probability passes the draw (strictly: a draw of exactly 0
    # must not pick a leading token of probability 0)
    picked = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True).clamp(max=vocab - 1)
    return torch.where(temperature == 0, greedy, picked.squeeze(1))


# -- the batch -----------------------------------------------------------------------------------------


@dataclass
class _RowState:
    settings: SamplingSettings
    generator: torch.Generator
    presence: float
    frequency: float

    @property
    def penalized(self) -> bool:
        return self.settings.repetition_penalty != 1.0 or bool(self.presence) or bool(self.frequency)


class BatchSampler:
    """The next token of every row of a batch, each row under its own settings, generator and penalties.

    Rows are added in order (``add``), may leave (``remove``: the last row takes the leaving row's place,
    as the server's slot cache does) and see what every row wrote (``observe``) for the penalties. The
    [rows, vocab] bookkeeping the penalties read is made only once a row asks for a penalty: plain
    sampling and greedy decoding pay nothing for it."""

    def __init__(self, vocab_size: int, device: torch.device | str, max_rows: int = 0):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.capacity = max(max_rows, 1)
        self.rows: list[_RowState] = []
        self.seen: torch.Tensor | None = None  # [capacity, vocab] bool: prompt + output tokens
        self.counts: torch.Tensor | None = None  # [capacity, vocab]: output tokens, for OpenAI's penalties

    def __len__(self) -> int:
        return len(self.rows)

    def add(
        self,
        settings: SamplingSettings,
        prompt_ids: list[int],
        choice: int = 0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
    ) -> None:
        """A new last row. Its generator is seeded with ``settings.seed + choice``; when the settings give
        no seed, ``seed`` (the server draws one per request) or else one drawn from torch's global random
        state (so ``torch.manual_seed`` makes an unseeded run repeatable)."""
        if settings.seed is not None:
            seed = settings.seed
        elif seed is None:
            seed = int(torch.randint(2**62, ()))
        row = len(self.rows)
        generator = torch.Generator().manual_seed(seed + choice)  # on the CPU: the same draws on every device
        state = _RowState(settings, generator, presence_penalty, frequency_penalty)
        self.rows.append(state)
        if state.penalized:  # the others never read their row of the bookkeeping
            self._reserve(row + 1)
            self.seen[row].zero_()
            self.seen[row, prompt_ids] = True
            self.counts[row].zero_()

    def remove(self, row: int) -> None:
        """Drop ``row``; the last row moves into its place."""
        last = len(self.rows) - 1
        if row != last:
            if self.seen is not None:
                self.seen[row] = self.seen[last]
                self.counts[row] = self.counts[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()

    def observe(self, tokens: list[int]) -> None:
        """Each row wrote ``tokens[row]``: it counts for the penalties from now on."""
        if not any(r.penalized for r in self.rows):
            return
        rows = torch.arange(len(tokens), device=self.device)
        chosen = torch.tensor(tokens, device=self.device)
        self.counts[rows, chosen] += 1
        self.seen[rows, chosen] = True

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows' logits [rows, vocab] after their repetition, presence and frequency penalties."""
        if not any(r.penalized for r in self.rows):
            return logits
        rows = len(self.rows)
        logits = logits.float()
        penalty = [r.settings.repetition_penalty for r in self.rows]
        if any(p != 1.0 for p in penalty):
            logits = apply_repetition_penalty(logits, self.seen[:rows], self._column(penalty)[:, None])
        presence, frequency = [r.presence for r in self.rows], [r.frequency for r in self.rows]
        if any(presence) or any(frequency):
            counts = self.counts[:rows]
            logits = logits - self._column(presence)[:, None] * (counts > 0) - self._column(frequency)[:, None] * counts
        return logits

    def sample(self, logits: torch.Tensor) -> list[int]:
        """One token per row from its last-position logits [rows, vocab]. A row that samples draws one
        uniform from its own generator per token (a greedy row draws nothing), so its tokens never depend
        on its neighbours' settings."""
        logits = self.penalized(logits)
        settings = [r.settings for r in self.rows]
        if all(s.temperature == 0 for s in settings):
            return logits.argmax(dim=-1).tolist()
        uniform = torch.stack(
            [
                torch.rand((), generator=r.generator) if s.temperature else torch.zeros(())
                for r, s in zip(self.rows, settings)
            ]
        )
        return sample_rows(
            logits,
            self._column([s.temperature for s in settings]),
            self._column([s.top_k for s in settings], torch.long),
            self._column([s.top_p for s in settings]),
            uniform.to(self.device),
        ).tolist()

    def _reserve(self, rows: int) -> None:
        """The penalty bookkeeping, made (or grown) to hold ``rows`` rows."""
        self.capacity = max(self.capacity, rows)
        if self.seen is None:
            self.seen = torch.zeros(self.capacity, self.vocab_size, dtype=torch.bool, device=self.device)
            self.counts = torch.zeros(self.capacity, self.vocab_size, device=self.device)
        elif self.seen.shape[0] < rows:  # the engine's batches know their size; this is only a safety net
            extra = self.capacity - self.seen.shape[0]
            self.seen = torch.cat([self.seen, self.seen.new_zeros(extra, self.vocab_size)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra, self.vocab_size)])

    def _column(self, values, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)


def random_seed() -> int:
    """A seed for a request that gave none, from the operating system (not torch's global state, which a
    server's threads would share)."""
    return random.SystemRandom().getrandbits(62)
