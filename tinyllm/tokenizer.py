"""Text <-> token ids, through the `tokenizers` library.

A Hugging Face directory ships `tokenizer.json`, which `tokenizers` reads as it is. A
GGUF file stores the vocabulary, the merges (or scores) and the special-token ids as
metadata (`tokenizer.ggml.*`); tinyllm builds the same `tokenizers.Tokenizer` from them
that `transformers` builds from that file:

- `gpt2` (byte-level BPE: SmolLM2, Llama 3). Every byte is spelled by a printable
  character (a space is `Ġ`, a newline `Ċ`), so the vocabulary never misses a byte.
  The text is first cut into words by a regular expression (GPT-2's, or Llama 3's when
  `tokenizer.ggml.pre` names it), then the file's merges apply inside each word.
- `llama` (SentencePiece-style BPE: Llama 2, TinyLlama). A space is written `▁` and one
  `▁` is put in front of the text, so "Hi" and " Hi" both start with the piece `▁Hi`.
  The file has no merges, only a score per piece: the higher the score, the earlier
  SentencePiece merges into that piece, so the merges are recovered from the scores. A
  character missing from the vocabulary falls back to its UTF-8 bytes, `<0xNN>` tokens.

Control tokens (BOS, EOS, chat markers such as `<|im_start|>`) are matched whole in the
text before any splitting, and never produced by merges. BOS and EOS are looked up once,
when the tokenizer is built. tinyllm adds BOS itself (see `encode`), so the tokenizer's
own post-processor is switched off: `tk.encode(text)` is the raw ids of the text.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError, CheckpointNotFoundError, one_line

# GGUF token types (tokenizer.ggml.token_type), as llama.cpp numbers them.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# How a byte-level vocabulary cuts text into words before merging (tokenizer.ggml.pre).
# Absent or unknown: GPT-2's own rule, built into `pre_tokenizers.ByteLevel`. Llama 3 cuts
# digits into groups of at most three, keeps a leading non-letter with the word it starts,
# and never joins letters to digits.
LLAMA3_WORDS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WORD_SPLITS = {"llama3": LLAMA3_WORDS, "llama-v3": LLAMA3_WORDS, "llama-bpe": LLAMA3_WORDS,
               "smaug-bpe": LLAMA3_WORDS}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs from the checkpoint: BOS, EOS,
    whether prompts start with BOS, and the chat template."""

    def __init__(self, tk: HFTokenizer, bos_id: int | None, eos_ids: tuple[int, ...],
                 add_bos: bool, chat_template: str | None, source: str):
        self.tk = tk
        tk.post_processor = None  # BOS is tinyllm's decision (add_bos), not the tokenizer's
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos and bos_id is not None  # prepend BOS when encoding a plain prompt
        self.chat_template = chat_template
        self.source = source
        # Looked up once here: the generation loop asks for these on every token.
        self.bos_token = None if bos_id is None else tk.id_to_token(bos_id)
        self.eos_token = None if not eos_ids else tk.id_to_token(eos_ids[0])
        self.special_ids = frozenset(i for i, t in tk.get_added_tokens_decoder().items() if t.special)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS in front if the checkpoint asks for it (or `add_bos`).
        Special tokens written in the text (e.g. `<|im_start|>`) are kept whole."""
        # encode_batch gives encode's ids and lets go of Python's lock while it works, so a
        # server's long prompt, tokenized in a worker thread, does not stall its event loop
        ids = self.tk.encode_batch([text], add_special_tokens=False)[0].ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    # ---- from a Hugging Face directory ----------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path, bos_id=None, eos_ids=(), vocab_size: int | None = None) -> "Tokenizer":
        """`tokenizer.json` as it is; BOS/EOS and the chat template from `tokenizer_config.json`
        (or `special_tokens_map.json`, `chat_template.jinja`).
        `bos_id`/`eos_ids` from config.json win; the tokenizer's EOS is added to them.
        `vocab_size`, the model's, if given: BOS and EOS must be rows of its embedding."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"{directory}: tokenizer.json not found (tinyllm reads the fast-tokenizer file that "
                "`tokenizer.save_pretrained` writes)")
        try:
            tk = HFTokenizer.from_file(str(path))
        except BaseException as e:  # a damaged file can make the Rust code panic (not an Exception)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"{path}: cannot be read by tokenizers ({one_line(e)})") from None
        files = [directory / "tokenizer_config.json", directory / "special_tokens_map.json"]
        configs = [(file, _read_json(file)) for file in files]

        def setting(name):
            """(file, value) of the first file that sets `name`."""
            return next(((file, cfg[name]) for file, cfg in configs if name in cfg), (None, None))

        def token_id(name):
            file, value = setting(name)
            text = value.get("content") if isinstance(value, dict) else value
            if text is not None and not isinstance(text, str):
                raise CheckpointError(f"{file}: {name} must be a token (a string or an object with a 'content' string)")
            return None if text is None else tk.token_to_id(text)

        if bos_id is None:
            bos_id = token_id("bos_token")
        eos = [int(e) for e in eos_ids]
        cfg_eos = token_id("eos_token")
        if cfg_eos is not None and cfg_eos not in eos:
            eos.append(cfg_eos)
        if vocab_size is not None:
            for name, tid in (("bos_token", bos_id), *(("eos_token", e) for e in eos)):
                if tid is not None and not 0 <= tid < vocab_size:
                    raise CheckpointError(f"{directory}: {name} id {tid} is outside the model's vocabulary (size {vocab_size})")
        # Whether BOS starts a prompt: the post-processor of tokenizer.json decides (Llama's
        # TemplateProcessing "<s> $A"); transformers 5 also ignores tokenizer_config.json's
        # add_bos_token when tokenizer.json exists. An EOS it would append is not kept:
        # a prompt must not end the reply before it starts.
        add_bos = bos_id is not None and bos_id in tk.encode("a", add_special_tokens=True).ids[:1]
        file, template = setting("chat_template")
        if template is None and (directory / "chat_template.jinja").is_file():
            file = directory / "chat_template.jinja"
            try:
                template = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(f"{file}: not UTF-8 text") from None
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{file}: chat_template must be a string or a list of {{name, template}} objects")
        return cls(tk, bos_id, tuple(eos), bool(add_bos), template, str(path))

    # ---- from GGUF metadata -----------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict, source: str) -> "Tokenizer":
        """The tokenizer a GGUF file describes; `fields` are its metadata as Python values."""
        tokens = _field(fields, "tokenizer.ggml.tokens", list, source)
        if not tokens:
            raise CheckpointError(f"{source}: the GGUF metadata has no tokenizer (tokenizer.ggml.tokens is missing)")
        if not all(isinstance(t, str) for t in tokens):
            raise CheckpointError(f"{source}: tokenizer.ggml.tokens must be a list of strings")
        kind = _field(fields, "tokenizer.ggml.model", str, source)
        n = len(tokens)
        types = _per_token(fields, "tokenizer.ggml.token_type", n, source, int) or [TOKEN_NORMAL] * n
        special_ids = {}
        for key in ("bos", "eos", "eot", "unknown", "padding"):
            value = _field(fields, f"tokenizer.ggml.{key}_token_id", int, source)
            if value is not None and not 0 <= value < n:
                raise CheckpointError(f"{source}: tokenizer.ggml.{key}_token_id is {value}, outside the vocabulary of {n} tokens")
            special_ids[key] = value

        merges = _merge_pairs(fields, tokens, source)
        if kind == "gpt2":
            if not merges:
                raise CheckpointError(f"{source}: tokenizer.ggml.merges is missing (a gpt2 tokenizer needs its merges)")
            tk = _byte_level_bpe(tokens, merges, _field(fields, "tokenizer.ggml.pre", str, source))
        elif kind == "llama":
            if not merges:
                scores = _per_token(fields, "tokenizer.ggml.scores", n, source, (int, float))
                if scores is None:
                    raise CheckpointError(f"{source}: tokenizer.ggml.scores is missing (a llama tokenizer without merges needs them)")
                merges = _merges_from_scores(tokens, scores)
            unk = special_ids["unknown"]
            if unk is None:
                unk = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
            add_space_prefix = _field(fields, "tokenizer.ggml.add_space_prefix", bool, source)
            tk = _sentencepiece_bpe(tokens, merges, None if unk is None else tokens[unk],
                                    True if add_space_prefix is None else add_space_prefix)
        else:
            raise CheckpointError(f"{source}: tokenizer.ggml.model is {kind!r}; tinyllm reads 'gpt2' (byte-level BPE) "
                                  "and 'llama' (SentencePiece BPE)")

        # Control tokens and BOS, EOS, <unk> are matched whole and skipped when decoding with
        # skip_special_tokens; user-defined ones are matched whole but are text. (Not the
        # padding id: some files point it at an ordinary token such as "!".)
        named = {special_ids[key] for key in ("bos", "eos", "unknown") if special_ids[key] is not None}
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, t in enumerate(types) if t == TOKEN_CONTROL or i in named])
        tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i, t in enumerate(types) if t == TOKEN_USER_DEFINED and i not in named])

        eos = [i for i in (special_ids["eos"], special_ids["eot"]) if i is not None]
        eos = list(dict.fromkeys(eos))  # EOT (Llama 3's <|eot_id|>) also ends a reply
        # A llama (SentencePiece) vocabulary starts prompts with BOS unless the file says not.
        add_bos = _field(fields, "tokenizer.ggml.add_bos_token", bool, source)
        return cls(tk, special_ids["bos"], tuple(eos), kind == "llama" if add_bos is None else add_bos,
                   _field(fields, "tokenizer.chat_template", str, source), source)


def _byte_level_bpe(tokens: list[str], merges: list[tuple[str, str]], pre: str | None) -> HFTokenizer:
    """GPT-2 style BPE: bytes spelled as printable characters, words cut by a regex."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    words = WORD_SPLITS.get(pre)
    if words is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:  # cut by the model's own regex first, then spell each word's bytes
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(words), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges, best first, recovered from a SentencePiece vocabulary's scores.

    SentencePiece merges, at each step, the adjacent pair whose joined piece has the highest
    score. `tokenizers` wants a ranked list of pairs instead, so every way of cutting every
    piece into two pieces of the vocabulary becomes a merge ranked by the piece's score.
    Equal scores (the cuts of one piece, or pieces scored alike) are ordered as transformers
    orders them, so both give the same ids: longer left part first, then longer right part,
    then by the ids of the piece and of its parts."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked = []
    for piece_id, piece in enumerate(tokens):
        score = scores[piece_id]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            left_id, right_id = vocab.get(left), vocab.get(right)
            if left_id is not None and right_id is not None:
                ranked.append((-score, -cut, cut - len(piece), piece_id, left_id, right_id, left, right))
    ranked.sort()
    return [(m[6], m[7]) for m in ranked]


def _sentencepiece_bpe(tokens: list[str], merges, unk: str | None, add_space_prefix: bool) -> HFTokenizer:
    """SentencePiece BPE as a `tokenizers` pipeline: `▁` for spaces, byte fallback, `<unk>`."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # byte_fallback: a character missing from the vocabulary becomes its <0xNN> byte tokens;
    # only if one of those is missing too does it become `unk` (consecutive ones fused).
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # Spaces become ▁, and one ▁ goes in front of the text unless it starts with one
    # already. "first": only at the start of the text, not again after a special token
    # in the middle of it. split=False: the whole text is one word for the merges.
    tk.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_SPACE, prepend_scheme="first" if add_space_prefix else "never", split=False)
    tk.decoder = decoders.Sequence([
        decoders.Replace(SPIECE_SPACE, " "),  # ▁ -> space
        decoders.ByteFallback(),              # <0xE4><0xBD><0xA0> -> 你
        decoders.Fuse(),
        # the ▁ that encoding put in front is taken off again
        *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
    return tk


def _field(fields: dict, key: str, kind, source: str):
    """A metadata value of the expected Python type (None if absent)."""
    value = fields.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise CheckpointError(f"{source}: {key} must be {_TYPE_NAMES[kind]}, got {type(value).__name__}")
    return value


_TYPE_NAMES = {list: "a list", str: "a string", int: "an integer", bool: "a boolean"}


def _per_token(fields: dict, key: str, n: int, source: str, kind):
    """A per-token metadata array of `kind` values, checked to have one entry per token (None if absent)."""
    values = _field(fields, key, list, source)
    if values is None:
        return None
    if len(values) != n:
        raise CheckpointError(f"{source}: {key} has {len(values)} entries, expected one per token ({n})")
    if not all(isinstance(v, kind) for v in values):
        raise CheckpointError(f"{source}: {key} must hold numbers, one per token")
    return values


def _merge_pairs(fields: dict, tokens: list[str], source: str) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges ("left right" strings) as pairs, each checked to fit the vocabulary:
    both parts and the piece they make are tokens. (`tokenizers` would stop at the first bad
    one with a panic from its Rust code instead.)"""
    merges = _field(fields, "tokenizer.ggml.merges", list, source) or []
    vocab = set(tokens)
    pairs = []
    for i, merge in enumerate(merges):
        pair = merge.split(" ", 1) if isinstance(merge, str) else ()
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise CheckpointError(f"{source}: tokenizer.ggml.merges[{i}] is {_short(merge)}, expected two tokens "
                                  "of the vocabulary, separated by a space, that join into a token")
        pairs.append((pair[0], pair[1]))
    return pairs


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep, a number too long
        raise CheckpointError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
