"""Helpers shared by tests: tiny configs and models, delta randomisation, ../shared/data, an exact-match reference."""
from __future__ import annotations

from pathlib import Path

import torch

# The shared data sets live beside the repository (../shared/data), wherever it is cloned.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=128, max_position_embeddings=64, num_labels=3)
    cfg.update(overrides)
    return BertConfig(**cfg)


def randomize_delta(model, std: float = 0.02, seed: int = 0) -> None:
    """Give every delta parameter non-trivial values (fresh LoRA has B = 0, i.e. no effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


WORDS = "zero one two three four five six seven eight nine plus minus is the a of and to what cat dog sat on mat".split()


def tiny_tokenizer():
    """A word-level tokenizer over a small vocabulary + digits, with pad/eos/unk, built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *WORDS, *list("0123456789+=?.,")])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def save_tiny_lm(path, seed: int = 0):
    """A tiny llama + its tokenizer saved as a HF directory (a model name for recipes and the CLI)."""
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=None))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert(path, seed: int = 0):
    from transformers import BertModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    BertModel(tiny_bert_config(vocab_size=len(tokenizer), pad_token_id=0)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def greedy_answers(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """Each prompt's greedy continuation, one prompt at a time with plain ``generate`` (no batching,
    no padding): an independent reference for the exact-match scores that evaluation reports."""
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def greedy_exact_match(model, tokenizer, rows, max_new_tokens: int) -> float:
    """The share of ``rows`` ({"prompt", "response"}) whose greedy answer is the response."""
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    return sum(a == r["response"] for a, r in zip(answers, rows)) / len(rows)


def write_constant_answer_task(root) -> tuple[Path, Path, list[dict]]:
    """Prompt/response files a tiny model learns in a few steps: every training answer is "7".

    Half the eval references are "7" and half "8", so a model that learned the task scores
    exactly 0.5 and the untrained one 0.0. Returns (train path, eval path, eval rows).
    """
    import json

    root = Path(root)
    g = torch.Generator().manual_seed(0)
    train = [{"prompt": f"{a}+{b}=", "response": "7"} for a, b in torch.randint(10, 99, (96, 2), generator=g).tolist()]
    evals = [{"prompt": f"{a}+{a}=", "response": "7" if a % 2 else "8"} for a in range(10, 26)]
    paths = root / "constant_train.jsonl", root / "constant_eval.jsonl"
    for path, rows in zip(paths, (train, evals)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return *paths, evals
