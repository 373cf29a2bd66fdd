"""Chat templates: tinyllm's rendering against `transformers`' `apply_chat_template` on the
real default model (SmolLM2's GGUF carries its template), and the errors users can hit."""
import pytest

from tinyllm.chat import ChatTemplate, ChatTemplateError, build_messages, chat_prompt_ids

from helpers_generate import SentencePieceStyle, wrap

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello there!"}],
    [{"role": "user", "content": "Write a haiku about 中文 and emoji 😀."},
     {"role": "assistant", "content": "Silent keys at night,\n code compiles."},
     {"role": "user", "content": "  Now in French, with café  "}],
    [{"role": "user", "content": ""}],
]


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_prompt_ids_equal_transformers_apply_chat_template(tiny_llm, hf_default, messages, add_generation_prompt):
    _, hf_tok = hf_default
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    expected_text = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    text = ChatTemplate.from_tokenizer(tiny_llm.tokenizer).render(messages, add_generation_prompt)
    assert text == expected_text
    assert chat_prompt_ids(tiny_llm.tokenizer, messages, add_generation_prompt) == list(expected)


def test_build_messages_with_and_without_system():
    assert build_messages("hi") == [{"role": "user", "content": "hi"}]
    assert build_messages("hi", system="be brief") == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_variables_and_trimming():
    source = ("{{ bos_token }}{% for m in messages %}\n"
              "  [{{ m.role }}] {{ m.content | tojson }}{{ eos_token }}\n"
              "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    t = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    msgs = [{"role": "user", "content": "héllo \"x\""}]
    # trim_blocks drops the newline after a block tag, lstrip_blocks the spaces before one
    assert t.render(msgs, add_generation_prompt=True) == '<s>  [user] "héllo \\"x\\""</s>\n[assistant]'
    assert t.render(msgs, add_generation_prompt=False) == '<s>  [user] "héllo \\"x\\""</s>\n'


def test_no_template_is_a_clear_error():
    tok = wrap(SentencePieceStyle.llama2())
    with pytest.raises(ChatTemplateError, match="no chat template.*--raw") as err:
        chat_prompt_ids(tok, build_messages("hi"))
    assert "\n" not in str(err.value)


def test_raise_exception_surfaces_as_one_line_error():
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start\nwith user') }}"
                     "{% endif %}ok", origin="model.gguf")
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="model.gguf: chat template error: Conversation must start with user"):
        t.render([{"role": "assistant", "content": "x"}])


def test_sandbox_blocks_python_internals():
    t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        t.render([{"role": "user", "content": "x"}])


def test_template_that_does_not_compile():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


@pytest.mark.parametrize("messages", [{"role": "user", "content": "x"}, ["hello"], [{"content": "x"}]])
def test_malformed_messages_are_named(messages):
    with pytest.raises(ChatTemplateError, match="messages"):
        ChatTemplate("x").render(messages)


# A Llama-2-style template written for this test: BOS per user turn, <<SYS>> block in the
# first turn, EOS after each answer, raise_exception when roles do not alternate.
LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}\n"
    "{% for m in msgs %}\n"
    "  {% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant/user/...') }}{% endif %}\n"
    "  {% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] | trim"
    " + ' [/INST]' }}\n"
    "  {% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}\n"
    "  {% endif %}\n"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face tokenizer directory: tokenizer.json + tokenizer_config.json with the template."""
    import json

    d = tmp_path_factory.mktemp("llama2_style_tokenizer")
    SentencePieceStyle.llama2().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "chat_template": LLAMA2_STYLE}))
    return d


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a baker had a shop"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " the old town "},
     {"role": "assistant", "content": "a little shop"}, {"role": "user", "content": "café 中"}],
])
def test_hf_directory_template_equals_transformers(hf_dir, messages):
    from transformers import AutoTokenizer

    from tinyllm.tokenizer import Tokenizer

    ours = Tokenizer.from_dir(hf_dir)
    theirs = AutoTokenizer.from_pretrained(str(hf_dir))
    text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ChatTemplate.from_tokenizer(ours).render(messages) == text
    assert chat_prompt_ids(ours, messages) == ids
    assert ids.count(ours.bos_id) == sum(m["role"] == "user" for m in messages)  # bos_token came from the config


def test_hf_directory_template_raise_exception(hf_dir):
    from tinyllm.tokenizer import Tokenizer

    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        chat_prompt_ids(Tokenizer.from_dir(hf_dir), [{"role": "assistant", "content": "hi"}])
