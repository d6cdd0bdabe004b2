"""Render examples to text *segments*: ``[(text, trained)]`` whose concatenation is the model input.

Keeping the text in segments is how the prompt/response boundary survives tokenization:
:func:`deltatune.data.formats.encode_segments` tokenizes the joined string once and marks the
tokens that overlap a ``trained`` segment.

Chat rendering uses the tokenizer's own ``chat_template`` (or :data:`FALLBACK_CHAT_TEMPLATE`)
as text (``tokenize=False``) — in transformers 5 ``tokenize=True`` may return a BatchEncoding,
and only the string lets us find the boundaries. Assistant turn *k* is the text that rendering
``messages[:k+1]`` adds after rendering ``messages[:k]`` with ``add_generation_prompt=True``;
that text includes the template's end-of-turn marker, so the model learns to stop.
"""
from __future__ import annotations

from typing import Any

from deltatune.utils.errors import DataError

Segments = list[tuple[str, bool]]

# The Stanford Alpaca prompt (with and without an input), the most common instruction format.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# Used for chat data when the tokenizer has no chat template (base models): plain text markers,
# so no new special tokens are needed. Separators open a turn rather than close one, so an
# assistant turn's text is exactly its content + EOS.
FALLBACK_CHAT_TEMPLATE = (  # newlines as {{ '\n' }}: HF renders with trim_blocks, eating "\n" after a tag
    "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '### User:\\n' + m['content'] }}"
    "{% else %}{{ '### Assistant:\\n' + m['content'] + (eos_token or '') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}{{ '### Assistant:\\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT-style {"from": ..., "value": ...} turns, mapped onto chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system", "tool": "tool"}


def instruction_segments(instruction: str, input_text: str, response: str, style: str) -> Segments:
    """Alpaca or plain prompt + response. ``style``: ``"alpaca"`` | ``"plain"``.

    plain: ``"{instruction}\\n\\n{input}\\n\\n"`` (input part omitted when empty) then the response.
    """
    if style == "alpaca":
        prompt = (ALPACA_PROMPT_WITH_INPUT if input_text else ALPACA_PROMPT).format(instruction=instruction, input=input_text)
    elif style == "plain":
        prompt = instruction + (f"\n\n{input_text}" if input_text else "") + "\n\n"
    else:  # pragma: no cover - guarded by the config's Literal
        raise ValueError(f"unknown instruction template {style!r}")
    return [(prompt, False), (response, True)]


def instruction_messages(instruction: str, input_text: str, response: str, system: str | None) -> list[dict[str, str]]:
    """The instruction example as a chat: [system], user = instruction (+ blank line + input), assistant."""
    user = instruction + (f"\n\n{input_text}" if input_text else "")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def normalize_messages(raw: Any, origin: str) -> list[dict[str, str]]:
    """Validate a ``messages`` list; accepts {role, content} and ShareGPT {from, value} turns."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{origin}: field 'messages' must be a non-empty list of {{role, content}} objects, found {_kind(raw)}")
    out = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise DataError(f"{origin}: messages[{i}] must be an object with 'role' and 'content', found {_kind(turn)}")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        elif "from" in turn:
            role, content = SHAREGPT_ROLES.get(str(turn.get("from")), turn.get("from")), turn.get("value")
        else:
            raise DataError(f"{origin}: messages[{i}] has no 'role'; found keys {sorted(turn)}, expected 'role' and 'content'")
        if role not in ROLES:
            raise DataError(f"{origin}: messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{origin}: messages[{i}].content must be a string, found {_kind(content)}")
        out.append({"role": role, "content": content})
    assistant = [m for m in out if m["role"] == "assistant"]
    if not assistant:
        raise DataError(f"{origin}: messages has no assistant turn; nothing to train on")
    if not any(m["content"].strip() for m in assistant):
        raise DataError(f"{origin}: every assistant turn is empty; expected a non-empty response")
    return out


def chat_segments(tokenizer: Any, messages: list[dict[str, str]], origin: str, template: str | None = None) -> Segments:
    """Render a conversation with the chat template; assistant turns are the trained segments.

    ``template`` overrides ``tokenizer.chat_template`` (used for :data:`FALLBACK_CHAT_TEMPLATE`).
    Needs a *prefix-stable* template (rendering a conversation's beginning gives a prefix of
    the full rendering). Templates that rewrite earlier turns (e.g. strip reasoning) are
    handled by training only the final assistant turn; if even that cannot be located, the
    record is rejected with a DataError.
    """
    full = _render(tokenizer, messages, False, origin, template)
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True, origin, template)
        upto = _render(tokenizer, messages[: k + 1], False, origin, template)
        if not (upto.startswith(before) and full.startswith(upto)):
            spans = []
            break
        spans.append((len(before), len(upto)))
    if not spans:  # not prefix-stable: fall back to the last assistant turn only
        k = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        before = _render(tokenizer, messages[:k], True, origin, template)
        upto = _render(tokenizer, messages[: k + 1], False, origin, template)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"{origin}: the chat template does not render the conversation's beginning as a prefix of the whole; "
                "cannot locate the assistant tokens (use template: alpaca or plain)"
            )
        spans = [(len(before), len(upto))]
    segments: Segments = []
    pos = 0
    for start, end in spans:
        if start > pos:
            segments.append((full[pos:start], False))
        segments.append((full[start:end], True))
        pos = end
    if pos < len(full):
        segments.append((full[pos:], False))
    return segments


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, origin: str, template: str | None) -> str:
    if not messages:
        # Rendering zero messages can fail in some templates; the prefix before turn 0 is "".
        if not add_generation_prompt:
            return ""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )
    except Exception as err:  # jinja raise_exception(...) for unsupported role orders etc.
        raise DataError(f"{origin}: the chat template rejected this conversation ({type(err).__name__}: {err})") from None
    if not isinstance(text, str):  # a list when given a batch; we always pass one conversation
        text = text[0]
    return text


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
