"""Log-likelihoods of continuations, the way benchmark harnesses score a language model.

A multiple-choice item is one context ("...\\nAnswer:") and several continuations (" A" … " D", or
whole answer texts); the model's choice is the continuation with the highest summed log-probability.
``Scorer.score`` computes those sums in batches and shares each context's work among its choices:

1. the contexts of a batch of items go through the model once, left-padded (the engine's ``prefill``),
   which gives every item's last-position logits and a KV cache;
2. the first token of every continuation is scored from those logits: for one-token continuations
   (the letters of MMLU, C-Eval, CMMLU) that is all, one forward per item instead of one per choice;
3. longer continuations get the cache rows of their item copied under them and run their remaining
   tokens as one batch on top of it, so no context is computed twice.

``naive_scores`` is the plain way (one forward over context + continuation per choice): the tests
check the two agree, and bench/eval.py measures the difference.

Texts become tokens the way lm-evaluation-harness does it: whitespace at the end of the context moves
to the continuation, the pair is encoded whole, and the continuation is what the whole has beyond the
context's own tokens (so a merge across the boundary counts for the continuation); a tokenizer with a
BOS token gets it in front. ``rolling`` scores whole documents for perplexity in windows of the
model's context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinylm.model.llama import attention_mask


@dataclass
class Request:
    """One context and the continuations to score after it, as token ids."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class Score:
    logprob: float  # the continuation's summed log-probability
    greedy: bool  # whether greedy decoding from the context would produce exactly the continuation
    tokens: int  # its length in tokens


def prefix_ids(tokenizer) -> list[int]:
    """What goes in front of every context: the BOS token if the tokenizer has one."""
    bos = tokenizer.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
    return [] if bos is None else [bos]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them (see the module notes)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return prefix_ids(tokenizer) + context_ids, whole[len(context_ids) :]


class Scorer:
    """Summed log-probabilities of continuations for an ``Engine``'s model (see the module notes)."""

    def __init__(self, engine, batch_size: int = 32):
        self.engine, self.model = engine, engine.model
        self.batch_size = batch_size
        self.context_length = engine.context_length

    def request(self, context: str, continuations: list[str]) -> Request:
        pairs = [encode_pair(self.engine.tokenizer, context, c) for c in continuations]
        return Request(pairs[0][0], [continuation for _, continuation in pairs])

    def score(self, requests: list[Request], progress=None) -> list[list[Score]]:
        """Each request's continuations scored, in order. Requests run longest context first (so a
        batch pads little), ``batch_size`` at a time; ``progress(n)`` hears of each request done."""
        units = []  # (request, its first continuation's index, what runs)
        for i, request in enumerate(requests):
            parts = self.fit(request)
            units += [(i, sum(len(p.continuations) for p in parts[:k]), part) for k, part in enumerate(parts)]
        units.sort(key=lambda u: -len(u[2].context))
        results: list[list[Score | None]] = [[None] * len(r.continuations) for r in requests]
        for start in range(0, len(units), self.batch_size):
            batch = units[start : start + self.batch_size]
            for (index, first, _), scores in zip(batch, self._score_batch([unit for _, _, unit in batch])):
                results[index][first : first + len(scores)] = scores
            if progress is not None:
                progress(len({index for index, _, _ in batch if None not in results[index]}))
        return results

    def fit(self, request: Request) -> list[Request]:
        """The request as it runs: whole when its context and every continuation, less the last token
        (predicted, never read), fit the model's context; else one request per continuation, each
        context cut from the left to fit that continuation, as the harness cuts every pair apart."""
        if any(not c for c in request.continuations):
            raise ValueError("a continuation encodes to no tokens: there is nothing to score")
        longest = max(len(c) for c in request.continuations)
        if len(request.context) + longest - 1 <= self.context_length:
            return [request]
        if longest > self.context_length:
            raise ValueError(
                f"a continuation of {longest} tokens does not fit the model's context of {self.context_length}"
            )
        return [Request(request.context[-(self.context_length + 1 - len(c)) :], [c]) for c in request.continuations]

    @torch.inference_mode()
    def _score_batch(self, requests: list[Request]) -> list[list[Score]]:
        longest_tail = max(len(c) - 1 for r in requests for c in r.continuations)
        logits, cache, padding = self.engine.prefill([r.context for r in requests], room=longest_tail)
        first = logits.float().log_softmax(-1)  # [items, vocab]: every continuation's first token
        rows = [i for i, r in enumerate(requests) for _ in r.continuations]
        continuations = [c for r in requests for c in r.continuations]
        logprobs = [[float(first[row, c[0]])] for row, c in zip(rows, continuations)]
        greedy = [[bool(first[row].argmax() == c[0])] for row, c in zip(rows, continuations)]
        if longest_tail:
            self._score_tails(cache, padding, rows, continuations, longest_tail, logprobs, greedy)
        scores, at = [], 0
        for r in requests:
            n = len(r.continuations)
            scores.append(
                [
                    Score(math.fsum(lp), all(g), len(c))
                    for lp, g, c in zip(logprobs[at : at + n], greedy[at : at + n], r.continuations)
                ]
            )
            at += n
        return scores

    def _score_tails(self, cache, padding, rows, continuations, length, logprobs, greedy) -> None:
        """Tokens 2.. of every continuation, in one batch on copies of their items' cache rows."""
        index = torch.tensor(rows, device=self.engine.device)
        tails = self.engine.new_cache(len(rows), cache.max_len)
        tails.take_rows(cache, index)
        tokens = torch.zeros(len(rows), length, dtype=torch.long, device=self.engine.device)
        for i, c in enumerate(continuations):  # inputs are tokens 1..n-1; right padding is never read
            tokens[i, : len(c) - 1] = torch.tensor(c[:-1])
        context_padding = padding[index]
        positions = context_padding.sum(-1, keepdim=True) + torch.arange(length, device=self.engine.device)
        keys = torch.cat(
            [context_padding, torch.ones(len(rows), length, dtype=padding.dtype, device=padding.device)], 1
        )
        mask = attention_mask(keys, length, keys.shape[1])
        hidden = self.model.hidden_states(tokens, position_ids=positions, mask=mask, cache=tails)
        for i, c in enumerate(continuations):
            if len(c) < 2:
                continue
            step = self.model.lm_head(hidden[i, : len(c) - 1]).float().log_softmax(-1)
            targets = torch.tensor(c[1:], device=step.device)
            logprobs[i] += step.gather(-1, targets[:, None]).squeeze(-1).tolist()
            greedy[i].append(bool((step.argmax(-1) == targets).all()))

    # -- whole documents -------------------------------------------------------------------------

    def rolling(self, ids: list[int]) -> float:
        """The summed log-probability of a whole document's tokens: the first predicted from the
        prefix token (BOS, else the end-of-text token), then in disjoint windows of the model's
        context, each window seeing the token before it (as the harness's rolling windows do)."""
        tokenizer = self.engine.tokenizer
        prefix = prefix_ids(tokenizer) or [tokenizer.eos_id]
        window = self.context_length
        requests = [
            Request(prefix if start == 0 else ids[start - 1 : start], [ids[start : start + window]])
            for start in range(0, len(ids), window)
        ]
        return math.fsum(s[0].logprob for s in self.score(requests))


@torch.inference_mode()
def naive_scores(model, request: Request) -> list[Score]:
    """One forward over context + continuation per choice: the reference ``Scorer`` must agree with."""
    scores = []
    for continuation in request.continuations:
        ids = torch.tensor([request.context + continuation[:-1]], device=model.lm_head.weight.device)
        logits = model(ids)[0, len(request.context) - 1 :].float().log_softmax(-1)
        targets = torch.tensor(continuation, device=logits.device)
        picked = logits.gather(-1, targets[:, None]).squeeze(-1)
        scores.append(Score(math.fsum(picked.tolist()), bool((logits.argmax(-1) == targets).all()), len(continuation)))
    return scores
