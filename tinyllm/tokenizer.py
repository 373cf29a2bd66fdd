"""Text <-> token ids, through the `tokenizers` library.

A Hugging Face directory ships `tokenizer.json`, which `tokenizers` reads as it is. A
GGUF file stores the vocabulary, merges and special-token ids as metadata; tinyllm
builds the same `tokenizers.Tokenizer` from them:

- `gpt2` (byte-level BPE, e.g. SmolLM2): every byte is mapped to a printable character
  (a space becomes `Ġ`), text is split by GPT-2's regex, and the file's merges apply.
- `llama` (SentencePiece-style BPE, e.g. TinyLlama, Llama 2): spaces become `▁`, one is
  prepended to the text, merges are recovered from the vocabulary's scores, and bytes
  missing from the vocabulary fall back to `<0xNN>` tokens.

Special tokens (BOS, EOS, chat markers) are looked up once and never split.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError

# GGUF token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    def __init__(self, tk: HFTokenizer, bos_id: int | None, eos_ids: tuple[int, ...],
                 add_bos: bool, chat_template: str | None, source: str):
        self.tk = tk
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos  # prepend BOS when encoding a plain prompt
        self.chat_template = chat_template
        self.source = source
        self.bos_token = None if bos_id is None else tk.id_to_token(bos_id)
        self.eos_token = None if not eos_ids else tk.id_to_token(eos_ids[0])

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) are kept whole."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def _special_ids(self) -> set[int]:
        if not hasattr(self, "_special_cache"):
            self._special_cache = {
                i for i, tok in self.tk.get_added_tokens_decoder().items() if tok.special}
        return self._special_cache

    # ---- from a Hugging Face directory ----------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path, bos_id=None, eos_ids=()) -> "Tokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{directory}: tokenizer.json not found (tinyllm needs the fast tokenizer file)")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read by tokenizers ({e})") from None
        cfg = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.exists():
            try:
                cfg = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None

        def token_id(value):
            text = value.get("content") if isinstance(value, dict) else value
            return None if text is None else tk.token_to_id(text)

        if bos_id is None:
            bos_id = token_id(cfg.get("bos_token"))
        eos = list(eos_ids)
        cfg_eos = token_id(cfg.get("eos_token"))
        if cfg_eos is not None and cfg_eos not in eos:
            eos.append(cfg_eos)
        # tokenizer.json's post-processor decides whether BOS is added; tinyllm adds it itself.
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            add_bos = bos_id is not None and bos_id in tk.encode("a", add_special_tokens=True).ids
        tk.post_processor = None
        template = cfg.get("chat_template")
        if template is None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tk, bos_id, tuple(eos), bool(add_bos), template, str(path))

    # ---- from GGUF metadata -----------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict, source: str) -> "Tokenizer":
        kind = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise CheckpointError(f"{source}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens)")
        types = fields.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        if kind == "gpt2":
            tk = _byte_level_bpe(tokens, fields.get("tokenizer.ggml.merges") or [])
        elif kind == "llama":
            tk = _sentencepiece_bpe(tokens, fields.get("tokenizer.ggml.scores"), types,
                                    fields.get("tokenizer.ggml.add_space_prefix", True))
        else:
            raise CheckpointError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (expected 'gpt2' or 'llama')")
        specials = [AddedToken(tokens[i], special=True, normalized=False)
                    for i, t in enumerate(types) if t == TOKEN_CONTROL]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
        tk.add_special_tokens(specials)
        tk.add_tokens(user)
        bos = fields.get("tokenizer.ggml.bos_token_id")
        eos = [fields["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in fields else []
        if fields.get("tokenizer.ggml.eot_token_id") not in (None, *eos):
            eos.append(fields["tokenizer.ggml.eot_token_id"])
        add_bos = fields.get("tokenizer.ggml.add_bos_token", kind == "llama")
        return cls(tk, bos, tuple(int(e) for e in eos), bool(add_bos),
                   fields.get("tokenizer.chat_template"), source)


def _byte_level_bpe(tokens: list[str], merges: list[str]) -> HFTokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece_bpe(tokens: list[str], scores, types, add_space_prefix: bool) -> HFTokenizer:
    """SentencePiece BPE as a tokenizers BPE: merges ranked by the score of the merged piece."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    scores = scores if scores is not None else [-float(i) for i in range(len(tokens))]
    merges = []
    for piece, piece_id in vocab.items():
        if types[piece_id] != TOKEN_NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((scores[piece_id], piece_id, vocab[left], vocab[right], left, right))
    # higher score merges first; ties broken by the ids of the parts, as SentencePiece does
    merges.sort(key=lambda m: (-m[0], m[2], m[3]))
    unk = next((tokens[i] for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges],
                                unk_token=unk, fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if add_space_prefix else []) + [normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
    return tk

