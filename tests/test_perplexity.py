"""`tinyllm.perplexity` against transformers: the same checkpoint, the same token ids, the same
sliding windows computed the way Hugging Face's perplexity guide computes them (labels set to
-100 before the window's new tokens, the model's own shifted cross-entropy). The number of
tokens the guide's labels score is counted from the labels, so it checks which tokens tinyllm
scores as well as what it gets for them.

Tolerance: perplexity within a relative 2e-6 of transformers' on a float32 tiny model (both
sum float32 log-probabilities), 1e-4 on the real default model (its float32 logits differ from
transformers' by up to ~5e-4, test_default_model.py).
"""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_tiny, make_hf_model, tiny_checkpoint_dir, write_gguf
from tinyllm.perplexity import main, perplexity, windows

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "eval" / "lighthouse.txt"
PROG = "python -m tinyllm.perplexity: error: "


def hf_sliding_perplexity(model, ids, context, stride):
    """Hugging Face's perplexity guide, with the scored-token count read from the labels.
    -> (perplexity, nll_sum, tokens scored)"""
    nll_sum, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        new = end - prev_end  # the tokens no earlier window scored
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-new] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss  # mean over labels[:, 1:] != -100
        n = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        scored += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / scored), nll_sum, scored


# ---- the windows, against their definition ---------------------------------------------------

@pytest.mark.parametrize("n, context, stride", [(10, 10, 10), (11, 10, 10), (100, 10, 3), (100, 10, 1),
                                                 (100, 10, 10), (37, 8, 5), (2, 2, 1), (1000, 512, 256)])
def test_windows_score_each_token_once_with_its_context(n, context, stride):
    plan = windows(n, context, stride)
    scored = [i for w in plan for i in range(w.first_scored, w.end)]
    assert len(scored) == len(set(scored)), "a token scored twice"
    starts = {w.begin for w in plan[1:]}
    unscored = set(range(n)) - set(scored)
    # t[0] is never scored; with no overlap, neither is the first token of a later window
    assert unscored == ({0} | starts if stride == context else {0})
    assert plan[0].begin == 0 and plan[-1].end == n
    for w in plan:
        assert w.end - w.begin <= context
        assert w.begin % stride == 0
        if w is not plan[0]:  # later windows: the overlap is context, the rest is new
            assert w.first_scored - w.begin == (context - stride if stride < context else 1)
    assert all(a.begin < b.begin for a, b in zip(plan, plan[1:]))


@pytest.mark.parametrize("n, context, stride, message", [
    (5, 10, 5, "the text has 5 tokens, fewer than one window of --context 10"),
    (100, 10, 11, "--stride 11 is larger than --context 10"),
    (100, 1, 1, "--context: a window needs at least 2 tokens"),
    (100, 10, 0, "--stride: must be a positive number"),
])
def test_windows_refuse_what_cannot_be_scored(n, context, stride, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        windows(n, context, stride)


# ---- the number, against transformers ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model (long enough positions for windows beyond one prefill chunk) in
    transformers and, from the same weights written as a float32 GGUF, in tinyllm."""
    hf = make_hf_model(seed=3, max_position_embeddings=1200)
    path = tmp_path_factory.mktemp("ppl") / "tiny.gguf"
    write_gguf(hf, path)
    return hf, load_tiny(path), path


@pytest.mark.parametrize("n, context, stride", [
    (300, 64, 32),    # overlapping windows
    (300, 64, 64),    # no overlap: window starts unscored
    (300, 100, 37),   # a short last window
    (90, 64, 1),      # one new token per window
    (256, 256, 128),  # exactly one window
    (1500, 1100, 300),  # windows longer than a prefill chunk: context-only chunks skip the vocabulary
])
def test_perplexity_equals_transformers_tiny_model(tiny, n, context, stride):
    hf, model, _ = tiny
    ids = np.random.default_rng(n + context + stride).integers(0, hf.config.vocab_size, n).tolist()
    ref_ppl, ref_nll, ref_scored = hf_sliding_perplexity(hf, ids, context, stride)
    got = perplexity(model, ids, context, stride)
    assert got.scored == ref_scored
    assert got.tokens == n and got.windows == len(windows(n, context, stride))
    assert got.perplexity == pytest.approx(ref_ppl, rel=2e-6)
    assert got.nll_sum == pytest.approx(ref_nll, rel=2e-6)


def test_progress_reports_every_window(tiny):
    _, model, _ = tiny
    seen = []
    got = perplexity(model, list(range(100)), 40, 20, progress=lambda *a: seen.append(a))
    assert [s[:2] for s in seen] == [(k, 4) for k in range(1, 5)]
    assert seen[-1][2] == got.scored == 99 and seen[-1][3] == pytest.approx(got.nll_sum)


def test_context_beyond_the_model_is_refused(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match=r"--context 2000 is more than the model's context length \(1200\)"):
        perplexity(model, list(range(3000)), 2000, 1000)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rel", [(np.float32, 2e-6), (np.float16, 2e-3)])
def test_perplexity_on_the_gpu_equals_transformers(tiny, dtype, rel):
    """The same readable forward on CuPy; float16 weights and activations move the figure a little."""
    from tinyllm.backend import get_device
    from tinyllm.loaders import assemble_weights, read_checkpoint
    from tinyllm.model import Model

    hf, _, path = tiny
    device = get_device("cuda")
    ckpt = read_checkpoint(path)
    model = Model(ckpt.config, assemble_weights(ckpt, dtype, device), device)
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, 1500).tolist()
    ref_ppl, _, ref_scored = hf_sliding_perplexity(hf, ids, 1100, 300)
    got = perplexity(model, ids, 1100, 300)
    assert got.scored == ref_scored
    assert got.perplexity == pytest.approx(ref_ppl, rel=rel)


# ---- the command line ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama as a Hugging Face directory with a tokenizer that adds BOS."""
    d = tmp_path_factory.mktemp("ppl_hf")
    hf, tk = tiny_checkpoint_dir(d, seed=4, bos_first=True)
    return d, tk, hf


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cli_json_equals_transformers_and_scores_every_text_token_after_bos(tiny_dir, tmp_path, capsys, device):
    d, tk, hf = tiny_dir
    text = TEXT.read_text()[:1500]
    f = tmp_path / "text.txt"
    f.write_text(text)
    args = [str(f), "--model", str(d), "--context", "128", "--stride", "48", "--json", "--device", device]
    assert main(args + ["--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)
    ids = [1] + tk.encode(text, add_special_tokens=False).ids  # BOS, because this tokenizer adds it
    ref_ppl, _, ref_scored = hf_sliding_perplexity(hf, ids, 128, 48)
    assert got["bos"] is True and got["tokens"] == len(ids)
    assert got["scored"] == ref_scored == len(ids) - 1  # every token of the text; only BOS is not predicted
    assert got["perplexity"] == pytest.approx(ref_ppl, rel=2e-6)
    lines = err.splitlines()
    assert len(lines) == got["windows"] and lines[-1].startswith(f"window {got['windows']}/{got['windows']}: ")


def test_cli_text_output_names_the_windows(tiny_dir, tmp_path, capsys):
    d, _, _ = tiny_dir
    f = tmp_path / "text.txt"
    f.write_text(TEXT.read_text()[:800])
    assert main([str(f), "--model", str(d), "--context", "64", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert re.fullmatch(r"perplexity \d+\.\d{4} \(\d+ of \d+ tokens scored, \d+ windows of 64 tokens, stride 32; "
                        r"[\d.]+ s\)\n", out), out


@pytest.mark.parametrize("content, args, status, message", [
    (b"", [], 1, "the file is empty"),
    (b" \n\t\n", [], 1, "the file is empty"),
    (b"caf\xe9", [], 1, "not valid UTF-8 text (byte 0xe9 at offset 3)"),
    (b"A short text.", ["--context", "64"], 1, "fewer than one window of --context 64"),
    (b"A short text.", ["--context", "64", "--stride", "65"], 1, "--stride 65 is larger than --context 64"),
    (b"A short text.", ["--context", "1"], 1, "--context: a window needs at least 2 tokens"),
    (b"A short text.", ["--stride", "0"], 1, "--stride: must be a positive number"),
    (b"A short text.", ["--context", "9999"], 1, "--context 9999 is more than the model's context length (256)"),
    (b"A short text.", ["--stride", "x"], 2, "argument --stride: invalid int value"),
    (None, [], 1, "no such file"),
])
def test_bad_input_is_one_line(tiny_dir, tmp_path, capsys, content, args, status, message):
    d, _, _ = tiny_dir
    f = tmp_path / "text.txt"
    if content is not None:
        f.write_bytes(content)
    if status == 2:
        with pytest.raises(SystemExit) as e:
            main([str(f), "--model", str(d), *args])
        code = e.value.code
    else:
        code = main([str(f), "--model", str(d), *args])
    out, err = capsys.readouterr()
    assert code == status
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(PROG) and message in err, err


def test_errors_name_the_command_that_ran(tmp_path, capsys):
    """main(prog=...) is how a `tinyllm perplexity` console command would run this module."""
    f = tmp_path / "empty.txt"
    f.write_bytes(b"")
    assert main([str(f)], prog="tinyllm perplexity") == 1
    assert capsys.readouterr().err.startswith("tinyllm perplexity: error: ")


# ---- the real default model ------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_perplexity_equals_transformers(tiny_llm, hf_default):
    """Non-overlapping windows keep this test short; test_docs_quote_the_default_figure covers
    the default windows (transformers only)."""
    hf_model, hf_tok = hf_default
    text = TEXT.read_text()
    ids = tiny_llm.tokenizer.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]  # SmolLM2 adds no BOS
    ref_ppl, _, ref_scored = hf_sliding_perplexity(hf_model, ids, 256, 256)
    got = perplexity(tiny_llm.model, ids, 256, 256)
    assert got.scored == ref_scored
    assert got.perplexity == pytest.approx(ref_ppl, rel=1e-4)


@pytest.mark.slow
def test_docs_quote_the_default_figure(hf_default):
    """docs/perplexity.md quotes the default model's perplexity on the shipped text with the
    default windows (tinyllm's output line); the figure must be transformers' to the tolerance."""
    hf_model, hf_tok = hf_default
    ids = hf_tok(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    ref_ppl, _, ref_scored = hf_sliding_perplexity(hf_model, ids, 512, 256)
    page = (ROOT / "docs" / "perplexity.md").read_text()
    quoted = re.search(r"^perplexity (\d+\.\d+) \((\d+) of (\d+) tokens scored, 3 windows of 512 tokens, stride 256",
                       page, re.M)
    assert quoted, "the docs page shows the command's output line"
    assert float(quoted.group(1)) == pytest.approx(ref_ppl, rel=1e-4)
    assert (int(quoted.group(2)), int(quoted.group(3))) == (ref_scored, len(ids))
