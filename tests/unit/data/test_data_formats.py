"""Records → token examples: label masks, templates, chat turns, classification labels, errors."""
from __future__ import annotations

import pytest

from deltatune.data import DataConfig, ExampleEncoder, LabelMap, Record, detect_format
from deltatune.data.templates import ALPACA_PROMPT, chat_segments
from deltatune.utils.errors import ConfigError, DataError

ORIGIN = "data/train.jsonl:17"


def rec(**data):
    return Record(data, ORIGIN)


def trained(example):
    return [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100]


def test_detect_format():
    cols: dict[str, str] = {}
    assert detect_format(rec(messages=[]), cols) == "chat"
    assert detect_format(rec(conversations=[]), cols) == "chat"
    assert detect_format(rec(instruction="a", input="", output="b"), cols) == "instruction"
    assert detect_format(rec(prompt="a", response="b"), cols) == "instruction"
    assert detect_format(rec(sentence="a", label=1), cols) == "classification"
    assert detect_format(rec(text="a"), cols) == "text"
    assert detect_format(rec(question="q", answer="a"), {"instruction": "question", "output": "answer"}) == "instruction"
    with pytest.raises(DataError, match=r"data/train\.jsonl:17: cannot tell the data format from the keys \['a', 'b'\]"):
        detect_format(rec(a=1, b=2), cols)


def test_alpaca_masks_prompt_tokens(bert_tokenizer):
    enc = ExampleEncoder(DataConfig(), bert_tokenizer, "instruction")
    assert enc.template == "alpaca"  # MiniLM has no chat template
    ex, truncated = enc(rec(instruction="Name the capital of France.", input="", output="Paris is the capital."))
    prompt = ALPACA_PROMPT.format(instruction="Name the capital of France.")
    n_prompt = 1 + len(bert_tokenizer(prompt, add_special_tokens=False)["input_ids"])  # [CLS] + prompt
    assert not truncated
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][-1] == -100  # the tokenizer's own [SEP] is never trained
    assert bert_tokenizer.decode(trained(ex)) == "paris is the capital."
    assert ex["labels"][n_prompt] == ex["input_ids"][n_prompt] != -100


def test_train_on_prompt_and_eos(plain_tokenizer):
    cfg = DataConfig(template="plain", train_on_prompt=True)
    ex, _ = ExampleEncoder(cfg, plain_tokenizer, "instruction")(rec(prompt="hello world", response="the quick fox"))
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == plain_tokenizer.eos_token_id == 2
    ex, _ = ExampleEncoder(DataConfig(template="plain"), plain_tokenizer, "instruction")(rec(prompt="hello world", response="the quick fox"))
    assert plain_tokenizer.decode(trained(ex)) == "the quick fox</s>"


def test_text_format_trains_every_token(plain_tokenizer):
    ex, _ = ExampleEncoder(DataConfig(), plain_tokenizer, "text")(rec(text="the lazy dog"))
    assert ex["labels"] == ex["input_ids"]
    assert plain_tokenizer.decode(ex["input_ids"]) == "the lazy dog</s>"


def test_chat_only_assistant_turns_are_trained(chat_tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the quick fox"},
        {"role": "user", "content": "test"},
        {"from": "gpt", "value": "brown dog"},  # ShareGPT turns are accepted too
    ]
    enc = ExampleEncoder(DataConfig(), chat_tokenizer, "chat")
    assert enc.template == "chat"
    ex, _ = enc(rec(messages=messages))
    full = chat_tokenizer.decode(ex["input_ids"])
    assert full == "<|system|>be brief<|end|><|user|>hello world<|end|><|assistant|>the quick fox<|end|><|user|>test<|end|><|assistant|>brown dog<|end|>"
    assert chat_tokenizer.decode(trained(ex)) == "the quick fox<|end|>brown dog<|end|>"
    # No EOS appended: the template's <|end|> closes the turn.
    assert chat_tokenizer.eos_token_id not in ex["input_ids"]


def test_instruction_through_chat_template(chat_tokenizer):
    ex, _ = ExampleEncoder(DataConfig(), chat_tokenizer, "instruction")(
        rec(instruction="what is the capital", input="of france", output="paris", system="be brief")
    )
    assert chat_tokenizer.decode(ex["input_ids"]) == "<|system|>be brief<|end|><|user|>what is the capital\n\nof france<|end|><|assistant|>paris<|end|>"
    assert chat_tokenizer.decode(trained(ex)) == "paris<|end|>"


def test_fallback_chat_template_for_base_tokenizer(plain_tokenizer):
    enc = ExampleEncoder(DataConfig(), plain_tokenizer, "chat")
    assert enc.template == "fallback-chat"
    ex, _ = enc(rec(messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]))
    assert plain_tokenizer.decode(trained(ex)) == "world</s>"
    assert plain_tokenizer.decode(ex["input_ids"]) == "### User:\nhello\n\n### Assistant:\nworld</s>"


def test_template_not_prefix_stable_trains_last_turn_only(chat_tokenizer):
    # A template that drops every assistant turn but the last (like reasoning-stripping ones).
    template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    segments = chat_segments(chat_tokenizer, msgs, ORIGIN, template)
    assert [s for s in segments if s[1]] == [("d<|end|>", True)]


def test_malformed_records_name_file_and_line(bert_tokenizer, chat_tokenizer):
    instr = ExampleEncoder(DataConfig(), bert_tokenizer, "instruction")
    with pytest.raises(DataError, match=r"^data/train\.jsonl:17: field 'output' is missing; found keys \['instruction'\]"):
        instr(rec(instruction="x"))
    with pytest.raises(DataError, match=r"^data/train\.jsonl:17: field 'output' is empty; expected non-empty text"):
        instr(rec(instruction="x", output="   "))
    with pytest.raises(DataError, match=r"^data/train\.jsonl:17: field 'instruction' must be a string, found list"):
        instr(rec(instruction=["x"], output="y"))
    chat = ExampleEncoder(DataConfig(), chat_tokenizer, "chat")
    with pytest.raises(DataError, match=r"^data/train\.jsonl:17: messages has no assistant turn"):
        chat(rec(messages=[{"role": "user", "content": "hi"}]))
    with pytest.raises(DataError, match=r"messages\[1\]\.role is 'bot'; expected one of system, user, assistant, tool"):
        chat(rec(messages=[{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]))
    mapped = ExampleEncoder(DataConfig(columns={"output": "answr"}), bert_tokenizer, "instruction")
    with pytest.raises(DataError, match=r"field 'answr' is missing; .*\(data\.columns\.output\) \(did you mean 'answer'\?\)"):
        mapped(rec(instruction="q", answer="a"))


def test_overlong_without_truncation_raises_and_with_truncation_cuts(bert_tokenizer):
    record = rec(instruction="short question", output=" ".join(["word"] * 100))
    with pytest.raises(DataError, match=r"^data/train\.jsonl:17: example has 1\d\d tokens, more than max_length=64; raise data\.max_length"):
        ExampleEncoder(DataConfig(max_length=64, truncation=False), bert_tokenizer, "instruction")(record)
    ex, truncated = ExampleEncoder(DataConfig(max_length=64), bert_tokenizer, "instruction")(record)
    assert truncated and len(ex["input_ids"]) == len(ex["labels"]) == 64
    # The prompt alone exceeds max_length: nothing left to learn from.
    with pytest.raises(DataError, match=r"no response tokens left after truncating to max_length=8 \(the prompt alone has \d+ tokens\)"):
        ExampleEncoder(DataConfig(max_length=8), bert_tokenizer, "instruction")(record)


def test_classification_labels_and_pairs(bert_tokenizer):
    lm = LabelMap.from_values(["not_entailment", "entailment", "entailment"], None)
    assert (lm.names, lm.num_labels) == (["entailment", "not_entailment"], 2)
    enc = ExampleEncoder(DataConfig(), bert_tokenizer, "classification", lm)
    ex, _ = enc(rec(text="a cat sat", text_pair="a cat", label="not_entailment"))
    assert ex["label"] == 1
    assert ex["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1]  # [CLS] a cat sat [SEP] | a cat [SEP]
    assert ex["attention_mask"] == [1] * 8
    with pytest.raises(DataError, match=r"^data/train\.jsonl:17: unknown label 'entailmnt' \(did you mean 'entailment' or 'not_entailment'\?\); expected one of"):
        enc(rec(text="x", label="entailmnt"))
    ints = LabelMap.from_values(["0", "1", 2, True], None)  # TSV strings, ints and bools are all integers
    assert (ints.names, ints.num_labels, ints.to_id("2", ORIGIN), ints.to_id(False, ORIGIN)) == (None, 3, 2, 0)
    named = LabelMap.from_values([], ["negative", "positive"])
    assert (named.to_id("positive", ORIGIN), named.to_id("0", ORIGIN)) == (1, 0)
    with pytest.raises(DataError, match=r"label 5 is outside 0\.\.1"):
        named.to_id(5, ORIGIN)
    with pytest.raises(DataError, match=r"labels mix integers \[1\] and strings \['good'\]"):
        LabelMap.from_values([1, "good"], None)


def test_classification_truncation(bert_tokenizer):
    enc = ExampleEncoder(DataConfig(max_length=6), bert_tokenizer, "classification", LabelMap(None, 2))
    ex, truncated = enc(rec(text="one two three four five six seven", label=1))
    assert truncated and len(ex["input_ids"]) == 6 and ex["input_ids"][-1] == bert_tokenizer.sep_token_id


def test_config_errors_are_clear(plain_tokenizer):
    with pytest.raises(ConfigError, match="data.template is 'chat' but the tokenizer has no chat_template"):
        ExampleEncoder(DataConfig(template="chat"), plain_tokenizer, "instruction")


class SlowTokenizer:
    """A stand-in without offset mappings (is_fast False), delegating everything else."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_slow_tokenizer_fallback_tokenizes_segments(chat_tokenizer):
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick fox"}]
    fast, _ = ExampleEncoder(DataConfig(), chat_tokenizer, "chat")(rec(messages=messages))
    slow, _ = ExampleEncoder(DataConfig(), SlowTokenizer(chat_tokenizer), "chat")(rec(messages=messages))
    assert chat_tokenizer.decode(trained(slow)) == chat_tokenizer.decode(trained(fast)) == "the quick fox<|end|>"
    assert chat_tokenizer.decode(slow["input_ids"]) == chat_tokenizer.decode(fast["input_ids"])


def test_generation_example_prompt_is_the_trained_prefix(plain_tokenizer, chat_tokenizer):
    record = Record({"prompt": "what is the capital", "response": "paris"}, "f.jsonl:1")
    plain = ExampleEncoder(DataConfig(template="plain"), plain_tokenizer, "instruction").generation_example(record)
    assert plain == {"prompt": "what is the capital\n\n", "response": "paris", "add_special_tokens": True}

    chat = Record({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}, "f.jsonl:2")
    ex = ExampleEncoder(DataConfig(), chat_tokenizer, "chat").generation_example(chat)
    assert ex == {"prompt": "<|user|>hello<|end|><|assistant|>", "response": "world", "add_special_tokens": False}
    with pytest.raises(ConfigError, match="generation needs instruction or chat data"):
        ExampleEncoder(DataConfig(), plain_tokenizer, "text").generation_example(Record({"text": "x"}, "f:3"))
