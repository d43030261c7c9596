"""Tokenizer files from a GGUF or a Hugging Face directory, and the small tokenizer the runtime uses.

A GGUF carries no `tokenizer.json`, only llama.cpp's metadata (tokens, merges or scores, token
types, special ids, chat template). `tokenizer_files_from_gguf` rebuilds the two Hugging Face files
from it with the `tokenizers` library, so that the ids equal what transformers gives for the same
GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`). The converter writes those files next
to the weight store; at run time `Tokenizer.load(directory)` reads them back and needs neither gguf
nor transformers.

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
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from .errors import TpimpiError

if TYPE_CHECKING:
    import gguf

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"

# llama.cpp's llama_token_type values stored in tokenizer.ggml.token_type.
_CONTROL = 3
_USER_DEFINED = 4

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

# Split regexes for byte-level BPE, per tokenizer.ggml.pre; the same text transformers uses.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# Values that take the plain GPT-2 regex built into the ByteLevel pre-tokenizer. The first group is
# GPT-2's own regex in llama.cpp too; the second is StarCoder-style (see the module docstring).
# Any other value raises: transformers would silently fall back to GPT-2's regex, which is wrong for
# e.g. "deepseek-llm", "falcon" or "stablelm2".
_GPT2_REGEX_PRES = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais",
                              "smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"})


class TokenizerError(TpimpiError, ValueError):
    """A tokenizer file or GGUF field that tpimpi cannot use, named with its actual value."""


# --------------------------------------------------------------------------------------------
# GGUF -> tokenizer.json + tokenizer_config.json


def _gguf_value(reader: "gguf.GGUFReader", key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tokenizer_files_from_gguf(reader: "gguf.GGUFReader") -> dict[str, str]:
    """File name -> text for tokenizer.json and tokenizer_config.json, built from GGUF metadata."""
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("GGUF has no tokenizer.ggml.tokens")
    token_types = _gguf_value(reader, "tokenizer.ggml.token_type") or []
    if token_types and len(token_types) != len(tokens):
        raise TokenizerError(f"GGUF has {len(tokens)} tokens but {len(token_types)} token types")
    backend, add_bos = _gguf_backend(reader, tokens)
    byte_level = _gguf_value(reader, "tokenizer.ggml.model") == "gpt2"
    _add_gguf_added_tokens(backend, tokens, token_types, byte_level)
    config = _gguf_config(reader, tokens, add_bos)

    # transformers registers the named special tokens (e.g. a SentencePiece "<unk>") as special too;
    # one the vocabulary cannot spell is not added, so no id beyond the model's vocabulary appears.
    named = [config[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token")
             if name in config and backend.token_to_id(config[name]) is not None]
    backend.add_special_tokens([AddedToken(text, normalized=False, special=True) for text in named])
    if add_bos:
        bos = config["bos_token"]
        if backend.token_to_id(bos) is None:
            raise TokenizerError(f"GGUF BOS token {bos!r} is not in the rebuilt vocabulary")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, backend.token_to_id(bos))])
    return {TOKENIZER_JSON: backend.to_str(), TOKENIZER_CONFIG_JSON: json.dumps(config, indent=2, ensure_ascii=False)}


def _gguf_backend(reader: "gguf.GGUFReader", tokens: list[str]) -> tuple[_Backend, bool]:
    """The tokenizers object for tokenizer.ggml.model, and whether to add BOS."""
    model = _gguf_value(reader, "tokenizer.ggml.model")
    merges = _gguf_value(reader, "tokenizer.ggml.merges")
    if model == "gpt2":
        backend = _byte_level_backend(tokens, merges, _gguf_value(reader, "tokenizer.ggml.pre", "default"))
        return backend, bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False))
    if model == "llama":
        arch = _gguf_value(reader, "general.architecture", "")
        if arch.startswith("gemma") or arch == "phi3":
            raise TokenizerError(f"SentencePiece GGUF tokenizer for architecture {arch!r} is not supported "
                                 "(it needs architecture-specific fixes); supported: llama/mistral-style")
        scores = _gguf_value(reader, "tokenizer.ggml.scores")
        add_prefix = _gguf_value(reader, "tokenizer.ggml.add_space_prefix", True)
        backend = _sentencepiece_backend(tokens, scores, merges, add_prefix)
        # Older files have no flag; llama.cpp and transformers then add BOS for a SentencePiece vocab.
        return backend, bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", True))
    raise TokenizerError(f"GGUF tokenizer.ggml.model {model!r} is not supported; supported: 'gpt2', 'llama'")


def _gguf_config(reader: "gguf.GGUFReader", tokens: list[str], add_bos: bool) -> dict:
    """tokenizer_config.json: special token strings, BOS/EOS flags and the chat template."""
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
                    "clean_up_tokenization_spaces": False}
    add_eos = _gguf_value(reader, "tokenizer.ggml.add_eos_token")
    if add_eos is not None:
        config["add_eos_token"] = bool(add_eos)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = _gguf_value(reader, f"tokenizer.ggml.{key}")
        if index is not None:
            if not 0 <= index < len(tokens):
                raise TokenizerError(f"GGUF tokenizer.ggml.{key} = {index} is outside the {len(tokens)} tokens")
            config[name] = tokens[index]
    if add_bos and "bos_token" not in config:
        raise TokenizerError("GGUF asks to add a BOS token but has no tokenizer.ggml.bos_token_id")
    template = _gguf_value(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"GGUF merge {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level_backend(tokens: list[str], merges: list[str] | None, pre: str) -> _Backend:
    if merges is None:
        raise TokenizerError("GGUF byte-level ('gpt2') tokenizer has no tokenizer.ggml.merges")
    if pre not in _PRE_SPLITS and pre not in _GPT2_REGEX_PRES:
        raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                             f"{sorted(_PRE_SPLITS.keys() | _GPT2_REGEX_PRES)}")
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    # A token written with characters outside the byte alphabet (a raw added token) is respelled
    # byte by byte, as transformers does; later duplicates win, as in a dict comprehension.
    vocab = {tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    backend = _Backend(BPE(vocab=vocab, merges=_split_merges(merges), dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False))
    if pre in _PRE_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best score first (ties: shorter left part,
    then shorter right part, then vocabulary order); the order transformers derives for Llama GGUFs."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))
    candidates = []
    for tok, score in score_of.items():
        pairs = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((left, right, score) for left, right in pairs)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _sentencepiece_backend(tokens: list[str], scores: list[float] | None, merges: list[str] | None,
                           add_prefix: bool) -> _Backend:
    if merges is not None:
        pairs = _split_merges(merges)
    elif scores is not None and len(scores) == len(tokens):
        pairs = _merges_from_scores(tokens, scores)
    else:
        got = "none" if scores is None else len(scores)
        raise TokenizerError(f"GGUF SentencePiece tokenizer has no merges and {got} scores for {len(tokens)} tokens")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = _Backend(BPE(vocab=vocab, merges=pairs, dropout=None, fuse_unk=True, byte_fallback=True))
    backend.normalizer = None
    # "first": a "▁" goes before the start of the text only, not after each special token.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_gguf_added_tokens(backend: _Backend, tokens: list[str], token_types: list[int], byte_level: bool) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so both stay whole.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp
    mislabel and is left alone, as transformers does.
    """
    alphabet = set(_byte_alphabet().values()) if byte_level else None
    control = [AddedToken(tok, normalized=False, special=True) for tok, kind in zip(tokens, token_types)
               if kind == _CONTROL and (alphabet is None or set(tok) <= alphabet)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [AddedToken(tok, normalized=False, special=False) for tok, kind in zip(tokens, token_types)
            if kind == _USER_DEFINED and tok in vocab]
    if user:
        backend.add_tokens(user)


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

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings become their ids; BOS first if the config says so."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else ids

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

    def render_messages(self, messages: list[dict]) -> str:
        """The prompt for a conversation ([{"role": ..., "content": ...}, ...]), ready for the assistant's reply."""
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
            return _compile_template(template).render(
                messages=messages, tools=None, documents=None, add_generation_prompt=True, **self._specials)
        except TemplateError as e:  # e.g. raise_exception("System role not supported")
            raise TokenizerError(f"the chat template refused this conversation: {e}") from None

    def stream(self, skip_special_tokens: bool = False) -> "TextStream":
        """A fresh incremental decoder for text being generated."""
        return TextStream(self, skip_special_tokens)


class TextStream:
    """Incremental detokenizer: push ids one at a time, get back only newly printable text.

    Text is held back while the window decodes to a trailing U+FFFD (a multi-byte character still
    incomplete), and while the last id is a byte-fallback token: byte fallback decodes a whole run
    of "<0xNN>" tokens at once (an invalid run becomes one U+FFFD per byte), so a run is never cut.
    Each push decodes a short window only: the ids printed by the previous step, as context (so
    leading-space rules come out as in a full decode), then the ids not yet printed. The window grows
    only while the output stays an unfinished or invalid UTF-8 run.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # window: context ids [0, _read), then ids not yet printed
        self._read = 0
        self._context_text = ""  # decode of the context ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok._backend.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", never half a character)."""
        token_id = int(token_id)
        self._tok._check_ids([token_id])
        self._ids.append(token_id)
        if token_id in self._tok._byte_ids:
            return ""
        text = self._decode(self._ids)
        if text.endswith("\ufffd") or len(text) <= len(self._context_text):
            return ""
        new = text[len(self._context_text):]
        # Printed ids become the next context; older ids are dropped.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._context_text = self._decode(self._ids)
        return new

    def flush(self) -> str:
        """End the text: return whatever is still held back (an unfinished character prints as
        U+FFFD). Ids pushed afterwards start a new text, decoded as if on their own."""
        text = self._decode(self._ids)
        new = text[len(self._context_text):]
        self._ids, self._read, self._context_text = [], 0, ""
        return new


def byte_tokenizer_files() -> dict[str, str]:
    """A minimal byte-level tokenizer (256 byte tokens and <|endoftext|>, no merges) for synthetic models:
    every text encodes, and its ids fit any model's vocabulary."""
    tokens = [_byte_alphabet()[b] for b in range(256)]
    backend = _byte_level_backend(tokens, [], "default")
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    config = {"eos_token": "<|endoftext|>", "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    return {TOKENIZER_JSON: backend.to_str(), TOKENIZER_CONFIG_JSON: json.dumps(config, indent=1)}
