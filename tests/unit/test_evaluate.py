"""Exact match of greedy generations: scoring, left padding, prompt rendering, tiny real Llama."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from deltatune.train.evaluate import exact_match, normalize_answer, render_prompt  # noqa: E402
from deltatune.utils.errors import ConfigError, DataError  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<unk>", "<user>", "<bot>"]
CHARS = list("0123456789+=? \nabcdefghijklmnopqrstuvwxyz,")
CHAT_TEMPLATE = (
    "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
)


def _tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """Char-level tokenizer: one id per character, specials kept whole, decode joins without spaces."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>" if pad else None,
        additional_special_tokens=["<user>", "<bot>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


EXAMPLES = [
    {"prompt": "1+2=", "response": "3"},
    {"prompt": "123+456=", "response": "579"},
    {"prompt": "40+2=", "response": "42"},
    {"prompt": "999+1=", "response": "1000"},
    {"prompt": "5+5=", "response": "10"},
]


class StubModel:
    """A "model" whose ``.generate`` appends a fixed answer for each prompt it recognises.

    It checks what exact_match hands it (left padding, matching attention mask, greedy flags)
    and records the prompts it saw.
    """

    def __init__(self, tokenizer, answers: dict[str, str], decode_specials: bool = False):
        self.tokenizer, self.answers, self.decode_specials = tokenizer, answers, decode_specials
        self.seen: list[str] = []
        self.training = True

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def generate(self, input_ids, attention_mask, do_sample, max_new_tokens, pad_token_id):
        assert do_sample is False and not self.training
        assert torch.equal(attention_mask, (input_ids != pad_token_id).long())
        # Left padding: once a row's real tokens start, they run to the end.
        assert torch.all(attention_mask[:, -1] == 1)
        assert torch.all(attention_mask.cummax(dim=1).values == attention_mask)
        rows = []
        for ids in input_ids:
            prompt = self.tokenizer.decode(ids, skip_special_tokens=not self.decode_specials)
            prompt = prompt.replace(self.tokenizer.pad_token or "\0", "")
            self.seen.append(prompt)
            key = prompt.removeprefix("<user>").removesuffix("<bot>")
            answer = self.tokenizer(self.answers[key], add_special_tokens=False)["input_ids"]
            rows.append((answer + [self.tokenizer.eos_token_id])[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_normalize_answer():
    assert normalize_answer("  579 ") == "579"
    assert normalize_answer("579\n12+3=") == "579"
    assert normalize_answer("\n 579\nmore") == "579"
    assert normalize_answer("") == ""


def test_right_answers_score_one_and_keep_order():
    tok = _tokenizer()
    model = StubModel(tok, {ex["prompt"]: ex["response"] for ex in EXAMPLES})
    result = exact_match(model, tok, EXAMPLES, batch_size=2, progress=False)
    generations = result.pop("generations")
    assert result == {"exact_match": 1.0, "n": 5, "predictions": ["3", "579", "42", "1000", "10"]}
    assert [g.strip() for g in generations] == result["predictions"]  # whole generations, before normalize_answer
    assert tok.padding_side == "right"  # restored
    assert model.training is True  # restored after eval mode


def test_wrong_answers_score_zero():
    tok = _tokenizer()
    model = StubModel(tok, {ex["prompt"]: ex["response"] + "1" for ex in EXAMPLES})
    result = exact_match(model, tok, EXAMPLES, batch_size=3, progress=False)
    assert result["exact_match"] == 0.0 and result["n"] == 5
    assert result["predictions"][1] == "5791"


def test_partly_right_and_text_after_newline_ignored():
    tok = _tokenizer()
    answers = {ex["prompt"]: ex["response"] for ex in EXAMPLES}
    answers["1+2="] = " 3\n4+4=8"  # right, then keeps generating on a new line
    answers["5+5="] = "11"  # wrong
    result = exact_match(StubModel(tok, answers), tok, EXAMPLES, max_new_tokens=16, progress=False)
    assert result["exact_match"] == pytest.approx(4 / 5)
    assert result["predictions"][0] == "3"


def test_max_new_tokens_truncates_the_answer():
    tok = _tokenizer()
    model = StubModel(tok, {ex["prompt"]: ex["response"] for ex in EXAMPLES})
    result = exact_match(model, tok, EXAMPLES, max_new_tokens=2, progress=False)
    assert result["predictions"][1] == "57" and result["predictions"][3] == "10"  # cut to 2 tokens
    assert result["exact_match"] == pytest.approx(3 / 5)


def test_chat_template_renders_once_without_extra_specials():
    tok = _tokenizer()
    assert render_prompt(tok, "1+2=", use_chat_template=True) == "<user>1+2=<bot>"
    assert render_prompt(tok, "1+2=", use_chat_template=False) == "1+2="
    model = StubModel(tok, {ex["prompt"]: ex["response"] for ex in EXAMPLES}, decode_specials=True)
    result = exact_match(model, tok, EXAMPLES, use_chat_template=True, progress=False)
    assert result["exact_match"] == 1.0
    assert sorted(model.seen) == sorted(f"<user>{ex['prompt']}<bot>" for ex in EXAMPLES)


def test_chat_template_missing_is_a_config_error():
    tok = _tokenizer()
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat_template"):
        exact_match(StubModel(tok, {}), tok, EXAMPLES, use_chat_template=True, progress=False)


def test_tokenizer_without_pad_token_pads_with_eos_and_is_restored():
    tok = _tokenizer(pad=False)
    model = StubModel(tok, {ex["prompt"]: ex["response"] for ex in EXAMPLES})
    assert exact_match(model, tok, EXAMPLES, progress=False)["exact_match"] == 1.0
    assert tok.pad_token is None and tok.padding_side == "right"


def test_bad_inputs():
    tok = _tokenizer()
    model = StubModel(tok, {})
    assert exact_match(model, tok, [], progress=False) == {"exact_match": 0.0, "n": 0, "predictions": []}
    with pytest.raises(DataError, match="example 1 field 'response'"):
        exact_match(model, tok, [EXAMPLES[0], {"prompt": "1+1="}], progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        exact_match(model, tok, EXAMPLES, batch_size=0, progress=False)


def test_progress_bar_only_when_asked(capsys):
    tok = _tokenizer()
    model = StubModel(tok, {ex["prompt"]: ex["response"] for ex in EXAMPLES})
    exact_match(model, tok, EXAMPLES, progress=False)
    assert "exact match" not in capsys.readouterr().err
    exact_match(model, tok, EXAMPLES, progress=True)
    assert "exact match" in capsys.readouterr().err


def _tiny_llama(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def test_left_padded_batch_matches_unbatched_greedy_on_tiny_llama():
    tok = _tokenizer()
    model = _tiny_llama(tok)
    examples = EXAMPLES + [{"prompt": "how many digits in 40213?", "response": "5"}]
    batched = exact_match(model, tok, examples, max_new_tokens=6, batch_size=len(examples), progress=False)
    one_by_one = exact_match(model, tok, examples, max_new_tokens=6, batch_size=1, progress=False)
    assert batched["predictions"] == one_by_one["predictions"]
    assert any(p for p in batched["predictions"])  # the random model does emit text
    # And the same as calling generate directly on the unpadded prompt.
    ids = tok(examples[1]["prompt"], return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6)
    direct = normalize_answer(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert batched["predictions"][1] == direct
    assert model.training is True  # exact_match restored train mode


def test_gsm8k_references_get_numeric_accuracy_from_the_whole_generation():
    tok = _tokenizer()
    examples = [{"prompt": "1+2=", "response": "1 plus 2\n#### 3"}, {"prompt": "2+2=", "response": "#### 4"}]
    model = StubModel(tok, {"1+2=": "so\n#### 3", "2+2=": "#### 5"})
    result = exact_match(model, tok, examples, batch_size=2, progress=False, max_new_tokens=20)
    assert result["numeric_accuracy"] == 0.5 and result["exact_match"] == 0.0
