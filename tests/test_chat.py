"""Chat templates: segments, response masks, Jinja templates, special tokens."""
from __future__ import annotations

import pytest

from tinygpt.chat import (BUILTIN_TEMPLATES, ChatTemplate, JinjaTemplate, Segment, encode_conversation,
                          encode_segments, ensure_special_tokens, get_template)
from tinygpt.data.formats import Message, detect_format, to_conversation
from tinygpt.errors import UserError
from tinygpt.tokenizer import Tokenizer

SYSTEM = "SYSTEM: answer like a pirate."
# One multi-turn row with a system prompt per SFT format; user/system texts are distinctive so a
# leak into the trained part would show in the decoded text.
SFT_ROWS = {
    "instruction_response": {"system": SYSTEM, "instruction": "USER-Q1 name a colour", "response": "Red, matey."},
    "dolly": {"system": SYSTEM, "instruction": "USER-Q1 summarise", "context": "USER-CTX ships sail",
              "response": "Ships go.", "category": "summarization"},
    "alpaca": {"system": SYSTEM, "instruction": "USER-Q1 translate", "input": "USER-IN hello", "output": "Ahoy!"},
    "lima": {"system": SYSTEM, "instruction": "USER-Q3 and then?", "input": "", "output": "Then we sail.",
             "history": [["USER-Q1 hi", "Ahoy there!"], ["USER-Q2 where to?", "To the\nisland, é 😀."]]},
    "sharegpt": {"conversations": [
        {"from": "system", "value": SYSTEM}, {"from": "human", "value": "USER-Q1 hi"},
        {"from": "gpt", "value": "Ahoy!"}, {"from": "human", "value": "USER-Q2 treasure?"},
        {"from": "gpt", "value": " Buried  deep.\n"}]},
    "messages": {"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "USER-Q1 hi"},
        {"role": "assistant", "content": "Arr."}, {"role": "user", "content": "USER-Q2 more"},
        {"role": "assistant", "content": "Arr arr!"}, {"role": "user", "content": "USER-Q3 again"},
        {"role": "assistant", "content": "1 + 1 = 2"}]},
    "prompt_completion": {"system": SYSTEM, "prompt": "USER-Q1 The sea is", "completion": " wide and deep."},
}
BPE_TEXT = ["Ahoy there matey, the ship sails to the island. " * 30,
            "USER question: what is the answer? The answer is red. " * 30,
            "system prompt: answer like a pirate, buried treasure deep in the sea. " * 30]


@pytest.fixture(scope="module")
def bpe_json():
    tok = Tokenizer.train(BPE_TEXT, vocab_size=400)
    return tok.to_json(), tok.config_json()


@pytest.fixture(params=["byte", "bpe"])
def tok(request, bpe_json):
    """A fresh tokenizer per test: ensure_special_tokens mutates it."""
    if request.param == "byte":
        return Tokenizer.byte_level()
    return Tokenizer.from_json(*bpe_json)


def masked_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def runs(ids, mask):
    """Contiguous runs of trained token ids."""
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


# Qwen2-Instruct's published chat_template (tokenizer_config.json), verbatim: a default system turn
# when the conversation has none.
QWEN2_JINJA = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
               "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("fmt", sorted(SFT_ROWS))
@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, pytest.param(QWEN2_JINJA, id="qwen2-jinja")])
def test_mask_trains_exactly_assistant_replies_and_end_markers(tok, name, fmt):
    row = SFT_ROWS[fmt]
    assert detect_format(row) == fmt
    conv = to_conversation(row, fmt)
    template = get_template(name, tok)
    ensure_special_tokens(tok, template)
    end = template.stop_strings[0]
    ids, mask = encode_conversation(tok, template, conv)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}

    replies = [m.content for m in conv.messages if m.role == "assistant"]
    assert masked_text(tok, ids, mask) == "".join(r + end for r in replies)
    # every assistant turn is its own trained run, in order
    assert [tok.decode(r) for r in runs(ids, mask)] == [r + end for r in replies]
    # no user or system text is trained, and all of it is in the untrained part
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    for m in conv.messages:
        if m.role != "assistant":
            assert m.content not in masked_text(tok, ids, mask)
            assert m.content in untrained
    # the segments are the whole rendering
    assert tok.decode(ids) == "".join(s.text for s in template.render(conv.messages))


def test_qwen2_jinja_default_system_turn_is_not_trained(tok):
    template = get_template(QWEN2_JINJA, tok)
    ensure_special_tokens(tok, template)
    msgs = [Message("user", "USER-Q1 hi"), Message("assistant", "Ahoy!"), Message("user", "USER-Q2 and?"),
            Message("assistant", "Arr.")]
    ids, mask = encode_conversation(tok, template, msgs)
    assert [tok.decode(r) for r in runs(ids, mask)] == ["Ahoy!<|im_end|>", "Arr.<|im_end|>"]
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_stop_strings_are_single_stop_tokens(tok, name):
    """Generation stops where the trained part ends: each end marker is one id in stop_ids()."""
    template = get_template(name, tok)
    ensure_special_tokens(tok, template)
    for stop in template.stop_strings:
        ids = tok.encode(stop)
        assert len(ids) == 1 and ids[0] in tok.stop_ids()


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_prompt_text_ends_with_generation_prompt(name):
    template = get_template(name)
    msgs = [Message("user", "hi")]
    text = template.prompt_text(msgs)
    assert text.endswith(template.generation_prompt) and "hi" in text
    segs = template.render(msgs, add_generation_prompt=True)
    assert not any(s.train for s in segs)


def test_builtin_renderings():
    msgs = [Message("system", "S"), Message("user", "U"), Message("assistant", "A")]
    text = lambda name: "".join(s.text for s in get_template(name).render(msgs))
    assert text("chatml") == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert text("llama3") == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                              "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
                              "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>")
    assert text("zephyr") == "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\nA</s>\n"
    assert text("alpaca") == "S\n\n### Instruction:\nU\n\n### Response:\nA<|endoftext|>\n\n"
    assert text("raw") == "SUA<|endoftext|>"
    chatml = get_template("chatml").render(msgs)
    assert [s for s in chatml if s.train] == [Segment("A<|im_end|>", True)]


def test_alpaca_and_raw_use_the_tokenizers_eos():
    class Tok:
        bos, eos, chat_template = "<s>", "</s>", None
    assert get_template("alpaca", Tok()).stop_strings == ["</s>"]
    assert get_template("raw", Tok()).special_tokens == ["</s>"]


CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
                " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")


def test_jinja_chatml_matches_builtin(tok):
    jinja, builtin = get_template(CHATML_JINJA, tok), get_template("chatml", tok)
    assert isinstance(jinja, JinjaTemplate)
    assert jinja.stop_strings == ["<|im_end|>"] and jinja.generation_prompt == builtin.generation_prompt
    assert set(jinja.special_tokens) == {"<|im_start|>", "<|im_end|>"}
    for fmt in ("sharegpt", "messages", "lima"):
        msgs = to_conversation(SFT_ROWS[fmt], fmt).messages
        assert jinja.render(msgs) == builtin.render(msgs)
        assert jinja.render(msgs[:-1], add_generation_prompt=True) == builtin.render(msgs[:-1], add_generation_prompt=True)
        assert jinja.prompt_text(msgs[:-1]) == builtin.prompt_text(msgs[:-1])
        assert encode_conversation(tok, jinja, msgs) == encode_conversation(tok, builtin, msgs)


def test_jinja_from_tokenizer_and_file(tmp_path):
    tok = Tokenizer.byte_level()
    tok.chat_template = CHATML_JINJA
    assert isinstance(get_template(None, tok), JinjaTemplate)
    assert isinstance(get_template("hf", tok), JinjaTemplate)
    path = tmp_path / "t.jinja"
    path.write_text(CHATML_JINJA, encoding="utf-8")
    msgs = [Message("user", "q"), Message("assistant", "a")]
    assert get_template(str(path)).render(msgs) == get_template("chatml").render(msgs)


def test_jinja_uses_bos_and_eos_tokens():
    src = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    template = JinjaTemplate(src, bos_token="<s>", eos_token="</s>")
    segs = template.render([Message("user", "q"), Message("assistant", "a"), Message("user", "r"),
                            Message("assistant", "b")])
    assert [s.text for s in segs if s.train] == ["a</s>", "b</s>"]
    assert "".join(s.text for s in segs) == "<s>[INST] q [/INST]a</s>[INST] r [/INST]b</s>"


def test_non_prefix_stable_jinja_is_rejected_clearly():
    src = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="not prefix-stable"):
        get_template(src).render([Message("user", "q"), Message("assistant", "a")])


def test_get_template_errors():
    with pytest.raises(UserError, match="chatml") as info:
        get_template("vicuna")
    assert all(n in str(info.value) for n in BUILTIN_TEMPLATES)
    with pytest.raises(UserError, match="no chat_template"):
        get_template("hf", Tokenizer.byte_level())
    with pytest.raises(UserError, match="not found"):
        get_template("missing.jinja")
    with pytest.raises(UserError, match="syntax error"):
        get_template("{% for m in %}")
    assert get_template(None).name == "chatml"
    assert isinstance(get_template("raw"), ChatTemplate)


def test_ensure_special_tokens_adds_llama3_tokens():
    tok = Tokenizer.byte_level()
    template = get_template("llama3", tok)
    before = tok.vocab_size
    added = ensure_special_tokens(tok, template)
    assert added == ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert tok.vocab_size == before + 4
    for t in added:
        assert len(tok.encode(t)) == 1 and tok.decode(tok.encode(t)) == t
    assert ensure_special_tokens(tok, template) == []
    assert ensure_special_tokens(tok, get_template("chatml")) == []  # tinygpt reserves ChatML


def test_encode_segments_tokenizes_each_segment_separately():
    tok = Tokenizer.byte_level()
    ids, mask = encode_segments(tok, [Segment("ab", False), Segment("c<|im_end|>", True), Segment("", False)])
    assert ids == tok.encode("ab") + tok.encode("c<|im_end|>") and mask == [0, 0, 1, 1]
