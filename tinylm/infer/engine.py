"""The inference engine: prefill, decode with a KV cache, sample, stop, stream.

Generating text is a loop with two phases:

    prefill   the whole prompt goes through the model at once; every layer writes its keys and values
              into a preallocated KVCache, and the logits at the last position give the first new token.
    decode    one token per step: the newest token is the model's only input, attention reads everything
              before it from the cache, so a step costs about the same however long the text already is.

Each step turns the logits of the last position into one token with the one sampler of
``tinylm.infer.sampling`` (penalties, then greedy argmax or temperature, top-k / top-p and a seeded draw),
the same one the server's scheduler uses. Token ids become text
through an ``IncrementalDecoder`` (never half a UTF-8 character) and a ``StopStringMatcher`` (never a
stop string, even one spread over several tokens).

Everything in tinylm that turns a prompt into text — ``tinylm generate``, ``tinylm chat``, the server,
evaluation and the quickstart — goes through ``Engine``, so there is one place to get this right:

    engine = Engine.from_dir("runs/tiny/final")
    engine.complete(["Once upon a time"], SamplingSettings(max_new_tokens=32, temperature=0))
    for piece in engine.stream("Once upon a time", SamplingSettings(temperature=0.8, seed=0)):
        print(piece, end="", flush=True)

A vision-language model directory (LLaVA) gives an engine that also takes images: each ``<image>`` tag
in a prompt stands for one image, in order. The prefill then runs on embeddings in which the image's
placeholder tokens are replaced by its projected patch features; decoding is the language model's alone.

    engine = Engine.from_dir("runs/vlm/sft/final")
    engine.stream("<image>\nWhat colour is the shape?", settings, images=["circle.png"])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinylm import modeldir
from tinylm.device import resolve_device
from tinylm.infer.sampling import BatchSampler, SamplingSettings, generation_defaults
from tinylm.model.llama import KV_CACHES, CausalLM, KVCache, attention_mask
from tinylm.model.vlm import expand_image_tags
from tinylm.tokenizer import THINK, THINK_END

__all__ = ["Completion", "Engine", "IncrementalDecoder", "Row", "StopStringMatcher", "TextStream"]

REPLACEMENT_CHAR = "\ufffd"  # what a decoder prints for bytes that are not (yet) a whole character


# -- from tokens to text ---------------------------------------------------------------------------


def shown_special_ids(tokenizer) -> set[int]:
    """The special tokens that are part of a reply's text: the reasoning markers, so that a reply that
    works something out reads "<|think|>8 + 3 = ... = 11<|think_end|>The answer is 11." rather than
    running the reasoning into the answer. Every other special token (ends of turns, image slots) is
    markup and left out of the text."""
    found = (tokenizer.token_to_id(marker) for marker in (THINK, THINK_END))
    return {token for token in found if token is not None and token in tokenizer.special_ids.values()}


class IncrementalDecoder:
    """Token ids in, printable text out, one token at a time and never half a character.

    In byte-level BPE a character outside ASCII (é, 中, 🙂) is 2–4 bytes that can be split over several
    tokens; decoding such a token alone gives U+FFFD. So we decode a short *window*: the last token
    already printed (as context, for decoders whose output depends on the token before, such as
    SentencePiece's leading space) plus the tokens not printed yet, and print the new part once the
    window no longer ends in an unfinished character. The window stays a couple of tokens long, so a
    step costs the same however long the text gets.
    """

    # An unfinished character needs at most 3 more bytes. Still unfinished after this many pending
    # tokens, the bytes are malformed rather than incomplete: print them (as U+FFFD) and move on.
    MAX_PENDING = 8

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.shown = shown_special_ids(tokenizer)
        self.window: list[int] = []
        self.printed = 0  # characters of decode(window) that are already out
        last = list(context[-1:])
        if last and not self._decode(last).endswith(REPLACEMENT_CHAR):
            self.window, self.printed = last, len(self._decode(last))

    def _decode(self, ids: list[int]) -> str:
        if not self.shown.intersection(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        pieces, run = [], []
        for token in ids:
            if token in self.shown:
                pieces += [self.tokenizer.decode(run, skip_special_tokens=True), self.tokenizer.id_to_token(token)]
                run = []
            else:
                run.append(token)
        return "".join(pieces) + self.tokenizer.decode(run, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", while a character is unfinished)."""
        self.window.append(token_id)
        text = self._decode(self.window)
        unfinished = text.endswith(REPLACEMENT_CHAR)
        if unfinished and len(self.window) <= self.MAX_PENDING:
            return ""
        piece = text[self.printed :]
        if unfinished:  # malformed bytes went out: start afresh rather than build on them
            self.window, self.printed = [], 0
        else:  # keep the last token as context for the next one
            self.window = self.window[-1:]
            self.printed = len(self._decode(self.window))
        return piece

    def flush(self) -> str:
        """The text still held back at the end of the output (an unfinished character shows as U+FFFD)."""
        piece = self._decode(self.window)[self.printed :]
        self.window, self.printed = [], 0
        return piece


class StopStringMatcher:
    """Cuts streamed text at the first stop string, which itself is never let out.

    Text that could be the beginning of a stop string is held back until the next piece settles it
    (``"\\nUs"`` may become ``"\\nUser:"``), so a stop string spread over several tokens is caught too.
    """

    def __init__(self, stop_strings: Sequence[str]):
        self.stop_strings = [s for s in stop_strings if s]
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add text; return the part that is safe to let out. Sets ``stopped`` on a match."""
        text = self.held + piece
        starts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if starts:
            self.held, self.stopped = "", True
            return text[: min(starts)]
        keep = self._longest_partial_match(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def _longest_partial_match(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper beginning of some stop string."""
        return max(
            (n for s in self.stop_strings for n in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:n])),
            default=0,
        )

    def flush(self) -> str:
        """The held-back text, at the end of an output that never completed a stop string."""
        held, self.held = self.held, ""
        return held


@dataclass
class Completion:
    """One prompt's output.

    token_ids      the generated ids, with the stop token at the end when one ended the output.
    text           the generated text, without stop token or stop string ("" when there is no tokenizer).
    finish_reason  "stop" (a stop token or stop string) or "length" (out of max_new_tokens or context).
    """

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class TextStream:
    """The text pieces of one completion as they are generated; ``completion`` says how it ended."""

    def __init__(self, pieces: Iterator[str], completion: Completion):
        self._pieces = pieces
        self.completion = completion

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating early (a ``for`` loop that breaks leaves it to the garbage collector)."""
        self._pieces.close()


class Row:
    """Bookkeeping for one prompt of a batch: collects its tokens and text and decides when it ends."""

    def __init__(self, prompt_ids: list[int], budget: int, stop_ids: set[int], tokenizer, stop_strings):
        self.completion = Completion(prompt_ids)
        self.budget = budget
        self.stop_ids = stop_ids
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids) if tokenizer is not None else None
        self.stops = StopStringMatcher(stop_strings)
        self.pieces: list[str] = []

    @property
    def done(self) -> bool:
        return self.completion.finish_reason is not None

    def push(self, token_id: int) -> str:
        """Take the row's next token; return the new text it makes safe to show ("" if none)."""
        self.completion.token_ids.append(token_id)
        if token_id in self.stop_ids:
            return self._finish("stop", self._flush())
        piece = self.stops.feed(self.decoder.push(token_id)) if self.decoder else ""
        if self.stops.stopped:
            return self._finish("stop", piece)
        if len(self.completion.token_ids) == self.budget:
            piece += self._flush()
            return self._finish("stop" if self.stops.stopped else "length", piece)
        self.pieces.append(piece)
        return piece

    def _flush(self) -> str:
        return self.stops.feed(self.decoder.flush()) + self.stops.flush() if self.decoder else ""

    def _finish(self, reason: str, piece: str) -> str:
        self.pieces.append(piece)
        self.completion.finish_reason = reason
        self.completion.text = "".join(self.pieces)
        return piece


# -- the engine ------------------------------------------------------------------------------------


class Engine:
    """A model (and its tokenizer) ready to generate: batched ids, batched text, or a text stream.

    ``compile=True`` compiles the one-token decode step with ``torch.compile``: the first call takes a
    while (seconds to a minute), later ones skip most of PyTorch's per-operation overhead. See
    docs/generate.md for when that pays off.

    ``kv_cache="int8"`` keeps the keys and values in an ``Int8KVCache``: about half the memory of a bf16
    cache (so the server fits about twice the sequences), at a small cost in quality and some in speed
    (see docs/quantize.md); "auto" keeps them in the model's dtype.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer=None,
        device: str | torch.device | None = None,
        compile: bool = False,
        processor=None,
        kv_cache: str = "auto",
    ):
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache: expected one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
        self.kv_cache = kv_cache
        if device is not None:
            model = model.to(resolve_device(device) if isinstance(device, str) else device)
        self.vlm = None  # a VisionLanguageModel: its language model generates, its tower and projector see
        if hasattr(model, "language_model"):
            if processor is None:
                raise ValueError("a vision-language model needs its image processor (preprocessor_config.json)")
            self.vlm, model = model.eval(), model.language_model
        self.processor = processor
        self.model = model.eval()
        self.tokenizer = tokenizer
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.context_length = model.config.max_position_embeddings
        self.defaults = SamplingSettings()  # the model directory's generation_config.json, in from_dir
        self.decode_step = self.last_logits  # one step for every sequence of a batch: the engine's and the server's
        if compile:
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            self.decode_step = torch.compile(self.last_logits, dynamic=True, options=options)

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        compile: bool = False,
        kv_cache: str = "auto",
    ) -> Engine:
        """Load a model directory or Hub id (weights, and the tokenizer when there is one) onto ``device``;
        a vision-language model with its image processor too."""
        path = modeldir.resolve_model(path)
        if modeldir.is_reward_dir(path):
            raise modeldir.ModelDirError(
                f"{path}: is a reward model: it scores conversations and writes none, so it cannot chat, generate, "
                "serve or be evaluated on benchmarks (tinylm.train.rm.score_conversations scores with it)"
            )
        loaded = modeldir.load(path, device=resolve_device(device), dtype=dtype)
        engine = cls(loaded.model, loaded.tokenizer, compile=compile, processor=loaded.processor, kv_cache=kv_cache)
        engine.defaults = generation_defaults(path)
        return engine

    # -- the three ways in ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[int]]:
        """Token ids in, generated token ids out (without the prompt; with the stop token if one ended
        the row). Prompts may differ in length: they are decoded together as one left-padded batch."""
        return [c.token_ids for c in self._run(prompts, settings, detokenize=False)]

    def complete(self, prompts: list[str], settings: SamplingSettings) -> list[str]:
        """Texts in, generated texts out, decoded as one batch."""
        return [c.text for c in self.run(prompts, settings)]

    def stream(self, prompt: str | list[int], settings: SamplingSettings, images: Sequence | None = None) -> TextStream:
        """Yield the generated text piece by piece as tokens come out: whole characters only, and
        nothing of a stop string. After the loop, ``.completion`` holds the ids and the finish reason.
        ``images`` (paths, bytes or PIL images): one per ``<image>`` tag of the prompt, in order."""
        row = self._row(self._prompt_ids(prompt, images), settings, detokenize=True)
        pixels = self.pixels([images or []])
        return TextStream(self._stream_pieces(row, settings, pixels), row.completion)

    def run(
        self, prompts: Sequence[str | list[int]], settings: SamplingSettings, images: Sequence[Sequence] | None = None
    ) -> list[Completion]:
        """Generate for a batch of prompts (texts or ids) and return each one's full ``Completion``.
        ``images``: per prompt, the images of its ``<image>`` tags (a vision-language model only)."""
        return self._run(prompts, settings, detokenize=self.tokenizer is not None, images=images)

    def _run(
        self,
        prompts: Sequence[str | list[int]],
        settings: SamplingSettings,
        detokenize: bool,
        images: Sequence[Sequence] | None = None,
    ) -> list[Completion]:
        if not prompts:
            return []
        images = list(images) if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} lists of images: give one list per prompt")
        rows = [self._row(self._prompt_ids(p, i), settings, detokenize) for p, i in zip(prompts, images)]
        steps = max(row.budget for row in rows)
        pixels = self.pixels(images)
        for tokens in self._token_steps([r.completion.prompt_ids for r in rows], settings, steps, pixels):
            for row, token in zip(rows, tokens):
                if not row.done:
                    row.push(token)
            if all(row.done for row in rows):
                break
        return [row.completion for row in rows]

    def _stream_pieces(self, row: Row, settings: SamplingSettings, pixels: torch.Tensor | None) -> Iterator[str]:
        for (token,) in self._token_steps([row.completion.prompt_ids], settings, row.budget, pixels):
            piece = row.push(token)
            if piece:
                yield piece
            if row.done:
                return

    # -- prompts and limits ---------------------------------------------------------------------

    def encode(self, text: str, images: int = 0) -> list[int]:
        """A text prompt's ids; for a vision-language model each ``<image>`` tag (there must be
        ``images`` of them) becomes the image's run of placeholder tokens."""
        tokenizer = self._require_tokenizer("a text prompt")
        if self.vlm is not None:
            text = expand_image_tags(text, images, self.vlm.config.image_seq_length)
        elif images:
            raise ValueError("this model has no vision tower, so it cannot take images (train one with tinylm vlm)")
        return tokenizer.encode(text)

    def pixels(self, images: Sequence[Sequence]) -> torch.Tensor | None:
        """The images of every prompt, in order, as one pixel tensor for the vision tower (None if none)."""
        flat = [image for row in images for image in (row or [])]
        if not flat:
            return None
        if self.vlm is None:
            raise ValueError("this model has no vision tower, so it cannot take images (train one with tinylm vlm)")
        return self.processor(flat)

    def _prompt_ids(self, prompt: str | list[int], images: Sequence | None = None) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode(prompt, len(images or []))
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give the model at least one token to continue")
        if len(ids) >= self.context_length:
            raise ValueError(
                f"the prompt is {len(ids)} tokens long but the model's context is {self.context_length} "
                f"tokens: shorten it to at most {self.context_length - 1} to leave room for a reply"
            )
        return ids

    def _row(self, prompt_ids: list[int], settings: SamplingSettings, detokenize: bool) -> Row:
        """The row's bookkeeping. Its budget is max_new_tokens, clipped so prompt + reply fit the context."""
        if settings.stop_strings:
            self._require_tokenizer("stop_strings")
        budget = min(settings.max_new_tokens, self.context_length - len(prompt_ids))
        tokenizer = self.tokenizer if detokenize or settings.stop_strings else None
        return Row(prompt_ids, budget, self.stop_ids(settings), tokenizer, settings.stop_strings)

    def stop_ids(self, settings: SamplingSettings) -> set[int]:
        """The token ids that end a row under ``settings``."""
        if settings.stop_token_ids is not None:
            return set(settings.stop_token_ids)
        if self.tokenizer is not None:
            return {self.tokenizer.eos_id}
        return set(self.model.config.eos_token_ids())

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and this engine has none (pass token ids instead)")
        return self.tokenizer

    # -- the loop -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _token_steps(
        self, prompts: list[list[int]], settings: SamplingSettings, steps: int, pixels: torch.Tensor | None = None
    ) -> Iterator[list[int]]:
        """Prefill the prompts, then yield one new token per prompt, ``steps`` times.

        Deciding when a row is done is the caller's business; the caller stops iterating once all are.
        A row that is done early keeps decoding alongside the others, and its tokens are ignored.

        Prompts of different lengths are left-padded to the longest, so every row's newest token sits
        in the same column. Padding is masked out of attention, and each row's positions count its
        own tokens only, so a row generates exactly what it would alone.

        ``pixels``: the images of all prompts in order; the prefill then runs on the vision-language
        model's embeddings, with each image's features in place of its placeholder tokens.

        A prompt that appears several times (a group of answers sampled for one prompt, as RL does) is
        prefilled once, and its rows of the cache are copied for the others: the same keys and values,
        a fraction of the work.
        """
        logits, cache, padding = self.shared_prefill(prompts, pixels, room=steps)
        batch, longest = padding.shape
        padded = not bool(padding.all())

        # For one new query the mask is the padding row itself (the query is a real token, so it
        # always sees itself); one buffer, sliced to the cache length at each step.
        if padded:
            key_padding = torch.ones(batch, longest + steps, dtype=torch.bool, device=self.device)
            key_padding[:, :longest] = padding.bool()
        sampler = BatchSampler(self.model.config.vocab_size, self.device, len(prompts))
        for row, prompt in enumerate(prompts):  # row r draws from seed + r: one prompt alone draws from seed
            sampler.add(settings, prompt, choice=row)
        position = padding.sum(dim=-1, keepdim=True)  # each row's next position: its own token count
        for step in range(steps):
            next_ids = sampler.sample(logits)
            yield next_ids
            if step == steps - 1:
                return
            sampler.observe(next_ids)
            mask = key_padding[:, None, None, : cache.length + 1] if padded else None
            tokens = torch.tensor(next_ids, device=self.device)[:, None]
            logits = self.decode_step(tokens, position, mask, cache)
            position += 1

    @torch.inference_mode()
    def prefill(
        self, prompts: list[list[int]], pixels: torch.Tensor | None = None, room: int = 0
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Run the prompts through the model at once, left-padded to the longest, into a new KVCache
        with ``room`` free positions after them. Returns the last position's logits [batch, vocab], the
        cache, and the 0/1 mask of real tokens [batch, longest].

        Each row's positions count its own tokens only (padding is masked out of attention), so a row
        gets exactly the keys, values and logits it would get alone.
        """
        tokens, padding = self._left_pad(prompts)
        batch, longest = tokens.shape
        positions = (padding.cumsum(dim=-1) - 1).clamp(min=0)
        cache = self.new_cache(batch, longest + room)
        mask = attention_mask(padding, longest, longest) if not bool(padding.all()) else None
        if self.vlm is not None:
            embeds = self.vlm.embed(tokens, None if pixels is None else pixels.to(self.device))
            hidden = self.model.hidden_states(inputs_embeds=embeds, position_ids=positions, mask=mask, cache=cache)
            return self.model.lm_head(hidden[:, -1]), cache, padding
        return self.last_logits(tokens, positions, mask, cache), cache, padding

    def shared_prefill(
        self, prompts: list[list[int]], pixels: torch.Tensor | None = None, room: int = 0
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """``prefill``, with each distinct prompt run once and its results copied to the rows that
        repeat it (text prompts; prompts with images are each run)."""
        first: dict[tuple[int, ...], int] = {}  # each distinct prompt → its row in the prefill
        for prompt in prompts:
            first.setdefault(tuple(prompt), len(first))
        if pixels is not None or len(first) == len(prompts):
            return self.prefill(prompts, pixels, room)
        logits, cache, padding = self.prefill([list(p) for p in first], None, room)
        rows = torch.tensor([first[tuple(p)] for p in prompts], device=self.device)
        copies = self.new_cache(len(prompts), cache.max_len)
        copies.take_rows(cache, rows)
        return logits[rows], copies, padding[rows]

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache of the engine's kind (``kv_cache``): for a prefill, or the server's slots."""
        return KV_CACHES[self.kv_cache](self.model.config, batch_size, max_len, self.device, self.dtype)

    def last_logits(self, tokens, positions, mask, cache) -> torch.Tensor:
        """Run the model over ``tokens`` [batch, t], appending to ``cache``; logits of the last position only."""
        hidden = self.model.hidden_states(tokens, position_ids=positions, mask=mask, cache=cache)
        return self.model.lm_head(hidden[:, -1])

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [batch, longest] with padding on the left, and a 0/1 mask of the real tokens."""
        longest = max(len(p) for p in prompts)
        tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=self.device)
        padding = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return tokens, padding
