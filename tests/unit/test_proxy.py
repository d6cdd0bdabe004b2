"""Logit arithmetic at decode time on tiny llamas: identities, the cache, sampling, refusals."""
from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.cli.main import main
from deltatune.generation import SamplingParams, generate_text
from deltatune.proxy import check_shared_vocab, proxy_generate_ids, proxy_generate_text, proxy_logits
from deltatune.utils.errors import ConfigError
from tests.helpers import randomize_delta, save_tiny_lm, tiny_llama_config, tiny_tokenizer

PROMPT = "one plus two is"


def llama(seed: int, **cfg):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    return LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), pad_token_id=0, eos_token_id=1, bos_token_id=None, **cfg)).eval()


@pytest.fixture
def small():
    """A small base and a tuned version of it (base + LoRA with random weights) sharing one model in memory."""
    base = llama(0)
    tuned = deltatune.attach(base, {"method": "lora", "r": 4, "targets": "all-linear"})
    randomize_delta(tuned, std=0.3, seed=1)
    return base, tuned


def test_proxy_logits_is_the_formula():
    big, b, t = torch.randn(2, 5, 11), torch.randn(2, 5, 13), torch.randn(2, 5, 12)
    out = proxy_logits(big, b, t, weight=0.7)
    assert out.shape == (2, 5, 11)
    assert torch.allclose(out, big + 0.7 * (t[..., :11] - b[..., :11]))


def test_big_equal_to_small_base_gives_small_tuned_greedy_output(small):
    base, tuned = small
    tok = tiny_tokenizer()
    sampling = SamplingParams(max_new_tokens=12)
    expected = generate_text(tuned, tok, PROMPT, sampling)
    with tuned.disable():
        base_text = generate_text(base, tok, PROMPT, sampling)
    assert expected != base_text  # the delta changes the output
    assert proxy_generate_text(base, base, tuned, tok, PROMPT, weight=1.0, sampling=sampling) == expected
    # w = 0: the big model alone.
    big = llama(5)
    assert proxy_generate_text(big, base, tuned, tok, PROMPT, weight=0.0, sampling=sampling) == generate_text(big, tok, PROMPT, sampling)


def test_cached_decoding_equals_full_recomputation(small):
    """Each step's token is the argmax of the formula recomputed on the whole sequence without a cache."""
    base, tuned = small
    big = llama(5)
    ids = tiny_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]
    new = proxy_generate_ids(big, base, tuned, ids, weight=1.5, sampling=SamplingParams(max_new_tokens=10))
    seq = ids
    with torch.no_grad():
        for token in new:
            with tuned.disable():
                b_logits, big_logits = base(input_ids=seq).logits[0, -1], big(input_ids=seq).logits[0, -1]
            ref = proxy_logits(big_logits, b_logits, tuned(input_ids=seq).logits[0, -1], 1.5)
            assert int(ref.argmax()) == token
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    assert len(new) == 10


def test_sampling_is_seeded_and_respects_top_k(small):
    base, tuned = small
    big = llama(5)
    ids = tiny_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]
    s = SamplingParams(max_new_tokens=15, temperature=1.0, top_k=1, seed=3)
    greedy = proxy_generate_ids(big, base, tuned, ids, 1.0, SamplingParams(max_new_tokens=15))
    assert proxy_generate_ids(big, base, tuned, ids, 1.0, s) == greedy  # top_k=1 is greedy
    hot = SamplingParams(max_new_tokens=15, temperature=2.0, top_p=0.9, seed=4)
    first = proxy_generate_ids(big, base, tuned, ids, 1.0, hot)
    assert proxy_generate_ids(big, base, tuned, ids, 1.0, hot) == first
    assert first != greedy


def test_stops_at_eos(small):
    base, tuned = small
    big = llama(5)
    ids = tiny_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]
    full = proxy_generate_ids(big, base, tuned, ids, 1.0, SamplingParams(max_new_tokens=8))
    stop = full[2]
    cut = proxy_generate_ids(big, base, tuned, ids, 1.0, SamplingParams(max_new_tokens=8), eos_token_id=stop)
    assert cut == full[: full.index(stop) + 1]


def test_refuses_different_vocabularies(small):
    tok = tiny_tokenizer()
    other = tiny_tokenizer()
    other.add_tokens(["zebra"])
    check_shared_vocab({"big": tok, "small": tiny_tokenizer()})
    with pytest.raises(ConfigError, match="do not share a tokenizer"):
        check_shared_vocab({"big model": tok, "small base": other})
    base, tuned = small
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with pytest.raises(ConfigError, match="output logits but the tokenizer has"):
        proxy_generate_ids(base, base, tuned, ids, vocab_size=len(tok) + 50)


def test_cli_proxy_with_adapter_syntax(tmp_path, capsys):
    big_dir = save_tiny_lm(tmp_path / "big", seed=1)
    small_dir = save_tiny_lm(tmp_path / "small", seed=2)
    tuned = deltatune.attach(deltatune.load_model(str(small_dir)), {"method": "lora", "r": 4, "targets": "all-linear"})
    randomize_delta(tuned, std=0.3, seed=1)
    tuned.save_delta(str(tmp_path / "adapter"))
    tok = tiny_tokenizer()
    expected = generate_text(tuned, tok, PROMPT, SamplingParams(max_new_tokens=6))
    capsys.readouterr()
    # big == small base, tuned = small base + adapter: the tuned model's greedy text.
    args = ["generate", "--model", str(small_dir), "--proxy", f"{small_dir}:{tmp_path / 'adapter'}", "--prompt", PROMPT, "--max-new-tokens", "6", "--no-stream"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
    args[2] = str(big_dir)
    assert main(args + ["--proxy-weight", "0"]) == 0
    assert capsys.readouterr().out.strip() == generate_text(deltatune.load_model(str(big_dir)), tok, PROMPT, SamplingParams(max_new_tokens=6)).strip()
    assert main(["generate", "--model", str(big_dir), "--proxy", str(small_dir), "--prompt", PROMPT]) == 2
    assert "SMALL_BASE:SMALL_TUNED" in capsys.readouterr().err
    assert main(["generate", "--model", str(big_dir), "--proxy-weight", "2", "--prompt", PROMPT]) == 2
    assert "--proxy-weight needs --proxy" in capsys.readouterr().err
