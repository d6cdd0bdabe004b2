"""Turn raw records into token examples, one format at a time.

Language-modelling formats (``text``, ``instruction``, ``chat``) give::

    {"input_ids": list[int], "labels": list[int]}      # same length L <= max_length

``labels[j]`` is the token the model should produce *at* position ``j`` (= ``input_ids[j]``) or
-100 where no loss is taken (prompt tokens unless ``train_on_prompt``, template markers of
non-assistant turns). Labels are *not* shifted: the trainer computes
``cross_entropy(logits[:, :-1], labels[:, 1:])``, as Hugging Face models do.

``classification`` gives ``{"input_ids", "attention_mask", ["token_type_ids"], "label": int}``.

Every error is a :class:`DataError` that starts with the record's ``file:line``.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from deltatune.data.config import DataConfig
from deltatune.data.sources import Record
from deltatune.data.templates import (
    FALLBACK_CHAT_TEMPLATE,
    Segments,
    chat_segments,
    has_chat_template,
    instruction_messages,
    instruction_segments,
    normalize_messages,
)
from deltatune.utils.errors import ConfigError, DataError, did_you_mean

IGNORE_INDEX = -100
LM_FORMATS = ("text", "instruction", "chat")


# Common column names read without a ``columns`` entry: GLUE's single sentences and sentence
# pairs, ShareGPT conversations. Only used when the canonical name itself is absent.
ALIASES = {"text": ("sentence", "sentence1"), "text_pair": ("sentence2",), "messages": ("conversations",)}


def field_name(name: str, columns: dict[str, str], data: dict[str, Any] | None = None) -> str:
    """The record key that holds canonical field ``name``: ``columns[name]`` if mapped, else
    ``name``, else (given the record ``data``) the first alias present in it."""
    if name in columns:
        return columns[name]
    if data is not None and name not in data:
        for alias in ALIASES.get(name, ()):
            if alias in data:
                return alias
    return name


def detect_format(record: Record, columns: dict[str, str]) -> str:
    """Guess the format from one record's keys: messages → chat; instruction+output or
    prompt+response → instruction; label → classification; text → text."""
    keys = record.data or {}

    def has(f: str) -> bool:
        return field_name(f, columns, keys) in keys

    if has("messages"):
        return "chat"
    if (has("instruction") and has("output")) or (has("prompt") and has("response")):
        return "instruction"
    if has("label"):
        return "classification"
    if has("text"):
        return "text"
    raise DataError(
        f"{record.origin}: cannot tell the data format from the keys {sorted(keys)}; expected 'text' (language modelling), "
        "'instruction'+'output' or 'prompt'+'response' (instruction), 'messages' (chat) or 'text'+'label' "
        "(classification); set data.format, and data.columns to map your column names"
    )


def resolve_template(config: DataConfig, tokenizer: Any, fmt: str) -> str:
    """The template actually used: ``chat`` (tokenizer's), ``fallback-chat``, ``alpaca``, ``plain`` or ``none``."""
    if fmt == "chat":
        if config.template in ("alpaca", "plain"):
            raise ConfigError(f"data.template {config.template!r} renders instruction data; chat data needs template auto or chat")
        return "chat" if has_chat_template(tokenizer) else "fallback-chat"
    if fmt == "instruction":
        if config.template == "chat" and not has_chat_template(tokenizer):
            raise ConfigError("data.template is 'chat' but the tokenizer has no chat_template; use template: alpaca or plain")
        if config.template == "auto":
            return "chat" if has_chat_template(tokenizer) else "alpaca"
        return config.template
    return "none"


class LabelMap:
    """Class labels → ids with a stable order.

    ``label_names`` given: a string is its index there, an int (or int-like string) is an index.
    Otherwise: all-integer labels (ints, bools, ``"0"``/``"1"`` strings from TSV) are used as
    ids; string labels get ids in sorted order of the unique values, so the mapping does not
    depend on file order.
    """

    def __init__(self, names: list[str] | None, num_labels: int):
        self.names = names
        self.num_labels = num_labels

    @classmethod
    def from_values(cls, values: Iterable[Any], label_names: list[str] | None) -> LabelMap:
        if label_names is not None:
            return cls(list(label_names), len(label_names))
        ints: set[int] = set()
        strings: set[str] = set()
        for v in values:
            as_int = _as_int(v)
            if as_int is not None:
                ints.add(as_int)
            elif isinstance(v, str):
                strings.add(v.strip())
        if strings and ints:
            raise DataError(
                f"labels mix integers {sorted(ints)[:5]} and strings {sorted(strings)[:5]}; "
                "use one kind, or set data.label_names to fix the order"
            )
        if strings:
            names = sorted(strings)
            return cls(names, len(names))
        return cls(None, max(ints) + 1 if ints else 0)

    def to_id(self, value: Any, origin: str) -> int:
        if isinstance(value, str) and self.names is not None and value.strip() in self.names:
            return self.names.index(value.strip())
        as_int = _as_int(value)
        if as_int is None:
            if isinstance(value, str) and self.names is not None:
                raise DataError(f"{origin}: unknown label {value!r}{did_you_mean(value, self.names)}; expected one of {self.names}")
            raise DataError(f"{origin}: label must be an integer or a string, found {type(value).__name__} {value!r}")
        if as_int < 0 or (self.num_labels and as_int >= self.num_labels):
            raise DataError(f"{origin}: label {as_int} is outside 0..{self.num_labels - 1}; set data.label_names to declare all classes")
        return as_int


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def encode_segments(tokenizer: Any, segments: Segments, *, add_special_tokens: bool) -> tuple[list[int], list[bool]]:
    """Tokenize ``"".join(texts)`` once; a token is trained if its characters overlap a trained segment.

    Tokenizing the joined string (not the pieces) gives exactly the tokens the model sees at
    inference; a token that straddles the prompt/response boundary counts as response.
    Special tokens the tokenizer adds itself (BOS, [CLS]/[SEP]; empty offsets) are never
    trained. Without offsets (a slow tokenizer) each segment is tokenized on its own and
    concatenated, with the BOS token first if ``add_special_tokens``.
    """
    full = "".join(text for text, _ in segments)
    spans, pos = [], 0
    for text, trained in segments:
        if trained and text:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    if getattr(tokenizer, "is_fast", False):
        # verbose=False: no "longer than model_max_length" warning; max_length is checked by the caller.
        enc = tokenizer(full, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        trained = [e > s and any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return ids, trained
    ids: list[int] = []
    mask: list[bool] = []
    if add_special_tokens and getattr(tokenizer, "bos_token_id", None) is not None:
        ids, mask = [tokenizer.bos_token_id], [False]
    for text, flag in segments:
        piece = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []
        ids += piece
        mask += [flag] * len(piece)
    return ids, mask


class ExampleEncoder:
    """``encoder(record) -> (example, truncated)`` for one format; raises DataError on bad records."""

    def __init__(self, config: DataConfig, tokenizer: Any, fmt: str, label_map: LabelMap | None = None):
        if fmt == "classification" and label_map is None:
            raise ValueError("classification needs a LabelMap")
        self.config = config
        self.tokenizer = tokenizer
        self.format = fmt
        self.template = resolve_template(config, tokenizer, fmt)
        self.label_map = label_map
        self.columns = dict(config.columns)

    def __call__(self, record: Record) -> tuple[dict[str, Any], bool]:
        if record.error is not None:
            raise DataError(record.error)
        if self.format == "classification":
            return self._classification(record)
        if self.format == "text":
            segments, add_special = [(self._text(record, "text"), True)], True
        elif self.format in ("instruction", "chat"):
            segments, add_special = self._conversation_segments(record)
        else:
            raise ConfigError(f"unknown data format {self.format!r}; expected one of {', '.join(LM_FORMATS)}, classification")
        return self._lm_example(record, segments, add_special)

    def _conversation_segments(self, record: Record) -> tuple[Segments, bool]:
        """Segments of an instruction or chat record, and whether tokenizing adds special tokens."""
        if self.format == "instruction":
            return self._instruction(record)
        messages = normalize_messages(self._get(record, "messages"), record.origin)
        return self._chat(messages, record.origin), False

    def generation_example(self, record: Record) -> dict[str, Any]:
        """``{"prompt", "response", "add_special_tokens"}`` for scoring generations of ``record``.

        ``prompt`` is exactly the text training puts before the first trained token (template
        and all), so a model is evaluated on the input it was trained on; ``response`` is the
        reference answer (the last assistant turn for chat data).
        """
        if record.error is not None:
            raise DataError(record.error)
        if self.format not in ("instruction", "chat"):
            raise ConfigError(f"generation needs instruction or chat data with a reference answer, not {self.format!r}")
        segments, add_special = self._conversation_segments(record)
        first = next((i for i, (_, trained) in enumerate(segments) if trained), len(segments))
        prompt = "".join(text for text, _ in segments[:first])
        if self.format == "chat":
            messages = normalize_messages(self._get(record, "messages"), record.origin)
            response = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        else:
            data = record.data or {}
            key = "output" if field_name("instruction", self.columns) in data or field_name("prompt", self.columns) not in data else "response"
            response = self._text(record, key)
        return {"prompt": prompt, "response": response, "add_special_tokens": add_special}

    # ------------------------------------------------------------ fields

    def _get(self, record: Record, name: str, required: bool = True) -> Any:
        data = record.data or {}
        key = field_name(name, self.columns, data)
        if key in data and data[key] is not None:
            return data[key]
        # An optional field the user mapped explicitly must exist: a typo in data.columns would
        # otherwise silently drop it (e.g. text_pair). A null optional value is just absent.
        if not required and (key in data or name not in self.columns):
            return None
        if name in self.columns:
            hint = f" (data.columns.{name}){did_you_mean(key, data)}"
        else:
            hint = f"; map one of your columns to it with data.columns.{name}"
        what = "is null" if key in data else "is missing"
        raise DataError(f"{record.origin}: field {key!r} {what}; found keys {sorted(data)}{hint}")

    def _text(self, record: Record, name: str, required: bool = True, allow_empty: bool = False) -> str:
        value = self._get(record, name, required)
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # numeric answers (e.g. "42") are text too
        if not isinstance(value, str):
            key = field_name(name, self.columns, record.data)
            raise DataError(f"{record.origin}: field {key!r} must be a string, found {type(value).__name__}")
        if not allow_empty and not value.strip():
            key = field_name(name, self.columns, record.data)
            raise DataError(f"{record.origin}: field {key!r} is empty; expected non-empty text")
        return value

    # ------------------------------------------------------------ formats

    def _instruction(self, record: Record) -> tuple[Segments, bool]:
        data = record.data or {}
        if field_name("instruction", self.columns) in data or field_name("prompt", self.columns) not in data:
            instruction = self._text(record, "instruction")
            input_text = self._text(record, "input", required=False, allow_empty=True)
            response = self._text(record, "output")
        else:
            instruction, input_text = self._text(record, "prompt"), ""
            response = self._text(record, "response")
        if self.template in ("alpaca", "plain"):
            return instruction_segments(instruction, input_text, response, self.template), True
        system = self._text(record, "system", required=False, allow_empty=True) or None
        return self._chat(instruction_messages(instruction, input_text, response, system), record.origin), False

    def _chat(self, messages: list[dict[str, str]], origin: str) -> Segments:
        template = None if self.template == "chat" else FALLBACK_CHAT_TEMPLATE
        return chat_segments(self.tokenizer, messages, origin, template)

    def _lm_example(self, record: Record, segments: Segments, add_special: bool) -> tuple[dict[str, Any], bool]:
        ids, trained = encode_segments(self.tokenizer, segments, add_special_tokens=add_special)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        # Text/instruction examples end with EOS so packed examples are separated and the model
        # learns to stop; chat templates already end each assistant turn with their own marker.
        if self.config.add_eos and self.format != "chat" and self.template in ("none", "alpaca", "plain") and eos is not None:
            if not ids or ids[-1] != eos:
                ids, trained = ids + [eos], trained + [segments[-1][1]]
        if self.config.train_on_prompt:
            trained = [True] * len(ids)
        labels = [t if flag else IGNORE_INDEX for t, flag in zip(ids, trained)]
        max_len = self.config.max_length
        truncated = len(ids) > max_len
        if truncated:
            if not self.config.truncation:
                raise DataError(
                    f"{record.origin}: example has {len(ids)} tokens, more than max_length={max_len}; "
                    "raise data.max_length or set data.truncation: true"
                )
            ids, labels = ids[:max_len], labels[:max_len]
        # Position 0 is never a target (the loss shifts by one), so it does not count.
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            if truncated:
                prompt_len = next((i for i, f in enumerate(trained) if f), len(trained))
                raise DataError(
                    f"{record.origin}: no response tokens left after truncating to max_length={max_len} "
                    f"(the prompt alone has {prompt_len} tokens); raise data.max_length"
                )
            raise DataError(f"{record.origin}: the response is empty after tokenization; expected at least one response token")
        return {"input_ids": ids, "labels": labels}, truncated

    def _classification(self, record: Record) -> tuple[dict[str, Any], bool]:
        text = self._text(record, "text")
        pair = self._text(record, "text_pair", required=False, allow_empty=True) or None
        label = self.label_map.to_id(self._get(record, "label"), record.origin)
        max_len = self.config.max_length
        enc = self.tokenizer(text, pair, verbose=False)
        truncated = len(enc["input_ids"]) > max_len
        if truncated:
            if not self.config.truncation:
                raise DataError(
                    f"{record.origin}: example has {len(enc['input_ids'])} tokens, more than max_length={max_len}; "
                    "raise data.max_length or set data.truncation: true"
                )
            enc = self.tokenizer(text, pair, truncation=True, max_length=max_len)
        example = {k: list(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        example["label"] = label
        return example, truncated
