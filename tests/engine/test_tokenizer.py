"""Tokenizer wrapper, byte fallback, incremental detokenizer and EOS lookup; transformers is the reference."""

import json
import random

import pytest

from expertmesh.engine.tokenizer import ByteTokenizer, IncrementalDetokenizer, Tokenizer, load_eos_token_ids
from expertmesh.testing import write_random_checkpoint

TEXTS = [
    "",
    "The mixture of experts routes each token to a few experts.",
    "  leading and trailing spaces  \n\nnew lines\ttabs",
    "Unicode: 你好，世界 こんにちは 🚀🤖 Привет ü é",
    "<｜User｜>special tokens inline<｜Assistant｜>reply<｜end▁of▁sentence｜>",
    "code: def f(x):\n    return x ** 2  # comment",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is MoE?"}],
    [
        {"role": "system", "content": "One."},
        {"role": "system", "content": "Two."},
        {"role": "user", "content": "Hi 🚀"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf_tok, add_special_tokens):
    for text in TEXTS:
        expected = hf_tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert tok.encode(text, add_special_tokens=add_special_tokens) == expected, text


def test_encode_prepends_bos_through_post_processor(tok):
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id == 0
    assert tok.encode("hello", add_special_tokens=False) == ids[1:]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(tok, hf_tok, skip_special_tokens):
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens) == hf_tok.decode(ids, skip_special_tokens=skip_special_tokens)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
        assert tok.decode(ids, skip_special_tokens) == hf_tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, add_generation_prompt):
    for messages in CONVERSATIONS:
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_renders_deepseek_turns(tok):
    prompt = tok.apply_chat_template(CONVERSATIONS[2])
    assert prompt == (
        "<｜begin▁of▁sentence｜>One.\n\nTwo.<｜User｜>Hi 🚀<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
        "<｜User｜>2+2?<｜Assistant｜>"
    )
    # The template writes BOS, so a chat prompt is encoded without adding another.
    assert tok.encode(prompt, add_special_tokens=False)[:1] == [tok.bos_token_id]


def test_special_ids_and_vocab_size(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, 2048)
    assert tok.all_special_ids[:4] == [0, 1, 2, 3]  # BOS, EOS, <｜User｜>, <｜Assistant｜>; then reserved padding


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hi", "non-empty list"),
        ([], "non-empty list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"content": "a"}], r"messages\[0\]\.role must be a string, got missing"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content must be a string, got a NoneType"),
        ([{"role": "tool", "content": "x"}], "unsupported role tool"),
    ],
)
def test_chat_template_rejects_bad_messages_naming_the_field(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_checkpoint_without_chat_template_gets_the_plain_default(tmp_path, tiny_dir):
    (tmp_path / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.chat_template is None
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "system: be brief\nuser: hi\nassistant:"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "system: be brief\nuser: hi\n"
    with pytest.raises(ValueError, match="role"):  # the messages are still checked
        tok.apply_chat_template([{"content": "hi"}])


def test_chat_template_list_form_dict_tokens_and_jinja_file(tmp_path, tiny_dir):
    (tmp_path / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    config = {
        "bos_token": {"content": "<｜begin▁of▁sentence｜>", "lstrip": False},
        "eos_token": {"content": "<｜end▁of▁sentence｜>"},
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<｜begin▁of▁sentence｜>D"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] | tojson }}|{{ eos_token }}")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "<b>&"}]) == '"<b>&"|<｜end▁of▁sentence｜>'


def test_chat_template_is_sandboxed(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_byte_fallback_round_trips_utf8(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1024}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 1024
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == [tok.bos_token_id, *text.encode("utf-8")]
        assert tok.decode(ids) == text
    assert tok.decode([*"héllo".encode(), 256, 257, 700]) == "héllo"  # ids >= 256 decode to nothing
    assert tok.all_special_ids == [256, 257]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"  # the default


def _stream(tok, ids, prompt_ids=None):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text
    assert not any(p.endswith("\ufffd") for p in pieces[:-1]), "emitted an incomplete character"
    return pieces, detok.text


def test_incremental_detokenizer_equals_full_decode_on_random_streams(tok):
    byte_tok = ByteTokenizer(vocab_size=300)
    rng = random.Random(1)
    for t in (tok, byte_tok):
        for _ in range(100):
            ids = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(1, 30))]
            prompt = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(0, 8))]
            assert _stream(t, ids, prompt)[1] == t.decode(ids)


def test_incremental_detokenizer_holds_split_multibyte_characters(tok):
    pieces, text = _stream(ByteTokenizer(), list("a🚀你".encode()))
    assert pieces == ["a", "", "", "", "🚀", "", "", "你", ""]
    for sample in TEXTS:
        ids = tok.encode(sample, add_special_tokens=False)
        pieces, text = _stream(tok, ids, prompt_ids=tok.encode("Say:"))
        assert text == tok.decode(ids) and pieces[-1] == ""  # nothing left over for flush
        assert "\ufffd" not in text


def test_load_eos_token_ids(tmp_path, tiny_dir):
    assert load_eos_token_ids(tiny_dir) == [1]
    assert load_eos_token_ids(tmp_path) == []
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_eos_token_ids(tmp_path) == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 9]}))
    assert load_eos_token_ids(tmp_path) == [3, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match="eos_token_id must be an int or a list of ints"):
        load_eos_token_ids(tmp_path)
