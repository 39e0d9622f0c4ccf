"""OpenAI's request format, checked field by field, turned into scheduler requests.

Every field is read through ``Fields``, which checks its type and range and, when it is wrong, raises
an ``APIError`` that names it (``param``) and says what was expected: the client gets OpenAI's error
shape with status 400, never a stack trace. Fields that would change the answer but are not supported
here (tools, response formats, echo, ...) are refused by name rather than silently ignored.

A chat request becomes one prompt through the model's chat template (with ``--rag``, its last user
message carries the passages retrieved for it); a completions request may carry several prompts
(strings or token ids). Each becomes one ``Request`` for the scheduler, with the same sampling
settings, whose defaults come from the model directory's ``generation_config.json``. An embeddings
request becomes the list of texts to encode.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, replace

from tinylm.image_processor import load_image
from tinylm.infer.chat import IMAGE_PREFIX
from tinylm.infer.sampling import SamplingSettings
from tinylm.infer.scheduler import Request

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # chat; the completions endpoint allows 5
MAX_MESSAGES = 1024
MAX_IMAGES = 8  # per request
MAX_STOP_CHARS = 200  # per stop string: text is matched against every stop string at every token
MAX_PIXELS = 4096 * 4096  # per picture, checked before it is decoded
IMAGE_TAGS = ("<image>", "<|image|>")
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit
MAX_EMBEDDING_CHARS = 100_000  # per input, before tokenizing (bge-m3's 8,192 tokens are ~40,000 characters)
IGNORED = {"user", "metadata", "store", "service_tier"}  # accepted, with no effect on the answer


class APIError(Exception):
    """An error the client caused (or must hear about), in OpenAI's shape."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object (NaN and Infinity are not JSON, and are refused)."""

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=no_constants)
        json.dumps(data, ensure_ascii=False).encode(
            "utf-8"
        )  # a lone surrogate escape (a "\ud800" in the JSON) is no text
    except UnicodeEncodeError:
        raise APIError("the request body holds a lone UTF-16 surrogate escape, which is not a character") from None
    except (ValueError, RecursionError) as e:
        raise APIError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(f"the request body must be a JSON object, not {json_type(data)}")
    return data


def json_type(value) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


class Fields:
    """One JSON object's fields, each read once with its type and range checked; ``where`` prefixes
    the field names in errors (``messages[2].content``)."""

    def __init__(self, data: dict, where: str = ""):
        self.data, self.where = data, where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kinds: tuple, expected: str, default=None):
        value = self.data.get(key)
        if value is None:
            return default
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise APIError(f"'{self.name(key)}' must be {expected}, got {json_type(value)}", self.name(key))
        return value

    def number(self, key, default, low, high, low_open=False):
        value = self.get(key, (int, float), "a number", default)
        if value is None:
            return None
        too_low = value <= low if low_open else value < low
        if too_low or value > high or math.isnan(value):
            bracket = "(" if low_open else "["
            raise APIError(f"'{self.name(key)}' must be in {bracket}{low}, {high}], got {value}", self.name(key))
        return float(value)

    def integer(self, key, default, low, high):
        value = self.get(key, (int,), "an integer", default)
        if value is not None and not low <= value <= high:
            raise APIError(f"'{self.name(key)}' must be between {low} and {high}, got {value}", self.name(key))
        return value

    def boolean(self, key, default=False):
        return self.get(key, (bool,), "a boolean", default)

    def string(self, key, default=None):
        return self.get(key, (str,), "a string", default)

    def refuse_unknown(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known and key not in IGNORED:
                raise APIError(f"unrecognized request argument supplied: {self.name(key)}", self.name(key))


# -- the parts both endpoints share -------------------------------------------------------------


SAMPLING_FIELDS = {
    "model",
    "ignore_eos",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "stop",
    "n",
    "seed",
    "stream",
    "stream_options",
    "logit_bias",
    "response_format",
}


@dataclass
class Generation:
    """A checked request: the scheduler requests to run, and how to answer."""

    requests: list[Request]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; else how many alternatives per token
    chat: bool
    sources: list[dict] | None = None  # --rag: the passages the prompt cites (None: no retrieval)


def sampling(fields: Fields, defaults: SamplingSettings, max_batch: int) -> tuple[SamplingSettings, dict]:
    """The sampling fields of either endpoint: SamplingSettings (its max_new_tokens still to be
    settled against the prompt) and the scheduler's extras."""
    refuse_unsupported(fields)
    temperature = fields.number("temperature", defaults.temperature, 0, 2)
    top_p = fields.number("top_p", defaults.top_p, 0, 1)
    top_k = fields.integer("top_k", defaults.top_k, -1, 1_000_000)
    repetition = fields.number("repetition_penalty", defaults.repetition_penalty, 0, 10, low_open=True)
    seed = fields.integer("seed", None, -(2**63), 2**64 - 1)
    settings = SamplingSettings(
        max_new_tokens=1,  # settled later
        temperature=temperature,
        top_k=max(top_k, 0),  # -1 is another way to say "off"
        top_p=max(top_p, 1e-9),  # 0 keeps the single most likely token, as the smallest positive p does
        repetition_penalty=repetition,
        seed=None if seed is None else seed % 2**62,
        stop_strings=stop_strings(fields),
    )
    extras = {
        "n": fields.integer("n", 1, 1, max_batch),
        "presence_penalty": fields.number("presence_penalty", 0.0, -2, 2),
        "frequency_penalty": fields.number("frequency_penalty", 0.0, -2, 2),
    }
    return settings, extras


def refuse_unsupported(fields: Fields) -> None:
    logit_bias = fields.get("logit_bias", (dict,), "an object")
    if logit_bias:
        raise APIError("'logit_bias' is not supported by this server", "logit_bias")
    response_format = fields.get("response_format", (dict,), "an object")
    if response_format and response_format.get("type") != "text":
        raise APIError(
            '\'response_format\' other than {"type": "text"} is not supported by this server', "response_format"
        )


def stop_strings(fields: Fields) -> list[str]:
    stop = fields.get("stop", (str, list), "a string or an array of strings")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise APIError(f"'stop[{i}]' must be a non-empty string, got {json_type(s)}", "stop")
        if len(s) > MAX_STOP_CHARS:
            raise APIError(f"'stop[{i}]' is {len(s)} characters long; at most {MAX_STOP_CHARS} are allowed", "stop")
    return list(stops)


def stream_fields(fields: Fields) -> tuple[bool, bool]:
    stream = fields.boolean("stream")
    options = fields.get("stream_options", (dict,), "an object")
    if options is None:
        return stream, False
    if not stream:
        raise APIError("'stream_options' is only allowed when 'stream' is true", "stream_options")
    option_fields = Fields(options, "stream_options")
    option_fields.refuse_unknown({"include_usage"})
    return stream, option_fields.boolean("include_usage")


def settle_length(
    settings: SamplingSettings,
    prompt_ids: list[int],
    fields: Fields,
    max_len: int,
    defaults: SamplingSettings,
    param: str,
) -> SamplingSettings:
    """Check the prompt against the context and settle max_new_tokens: the request's, which must fit
    beside the prompt, or the default, cut to the room left."""
    room = max_len - len(prompt_ids)
    if room < 1:
        raise APIError(
            f"the prompt is {len(prompt_ids)} tokens long, but this server's context is {max_len} tokens "
            f"(prompt + reply); shorten it to at most {max_len - 1} tokens",
            param,
            code="context_length_exceeded",
        )
    name, asked = asked_length(fields)
    if asked is None:
        return replace(settings, max_new_tokens=min(defaults.max_new_tokens, room))
    if asked > room:
        raise APIError(
            f"'{name}' is {asked}, but the prompt is {len(prompt_ids)} tokens and this server's context is "
            f"{max_len} tokens: at most {room} can be generated",
            name,
            code="context_length_exceeded",
        )
    return replace(settings, max_new_tokens=asked)


def asked_length(fields: Fields) -> tuple[str, int | None]:
    """(the field, the reply length it asks for), or (..., None) when the request leaves it to the server."""
    asked = fields.integer("max_completion_tokens", None, 1, 2**31)
    if asked is not None:
        return "max_completion_tokens", asked
    return "max_tokens", fields.integer("max_tokens", None, 1, 2**31)


def end_tokens(settings: SamplingSettings, fields: Fields) -> SamplingSettings:
    """``ignore_eos`` (an extra, as in vLLM): generate max_tokens whatever the model says (benchmarks
    want a known length). Stop strings still apply."""
    return replace(settings, stop_token_ids=[]) if fields.boolean("ignore_eos") else settings


def encode(server, text: str, images: int, param: str) -> list[int]:
    """The prompt's ids; a text that cannot fit the context is refused before it is tokenized (no
    token covers more than ``max_token_chars`` characters), so a huge prompt costs no time."""
    tokenizer, max_len = server.engine.tokenizer, server.scheduler.max_len
    if len(text) > max_len * tokenizer.max_token_chars:
        raise APIError(
            f"the prompt is {len(text)} characters long: more than this server's context of {max_len} tokens can hold",
            param,
            code="context_length_exceeded",
        )
    return server.engine.encode(text, images)


def check_model(fields: Fields, name: str) -> None:
    model = fields.string("model")
    if model is not None and model != name:
        raise APIError(
            f"the model '{model}' does not exist; this server serves '{name}'",
            "model",
            status=404,
            code="model_not_found",
        )


# -- chat -----------------------------------------------------------------------------------------


def chat_request(data: dict, server) -> Generation:
    """POST /v1/chat/completions → a Generation. ``server`` gives the engine, chat format, limits."""
    fields = Fields(data)
    fields.refuse_unknown(SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "rag"})
    check_model(fields, server.name)
    settings, extras = sampling(fields, server.defaults, server.scheduler.max_batch)
    stream, include_usage = stream_fields(fields)
    logprobs = None
    if fields.boolean("logprobs"):
        logprobs = fields.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif fields.data.get("top_logprobs") is not None:
        raise APIError("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    messages, images = chat_messages(data, server)
    settings = end_tokens(server.chat_format.settings(settings, server.engine.tokenizer), fields)
    prompt_ids = chat_prompt(server, messages, images)
    settled = settle_length(settings, prompt_ids, fields, server.scheduler.max_len, server.defaults, "messages")
    messages, sources = grounded(server, fields, messages, images, settled)
    if sources is not None:  # the question now stands in the template with its passages: settled again
        prompt_ids = chat_prompt(server, messages, images)
        settled = settle_length(settings, prompt_ids, fields, server.scheduler.max_len, server.defaults, "messages")
    pixels = server.engine.pixels([images]) if images else None  # queued requests hold small tensors, not pictures
    request = Request(prompt_ids, settled, logprobs=logprobs, pixels=pixels, **extras)
    return Generation([request], extras["n"], stream, include_usage, logprobs, chat=True, sources=sources)


def chat_prompt(server, messages: list[dict], images: list) -> list[int]:
    try:
        prompt = server.chat_format.render(messages)
    except ValueError as e:
        raise APIError(str(e), "messages") from None
    return encode(server, prompt, len(images), "messages")


def grounded(
    server, fields: Fields, messages: list[dict], images: list, settings: SamplingSettings
) -> tuple[list[dict], list[dict] | None]:
    """With ``--rag`` (unless the request says ``"rag": false``): the conversation whose last user
    message carries as many passages as fit beside it and the reply, and their sources."""
    searching = server.retrieval is not None and server.retrieval.searcher is not None
    if not fields.boolean("rag", searching):
        return messages, None
    if not searching:
        raise APIError("'rag': this server has no index; start it with tinylm serve MODEL --rag INDEX", "rag")
    if messages[-1]["role"] != "user":  # nothing was asked (the client continues the assistant's turn)
        return messages, []
    max_len = server.scheduler.max_len
    # the reply's room: what the request asks for, else as much as `rag ask` leaves (at most half the context)
    room = settings.max_new_tokens if asked_length(fields)[1] else min(settings.max_new_tokens, max_len // 2)

    def fits(conversation: list[dict]) -> bool:
        return len(server.engine.encode(server.chat_format.render(conversation), len(images))) + room <= max_len

    return server.retrieval.ground(messages, fits)


def chat_messages(data: dict, server) -> tuple[list[dict], list]:
    """The conversation as the chat template takes it ({"role", "content"} with text content; each
    picture becomes an image tag in its place), and the pictures in order."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty array of messages", "messages")
    if len(messages) > MAX_MESSAGES:
        raise APIError(f"'messages' may hold at most {MAX_MESSAGES} messages, got {len(messages)}", "messages")
    rendered, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(f"'{where}' must be an object with 'role' and 'content', got {json_type(message)}", where)
        fields = Fields(message, where)
        fields.refuse_unknown({"role", "content", "name"})
        fields.string("name")
        role = fields.string("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(
                f"'{where}.role' must be one of system, developer, user, assistant; got {role!r}", f"{where}.role"
            )
        content = message.get("content")
        if isinstance(content, str):
            text = checked_text(content, f"{where}.content", server)
        elif isinstance(content, list):
            text = content_parts(content, f"{where}.content", role, server, images)
        else:
            raise APIError(
                f"'{where}.content' must be a string or an array of content parts, got {json_type(content)}",
                f"{where}.content",
            )
        rendered.append({"role": "system" if role == "developer" else role, "content": text})
    return rendered, images


def checked_text(text: str, where: str, server) -> str:
    """A message's text; for a vision-language model it may not fake a picture with an image tag."""
    if server.engine.vlm is not None and any(tag in text for tag in IMAGE_TAGS):
        raise APIError(f"'{where}' contains an image tag as text; send pictures as image_url parts", where)
    return text


def content_parts(parts: list, where: str, role: str, server, images: list) -> str:
    """An array of text and image_url parts → the message's text, with an image tag per picture."""
    pieces = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise APIError(f"'{here}' must be a content part object, got {json_type(part)}", here)
        kind = part.get("type")
        if kind == "text":
            Fields(part, here).refuse_unknown({"type", "text"})
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(f"'{here}.text' must be a string, got {json_type(text)}", f"{here}.text")
            pieces.append(checked_text(text, f"{here}.text", server))
        elif kind == "image_url":
            if role != "user":
                raise APIError(f"'{here}': only user messages may carry images", here)
            if server.engine.vlm is None:
                raise APIError(f"'{here}': this model has no vision tower, so it cannot take images", here)
            if len(images) >= MAX_IMAGES:
                raise APIError(f"a request may carry at most {MAX_IMAGES} images", here)
            images.append(read_image_url(part, here))
            pieces.append(IMAGE_PREFIX)
        else:
            raise APIError(f"'{here}.type' must be 'text' or 'image_url', got {kind!r}", f"{here}.type")
    return "".join(pieces)


def read_image_url(part: dict, where: str):
    """A picture from a ``data:image/...;base64,...`` URL (the server fetches nothing from the network)."""
    from PIL import Image  # Pillow, loaded when a request first brings a picture

    fields = Fields(part, where)
    fields.refuse_unknown({"type", "image_url"})
    image_url = fields.get("image_url", (dict, str), "an object with a 'url'")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    param = f"{where}.image_url.url"
    if not isinstance(url, str):
        raise APIError(f"'{param}' must be a string, got {json_type(url)}", param)
    header, comma, payload = url.partition(",")
    if not (header.startswith("data:") and header.endswith(";base64") and comma):
        raise APIError(
            f"'{param}' must be a data URL (data:image/png;base64,...); this server fetches nothing from the network",
            param,
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(f"'{param}' is not valid base64", param) from None
    try:
        with Image.open(io.BytesIO(raw)) as image:  # reads the header only
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise APIError(
                    f"'{param}' is a {width}x{height} picture; at most {MAX_PIXELS:,} pixels are allowed", param
                )
            return load_image(image)
    except APIError:
        raise
    except Exception as e:  # any decoder failure (including decompression bombs) is the client's input
        raise APIError(f"'{param}' is not a readable image ({type(e).__name__}: {e})", param) from None


# -- completions ----------------------------------------------------------------------------------


def completion_request(data: dict, server) -> Generation:
    """POST /v1/completions → a Generation, one scheduler request per prompt."""
    fields = Fields(data)
    fields.refuse_unknown(SAMPLING_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of"})
    check_model(fields, server.name)
    if fields.boolean("echo"):
        raise APIError("'echo' is not supported by this server", "echo")
    if fields.string("suffix"):
        raise APIError("'suffix' is not supported by this server", "suffix")
    settings, extras = sampling(fields, server.defaults, server.scheduler.max_batch)
    if fields.integer("best_of", extras["n"], 1, server.scheduler.max_batch) != extras["n"]:
        raise APIError("'best_of' other than n is not supported by this server", "best_of")
    stream, include_usage = stream_fields(fields)
    logprobs = fields.integer("logprobs", None, 0, 5)
    if server.eos_token_ids:
        settings = replace(settings, stop_token_ids=sorted({server.engine.tokenizer.eos_id, *server.eos_token_ids}))
    settings = end_tokens(settings, fields)
    prompts = completion_prompts(data.get("prompt"), server, extras["n"])
    requests = []
    for i, ids in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        requests.append(
            Request(
                ids,
                settle_length(settings, ids, fields, server.scheduler.max_len, server.defaults, param),
                logprobs=logprobs,
                **extras,
            )
        )
    return Generation(requests, extras["n"], stream, include_usage, logprobs, chat=False)


def completion_prompts(prompt, server, n: int) -> list[list[int]]:
    """``prompt``: a string, an array of strings, an array of token ids, or an array of those; each
    prompt runs ``n`` sequences, and all of them must fit in one batch."""
    vocab = server.engine.model.config.vocab_size
    image_token = server.engine.vlm.config.image_token_id if server.engine.vlm is not None else None

    def ids_of(value, param) -> list[int]:
        if isinstance(value, str):
            ids = encode(server, value, 0, param)
        elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            bad = [t for t in value if not 0 <= t < vocab]
            if bad:
                raise APIError(f"'{param}' holds token id {bad[0]}, outside the vocabulary (0..{vocab - 1})", param)
            if image_token in value:
                raise APIError(
                    f"'{param}' holds the image token {image_token}; pictures go through the chat endpoint", param
                )
            ids = list(value)
        else:
            raise APIError(f"'{param}' must be a string or an array of token ids", param)
        if not ids:
            raise APIError(f"'{param}' is empty: give the model at least one token to continue", param)
        return ids

    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        return [ids_of(prompt, "prompt")]
    if isinstance(prompt, list) and prompt:
        if len(prompt) * n > server.scheduler.max_batch:
            raise APIError(
                f"{len(prompt)} prompts × n={n} is more than the {server.scheduler.max_batch} sequences "
                "this server runs at once (--max-batch)",
                "prompt",
            )
        return [ids_of(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise APIError(
        "'prompt' must be a non-empty string, array of strings, array of token ids, or array of those", "prompt"
    )


# -- embeddings -----------------------------------------------------------------------------------


@dataclass
class Embeddings:
    """A checked embeddings request: the texts to encode, and how to send the vectors back."""

    texts: list[str]
    base64: bool  # little-endian float32 bytes in base64 (what the openai client asks for), not JSON numbers
    single: bool  # ``input`` was one string, not an array

    def param(self, i: int) -> str:
        return "input" if self.single else f"input[{i}]"


def embedding_request(data: dict, server) -> Embeddings:
    """POST /v1/embeddings → the texts to encode with the server's encoder."""
    encoder = server.retrieval.embedder if server.retrieval is not None else None
    if encoder is None:
        raise APIError(
            "this server has no text encoder: start it with tinylm serve MODEL --embedder DIR (a local "
            "sentence-transformers or transformers encoder directory), or with --rag INDEX built with --embedder",
            code="no_encoder",
        )
    fields = Fields(data)
    fields.refuse_unknown({"model", "input", "encoding_format", "dimensions"})
    name = server.retrieval.encoder_name
    model = fields.string("model")
    if model is not None and model != name:
        raise APIError(
            f"the model '{model}' is not this server's encoder; /v1/embeddings serves '{name}'",
            "model",
            status=404,
            code="model_not_found",
        )
    encoding = fields.string("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise APIError(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    dimensions = fields.integer("dimensions", encoder.dim, 1, 2**31)
    if dimensions != encoder.dim:
        raise APIError(
            f"'dimensions' must be this encoder's {encoder.dim}: it cannot shorten its vectors", "dimensions"
        )
    single = isinstance(data.get("input"), str)
    texts = [data["input"]] if single else data.get("input")
    if not isinstance(texts, list) or not texts:
        raise APIError("'input' must be a non-empty string or array of strings", "input")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise APIError(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} texts, got {len(texts)}", "input")
    request = Embeddings(texts, encoding == "base64", single)
    for i, text in enumerate(texts):
        param = request.param(i)
        if isinstance(text, list) or (isinstance(text, int) and not isinstance(text, bool)):
            raise APIError(
                f"'{param}': token ids are not accepted; the encoder reads text with its own tokenizer "
                "(LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False) sends text)",
                param,
            )
        if not isinstance(text, str):
            raise APIError(f"'{param}' must be a string, got {json_type(text)}", param)
        if not text:
            raise APIError(f"'{param}' is empty: there is nothing to encode", param)
        if len(text) > MAX_EMBEDDING_CHARS:
            raise APIError(
                f"'{param}' is {len(text)} characters long; at most {MAX_EMBEDDING_CHARS} are allowed", param
            )
    return request
