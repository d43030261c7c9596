"""Tokenizer files from a GGUF or a Hugging Face directory, and the small tokenizer the runtime uses.

A GGUF carries no `tokenizer.json`, only llama.cpp's metadata (tokens, merges or scores, token
types, special ids, chat template). At conversion time `tokenizer_files_from_gguf` has transformers
rebuild the two Hugging Face files from it (its GGUF tokenizer conversion, the same that
`AutoTokenizer.from_pretrained(dir, gguf_file=name)` runs), so the ids are transformers' by
construction; transformers is an optional dependency of converting a GGUF only. The converter writes
the files next to the weight store; at run time `Tokenizer.load(directory)` reads them back with the
`tokenizers` library alone.

What this module adds to the libraries, and why:
- a refusal of GGUF pre-tokenizer names transformers does not know: it would fall back to GPT-2's
  split regex without a word, which is wrong for e.g. "deepseek-llm", "falcon" or "stablelm2";
- the end-of-turn ids a GGUF implies (it has no generation_config.json);
- chat templates rendered in a Jinja sandbox set up as transformers' apply_chat_template does, so
  rank 0 needs neither transformers nor a network at run time;
- around tokenizers' DecodeStream: byte-fallback runs handed over whole, and `flush` to end a text
  whose last bytes never completed (see TextStream).

Known divergence, kept on purpose to match transformers: for pre-tokenizer "smollm" (and the other
StarCoder-style values) llama.cpp and the original tokenizer.json split every digit off *before* the
GPT-2 regex, transformers does not. With SmolLM2's vocabulary (single-digit tokens only) the two
differ only on runs of spaces right before a digit: "x  1" is [x, Ġ, Ġ, 1] here and in transformers,
[x, ĠĠ, 1] in llama.cpp.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from functools import lru_cache
from collections.abc import Iterable

from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from .errors import TpimpiError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"

# The named special tokens transformers hands to a chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Special tokens that end a turn or a document. llama.cpp treats a *control* token with one of these
# texts as end-of-generation; we do the same, and only for tokens that are special in the vocabulary,
# so ordinary text can never produce one. Start-of-turn and tool tokens are deliberately absent: a
# model may write those mid-answer.
_END_OF_TURN_TEXTS = frozenset({
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "</s>", "<EOT>",
})

# tokenizer.ggml.pre values whose split is GPT-2's regex, the one built into the ByteLevel
# pre-tokenizer (the second group is StarCoder-style: see the module docstring). transformers gives
# these no split of their own, rightly; it gives every other value it knows its own regex.
_GPT2_REGEX_PRES = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais",
                              "smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"})


class TokenizerError(TpimpiError, ValueError):
    """A tokenizer file or GGUF field that tpimpi cannot use, named with its actual value."""


# --------------------------------------------------------------------------------------------
# GGUF -> tokenizer.json + tokenizer_config.json (at conversion time, with transformers)


def tokenizer_files_from_gguf(path: str | os.PathLike) -> dict[str, str]:
    """File name -> text for tokenizer.json and tokenizer_config.json (with the chat template), built by
    transformers' GGUF tokenizer conversion from the file's metadata."""
    path = os.fspath(path)
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS, get_gguf_tokenizer
    except ImportError as e:
        raise TokenizerError(f"converting a GGUF's tokenizer needs transformers 5.24 or later ({e}): "
                             "pip install 'tpimpi[convert]'") from None
    _, tokenizer_dict, _ = get_gguf_tokenizer(path)
    model = tokenizer_dict.get("tokenizer_type")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(f"GGUF tokenizer.ggml.model {model!r} is not supported; supported: 'gpt2', 'llama'")
    pre = tokenizer_dict.get("pre_tokenizer_type", "default")
    if model == "gpt2" and pre not in GGUF_PRE_TOKENIZER_SPLITS and pre not in _GPT2_REGEX_PRES:
        raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                             f"{sorted(GGUF_PRE_TOKENIZER_SPLITS.keys() | _GPT2_REGEX_PRES)}")
    try:
        converted = PreTrainedTokenizerFast.from_pretrained(
            os.path.dirname(path) or ".", gguf_file=os.path.basename(path), local_files_only=True)
    except (ValueError, KeyError) as e:
        raise TokenizerError(f"transformers cannot build the tokenizer of {path}: {e}") from None
    with tempfile.TemporaryDirectory(prefix="tpimpi-tokenizer-") as out:
        converted.save_pretrained(out)
        return tokenizer_files_from_hf_dir(out)


# --------------------------------------------------------------------------------------------
# Hugging Face directory, saving


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def tokenizer_files_from_hf_dir(path: str | os.PathLike) -> dict[str, str]:
    """tokenizer.json (required) and tokenizer_config.json from a Hugging Face model directory;
    a chat_template.jinja file (or an older chat_template.json), if present, becomes the config's
    chat_template."""
    path = os.fspath(path)
    tok_path = os.path.join(path, TOKENIZER_JSON)
    if not os.path.isfile(tok_path):
        raise TokenizerError(f"no {TOKENIZER_JSON} in {path!r}; tpimpi needs a fast-tokenizer file")
    files = {TOKENIZER_JSON: _read_text(tok_path)}
    config_path = os.path.join(path, TOKENIZER_CONFIG_JSON)
    config = _load_json(_read_text(config_path), config_path) if os.path.isfile(config_path) else {}
    template_path = os.path.join(path, CHAT_TEMPLATE_JINJA)
    legacy_path = os.path.join(path, CHAT_TEMPLATE_JSON)  # older processors: {"chat_template": "..."}
    if os.path.isfile(template_path):
        config["chat_template"] = _read_text(template_path)
    elif os.path.isfile(legacy_path) and not config.get("chat_template"):
        legacy = _load_json(_read_text(legacy_path), legacy_path)
        if not isinstance(legacy, dict) or not isinstance(legacy.get("chat_template"), str):
            raise TokenizerError(f"{legacy_path} has no \"chat_template\" string")
        config["chat_template"] = legacy["chat_template"]
    if config or os.path.isfile(config_path):
        files[TOKENIZER_CONFIG_JSON] = json.dumps(config, indent=2, ensure_ascii=False)
    return files


def save_tokenizer_files(files: dict[str, str], directory: str | os.PathLike) -> None:
    """Write each file into `directory` atomically (temporary name, then os.replace)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for name, text in files.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise TokenizerError(f"tokenizer file name {name!r} must be a plain file name")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, os.path.join(directory, name))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _load_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{where} is not valid JSON: {e}") from None


# --------------------------------------------------------------------------------------------
# Chat templates


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers: plain json.dumps, without Jinja's HTML escaping.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile_template(source: str):
    """The template compiled in a sandbox set up as transformers' apply_chat_template does."""
    from jinja2 import ext, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# --------------------------------------------------------------------------------------------
# Runtime tokenizer


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string, or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode, decode, stream and chat-render with the two tokenizer files of a model."""

    def __init__(self, backend: _Backend, config: dict):
        self._backend = backend
        self._config = config
        self._specials = {name: text for name in _TEMPLATE_TOKEN_NAMES
                          if (text := _token_text(config.get(name))) is not None}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.add_bos = self._resolve_add_bos()
        self.eos_ids = self._end_ids()
        self._byte_ids = self._byte_fallback_ids()

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read tokenizer.json and (if present) tokenizer_config.json from `directory`."""
        directory = os.fspath(directory)
        tok_path = os.path.join(directory, TOKENIZER_JSON)
        if not os.path.isfile(tok_path):
            raise TokenizerError(f"no {TOKENIZER_JSON} in {directory!r}")
        config_path = os.path.join(directory, TOKENIZER_CONFIG_JSON)
        files = {TOKENIZER_JSON: _read_text(tok_path)}
        if os.path.isfile(config_path):
            files[TOKENIZER_CONFIG_JSON] = _read_text(config_path)
        return cls.from_files(files, where=directory)

    @classmethod
    def from_files(cls, files: dict[str, str], where: str = "<memory>") -> "Tokenizer":
        """Build from the file texts that tokenizer_files_from_gguf / _from_hf_dir return."""
        if TOKENIZER_JSON not in files:
            raise TokenizerError(f"{TOKENIZER_JSON} missing from tokenizer files of {where}")
        try:
            backend = _Backend.from_str(files[TOKENIZER_JSON])
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{where}/{TOKENIZER_JSON} is not a tokenizers file: {e}") from None
        config = _load_json(files.get(TOKENIZER_CONFIG_JSON, "{}"), f"{where}/{TOKENIZER_CONFIG_JSON}")
        if not isinstance(config, dict):
            raise TokenizerError(f"{where}/{TOKENIZER_CONFIG_JSON} holds {type(config).__name__}, not an object")
        return cls(backend, config)

    def _special_id(self, name: str) -> int | None:
        text = self._specials.get(name)
        if text is None:
            return None
        index = self._backend.token_to_id(text)
        if index is None:
            raise TokenizerError(f"tokenizer config {name} {text!r} is not in the vocabulary")
        return index

    def _resolve_add_bos(self) -> bool:
        flag = self._config.get("add_bos_token")
        if flag is None:
            # No flag: transformers then keeps tokenizer.json's post-processor; see whether it adds BOS.
            ids = self._backend.encode("", add_special_tokens=True).ids
            return self.bos_id is not None and ids[:1] == [self.bos_id]
        if flag and self.bos_id is None:
            raise TokenizerError("tokenizer config sets add_bos_token but names no bos_token")
        return bool(flag)

    def _end_ids(self) -> frozenset[int]:
        ids = set() if self.eos_id is None else {self.eos_id}
        for index, added in self._backend.get_added_tokens_decoder().items():
            if added.special and added.content in _END_OF_TURN_TEXTS:
                ids.add(index)
        return frozenset(ids)

    def _byte_fallback_ids(self) -> frozenset[int]:
        """Ids of "<0xNN>" tokens when the model decodes them by byte fallback (SentencePiece-style)."""
        if not getattr(self._backend.model, "byte_fallback", False):
            return frozenset()
        return frozenset(i for tok, i in self._backend.get_vocab(with_added_tokens=False).items()
                         if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"))

    @property
    def has_chat_template(self) -> bool:
        return bool(self._config.get("chat_template"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings become their ids. BOS goes first if the config says
        so and add_special_tokens (a rendered chat carries its own: see encode_chat)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and add_special_tokens else ids

    def _check_ids(self, ids: list[int]) -> None:
        for index in ids:
            if not 0 <= index < self.vocab_size:
                raise TokenizerError(f"token id {index} is outside the vocabulary of {self.vocab_size}")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are written out unless skip_special_tokens."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, user_text: str, system: str | None = None) -> str:
        """The prompt for one user turn (after an optional system turn), ready for the assistant's reply."""
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": user_text})
        return self.render_messages(messages)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """A conversation ([{"role": ..., "content": ...}, ...]) through the model's chat template."""
        template = self._config.get("chat_template")
        if not template:
            raise TokenizerError("this tokenizer has no chat template; encode the raw prompt instead")
        if isinstance(template, list):  # older configs: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise TokenizerError(f"chat templates {sorted(map(str, named))} include none named 'default'")
            template = named["default"]
        from jinja2 import TemplateError

        try:
            return _compile_template(template).render(messages=messages, tools=None, documents=None,
                                                      add_generation_prompt=add_generation_prompt, **self._specials)
        except TemplateError as e:  # e.g. raise_exception("System role not supported")
            raise TokenizerError(f"the chat template refused this conversation: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation, as transformers' apply_chat_template(tokenize=True): the
        template writes every special token itself (Llama's and Mistral's emit {{ bos_token }}), so the
        rendered text is encoded without adding BOS again."""
        return self.encode(self.render_messages(messages, add_generation_prompt), add_special_tokens=False)

    def stream(self, skip_special_tokens: bool = False) -> "TextStream":
        """A fresh incremental decoder for text being generated."""
        return TextStream(self, skip_special_tokens)


class TextStream:
    """Incremental detokenizer: push ids one at a time, get back only newly printable text.

    tokenizers' DecodeStream does the work (it holds text back while a multi-byte character is
    unfinished). Two things are added. A run of byte-fallback "<0xNN>" tokens is handed to it whole,
    with the token that ends the run: byte fallback decodes a run at once (an invalid run becomes one
    U+FFFD per byte), and DecodeStream given such a run token by token can meet a prefix it already
    printed decoding differently, and raises. And flush() ends a text, returning what is still held
    (an unfinished character prints as U+FFFD, as a full decode would), so the pieces always add up
    to decode() of the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._start()

    def _start(self) -> None:
        self._stream = decoders.DecodeStream(skip_special_tokens=self._skip)
        self._ids: list[int] = []  # ids since the start of this text
        self._run: list[int] = []  # byte-fallback ids not yet given to the stream
        self._printed = 0  # characters returned for them

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", never half a character)."""
        token_id = int(token_id)
        self._tok._check_ids([token_id])
        self._ids.append(token_id)
        self._run.append(token_id)
        if token_id in self._tok._byte_ids:
            return ""
        piece = self._stream.step(self._tok._backend, self._run) or ""
        self._run = []
        self._printed += len(piece)
        return piece

    def flush(self) -> str:
        """End the text: return whatever is still held back. Ids pushed afterwards start a new text,
        decoded as if on their own."""
        rest = self._tok._backend.decode(self._ids, skip_special_tokens=self._skip)[self._printed:]
        self._start()
        return rest


def byte_tokenizer_files() -> dict[str, str]:
    """A minimal byte-level tokenizer (the 256 byte tokens and <|endoftext|>, no merges) for synthetic
    models: every text encodes, and its ids fit any model's vocabulary."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one printable character per byte
    backend = _Backend(BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    config = {"eos_token": "<|endoftext|>", "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    return {TOKENIZER_JSON: backend.to_str(), TOKENIZER_CONFIG_JSON: json.dumps(config, indent=1)}
