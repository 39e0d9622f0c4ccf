"""Multi-turn chat in the terminal, over the inference engine.

A chat is a list of messages, ``{"role": "system" | "user" | "assistant", "content": ...}``. Each turn
the whole conversation is *rendered* into one prompt, the engine continues it, and the reply streams to
the screen as it is generated. The model itself remembers nothing between turns: the history is simply
in the prompt every time, and the oldest exchanges are dropped when it no longer fits the context.

How the conversation is rendered is a ``ChatFormat``. ``PLAIN`` suits a base model that has only read
ordinary text — labelled lines, ending with the cue for the assistant to speak:

    System: You answer in one sentence.
    User: Who is Tom?
    Assistant:

and a reply ends where the model starts writing the user's next line ("\\nUser:"). A model fine-tuned on
a chat template gets a ChatFormat built from that template instead.

Commands: /reset starts over, /system TEXT sets the system prompt (/system alone removes it), /image PATH
shows a vision-language model a picture with the next message, /exit or Ctrl-D quits. Ctrl-C while the
model is writing stops that reply and returns to the prompt.

An image goes into the conversation as an ``<image>`` tag at the start of the user message it came
with; the message keeps its images, so they stay in the prompt (and in order) as long as the message
does, and leave with it when the oldest exchanges no longer fit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

from tinylm.chat_template import find_template
from tinylm.image_processor import load_image
from tinylm.infer.sampling import SamplingSettings
from tinylm.io import DataError, iter_records
from tinylm.model.vlm import IMAGE_TAG, IMAGE_TOKEN

HELP = (
    "commands: /reset starts over, /system TEXT sets the system prompt, /exit quits (or Ctrl-D); Ctrl-C stops a reply"
)
IMAGE_HELP = "/image PATH shows the model a picture with your next message"
PROMPT = "> "


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation becomes prompt text, and which text (or tokens) end the assistant's turn."""

    render: Callable[[list[dict]], str]
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def settings(self, settings: SamplingSettings, tokenizer) -> SamplingSettings:
        """``settings`` that also stop where this format's turn ends (and at the tokenizer's eos)."""
        stop_ids = None
        if self.stop_token_ids:
            base = settings.stop_token_ids if settings.stop_token_ids is not None else [tokenizer.eos_id]
            stop_ids = sorted({*base, *self.stop_token_ids})
        return replace(
            settings,
            stop_strings=[*settings.stop_strings, *self.stop_strings],
            stop_token_ids=stop_ids if stop_ids is not None else settings.stop_token_ids,
        )


def render_plain(messages: list[dict]) -> str:
    """One labelled line per message, then "Assistant:" for the model to continue."""
    labels = {"system": "System", "user": "User", "assistant": "Assistant"}
    lines = [f"{labels[m['role']]}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


PLAIN = ChatFormat(render_plain, stop_strings=("\nUser:",))


def chat_format_for(tokenizer, eos_token_ids=()) -> ChatFormat:
    """The model's own format: its tinylm template; else the Jinja ``chat_template`` a foreign model
    (a local Qwen or Llama directory) ships, stopping at its eos tokens; else PLAIN for a base model."""
    jinja = getattr(tokenizer, "chat_template", None)
    if not jinja:
        return PLAIN
    template = find_template(jinja)
    if template is not None:
        return ChatFormat(
            lambda messages: template.render(messages, add_generation_prompt=True),
            tuple(template.stop_strings),
            tuple(template.stop_token_ids(tokenizer)),
        )
    return ChatFormat(jinja_renderer(jinja, tokenizer), stop_token_ids=tuple(eos_token_ids) or (tokenizer.eos_id,))


def jinja_renderer(jinja: str, tokenizer) -> Callable[[list[dict]], str]:
    """Render a foreign Jinja chat template as transformers does, in a sandbox (the template came with
    a model directory, so it is not trusted to touch anything)."""
    # jinja2 runs only a foreign model's chat template (tinylm's own render from their definitions)
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(jinja)
    specials = {
        "bos_token": getattr(tokenizer, "bos_token", None) or "",
        "eos_token": getattr(tokenizer, "eos_token", ""),
    }

    def render(messages: list[dict]) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=True, **specials)
        except TemplateError as e:
            raise ValueError(f"the model's chat_template refused the conversation: {e}") from None

    return render


def run_chat(
    engine,
    system: str | None = None,
    settings: SamplingSettings | None = None,
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
    chat_format: ChatFormat = PLAIN,
    images: list | None = None,
    augment: Callable[[str], tuple[str, str]] | None = None,
) -> list[dict]:
    """Chat until /exit or end of input; return the conversation (system message first, if any; a
    message that came with images holds them under "images").

    ``images`` go with the first message (as /image does). ``augment(message)`` gives (what the model
    reads instead of the message, a note shown after the reply): ``chat --rag`` puts retrieved
    passages there and lists their sources; the conversation keeps the message as typed. ``input_fn``
    and ``output`` default to the terminal; tests pass a scripted input and a StringIO.
    """
    if engine.tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this model has none (no tokenizer.json in its directory)")
    settings = chat_format.settings(settings or engine.defaults, engine.tokenizer)
    history: list[dict] = []
    say = lambda text: print(text, file=output, flush=True)  # noqa: E731
    sees = engine.vlm is not None
    pending = [attach_image(engine, image) for image in images or []]
    say(HELP + (f"; {IMAGE_HELP}" if sees else ""))
    while True:
        try:
            line = input_fn(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
            say("")
            break
        command, _, argument = line.partition(" ")
        if not line:
            continue
        elif command == "/exit":
            break
        elif command == "/reset":
            history.clear()
            pending.clear()
            say("(new conversation)")
        elif command == "/system":
            if sees and has_image_markers(argument):
                say(NO_MARKERS)
                continue
            system = argument.strip() or None
            say(f"(system prompt: {system})" if system else "(no system prompt)")
        elif command == "/image":
            try:
                pending.append(attach_image(engine, argument.strip()))
                say(f"(image {argument.strip()} goes with your next message)")
            except ValueError as e:
                say(f"({e})")
        elif command.startswith("/"):
            say(f"unknown command {command}; {HELP}")
        elif sees and has_image_markers(line):
            say(NO_MARKERS)
        else:
            turn, note = augment(line) if augment is not None else (line, None)
            message = {"role": "user", "content": IMAGE_PREFIX * len(pending) + turn}
            if pending:
                message["images"], pending = pending, []
            history.append(message)
            prompt = fit_to_context(engine, system, history, chat_format, settings.max_new_tokens, say)
            if prompt is None:
                pending = history.pop().get("images", [])  # the pictures wait for a shorter message
                continue
            reply = stream_reply(engine, prompt, settings, output, images_of(history) or None)
            if sees:  # a reply that wrote a tag would make every later prompt hold more tags than pictures
                reply = reply.replace(IMAGE_TAG, "").replace(IMAGE_TOKEN, "")
            message["content"] = message["content"].removesuffix(turn) + line  # later turns see it as typed
            history.append({"role": "assistant", "content": reply})
            if note:
                say(note)
    return with_system(system, history)


IMAGE_PREFIX = IMAGE_TAG + "\n"  # how an attached image enters its message, as in LLaVA's data
NO_MARKERS = f"(pictures enter with /image PATH; a message cannot contain {IMAGE_TAG} or {IMAGE_TOKEN} itself)"


def has_image_markers(text: str) -> bool:
    return IMAGE_TAG in text or IMAGE_TOKEN in text


def attach_image(engine, path: str):
    """The image at ``path``, read now so that a wrong path is reported at once, not mid-reply."""
    if engine.vlm is None:
        raise ValueError("this model has no vision tower, so it cannot see images (train one with tinylm vlm)")
    if not path:
        raise ValueError("/image needs a path: /image picture.png")
    return load_image(path)


def images_of(history: list[dict]) -> list:
    return [image for message in history for image in message.get("images", ())]


def with_system(system: str | None, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history


def text_only(messages: list[dict]) -> list[dict]:
    """The messages as the chat format renders them: role and content (images travel separately)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def fit_to_context(engine, system, history, chat_format, reply_room, say) -> str | None:
    """Render the conversation, first dropping the oldest exchanges while the prompt plus room for the
    reply would overflow the model's context. None (after saying why) if even the newest message alone
    does not fit."""
    room = min(reply_room, engine.context_length // 2)
    while True:
        prompt = chat_format.render(text_only(with_system(system, history)))
        if len(engine.encode(prompt, len(images_of(history)))) + room <= engine.context_length:
            return prompt
        if len(history) == 1:
            say(f"(that message is too long for the model's context of {engine.context_length} tokens)")
            return None
        del history[:2]  # the oldest user message and its reply
        say("(the oldest exchange no longer fits in the context and was forgotten)")


def stream_reply(engine, prompt: str, settings: SamplingSettings, output: TextIO, images: list | None = None) -> str:
    """Write the reply to ``output`` as it is generated and return it. Ctrl-C ends it early; what was
    shown until then stays in the conversation."""
    shown: list[str] = []
    try:
        for piece in engine.stream(prompt, settings, images=images):
            if not shown:  # the prompt ends with "Assistant:", so the reply starts with a space
                piece = piece.lstrip()
                if not piece:
                    continue
            output.write(piece)
            output.flush()
            shown.append(piece)
    except KeyboardInterrupt:
        output.write(" [stopped]")
    output.write("\n")
    output.flush()
    return "".join(shown).rstrip()


def answer_prompts(
    engine,
    prompts: list[str],
    system: str | None = None,
    settings: SamplingSettings | None = None,
    chat_format: ChatFormat = PLAIN,
    images: list | None = None,
    augment: Callable[[str], tuple[str, str]] | None = None,
) -> list[dict]:
    """Each prompt as a one-turn conversation, answered in one batch: a scripted check of a chat model.
    ``images`` (a vision-language model) go with every prompt; ``augment`` as in ``run_chat`` (its
    note is the record's "sources"). Returns one record per prompt: {"prompt", "answer", "finish_reason"}."""
    if engine.tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this model has none (no tokenizer.json in its directory)")
    settings = chat_format.settings(settings or engine.defaults, engine.tokenizer)
    pictures = [attach_image(engine, image) for image in images or []]
    turns = [augment(p) if augment is not None else (p, None) for p in prompts]
    rendered = [
        chat_format.render(with_system(system, [{"role": "user", "content": IMAGE_PREFIX * len(pictures) + turn}]))
        for turn, _ in turns
    ]
    completions = engine.run(rendered, settings, images=[pictures] * len(prompts) if pictures else None)
    records = []
    for prompt, (_, note), completion in zip(prompts, turns, completions):
        record = {"prompt": prompt, "answer": completion.text.strip(), "finish_reason": completion.finish_reason}
        records.append(record | ({"sources": note} if note is not None else {}))
    return records


def read_prompts(path) -> list[str]:
    """Prompts from a file: one per line in a .txt (blank lines skipped), or {"prompt": ...} per line
    in a .jsonl. Errors name the file and line."""
    prompts = []
    for where, record in iter_records(path, types=(".txt", ".jsonl"), txt_split="line"):
        if isinstance(record, DataError):
            raise DataError(f"{where}: {record}", record.reason)
        if isinstance(record, str):
            if record.strip():
                prompts.append(record.strip())
            continue
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f"{where}: expected an object with a string field 'prompt'")
        prompts.append(record["prompt"])
    if not prompts:
        raise DataError(f"{path}: no prompts in it")
    return prompts
