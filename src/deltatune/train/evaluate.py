"""Exact match of greedy generations against reference responses.

Score = (1/n) * sum_i [normalize_answer(generated_i) == normalize_answer(response_i)], where
``generated_i`` is the greedy continuation (at most ``max_new_tokens`` tokens) of example i's
prompt, rendered exactly as training renders it:

- ``use_chat_template=False``: the raw prompt text, tokenized with the tokenizer's defaults
  (``tokenizer(prompt)``, so a tokenizer that adds BOS adds it here too);
- ``use_chat_template=True``: ``apply_chat_template([{"role": "user", "content": prompt}],
  add_generation_prompt=True, tokenize=False)``, then tokenized with
  ``add_special_tokens=False`` (the template already holds BOS / role markers).

Batches are left-padded so every row's last prompt token sits at the same position and the new
tokens start at column ``T_in`` for all rows; with the attention mask (and the position ids
``generate`` derives from it) this gives the same greedy output as one prompt at a time.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from deltatune.evaluation.answers import FINAL_ANSWER, numeric_accuracy
from deltatune.utils.errors import ConfigError, DataError


def normalize_answer(s: str) -> str:
    """The compared form of an answer: surrounding whitespace stripped, cut at the first newline.

    ``" 579\\n12+3="`` -> ``"579"``: a model that goes on generating a next line is still right.
    """
    return s.strip().split("\n", 1)[0].strip()


def exact_match(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict],
    max_new_tokens: int = 8,
    batch_size: int = 32,
    use_chat_template: bool = False,
    progress: bool = True,
    add_special_tokens: bool | None = None,
) -> dict:
    """Greedy-decode every example's prompt and score exact match with its ``response``.

    ``model`` is a transformers causal LM or any object whose ``.generate(input_ids=[B, T],
    attention_mask=[B, T], do_sample=False, max_new_tokens=..., pad_token_id=...)`` returns
    ``[B, T + new]`` token ids (or an output with ``.sequences``), e.g. a wrapper forwarding to one.
    The model is put in eval mode for the call and its previous mode restored; the tokenizer's
    ``padding_side`` (and ``pad_token``, set to EOS when missing) are restored too.

    Returns ``{"exact_match": float in [0, 1], "n": len(examples), "predictions": [str]}``, the
    predictions normalized (see :func:`normalize_answer`) and in the order of ``examples``.
    An empty ``examples`` gives exact_match 0.0 and n 0.
    """
    for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}: expected an int >= 1, got {value!r}")
    for i, example in enumerate(examples):
        for key in ("prompt", "response"):
            if not isinstance(example, dict) or not isinstance(example.get(key), str):
                found = example.get(key) if isinstance(example, dict) else type(example).__name__
                raise DataError(f"exact_match: example {i} field {key!r} is {found!r}, expected a string")
    if not examples:
        return {"exact_match": 0.0, "n": 0, "predictions": []}

    texts = [render_prompt(tokenizer, ex["prompt"], use_chat_template) for ex in examples]
    # Pre-rendered prompts (from the data pipeline) say themselves whether special tokens go in.
    add_special_tokens = (not use_chat_template) if add_special_tokens is None else add_special_tokens
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory error
    # shows up in the first batch rather than the last.
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    predictions: list[str] = [""] * len(texts)
    generations: list[str] = [""] * len(texts)  # whole, before normalize_answer: GSM8K's "#### n" follows the reasoning
    device = _device_of(model)

    with _left_padding(tokenizer) as pad_token_id, _eval_mode(model), torch.no_grad():
        bar = tqdm(total=len(texts), desc="exact match", unit="ex", disable=not progress)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                add_special_tokens=add_special_tokens,
                padding=True,
                return_tensors="pt",
            )
            input_ids = batch["input_ids"].to(device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"].to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
            )
            sequences = getattr(output, "sequences", output)
            # Left padding puts every row's first new token at column T_in.
            new_tokens = sequences[:, input_ids.shape[1] :]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(rows, decoded):
                predictions[i], generations[i] = normalize_answer(text), text
            bar.update(len(rows))
        bar.close()

    correct = sum(p == normalize_answer(ex["response"]) for p, ex in zip(predictions, examples))
    result = {"exact_match": correct / len(examples), "n": len(examples), "predictions": predictions, "generations": generations}
    if any(FINAL_ANSWER.search(ex["response"]) for ex in examples):  # GSM8K-style references: score the final number too
        result["numeric_accuracy"] = numeric_accuracy(generations, [ex["response"] for ex in examples])
    return result


def render_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> str:
    """The text the model sees for ``prompt`` (before tokenization); see the module docstring."""
    if not use_chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "use_chat_template=True but the tokenizer has no chat_template; "
            "set use_chat_template=False for a base model"
        )
    # tokenize=False: in transformers 5 tokenize=True returns a BatchEncoding, not ids.
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


@contextlib.contextmanager
def _left_padding(tokenizer: Any) -> Iterator[int]:
    """Left padding (and a pad token, EOS if none) for the block; yields the pad token id."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    if old_pad is None:
        if tokenizer.eos_token is None:
            raise ConfigError("exact_match: the tokenizer has neither a pad token nor an EOS token to pad with")
        # Padded positions are masked out, so which token fills them does not matter.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        yield tokenizer.pad_token_id
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """``model.eval()`` for the block (no dropout while decoding), previous mode restored."""
    was_training = getattr(model, "training", None)
    if isinstance(was_training, bool) and hasattr(model, "train"):
        model.train(False)
    try:
        yield
    finally:
        if isinstance(was_training, bool) and hasattr(model, "train"):
            model.train(was_training)


def _device_of(model: Any) -> torch.device:
    """Where the inputs go: ``model.device``, else its first parameter's device, else CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")
