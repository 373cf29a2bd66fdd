"""The tokenizer against `transformers`' tokenizer of the same file.

- The real default model (SmolLM2, a `gpt2` byte-level GGUF vocabulary): ids, BOS, EOS,
  decoding and the chat template, on a varied corpus.
- A `llama` (SentencePiece-style) GGUF vocabulary made here: no real one is available
  offline, so a BPE is trained on a small corpus, its pieces are scored in merge order
  (as SentencePiece scores them) and written with the `gguf` package, with byte tokens,
  control, unknown and user-defined tokens. transformers reads the same file.
- A byte-level vocabulary with Llama 3's word splitting (`tokenizer.ggml.pre`).
- A Hugging Face directory (`tokenizer.json`) written by transformers' `save_pretrained`.
- Bad inputs: one-line errors naming the file and field.

Every expected id comes from transformers (or is written out by hand in the test).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
gguf = pytest.importorskip("gguf")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402  (only to train test vocabularies)
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

from tinyllm.errors import TinyLLMError  # noqa: E402
from tinyllm.loaders.gguf import field_values, open_gguf  # noqa: E402
from tinyllm.tokenizer import Tokenizer  # noqa: E402

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    " one leading space",
    "trailing spaces   ",
    "multiple    spaces   between  words",
    " ",
    "   ",
    "",
    "\n",
    "line one\nline two\n\nline four\r\nwindows line",
    "\ttab\tseparated\tvalues\t",
    "def f(x):\n    if x > 0:\n        return x ** 2\n    return -x\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C",
    "1234567890 3.14159 -42 1e-5 0x1F 1,000,000 2026-11-22",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 ❤️",
    "Accents: café naïve résumé Ångström Straße façade",
    "CJK: 你好，世界！ 日本語のテキスト 한국어 문장",
    "Mixed: Привет мир — Γειά σου κόσμε — مرحبا بالعالم",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|>",
    "x<|im_start|>Hello",
    "don't won't I'm you're we've they'll he'd",
    "URL: https://example.com/path?q=1&r=two#frag",
    "a" * 50 + " " + "ab" * 20,
    "\u2581already\u2581has\u2581metaspace",
    "Ġ Ċ byte-level glyphs",
    "<s>not really a bos</s> <unk>",
    "\x00 control \x07 chars \u200b zero width",
]


def check_same_ids(tiny, ref, texts):
    """tinyllm's raw ids and decoding equal transformers' for every text."""
    for text in texts:
        want = ref.encode(text, add_special_tokens=False)
        got = tiny.encode(text, add_bos=False)
        assert got == want, f"{text!r}: {ref.convert_ids_to_tokens(got)} != {ref.convert_ids_to_tokens(want)}"
        for skip in (False, True):
            assert tiny.decode(got, skip_special_tokens=skip) == ref.decode(want, skip_special_tokens=skip), (text, skip)
        # with BOS as each side decides from the file's tokenizer.ggml.add_bos_token
        assert tiny.encode(text) == ref.encode(text), text


# ---- the real default model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def default_fields(default_model_path):
    """The default GGUF's metadata, read by transformers' own GGUF reader: the file's word on BOS/EOS."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    return read_gguf_metadata(str(default_model_path), ("tokenizer.ggml.tokens",))[0]


@pytest.mark.slow
def test_default_model_ids_and_decoding_match_transformers(tiny_llm, hf_default):
    check_same_ids(tiny_llm.tokenizer, hf_default[1], CORPUS)


@pytest.mark.slow
def test_default_model_decode_round_trips(tiny_llm):
    tok = tiny_llm.tokenizer
    for text in CORPUS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


@pytest.mark.slow
def test_default_model_special_tokens_match_the_file_and_transformers(tiny_llm, hf_default, default_fields):
    tok, ref, f = tiny_llm.tokenizer, hf_default[1], default_fields
    assert tok.bos_id == f["tokenizer.ggml.bos_token_id"] == ref.bos_token_id
    assert tok.eos_ids[0] == f["tokenizer.ggml.eos_token_id"] == ref.eos_token_id
    assert tok.add_bos is f["tokenizer.ggml.add_bos_token"] is False
    assert tok.encode("Hi") == ref.encode("Hi")  # no BOS for SmolLM2
    assert tok.bos_token == ref.bos_token and tok.eos_token == ref.eos_token
    assert tok.chat_template == ref.chat_template
    assert tok.vocab_size == len(ref) == len(f["tokenizer.ggml.tokens"])
    assert tok.is_special(ref.convert_tokens_to_ids("<|im_start|>"))
    assert not tok.is_special(ref.convert_tokens_to_ids("Hello"))


@pytest.mark.slow
def test_default_model_hf_directory_matches_transformers(tiny_llm, hf_default, tmp_path):
    """The same tokenizer saved as tokenizer.json by transformers, read back by both."""
    hf_default[1].save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    check_same_ids(tok, ref, CORPUS)
    assert (tok.bos_id, tok.eos_ids[0]) == (ref.bos_token_id, ref.eos_token_id)
    assert tok.chat_template == ref.chat_template == tiny_llm.tokenizer.chat_template


# ---- a SentencePiece-style (`llama`) GGUF vocabulary made here ------------------------------

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. The theory of the thing, then the other thing.",
    "Hello world, hello there! Well, hello again: the world is wide.",
    "def main():\n    return 0\n\nif __name__ == '__main__':\n    main()\n",
    "numbers 123 4567 89 and 2026, then 100 000 more numbers",
    "    indented lines    with    many    spaces   ",
] * 4
BYTES = [f"<0x{b:02X}>" for b in range(256)]
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def train_pieces() -> list[str]:
    """BPE pieces in the order they were learned (the order SentencePiece scores them)."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tk.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False))
    model = json.loads(tk.to_str())["model"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model["merges"]]
    chars = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if len(t) == 1]
    return list(dict.fromkeys(merged + chars))


def llama_vocab(byte_tokens=True):
    """tokens, scores, types laid out as a Llama 2 GGUF: <unk> <s> </s>, bytes, scored pieces,
    single characters last; then chat markers (control) and one user-defined token."""
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [UNKNOWN, CONTROL, CONTROL]
    if byte_tokens:
        tokens += BYTES
        scores += [0.0] * 256
        types += [BYTE] * 256
    for rank, piece in enumerate(train_pieces()):
        tokens.append(piece)
        scores.append(-float(rank))  # learned earlier = merged earlier = higher score
        types.append(NORMAL)
    for piece, kind in (("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL), ("<think>", USER_DEFINED)):
        tokens.append(piece)
        scores.append(0.0)
        types.append(kind)
    return tokens, scores, types


def write_tokenizer_gguf(path: Path, model="llama", tokens=None, scores=None, types=None, merges=None,
                         pre=None, bos=1, eos=2, unk=None, pad=None, add_bos=None, add_space_prefix=None,
                         template=None):
    """A GGUF holding llama hyper-parameters and a tokenizer only: transformers reads its
    tokenizer from the metadata alone, and so does tinyllm."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    if tokens is not None:
        w.add_vocab_size(len(tokens))
        w.add_tokenizer_model(model)
        w.add_token_list(tokens)
        if scores is not None:
            w.add_token_scores(scores)
        if types is not None:
            w.add_token_types(types)
        if merges is not None:
            w.add_token_merges(merges)
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        if unk is not None:
            w.add_unk_token_id(unk)
        if pad is not None:
            w.add_pad_token_id(pad)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
        if add_space_prefix is not None:
            w.add_add_space_prefix(add_space_prefix)
        if template is not None:
            w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_from_gguf(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_fields(field_values(open_gguf(path)), str(path))


def ref_from_gguf(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


LLAMA_CORPUS = CORPUS + [
    "the theory then thing", "Hello hello HELLO", "     x", "x     ", "<think>hmm</think>",
    "main() returns 0", "<|im_start|>", "<s>", "</s>",
]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    """A llama GGUF vocabulary, tinyllm's tokenizer of it and transformers' (loaded once)."""
    tokens, scores, types = llama_vocab()
    path = write_tokenizer_gguf(tmp_path_factory.mktemp("llama") / "vocab.gguf", tokens=tokens, scores=scores,
                                types=types, unk=0, add_bos=True, add_space_prefix=True, template=TEMPLATE)
    return path, tiny_from_gguf(path), ref_from_gguf(path)


def test_llama_gguf_ids_and_decoding_match_transformers(llama_gguf):
    _, tok, ref = llama_gguf
    check_same_ids(tok, ref, LLAMA_CORPUS)


def test_llama_gguf_exercises_merges_byte_fallback_and_specials(llama_gguf):
    """Guard that the corpus reaches every part: multi-character pieces, <0xNN> bytes for
    characters outside the vocabulary, control and user-defined tokens kept whole."""
    _, tok, ref = llama_gguf
    pieces = ref.convert_ids_to_tokens(tok.encode("Hello world 你好<|im_end|><think>", add_bos=False))
    assert "\u2581Hello" in pieces
    assert "<0xE4>" in pieces  # first byte of 你
    assert "<|im_end|>" in pieces and "<think>" in pieces


def test_llama_gguf_special_tokens_match_transformers(llama_gguf):
    _, tok, ref = llama_gguf
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (ref.bos_token_id, (ref.eos_token_id,), True)
    assert tok.encode("Hi")[0] == ref.encode("Hi")[0] == 1
    assert (tok.bos_token, tok.eos_token) == (ref.bos_token, ref.eos_token) == ("<s>", "</s>")
    assert tok.chat_template == ref.chat_template == TEMPLATE
    assert tok.special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special} == {0, 1, 2, 469, 470}
    assert not tok.is_special(ref.convert_tokens_to_ids("<think>"))


def test_llama_gguf_add_bos_false_is_honoured(tmp_path):
    tokens, scores, types = llama_vocab()
    path = write_tokenizer_gguf(tmp_path / "v.gguf", tokens=tokens, scores=scores, types=types, add_bos=False)
    tok = tiny_from_gguf(path)
    assert tok.encode("Hi") == ref_from_gguf(path).encode("Hi") and tok.encode("Hi")[0] != 1
    assert tok.encode("Hi", add_bos=True)[0] == 1


def test_llama_gguf_without_add_bos_field_adds_bos(tmp_path):
    """Older llama files have no add_bos_token: their prompts start with BOS."""
    tokens, scores, types = llama_vocab()
    path = write_tokenizer_gguf(tmp_path / "v.gguf", tokens=tokens, scores=scores, types=types)
    assert tiny_from_gguf(path).encode("Hi") == ref_from_gguf(path).encode("Hi")
    assert tiny_from_gguf(path).encode("Hi")[0] == 1


def test_llama_gguf_tied_scores_break_ties_as_transformers(tmp_path):
    """When merges tie (equal scores), the order decides the ids. Hand-made vocabulary:
    "ab" and "bc" score alike, and "▁▁▁" can be made as ▁+▁▁ or ▁▁+▁."""
    s = "\u2581"
    tokens = ["<unk>", "<s>", "</s>", *BYTES, s, "a", "b", "c", "bc", "ab", s + s, s * 3, s * 4, "ca", "abc"]
    scores = [0.0] * 259 + [-100.0, -100.0, -100.0, -100.0, -1.0, -1.0, -2.0, -3.0, -3.0, -1.0, -5.0]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * 11
    path = write_tokenizer_gguf(tmp_path / "tie.gguf", tokens=tokens, scores=scores, types=types, add_bos=False)
    tok, ref = tiny_from_gguf(path), ref_from_gguf(path)
    texts = ["abc", "abca", "cabc", " abcab", "bcab", "    ", "       ", "a    b", "  a  bc  "]
    check_same_ids(tok, ref, texts)


def test_llama_gguf_without_space_prefix(tmp_path):
    """add_space_prefix=false: no ▁ is put in front of the text, and decoding strips none.
    transformers ignores this flag, so the reference is transformers' BPE model applied
    to the text with spaces written as ▁ (what the flag asks for), and the round trip."""
    tokens, scores, types = llama_vocab()
    path = write_tokenizer_gguf(tmp_path / "v.gguf", tokens=tokens, scores=scores, types=types,
                                add_bos=False, add_space_prefix=False)
    tok, ref = tiny_from_gguf(path), ref_from_gguf(path)
    model = ref.backend_tokenizer.model
    for text in ["Hello world", "the theory", " leading", "two  spaces ", "x"]:
        want = [t.id for t in model.tokenize(text.replace(" ", "\u2581"))]
        assert tok.encode(text) == want, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" Hello") == ref.encode(" Hello")  # already starts with ▁: the same either way


def test_llama_gguf_missing_byte_token_becomes_unk(tmp_path):
    """Without <0xNN> tokens a character outside the vocabulary is <unk> (SentencePiece's
    rule), never dropped."""
    s = "\u2581"
    tokens = ["<unk>", "<s>", "</s>", s, "a", s + "a"]
    types = [UNKNOWN, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL]
    path = write_tokenizer_gguf(tmp_path / "v.gguf", tokens=tokens, scores=[0.0, 0.0, 0.0, -3.0, -2.0, -1.0],
                                types=types, unk=0, add_bos=False)
    tok = tiny_from_gguf(path)
    assert tok.encode("aé") == [5, 0]
    assert tok.encode("a 中文 a") == [5, 3, 0, 5]  # ▁a ▁ <unk> ▁a: unknowns in a row fuse into one


def test_llama_hf_directory_matches_transformers(llama_gguf, tmp_path):
    """transformers writes the GGUF tokenizer as tokenizer.json (+ tokenizer_config.json);
    tinyllm's from_dir reads it back: same ids, BOS (from the post-processor), EOS, template."""
    _, tok_gguf, ref_gguf = llama_gguf
    ref_gguf.save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    check_same_ids(tok, ref, LLAMA_CORPUS)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (ref.bos_token_id, (ref.eos_token_id,), True)
    assert tok.chat_template == ref.chat_template == TEMPLATE
    assert tok.special_ids == tok_gguf.special_ids


def test_hf_directory_bos_follows_tokenizer_json_and_config_ids_come_first(llama_gguf, tmp_path):
    """config.json's EOS ids (passed in by the loader) come first. Whether BOS is added is
    the post-processor's call: transformers 5 ignores tokenizer_config.json's add_bos_token
    when tokenizer.json exists, so a stale `false` there changes nothing."""
    llama_gguf[2].save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(cfg))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path, eos_ids=(5,))
    assert tok.encode("Hi") == ref.encode("Hi") and tok.encode("Hi")[0] == 1
    assert tok.eos_ids == (5, 2)

    # a post-processor without BOS: prompts start without it
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hi") == ref.encode("Hi") and tok.encode("Hi")[0] != 1 and not tok.add_bos


# ---- byte-level BPE with Llama 3's word splitting -------------------------------------------

@pytest.fixture(scope="module")
def byte_level_vocab():
    """A byte-level BPE trained here: tokens (every byte's character first) and merges."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=500, min_frequency=2, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tk.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    # <|endoftext|> as the unknown token, as in SmolLM2: without one, transformers' byte-level
    # tokenizer appends an <|endoftext|> of its own beyond the vocabulary
    tokens += ["<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>"]
    types = [NORMAL] * (len(tokens) - 3) + [CONTROL] * 3
    return tokens, merges, types


@pytest.mark.parametrize("pre", ["llama-bpe", "smollm", None])
def test_byte_level_gguf_word_splitting_matches_transformers(byte_level_vocab, tmp_path, pre):
    tokens, merges, types = byte_level_vocab
    unk, bos, eot = len(tokens) - 3, len(tokens) - 2, len(tokens) - 1
    path = write_tokenizer_gguf(tmp_path / "bl.gguf", model="gpt2", tokens=tokens, types=types, merges=merges,
                                pre=pre, bos=bos, eos=eot, unk=unk, add_bos=True)
    tok, ref = tiny_from_gguf(path), ref_from_gguf(path)
    check_same_ids(tok, ref, CORPUS + ["<|begin_of_text|>x<|eot_id|>", "1234567 12 123456"])
    # the splitting matters: GPT-2 keeps " 4567" one word (a token of this vocabulary),
    # Llama 3 cuts the space off and the digits into groups of at most three
    pieces = ref.convert_ids_to_tokens(tok.encode(" 4567", add_bos=False))
    if pre == "llama-bpe":
        assert pieces[0] == "\u0120" and "".join(pieces) == "\u01204567"
    else:
        assert pieces == ["\u01204567"]
    assert tok.encode("x")[0] == bos


def test_padding_id_on_an_ordinary_token_does_not_make_it_special(byte_level_vocab, tmp_path):
    """Some files point tokenizer.ggml.padding_token_id at an ordinary token ("!"). tinyllm
    never pads, so that token stays text: the ids equal transformers' for the same file
    without the padding id."""
    tokens, merges, types = byte_level_vocab
    common = dict(model="gpt2", tokens=tokens, types=types, merges=merges, bos=len(tokens) - 2,
                  eos=len(tokens) - 1, unk=len(tokens) - 3, add_bos=False)
    padded = write_tokenizer_gguf(tmp_path / "pad.gguf", pad=tokens.index("!"), **common)
    ref = ref_from_gguf(write_tokenizer_gguf(tmp_path / "nopad.gguf", **common))
    tok = tiny_from_gguf(padded)
    check_same_ids(tok, ref, ["Hello world!", "Well!! hello!"])
    assert not tok.is_special(tokens.index("!"))


# ---- bad inputs -----------------------------------------------------------------------------

def one_line_error(fn, *words):
    with pytest.raises(TinyLLMError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


def test_gguf_without_tokenizer_is_a_one_line_error(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "weights_only.gguf")
    one_line_error(lambda: tiny_from_gguf(path), "weights_only.gguf", "tokenizer.ggml.tokens")


def test_unknown_tokenizer_model_is_a_one_line_error(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "bert.gguf", model="bert", tokens=["[UNK]", "a", "b"],
                                types=[UNKNOWN, NORMAL, NORMAL], bos=0, eos=0)
    one_line_error(lambda: tiny_from_gguf(path), "bert.gguf", "tokenizer.ggml.model", "'bert'", "llama", "gpt2")


def test_inconsistent_gguf_tokenizer_fields_are_one_line_errors(tmp_path):
    tokens, scores, types = llama_vocab()
    bad_types = write_tokenizer_gguf(tmp_path / "t.gguf", tokens=tokens, scores=scores, types=types[:-1])
    one_line_error(lambda: tiny_from_gguf(bad_types), "tokenizer.ggml.token_type", str(len(tokens)))
    bad_bos = write_tokenizer_gguf(tmp_path / "b.gguf", tokens=tokens, scores=scores, types=types, bos=len(tokens))
    one_line_error(lambda: tiny_from_gguf(bad_bos), "tokenizer.ggml.bos_token_id", str(len(tokens)))
    no_scores = write_tokenizer_gguf(tmp_path / "s.gguf", tokens=tokens, types=types)
    one_line_error(lambda: tiny_from_gguf(no_scores), "tokenizer.ggml.scores")
    no_merges = write_tokenizer_gguf(tmp_path / "m.gguf", model="gpt2", tokens=tokens, types=types)
    one_line_error(lambda: tiny_from_gguf(no_merges), "tokenizer.ggml.merges")


def test_directory_without_tokenizer_json_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError):  # also the built-in error a caller would catch
        Tokenizer.from_dir(tmp_path)
    one_line_error(lambda: Tokenizer.from_dir(tmp_path), str(tmp_path), "tokenizer.json")


def test_unreadable_tokenizer_files_are_one_line_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    one_line_error(lambda: Tokenizer.from_dir(tmp_path), "tokenizer.json")
    good = tmp_path / "good"
    HFTokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(good.mkdir() or good / "tokenizer.json"))
    (good / "tokenizer_config.json").write_text("{not json")
    one_line_error(lambda: Tokenizer.from_dir(good), "tokenizer_config.json", "JSON")
