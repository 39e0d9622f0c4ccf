"""Continuous batching: many requests share one model, joining and leaving between decode steps.

A server answering one request at a time leaves most of the hardware idle: a decode step reads every
weight of the model to produce one token, and reading them for eight rows costs hardly more than for
one. So the ``Scheduler`` keeps one batch running in a loop of its own (a background thread, or the
main thread under ``tinylm serve``) and lets requests in and out of it *between steps*:

    submit     a request waits in a queue (bounded: a full queue refuses with ``QueueFull``)
    admit      before each step, waiting requests that fit get slots; their prompts are prefilled
               together (``Engine.prefill``) and their keys and values copied into their slots
    step       every running sequence samples one token from its last logits, and the batch runs one
               decode step over all of them at once
    leave      a sequence that finished (stop token, stop string, length) or whose request was
               cancelled gives its slot back at once; the next waiting request takes it

The keys and values live in a ``KVCache`` of the engine's own kind (``Engine.new_cache``), used row by
row: one row of ``max_len`` positions per slot, each row filled to its own length. A decode step writes
each row's new key at that row's own position and masks each row's attention to its own length, so rows
of different ages decode side by side and each one gets exactly the tokens it would get alone (with an
int8 cache too: each vector has its own scale). Running rows are kept in slots 0..n-1 (a leaving row's
slot is filled by moving the last one into it), so a step reads plain slices of the cache, never a
gathered copy.

Each request carries its own sampling settings. Sampling is done for the whole batch at once by the
engine's own sampler (``tinylm.infer.sampling.BatchSampler``), with one random generator per sequence,
so a seeded request draws the same tokens however many others run beside it, and the same tokens as
``tinylm generate`` with that seed. The decode step is the engine's too (``Engine.decode_step``, compiled
when the engine is). Events go back through the request's callback, from the
scheduler's thread: the server hands them to its event loop.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tinylm.infer.engine import Engine, Row
from tinylm.infer.sampling import BatchSampler, SamplingSettings, random_seed, sample_rows
from tinylm.model.llama import KVCache

__all__ = ["Choice", "Event", "QueueFull", "Request", "Scheduler", "TokenLogprob"]


class QueueFull(RuntimeError):
    """The scheduler already holds as many waiting requests as it was told to."""


@dataclass
class Request:
    """What one API call asks for: a prompt, how to sample, and how many choices.

    presence_penalty, frequency_penalty  OpenAI's: subtract ``presence`` from the logit of every token
                                         already generated, and ``frequency`` times its count (-2..2).
    logprobs                             None: none; k >= 0: each token's log-probability and the k
                                         most likely alternatives (under the model's raw distribution).
    pixels                               the prompt's pictures, one per image tag, as the vision
                                         tower takes them (``Engine.pixels``): a vision-language model.
    """

    prompt_ids: list[int]
    settings: SamplingSettings
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    pixels: torch.Tensor | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), most likely first


@dataclass
class Event:
    """One step of one choice: the text it made safe to show (maybe ""), the token's log-probability
    when asked for (not for the stop token that ends a choice), and on the choice's last event its
    finish reason ("stop" or "length"). ``error`` (with ``index`` -1) says the whole request failed."""

    index: int
    text: str = ""
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    error: str | None = None


class Choice:
    """One of a request's n sequences while it runs: its slot's text bookkeeping (its sampling state is
    the sampler's row of the same number)."""

    def __init__(self, ticket: Ticket, index: int, row: Row):
        self.ticket, self.index, self.row = ticket, index, row


class Ticket:
    """A submitted request: ``cancel()`` ends its generation at the next step."""

    def __init__(self, request: Request, on_event: Callable[[Event], None]):
        self.request, self.on_event = request, on_event
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the caller; a caller that has gone away cannot stop the scheduler."""
        try:
            self.on_event(event)
        except Exception:
            self.cancelled = True


class Scheduler:
    """Runs an ``Engine``'s model for many requests at once; see the module's docstring.

        scheduler = Scheduler(engine, max_batch=16)
        ticket = scheduler.submit(Request(ids, SamplingSettings(max_new_tokens=64)), on_event)
        ...
        scheduler.close()

    ``max_len`` bounds prompt + reply per sequence (default: the model's context, at most 4096);
    the cache holds ``max_batch`` × ``max_len`` positions. ``max_waiting`` bounds the queue.
    ``max_prefill_tokens`` bounds one admission's prefill (requests × longest prompt), so a crowd of
    long prompts joins over a few steps instead of stalling the running streams at once.

    The loop runs in a thread of its own, or, with ``thread=False``, in whichever thread calls
    ``run()`` (until ``close()``). On the CPU the main thread is the faster home: PyTorch's OpenMP
    workers wait for the next operation most eagerly there, and the same decode step measured 1.7x
    slower from a second thread on a 2-core machine. ``tinylm serve`` runs it there.
    """

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 16,
        max_len: int | None = None,
        max_waiting: int = 256,
        max_prefill_tokens: int = 8192,
        thread: bool = True,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.engine = engine
        self.model = engine.model
        self.max_batch, self.max_waiting, self.max_prefill_tokens = max_batch, max_waiting, max_prefill_tokens
        self.max_len = min(max_len or 4096, engine.context_length)
        config = self.model.config
        self.cache = engine.new_cache(max_batch, self.max_len)
        self.sampler = BatchSampler(config.vocab_size, engine.device, max_batch)  # row i samples for slot i
        self.slots: list[Choice] = []  # running choices; choice i is in cache slot i
        self.logits: torch.Tensor | None = None  # [len(slots), vocab]: each running choice's next-token logits
        self.waiting: deque[Ticket] = deque()
        self.lock = threading.Condition()
        self.closed = False
        self.steps = 0  # decode steps run (for tests and the health page)
        self.thread = threading.Thread(target=self.run, name="tinylm-scheduler", daemon=True) if thread else None
        if self.thread is not None:
            self.thread.start()

    # -- the public side (any thread) -----------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Ticket:
        """Queue a request; ``on_event`` is called from the scheduler's thread with every ``Event``.
        Raises ValueError when the request can never run here, QueueFull when the queue is full,
        RuntimeError when the scheduler is closed."""
        if not 1 <= request.n <= self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch} (the server's --max-batch), got {request.n}")
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: give the model at least one token to continue")
        if len(request.prompt_ids) + request.settings.max_new_tokens > self.max_len:
            raise ValueError(
                f"the prompt ({len(request.prompt_ids)} tokens) plus max_tokens "
                f"({request.settings.max_new_tokens}) exceed the {self.max_len} tokens a sequence may hold"
            )
        ticket = Ticket(request, on_event)
        with self.lock:
            if self.closed:
                raise RuntimeError("the scheduler is closed")
            if len(self.waiting) >= self.max_waiting:  # requests whose clients left no longer count
                self.waiting = deque(t for t in self.waiting if not t.cancelled)
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; try again shortly")
            self.waiting.append(ticket)
            self.lock.notify()
        return ticket

    def stats(self) -> dict:
        return {
            "running": len(self.slots),
            "waiting": len(self.waiting),
            "max_batch": self.max_batch,
            "max_len": self.max_len,
            "steps": self.steps,
        }

    def close(self) -> None:
        """Stop the loop; requests still waiting or running are told the server is shutting down."""
        with self.lock:
            self.closed = True
            self.lock.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)

    # -- the loop (the scheduler's thread) ------------------------------------------------------

    def run(self) -> None:
        """Warm up, then admit, step, repeat, until ``close()`` (or Ctrl-C in this thread): then every
        request still waiting or running is told the server is shutting down."""
        try:
            self.warm_up()
            while True:
                with self.lock:
                    while not self.closed and not self.waiting and not self.slots:
                        # never wait unboundedly: a signal the kernel hands to another thread (a GPU
                        # driver's, say) reaches Python's handler only when this thread runs again
                        self.lock.wait(timeout=0.5)
                    if self.closed:
                        break
                    admitted = self._take_admissible()
                with torch.inference_mode():
                    self._admit_each(admitted)
                    try:
                        if self.slots:
                            self._step()
                    except Exception as error:  # a failed step fails the requests in it, never the server
                        self._fail({c.ticket for c in self.slots}, error)
                        self.slots, self.logits = [], None
        finally:
            with self.lock:
                self.closed = True
                stranded = [*self.waiting, *{c.ticket for c in self.slots}]
                self.waiting.clear()
            self._fail(stranded, "the server is shutting down")

    @torch.inference_mode()
    def warm_up(self) -> None:
        """On a GPU, a decode step and a sampling at every batch size and cache bucket before any
        request, so the first requests do not pay for the device's first use of each shape (kernels
        are loaded and chosen on first use: the first pass of bench/serve.py ran several times slower
        than the second on an H200 without it). A CPU has nothing to warm."""
        if self.engine.device.type != "cuda":
            return
        for rows, filled in itertools.product(range(1, self.max_batch + 1), range(0, self.max_len, KVCache.BUCKET)):
            self.cache.lengths[:rows] = [filled] * rows
            positions, mask = self.cache.begin_step(rows)
            tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.engine.device)
            logits = self.engine.decode_step(tokens, positions, mask, self.cache)
            ones = torch.ones(rows, device=self.engine.device)
            for top_k in (0, 1):
                sample_rows(
                    logits, ones, torch.full((rows,), top_k, device=self.engine.device), ones, ones * 0.5
                ).tolist()
        self.cache.lengths = [0] * self.max_batch

    def _take_admissible(self) -> list[Ticket]:
        """Waiting requests, first come first served, while their choices fit in the free slots and
        their prefill (requests × longest prompt) in ``max_prefill_tokens`` (the first always goes)."""
        free, taken, longest = self.max_batch - len(self.slots), [], 0
        while self.waiting:
            ticket = self.waiting[0]
            if ticket.cancelled:
                self.waiting.popleft()
                continue
            length = max(longest, len(ticket.request.prompt_ids))
            if ticket.request.n > free or (taken and length * (len(taken) + 1) > self.max_prefill_tokens):
                break
            taken.append(self.waiting.popleft())
            free, longest = free - ticket.request.n, length
        return taken

    def _admit_each(self, tickets: list[Ticket]) -> None:
        """Admit the requests together; if that fails, one by one, so that only a bad one fails."""
        running = len(self.slots)
        try:
            self._admit(tickets)
            return
        except Exception as error:
            del self.slots[running:]
            if len(tickets) == 1:
                self._fail(tickets, error)
                return
        for ticket in tickets:
            self._admit_each([ticket])

    def _admit(self, tickets: list[Ticket]) -> None:
        """Prefill the new requests together and give each of their choices a slot."""
        if not tickets:
            return
        engine = self.engine
        prompts = [t.request.prompt_ids for t in tickets]
        pictures = [t.request.pixels for t in tickets if t.request.pixels is not None]
        logits, cache, padding = engine.prefill(prompts, torch.cat(pictures) if pictures else None)
        longest = padding.shape[1]
        new_logits = []
        for row, ticket in enumerate(tickets):
            request = ticket.request
            start = longest - len(request.prompt_ids)  # left padding
            seed = random_seed()  # used when the request gave none
            for index in range(request.n):
                slot = len(self.slots)
                self.cache.fill(slot, cache.k[:, row, :, start:longest], cache.v[:, row, :, start:longest])
                self.sampler.add(
                    request.settings,
                    request.prompt_ids,
                    choice=index,
                    presence_penalty=request.presence_penalty,
                    frequency_penalty=request.frequency_penalty,
                    seed=seed,
                )
                settings = request.settings
                choice_row = Row(
                    request.prompt_ids, settings.max_new_tokens, engine.stop_ids(settings), engine.tokenizer,
                    settings.stop_strings,
                )  # fmt: skip
                self.slots.append(Choice(ticket, index, choice_row))
                new_logits.append(logits[row])
        stacked = torch.stack(new_logits)
        self.logits = stacked if self.logits is None else torch.cat([self.logits, stacked])

    def _step(self) -> None:
        """Sample a token for every running choice, report it, let finished ones leave, decode the rest."""
        tokens, logprobs = self._sample()
        self.sampler.observe(tokens)
        leaving = []
        for slot, (choice, token) in enumerate(zip(self.slots, tokens)):
            ticket = choice.ticket
            if ticket.cancelled:
                leaving.append(slot)
                continue
            text = choice.row.push(token)
            logprob = logprobs[slot] if logprobs and token not in choice.row.stop_ids else None
            event = Event(choice.index, text, token, logprob, choice.row.completion.finish_reason)
            if event.finish_reason is not None:
                leaving.append(slot)
            ticket.emit(event)
        for slot in reversed(leaving):
            self._leave(slot, tokens)
        if not self.slots:
            self.logits = None
            return
        positions, mask = self.cache.begin_step(len(self.slots))
        next_ids = torch.tensor(tokens[: len(self.slots)], device=self.engine.device)[:, None]
        self.logits = self.engine.decode_step(next_ids, positions, mask, self.cache)
        self.steps += 1

    def _leave(self, slot: int, tokens: list[int]) -> None:
        """Free ``slot``: the last running choice moves into it (with its cache row, penalties and token)."""
        last = len(self.slots) - 1
        self.sampler.remove(slot)
        if slot != last:
            self.cache.move(last, slot)
            self.slots[slot] = self.slots[last]
            tokens[slot] = tokens[last]
        self.slots.pop()

    def _sample(self) -> tuple[list[int], list[TokenLogprob] | None]:
        """Each running choice's next token under its own settings (and its log-probabilities, if asked)."""
        tokens = self.sampler.sample(self.logits)
        wanted = [c.ticket.request.logprobs for c in self.slots]
        if all(w is None for w in wanted):
            return tokens, None
        return tokens, self._logprobs(self.logits.float(), tokens, wanted)

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: list[int], wanted: list[int | None]) -> list[TokenLogprob | None]:
        logp = logits.log_softmax(dim=-1)
        chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None]).squeeze(1).tolist()
        k = max(w or 0 for w in wanted)
        top_values, top_ids = logp.topk(k, dim=-1) if k else (None, None)
        out = []
        for row, want in enumerate(wanted):
            if want is None:
                out.append(None)
                continue
            top = list(zip(top_ids[row, :want].tolist(), top_values[row, :want].tolist())) if want else []
            out.append(TokenLogprob(tokens[row], chosen[row], top))
        return out

    @staticmethod
    def _fail(tickets, error: Exception | str) -> None:
        for ticket in tickets:
            ticket.cancelled = True
            ticket.emit(Event(-1, error=str(error) or type(error).__name__))
