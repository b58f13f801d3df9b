import logging

import pytest

from tsopsd.errors import TsopsdError
from tsopsd.lab.tiny import CHAT_TEMPLATE, build_tokenizer
from tsopsd.prompts import load_prompts


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.pad_token = t.eos_token
    return t


def test_jsonl_prompt_and_messages_with_chat_template(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "the cat"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    prompts = load_prompts(path, tok)
    assert [p.text for p in prompts] == ["the cat", "<|user|>hi\n<|assistant|>"]
    assert tok.chat_template == CHAT_TEMPLATE
    assert list(prompts[1].ids) == tok("<|user|>hi\n<|assistant|>", add_special_tokens=False)["input_ids"]


def test_prompt_field_txt_and_limit(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "a b"}\n{"question": "c d"}\n')
    assert [p.text for p in load_prompts(path, tok, prompt_field="question")] == ["a b", "c d"]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\nthird\n")
    assert [p.text for p in load_prompts(txt, tok, limit=2)] == ["first prompt", "second prompt"]


def test_parquet_in_verl_layout(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"prompt": [[{"role": "user", "content": "one two"}], [{"role": "user", "content": "cat"}]],
                      "data_source": ["x", "y"]})
    pq.write_table(table, tmp_path / "train.parquet")
    prompts = load_prompts(tmp_path / "train.parquet", tok)
    assert [p.text for p in prompts] == ["<|user|>one two\n<|assistant|>", "<|user|>cat\n<|assistant|>"]


def test_left_truncation_is_warned(tmp_path, tok, caplog):
    path = tmp_path / "p.txt"
    path.write_text("one two three four five six seven eight nine ten\nthe\n")
    with caplog.at_level(logging.WARNING):
        prompts = load_prompts(path, tok, max_prompt_tokens=3)
    full = tok("one two three four five six seven eight nine ten")["input_ids"]
    assert list(prompts[0].ids) == full[-3:]
    assert "1 of 2 prompts were longer than 3 tokens" in caplog.text


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "prompt file is empty"),
        ("blank.txt", "\n  \n", "prompt file is empty"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"bad\.jsonl:2: bad JSON"),
        ("field.jsonl", '{"prompt": "ok"}\n{"text": "x"}\n', r"field\.jsonl:2: missing field 'prompt'"),
        ("type.jsonl", '{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": 7}\n', r"type\.jsonl:3: prompt must be a string"),
        ("list.jsonl", "[1, 2]\n", r"list\.jsonl:1: expected a JSON object"),
        ("msgs.jsonl", '{"messages": [{"role": "user"}]}\n', r"msgs\.jsonl:1: prompt must be a string or a list"),
        ("emptyprompt.jsonl", '{"prompt": "  "}\n', r"emptyprompt\.jsonl:1: empty prompt"),
        ("p.csv", "a,b\n", "unknown prompt file type '.csv'"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, tok, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TsopsdError, match=message):
        load_prompts(path, tok)


def test_missing_prompt_file(tmp_path, tok):
    with pytest.raises(TsopsdError, match="prompt file not found"):
        load_prompts(tmp_path / "nope.jsonl", tok)
