"""`python -m tinyllm.run` in a subprocess: the default run, --json, --chat over stdin,
and user errors (one line on stderr, no traceback, non-zero exit status)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm.run import DEFAULT_PROMPT, build_parser

ROOT = Path(__file__).resolve().parents[1]
STATS_LINE = re.compile(r"^\[\d+ tokens \((eos|stop|length|context)\) \| prompt \d+ tokens.* tok/s.*first token "
                        r"[\d.]+ s \| decode [\d.]+ tok/s \| load [\d.]+ s \| peak memory \d+ MiB\]$")


def cli(*args, stdin=None, timeout=600, command=("-m", "tinyllm.run")):
    """The command in a subprocess; with no `stdin` text its stdin is empty (not a terminal)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, encoding="utf-8",
                          cwd=ROOT, env=env, timeout=timeout, **feed)


def hf_chat_greedy(hf_default, messages, n):
    import torch

    model, tok = hf_default
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                             top_k=None, attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2)
    new = out[0, len(ids):].tolist()
    return ids, new, tok.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_default_run_streams_the_reference_answer(hf_default):
    """No flags: the embedded model answers the built-in question; the text is transformers'
    greedy answer to the same chat prompt, spaces and all; one stats line on stderr."""
    r = cli()
    assert r.returncode == 0, r.stderr
    _, _, expected = hf_chat_greedy(hf_default, [{"role": "user", "content": DEFAULT_PROMPT}], 256)
    assert r.stdout == expected + "\n"
    assert " " in expected.strip() and "\ufffd" not in r.stdout
    assert STATS_LINE.match(r.stderr.strip()), r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.slow
def test_json_output(hf_default):
    r = cli("--raw", "--prompt", "-", "--max-new-tokens", "6", "--json", "--quiet",
            stdin="The capital of France is")  # '-': the prompt comes from stdin
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = json.loads(r.stdout)
    _, tok = hf_default
    assert out["prompt_ids"] == tok("The capital of France is", add_special_tokens=False)["input_ids"]
    assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length"
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)
    s = out["stats"]
    assert s["new_tokens"] == 6 and s["prompt_tokens"] == len(out["prompt_ids"])
    assert s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0 and s["ttft_s"] > 0


@pytest.mark.slow
def test_chat_two_turns_through_stdin(hf_default):
    r = cli("--chat", "--json", "--max-new-tokens", "10", "--system", "You are brief.",
            stdin="Name a fruit.\nName another one.\n")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(turns) == 2
    assert turns[1]["stats"]["cached_tokens"] > len(turns[0]["prompt_ids"])  # turn 1 stayed in the KV cache
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": turns[0]["text"]}, {"role": "user", "content": "Name another one."}]
    ids, new, _ = hf_chat_greedy(hf_default, messages, 10)
    assert turns[1]["prompt_ids"] == ids
    assert turns[1]["token_ids"] == new[:len(turns[1]["token_ids"])]


@pytest.mark.slow
def test_chat_streams_text_per_turn():
    r = cli("--chat", "--max-new-tokens", "5", "--quiet", "--stop", "\n", stdin="Hi!\n\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert len(r.stdout.splitlines()) == 1  # one turn (the blank line is skipped, /exit ends the chat)


@pytest.mark.slow
def test_context_overflow_is_one_line_error():
    r = cli("--max-context", "8", "--prompt", "This prompt is longer than eight tokens once templated.")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "context overflow" in r.stderr and "--max-context" in r.stderr


def gpu_usable() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.parametrize("args, status, message", [
    (["--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--top-k", "many"], 2, "argument --top-k: invalid int value"),
    (["--dtype", "int3"], 2, "argument --dtype: invalid choice"),
    (["--prompt", "a", "--prompt-file", "b"], 2, "not allowed with argument"),
    (["--temperature", "-1"], 1, "--temperature: must be >= 0"),
    (["--top-p", "1.5"], 1, "--top-p: must be in (0, 1]"),
    (["--min-p", "-0.5"], 1, "--min-p: must be in [0, 1]"),
    (["--repetition-penalty", "0"], 1, "--repetition-penalty: must be > 0"),
    (["--max-new-tokens", "-3"], 1, "--max-new-tokens: must be >= 0"),
    (["--max-context", "0"], 1, "--max-context: must be a positive number"),
    (["--raw", "--system", "x"], 1, "--system needs the chat template"),
    (["--model", "/no/such/model.gguf"], 1, "/no/such/model.gguf: no such file or directory"),
    (["--prompt-file", "/no/such/prompt.txt"], 1, "--prompt-file: /no/such/prompt.txt: no such file"),
    (["--device", "tpu"], 1, "--device: expected 'cpu', 'cuda' or 'cuda:N'"),
    (["--device", "cuda"], 1, "CUDA"),
    (["--dtype", "bf16"], 1, "--dtype bf16: bfloat16 runs on a GPU only"),
])
def test_user_errors_are_one_line(args, status, message):
    if args == ["--device", "cuda"] and gpu_usable():
        pytest.skip("a GPU is usable here, so --device cuda is not an error")
    r = cli(*args, timeout=120)
    assert r.returncode == status
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("python -m tinyllm.run: error: ")
    assert message in r.stderr


def test_help_documents_every_flag():
    text = build_parser().format_help()
    for flag in ("--model", "--device", "--prompt", "--prompt-file", "--chat", "--raw", "--max-new-tokens",
                 "--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty", "--presence-penalty",
                 "--frequency-penalty", "--seed", "--stop", "--system", "--max-context", "--dtype", "--json",
                 "--quiet"):
        assert re.search(rf"{flag}\b", text), flag
    r = cli("--help", timeout=120)
    assert r.returncode == 0 and "--repetition-penalty" in r.stdout


def test_stop_flag_understands_backslash_escapes():
    from tinyllm.run import unescape

    assert unescape(r"\n\n") == "\n\n"
    assert unescape(r"a\tb") == "a\tb"
    assert unescape(r"c:\\new") == "c:\\new"
    assert unescape("ünïcode\n") == "ünïcode\n"


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory, with a tokenizer but no chat template."""
    from conftest import tiny_checkpoint_dir

    d = tmp_path_factory.mktemp("tiny_hf_model")
    _, tk = tiny_checkpoint_dir(d, bos_first=True)
    return d, tk


def test_hf_directory_model_raw_and_missing_template(tiny_hf_dir):
    d, tk = tiny_hf_dir
    r = cli("--model", str(d), "--raw", "--prompt", "a baker had", "--max-new-tokens", "5", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == [1] + tk.encode("a baker had", add_special_tokens=False).ids
    assert out["finish_reason"] in ("length", "eos") and 1 <= len(out["token_ids"]) <= 5
    r = cli("--model", str(d), "--prompt", "hi", timeout=120)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "no chat template" in r.stderr and "--raw" in r.stderr


def test_loading_display_draws_then_erases(monkeypatch):
    import io
    import time

    from tinyllm.run import LoadingDisplay

    fake = io.StringIO()
    monkeypatch.setattr(sys, "stderr", fake)
    with LoadingDisplay("/models/model.gguf", enabled=True):
        time.sleep(0.35)
    out = fake.getvalue()
    assert "\rloading model.gguf [" in out and " s" in out
    assert out.endswith("\r\033[K")  # the line is erased: the answer starts on a clean line
    fake.truncate(0)
    with LoadingDisplay("model.gguf", enabled=False):  # stderr not a terminal: nothing at all
        time.sleep(0.15)
    assert fake.getvalue() == ""


def test_loading_display_shows_the_share_done(monkeypatch):
    """The terminal's loading line: a bar filled to the reported fraction and its percentage,
    erased at the end."""
    import io
    import time

    from tinyllm.run import LoadingDisplay

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with LoadingDisplay("model.gguf", enabled=True) as display:
        display.update(0.5)
        time.sleep(0.35)
        display.update(0.25)  # never goes back
        time.sleep(0.25)
    out = err.getvalue()
    assert "loading model.gguf [" + "#" * 12 + " " * 12 + "]  50% " in out
    assert " 25% " not in out
    assert out.endswith("\r\033[K")


# ---- off the happy path: bad bytes, bugs, --debug --------------------------------------------------

def test_prompt_that_is_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    r = cli("--prompt-file", str(bad), timeout=120)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert f"--prompt-file: {bad}: not valid UTF-8 text (byte 0xe9 at offset 3)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tinyllm.run", "--prompt", "-"], input=b"caf\xe9",
                       capture_output=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"(stdin): not valid UTF-8" in r.stderr


def crash(*args, **kwargs):
    raise RuntimeError("something nobody anticipated")


@pytest.mark.parametrize("module", ["tinyllm.run", "tinyllm.server.main"])
def test_unanticipated_error_is_one_line_and_debug_shows_the_traceback(module, monkeypatch, capsys):
    """A bug (here: an exception injected where the model would load) still ends as one line
    and exit status 1; --debug or TINYLLM_DEBUG=1 adds the traceback."""
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, "load_model" if module == "tinyllm.run" else "api_key", crash)
    monkeypatch.delenv("TINYLLM_DEBUG", raising=False)
    args = ["--prompt", "hi"] if module == "tinyllm.run" else []
    assert mod.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"{mod.PROG}: error: unexpected RuntimeError: something nobody anticipated (--debug")
    assert mod.main(args + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("unexpected RuntimeError: something nobody anticipated")
    monkeypatch.setenv("TINYLLM_DEBUG", "1")
    assert mod.main(args) == 1
    assert "Traceback" in capsys.readouterr().err


def test_run_and_serve_share_the_model_flags():
    from tinyllm.cli import load_options
    from tinyllm.server.main import build_parser as serve_parser

    argv = ["--model", "m.gguf", "--device", "cuda:1", "--dtype", "fp16", "--no-fast-path"]
    run_args, serve_args = build_parser().parse_args(argv), serve_parser().parse_args(argv)
    assert load_options(run_args) == load_options(serve_args) == {"device": "cuda:1", "dtype": "fp16",
                                                                  "fast_path": False}
    assert run_args.model == serve_args.model == "m.gguf"
    assert load_options(serve_parser().parse_args([]))["dtype"] is None  # auto


# ---- the `tinyllm` command and llama-cli's flags ------------------------------------------------

def test_console_command_and_version():
    """pyproject.toml installs `tinyllm` (tinyllm.cli:main); --version is the installed metadata's."""
    from importlib import metadata

    import tinyllm

    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("tinyllm") == "tinyllm.cli:main"
    installed = metadata.version("tinyllm")
    assert tinyllm.__version__ == installed
    for command in (("-m", "tinyllm"), ("-m", "tinyllm.run"), ("-m", "tinyllm.serve")):
        r = cli("--version", command=command, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == f"tinyllm {installed}", (command, r)
    r = cli("run", "--help", command=("-m", "tinyllm"), timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: tinyllm run")
    r = cli("serve", "--max-batch", "0", command=("-m", "tinyllm"), timeout=120)
    assert r.returncode == 1 and r.stderr == "tinyllm serve: error: --max-batch: must be >= 1, got 0\n"
    r = cli("walk", command=("-m", "tinyllm"), timeout=120)
    assert r.returncode == 2 and "invalid choice: 'walk'" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("module", ["tinyllm.run", "tinyllm.server.main"])
def test_help_shows_each_default_once(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    formatter = parser.formatter_class(parser.prog)
    for action in parser._actions:
        text = formatter._get_help_string(action) % {"default": action.default}
        assert text.count("default") <= 1, (action.dest, text)
        d = action.default
        if action.option_strings and d not in (None, False, [], "==SUPPRESS==") and action.help:
            assert "default" in text, (action.dest, text)  # every real default is shown
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text


def test_threads_flag_sets_blas_threads():
    from threadpoolctl import threadpool_info, threadpool_limits

    from tinyllm.cli import UsageError, apply_threads
    from tinyllm.run import build_parser

    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    if not blas:
        pytest.skip("NumPy's BLAS is not one threadpoolctl can see")
    with threadpool_limits(limits=None):  # put back whatever the test changes
        apply_threads(build_parser().parse_args(["-t", "1"]))
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
    with pytest.raises(UsageError, match="--threads: must be >= 1, got 0"):
        apply_threads(build_parser().parse_args(["--threads", "0"]))


def test_llama_cli_short_flags_map_to_the_long_ones():
    from tinyllm.run import build_parser

    a = build_parser().parse_args(["-m", "x.gguf", "-p", "hi", "-n", "7", "-c", "64", "-s", "3", "-t", "2"])
    assert (a.model, a.prompt, a.max_new_tokens, a.max_context, a.seed, a.threads) == ("x.gguf", "hi", 7, 64, 3, 2)
    assert build_parser().parse_args(["a positional prompt"]).text == "a positional prompt"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["both", "-p", "given"])


@pytest.mark.slow
def test_short_flags_logprobs_json_and_peak_memory(hf_default, default_model_path):
    """-m -p -n -c -s -t together; --logprobs 3 in --json: each greedy token's log-probability
    is the log-softmax of transformers' logits, its alternatives transformers' top 3."""
    import torch

    r = cli("-m", str(default_model_path), "-p", "The capital of France is", "--raw", "-n", "4", "-c", "32",
            "-s", "5", "-t", "1", "--json", "--logprobs", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    model, tok = hf_default
    ids = out["prompt_ids"] + out["token_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1).numpy()
    assert len(out["logprobs"]) == 4
    for k, entry in enumerate(out["logprobs"]):
        row = ref[len(out["prompt_ids"]) + k - 1]
        assert entry["id"] == out["token_ids"][k] == int(row.argmax())
        assert entry["logprob"] == pytest.approx(row[entry["id"]], abs=2e-3)
        top = sorted(range(len(row)), key=lambda i: -row[i])[:3]
        assert [t["id"] for t in entry["top"]] == top
        assert [t["logprob"] for t in entry["top"]] == pytest.approx([row[i] for i in top], abs=2e-3)
        assert entry["token"] == tok.decode([entry["id"]])
    assert out["stats"]["peak_rss_mib"] > 50


@pytest.mark.slow
def test_positional_and_piped_prompts_table_view_and_stats_line(hf_default):
    _, tok = hf_default
    expected = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    r = cli("--raw", "-n", "1", "--json", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_ids"] == expected
    r = cli("--raw", "-n", "1", "--json", stdin="The capital of France is\n")  # echo's newline is dropped
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_ids"] == expected
    r = cli("--raw", "-n", "2", "--logprobs", "2", "The capital of France is")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "the 2 most likely tokens" in lines[0]
    assert re.match(r"^ *'.*' +\d+\.\d% +\| '.*' +\d+\.\d% +'.*' +\d+\.\d%$", lines[1]), lines[1]
    assert STATS_LINE.match(r.stderr.strip()), r.stderr


def test_a_character_cut_by_the_budget_is_not_printed_as_replacement(tiny_llm):
    """An emoji spelled by several byte-level tokens, cut after its first: no U+FFFD."""
    from tinyllm.generate import StopRules, TokenStream

    ids = tiny_llm.tokenizer.encode("🙂")
    assert len(ids) > 1 and "\ufffd" in tiny_llm.tokenizer.decode(ids[:1])  # the premise: a partial character
    stream = TokenStream(tiny_llm.tokenizer, tiny_llm.config, [], StopRules(max_new_tokens=1), uses_history=False)
    assert stream.add(ids[0], context_full=False).text == "" and stream.finish_reason == "length"
    stream = TokenStream(tiny_llm.tokenizer, tiny_llm.config, [], StopRules(max_new_tokens=5), uses_history=False)
    assert stream.add(ids[0], context_full=True).text == "" and stream.finish_reason == "context"
    stream = TokenStream(tiny_llm.tokenizer, tiny_llm.config, [], StopRules(max_new_tokens=len(ids)),
                         uses_history=False)
    assert "".join(stream.add(i, context_full=False).text for i in ids) == "🙂"  # whole: unchanged


@pytest.mark.slow
def test_readme_chat_example_is_the_models_answer():
    """The README's --chat transcript: the default model's greedy answer to that system prompt."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    system, question, answer = re.search(r'\$ tinyllm run --chat --system "([^"]+)"\n>>> (.+)\n((?:.+\n)+?)```',
                                         readme).groups()
    shown = " ".join(answer.split()).removesuffix(" ...")
    r = cli("--chat", "--system", system, "-n", "64", "--quiet", stdin=question + "\n")
    assert r.returncode == 0, r.stderr
    assert " ".join(r.stdout.split()).startswith(shown), r.stdout
