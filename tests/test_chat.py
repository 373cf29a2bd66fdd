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
