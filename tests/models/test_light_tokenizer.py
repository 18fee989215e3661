"""The light tokenizer (routers, simulated engines, the bench client) gives the ids, text and
chat prompts transformers' tokenizer gives the engine, on the built-in model's vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

from microserve.api.tools import chat_prompt_ids
from microserve.errors import UserError
from microserve.light_tokenizer import LightTokenizer
from microserve.tokenizer import chat_ids, encode, gguf_tokenizer, load_tokenizer

TEXTS = ["Hello world", "  spaces  and\ttabs\n\n", "<|im_start|>user\nhi<|im_end|>", "ünïcödé 🙂 中文", ""]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again 🙂"}],
]
TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time",
                                         "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def both(builtin_gguf):
    light = load_tokenizer(str(builtin_gguf))
    assert isinstance(light, LightTokenizer)
    return light, gguf_tokenizer(Path(builtin_gguf))


def test_same_ids_and_text(both):
    light, hf = both
    for text in TEXTS:
        ids = encode(hf, text)
        assert encode(light, text) == ids, text
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    ids = encode(hf, "Well , it 's done . Isn 't it ?")
    assert light.decode(ids, clean_up_tokenization_spaces=True) == hf.decode(ids, clean_up_tokenization_spaces=True)
    assert light.eos_token_id == hf.eos_token_id and len(light) == len(hf)
    assert light.all_special_ids == sorted(hf.all_special_ids)
    assert light.convert_ids_to_tokens([100, 2000]) == hf.convert_ids_to_tokens([100, 2000])


def test_same_chat_prompts(both):
    light, hf = both
    for messages in CHATS:
        for add in (True, False):
            assert chat_ids(light, messages, add) == chat_ids(hf, messages, add)
    calls = [*CHATS[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
             {"role": "tool", "content": "noon", "tool_call_id": "call_1"}]
    from microserve.api.tools import Tool

    tools = [Tool.model_validate(TOOL)]
    assert chat_prompt_ids(light, calls, tools, True) == chat_prompt_ids(hf, calls, tools, True)


def test_a_template_that_raises_says_why(tmp_path, both):
    light, _ = both
    light.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")
    with pytest.raises(UserError, match="only user turns"):  # a 400, not a 500
        chat_ids(LightTokenizer(tmp_path), CHATS[0])
