"""Generated tasks with exactly checkable answers (the default training job's data)."""
from deltatune.tasks.numbers import (
    DEFAULT_TASK,
    TASK_NAMES,
    make_number_task,
    number_to_words,
    parse_task_names,
    write_jsonl,
)

__all__ = [
    "DEFAULT_TASK",
    "TASK_NAMES",
    "make_number_task",
    "number_to_words",
    "parse_task_names",
    "write_jsonl",
]
