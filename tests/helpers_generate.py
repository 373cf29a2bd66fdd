"""Helpers for the generation, chat and detokenizer tests: small SentencePiece-style
tokenizers trained in the test. (The real default model comes from conftest.py's
session fixtures `tiny_llm` and `hf_default`, loaded once per session.)"""
from __future__ import annotations

import json

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer


TRAIN_TEXT = [
    "a baker had a little shop in the old town, and every morning he baked bread.",
    "The quick brown fox jumps over the lazy dog. Café, naïve, résumé, jalapeño!",
    "def main():\n    for i in range(10):\n        print(i)  # count\n    return 0\n",
    "Once upon a time there was a baker who had a cat named Tom.",
    "Numbers like 12345 and 3.14159 appear in text; so do symbols: @#$%^&*()[]{}.",
]


class SentencePieceStyle:
    """Small SentencePiece-style BPE tokenizers (`▁` for spaces, `<0xNN>` byte fallback),
    trained in the test from TRAIN_TEXT with the `tokenizers` library. CJK and emoji are
    not in their vocabulary, so those characters come out as byte-fallback tokens."""

    @staticmethod
    def _train(normalizer, pre_tokenizer):
        base = HFTokenizer(models.BPE(unk_token="<unk>"))
        if normalizer is not None:
            base.normalizer = normalizer
        if pre_tokenizer is not None:
            base.pre_tokenizer = pre_tokenizer
        base.train_from_iterator(TRAIN_TEXT * 3, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                                     special_tokens=["<unk>", "<s>", "</s>"]))
        trained = json.loads(base.to_str())["model"]
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for piece in sorted(trained["vocab"], key=trained["vocab"].get):
            vocab.setdefault(piece, len(vocab))
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in trained["merges"]]
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                    fuse_unk=True, byte_fallback=True))
        tk.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
        return tk

    @classmethod
    def llama2(cls):
        """Llama 2's layout: a normalizer that prepends `▁` and replaces spaces; the decoder strips one space."""
        # trained with Metaspace splitting, so that (as in SentencePiece) no piece spans two words
        tk = cls._train(None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                        decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        return tk

    @classmethod
    def metaspace(cls):
        """The Metaspace pre-tokenizer and decoder (newer SentencePiece conversions)."""
        pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tk = cls._train(None, pre)
        tk.pre_tokenizer = pre
        tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                     prepend_scheme="always")])
        return tk


def wrap(tk, bos_id=1, eos_ids=(2,)):
    """A tinyllm Tokenizer around a `tokenizers.Tokenizer` made in a test."""
    from tinyllm.tokenizer import Tokenizer

    return Tokenizer(tk, bos_id, tuple(eos_ids), add_bos=False, chat_template=None, source="test")
