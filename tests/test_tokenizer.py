"""Tokenizer: agreement with transformers.AutoTokenizer, chat templates, and streaming detokenization."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer as RawTokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from worker.models import tiny
from worker.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer, TokenizerLoadError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the key/value cache in fixed-size blocks.",
    "Continuous batching lets sequences join and leave every step!",
    "Ünïcödé: café, naïve, déjà vu; 東京は晴れ; emoji 🙂🚀 and more",
    "def forward(self, x):\n    return self.proj(x) + 1\n",
] * 20
SAMPLES = [
    "Hello world",
    "  leading spaces and trailing  ",
    "café naïve déjà 東京 🙂🚀 ✓",
    "line one\nline two\n\ttabbed",
    "<s> literal special </s> in text",
    "",
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYS] {{ m['content'] | trim }}\n"
    "{% else %}<{{ m['role'] }}> {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "Wie spät ist es? 🙂"},
    {"role": "assistant", "content": "Zeit für Tee."},
    {"role": "user", "content": "Und jetzt?"},
]


def byte_level_bpe() -> RawTokenizer:
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def metaspace_bpe() -> RawTokenizer:
    """SentencePiece-style: spaces become U+2581 and a leading one is stripped on decode."""
    tok = RawTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_dir(directory: Path, raw: RawTokenizer, config: dict, generation: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


BPE_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True, "lstrip": False, "rstrip": False, "normalized": False},
    "pad_token": "<pad>",
    "chat_template": TEMPLATE,
}


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    return write_dir(tmp_path_factory.mktemp("bpe"), byte_level_bpe(), BPE_CONFIG, {"eos_token_id": [1, 2]})


@pytest.fixture(scope="module")
def both(bpe_dir):
    return Tokenizer.from_dir(bpe_dir), transformers.AutoTokenizer.from_pretrained(bpe_dir)


# ---- agreement with transformers -----------------------------------------------------------------


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_matches_hf(both, add_special):
    ours, hf = both
    for text in SAMPLES:
        assert ours.encode(text, add_special_tokens=add_special) == hf.encode(text, add_special_tokens=add_special), text
    assert ours.encode("hi")[0] == ours.bos_token_id  # the post-processor adds BOS


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_hf_and_round_trips(both, skip):
    ours, hf = both
    for text in SAMPLES:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        if "<s>" not in text:
            assert ours.decode(ids) == text


def test_special_token_facts(both):
    ours, hf = both
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.vocab_size == len(hf)
    # tokenizer_config's eos (an AddedToken dict) first, then generation_config's extra ids
    assert ours.eos_token_ids == (hf.eos_token_id, 2)
    assert ours.eos_token_id == hf.eos_token_id


def test_transformers_helpers_ported_scripts_call_agree(both):
    """len(), batch_decode, get_vocab and convert_ids_to_tokens were AttributeErrors."""
    ours, hf = both
    ids = [ours.encode(text) for text in SAMPLES[:3]]
    assert ours.batch_decode(ids) == hf.batch_decode(ids, skip_special_tokens=True)
    assert len(ours) == len(hf) and ours.get_vocab() == hf.get_vocab()
    assert ours.convert_ids_to_tokens(ids[2]) == hf.convert_ids_to_tokens(ids[2])
    assert ours.convert_ids_to_tokens(ids[2][1]) == hf.convert_ids_to_tokens(ids[2][1])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(both, add_generation_prompt):
    ours, hf = both
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == expected


def test_transformers5_saved_dir_with_jinja_file(tmp_path, both):
    """transformers 5 writes chat_template.jinja beside tokenizer_config.json; both readers agree."""
    _, hf = both
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    ours, reloaded = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.apply_chat_template(MESSAGES) == reloaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.encode(SAMPLES[2]) == reloaded.encode(SAMPLES[2])


@pytest.mark.parametrize("post_processor", [True, False])
def test_post_processor_alone_decides_bos_as_in_hf(tmp_path, post_processor):
    """tokenizer_config's add_bos_token/add_eos_token do not override tokenizer.json (transformers 5)."""
    raw = byte_level_bpe()
    if not post_processor:
        raw.post_processor = None
    directory = write_dir(tmp_path, raw, {**BPE_CONFIG, "add_bos_token": not post_processor, "add_eos_token": True})
    ours, hf = Tokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(directory)
    for text in SAMPLES[:3]:
        assert ours.encode(text) == hf.encode(text)
    ids = ours.encode("abc")
    assert (ids[0] == ours.bos_token_id) == post_processor
    assert ids[-1] not in ours.eos_token_ids


def test_a_template_testing_tools_or_documents_renders_as_in_transformers(tmp_path):
    """transformers defines them as none when not given: an undefined name is `not none`,
    so the tools section was rendered, and `tools | tojson` raised a bare TypeError."""
    template = ("{% if tools is not none %}[tools {{ tools | tojson }}]{% endif %}"
                "{% if documents is not none %}[docs]{% endif %}"
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    directory = write_dir(tmp_path, byte_level_bpe(), {**BPE_CONFIG, "chat_template": template})
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    expected = hf.apply_chat_template(MESSAGES, tokenize=False)
    assert "[tools" not in expected and "[docs]" not in expected
    assert Tokenizer.from_dir(directory).apply_chat_template(MESSAGES,
                                                             add_generation_prompt=False) == expected


TRIMMING = TEMPLATE.replace("m['content'] }}", "m['content'] | trim }}")


@pytest.mark.parametrize("final", ["Gleich", "Gleich  ", [{"type": "text", "text": "s"}]],
                         ids=["text", "trailing-space", "parts"])
@pytest.mark.parametrize("template", [TEMPLATE, TRIMMING], ids=["keeps-spaces", "trims"])
def test_continuing_the_final_message_matches_transformers(both, final, template):
    """continue_final_message and chat_template were taken as template variables: the
    checkpoint's template rendered, and the last message ended as a finished turn."""
    ours, hf = both
    started = [*MESSAGES, {"role": "assistant", "content": final}]
    expected = hf.apply_chat_template(started, chat_template=template, tokenize=False,
                                      continue_final_message=True)
    assert ours.apply_chat_template(started, chat_template=template,
                                    continue_final_message=True) == expected
    override = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    assert ours.apply_chat_template(MESSAGES, chat_template=override) == hf.apply_chat_template(
        MESSAGES, chat_template=override, tokenize=False, add_generation_prompt=True)


def test_chat_template_arguments_it_cannot_serve_are_refused(both):
    ours, _ = both
    with pytest.raises(ChatTemplateError, match="cannot both"):
        ours.apply_chat_template(MESSAGES, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(TypeError, match="does not take return_tensors"):
        ours.apply_chat_template(MESSAGES, tokenize=True, return_tensors="pt")


def test_special_tokens_and_template_variables_render_as_in_transformers(both):
    """A caller's variables reach the template and override the tokenizer's special tokens,
    as in transformers; a bos_token among them was a TypeError (given twice to render)."""
    ours, hf = both
    template = ("{{ bos_token }}{% if enable_thinking %}<think>{% endif %}"
                "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    for variables in ({}, {"enable_thinking": True}, {"bos_token": "[B]", "eos_token": "|"}):
        expected = hf.apply_chat_template(MESSAGES, chat_template=template, tokenize=False,
                                          **variables)
        assert ours.apply_chat_template(MESSAGES, chat_template=template, **variables) == expected
    assert ours.apply_chat_template(MESSAGES, chat_template=template).startswith("<s>")
    assert "</s>" in ours.apply_chat_template(MESSAGES, chat_template=template)


def test_token_bytes_give_a_split_character_its_own_bytes(bpe_dir):
    """Each byte-level piece maps back to its bytes, with the byte-level pre-tokenizer's own
    alphabet, including a character split over tokens (which decode alone as U+FFFD)."""
    from tokenizers.pre_tokenizers import ByteLevel

    ours = Tokenizer.from_dir(bpe_dir)
    pre = ByteLevel(add_prefix_space=False, use_regex=False)
    for char in "a é\n\t€😀" + "".join(map(chr, range(0x80, 0x100))):
        mapped = "".join(piece for piece, _ in pre.pre_tokenize_str(char))
        ids = [ours.token_to_id(c) for c in mapped]  # one per byte: the vocabulary has each
        assert b"".join(ours.token_bytes(i) for i in ids) == char.encode(), char


# ---- chat template errors ------------------------------------------------------------------------


def test_missing_chat_template_is_a_clear_error(tmp_path):
    config = {k: v for k, v in BPE_CONFIG.items() if k != "chat_template"}
    ours = Tokenizer.from_dir(write_dir(tmp_path, byte_level_bpe(), config))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ours.apply_chat_template(MESSAGES)


def test_template_raise_exception_and_sandbox(tmp_path):
    config = {**BPE_CONFIG, "chat_template": "{{ raise_exception('roles must alternate') }}"}
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        Tokenizer.from_dir(write_dir(tmp_path / "a", byte_level_bpe(), config)).apply_chat_template(MESSAGES)
    config = {**BPE_CONFIG, "chat_template": "{{ messages.__class__.__mro__ }}"}
    with pytest.raises(ChatTemplateError):
        Tokenizer.from_dir(write_dir(tmp_path / "b", byte_level_bpe(), config)).apply_chat_template(MESSAGES)
    config = {**BPE_CONFIG, "chat_template": "{{ 1 + messages }}"}  # a TypeError of its own
    with pytest.raises(ChatTemplateError, match="chat template failed: TypeError"):
        Tokenizer.from_dir(write_dir(tmp_path / "c", byte_level_bpe(), config)).apply_chat_template(MESSAGES)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("eos", ["x", [2, None], 2.5])
def test_a_malformed_generation_config_eos_names_the_file(tmp_path, eos):
    # these escaped as a bare ValueError / TypeError
    write_dir(tmp_path, byte_level_bpe(), BPE_CONFIG, {"eos_token_id": eos})
    with pytest.raises(TokenizerLoadError,
                       match=r"generation_config.json: eos_token_id=.* must be a token id"):
        Tokenizer.from_dir(tmp_path)


# ---- incremental detokenization ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("tiny")
    tiny.write_tiny_tokenizer(directory)
    return Tokenizer.from_dir(directory)


class CountingTokenizer(Tokenizer):
    """The real tokenizer, recording how many ids each decode call sees."""

    def __init__(self, inner: Tokenizer) -> None:
        self.__dict__.update(inner.__dict__)
        self.window_sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.window_sizes.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def stream(tokenizer, prompt_ids, generated, step=1) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.add(generated[i : i + step]) for i in range(0, len(generated), step)]
    return deltas + [detok.flush()]


@pytest.mark.parametrize("step", [1, 3])
def test_stream_never_splits_a_character_over_byte_tokens(tiny_tok, step):
    """The tiny tokenizer has one token per byte, so multi-byte characters span several tokens."""
    tok = tiny_tok
    text = "aé東🙂 z🚀\n✓"
    generated = tok.encode(text, add_special_tokens=False)
    assert len(generated) == len(text.encode("utf-8"))
    deltas = stream(tok, tok.encode("prompt: "), generated, step)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    if step == 1:
        assert deltas[:3] == ["a", "", "é"]  # é's first byte alone yields nothing


def test_stream_matches_full_decode_for_realistic_tokenizers(tmp_path, bpe_dir):
    meta_dir = write_dir(tmp_path, metaspace_bpe(), {"bos_token": "<s>", "eos_token": "</s>"})
    for directory in (bpe_dir, meta_dir):
        tok = Tokenizer.from_dir(directory)
        prompt = tok.encode("Paged attention keeps")
        for text in SAMPLES[:4]:
            generated = tok.encode(" " + text, add_special_tokens=False)
            expected = tok.decode(prompt + generated)[len(tok.decode(prompt)) :]
            assert "".join(stream(tok, prompt, generated)) == expected, (directory.name, text)


def test_stream_skips_special_tokens(tiny_tok):
    tok = tiny_tok
    eos = tok.eos_token_ids[0]
    generated = tok.encode("ok", add_special_tokens=False) + [eos]
    assert "".join(stream(tok, [tok.bos_token_id], generated)) == "ok"


def test_stream_decodes_a_bounded_window(tiny_tok):
    tok = CountingTokenizer(tiny_tok)
    prompt = tok.encode("x" * 500)
    generated = tok.encode("streaming text " * 40, add_special_tokens=False)
    stream(tok, prompt, generated)
    assert max(tok.window_sizes) <= IncrementalDetokenizer.CONTEXT_TOKENS + 2


def test_flush_releases_an_unfinished_character(tiny_tok):
    tok = tiny_tok
    partial = list("é".encode("utf-8"))[:1]
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(tok.encode("a", add_special_tokens=False)) == "a"
    assert detok.add(partial) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_tiny_tokenizer_agrees_with_hf(tmp_path):
    tiny.write_tiny_tokenizer(tmp_path)
    ours, hf = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert ours.encode(text) == hf.encode(text)
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_tiny_chat_template_renders_roles(tiny_tok):
    tok = tiny_tok
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s><|user|>hi<|end|>\n<|assistant|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with pytest.raises(ChatTemplateError, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_a_long_encode_lets_other_threads_run():
    """A server thread encoding a 1 MiB prompt must not stop the event loop's thread: tokenizers'
    plain encode() holds the GIL throughout (this loop then gets 1-2 turns), encode_batch not."""
    tokenizer = Tokenizer.from_dir(tiny.tiny_model_dir())
    text = " ".join(f"w{i % 9973}x{i % 7}" for i in range(120_000))  # ~1 MiB, ~1 s to encode
    done = threading.Event()
    worker = threading.Thread(target=lambda: (tokenizer.encode(text), done.set()))
    turns = 0
    worker.start()
    while not done.is_set():
        time.sleep(0.005)
        turns += 1
    worker.join()
    assert turns >= 20
