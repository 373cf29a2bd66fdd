"""Streaming detokenizer: the streamed pieces concatenate to `tokenizer.decode(all ids)`
(the `tokenizers` library's decode is the reference), with spaces kept and no piece
holding U+FFFD unless the full text does.

Tokenizers: the real SmolLM2 byte-level BPE (`Ġ`), and two SentencePiece-style BPEs
(`▁`, byte fallback) trained inside the test."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllm.detokenize import StreamingDetokenizer

from helpers_generate import SentencePieceStyle, wrap

FFFD = "\ufffd"

# Fragments of real text: words with spaces, accents, CJK, emoji (also multi-code-point:
# flags, skin tones, ZWJ sequences), other scripts, code with indentation, odd whitespace.
FRAGMENTS = [
    "a", " baker", " had", " a", "the", " The", "Hello", ",", ".", "!", "?", " ", "  ", "    ", "\n", "\n\n", "\t",
    "café", " naïve", " résumé", "Ångström", " jalapeño", "ß", "œ", "Ω", "Привет", " мир", "Ελληνικά",
    "中文", "字符", "日本語", "カタカナ", "한국어", "العربية", "עברית", "हिन्दी", "ไทย",
    "😀", "🎉", "👍🏽", "👩‍💻", "🇫🇷", "❤️", "🤖", "∑", "≈", "→", "€", "£", "°C", "½",
    "def f(x):\n    return x * 2\n", "    if (a < b) {\n        return;\n    }", "# comment", "x = [1, 2, 3]",
    "12345", "3.14", "@user", "http://example.com/a?b=c", "\"quoted\"", "'single'", "—", "…",
]

CORPUS = [
    "a baker had a little shop",
    "Hello, world! 😀 中文字符 café naïve résumé",
    "def main():\n    for i in range(10):\n        print(i)  # 🎉\n\treturn 0\n",
    "👩‍💻 writes code; 🇫🇷 is a flag; 👍🏽 has a skin tone.",
    "日本語のテキストと한국어 텍스트, Ελληνικά και русский язык.",
    "   leading spaces and trailing   ",
    "\n\nnewlines\n\n\nand\ttabs\t\t",
    "Ångström → 10⁻¹⁰ m; ½ + ¼ ≈ 0.75; 100 °C; €5",
]


def stream(tok, ids):
    d = StreamingDetokenizer(tok)
    pieces = [d.add(i) for i in ids]
    pieces.append(d.flush())
    return pieces


def check(tok, ids):
    pieces = stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(pieces) == full
    if FFFD not in full:
        assert not any(FFFD in p for p in pieces)
    return pieces


@pytest.fixture(scope="module")
def smollm2(tiny_llm):
    return tiny_llm.tokenizer


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def sentencepiece(request):
    return wrap(getattr(SentencePieceStyle, request.param)())


# ---- the bug never to have -------------------------------------------------------------------

@pytest.mark.slow
def test_spaces_kept_byte_level(smollm2):
    ids = smollm2.encode("a baker had a")
    pieces = check(smollm2, ids)
    assert "".join(pieces) == "a baker had a"
    assert len([p for p in pieces if p]) >= 4  # really streamed, one word at a time


def test_spaces_kept_sentencepiece(sentencepiece):
    ids = sentencepiece.encode("a baker had a")
    assert any(sentencepiece.tk.id_to_token(i).startswith("▁") for i in ids[1:])
    pieces = check(sentencepiece, ids)
    assert "".join(pieces) == "a baker had a"


# ---- corpus and property tests ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS)
def test_corpus_byte_level(smollm2, text):
    check(smollm2, smollm2.encode(text))


@pytest.mark.parametrize("text", CORPUS)
def test_corpus_sentencepiece(sentencepiece, text):
    ids = sentencepiece.encode(text)
    check(sentencepiece, ids)


def test_byte_fallback_tokens_are_joined(sentencepiece):
    ids = sentencepiece.encode("x 中😀")
    assert sum(sentencepiece.tk.id_to_token(i).startswith("<0x") for i in ids) >= 7  # 3 + 4 bytes
    pieces = check(sentencepiece, ids)
    assert "中" in "".join(pieces) and "😀" in "".join(pieces)
    assert all(FFFD not in p for p in pieces)


@pytest.mark.slow
def test_emoji_split_over_byte_level_tokens_is_not_broken(smollm2):
    ids = smollm2.encode("🇫🇷👩‍💻")
    assert len(ids) > 2
    pieces = check(smollm2, ids)
    assert all(FFFD not in p for p in pieces)


real_text = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=30).map("".join)
SETTINGS = settings(max_examples=150, deadline=None, database=None,  # no .hypothesis/ folder in the repository
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.slow
@SETTINGS
@given(text=real_text)
def test_property_real_text_byte_level(smollm2, text):
    check(smollm2, smollm2.encode(text))


@SETTINGS
@given(text=real_text)
def test_property_real_text_sentencepiece(sentencepiece, text):
    check(sentencepiece, sentencepiece.encode(text))


@pytest.mark.slow
@SETTINGS
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
def test_property_any_unicode_byte_level(smollm2, text):
    check(smollm2, smollm2.encode(text))


@pytest.mark.slow
@SETTINGS
@given(ids=st.lists(st.integers(0, 49151), max_size=20))
def test_property_any_token_ids_byte_level(smollm2, ids):
    """Arbitrary ids (broken UTF-8 included): the concatenation still equals the decode."""
    assert "".join(stream(smollm2, ids)) == smollm2.decode(ids)


def test_special_tokens_skipped(sentencepiece):
    ids = [1] + sentencepiece.encode("hello there") + [2]
    assert "".join(stream(sentencepiece, ids)) == sentencepiece.decode(ids) == "hello there"
