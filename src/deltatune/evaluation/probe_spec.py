"""The retention probes of ``deltatune eval --probes probes.yaml``, as a validated YAML file.

```yaml
in_context:                      # few-shot classification on tasks the run did not train on
  - name: sst2
    test: ../shared/data/sst2/validation.tsv
    train: ../shared/data/sst2/train.tsv
    text: sentence               # column names
    label: label
    verbalizers: [" negative", " positive"]
    template: "Review: {text}\\nSentiment:"
    shots: 4
    limit: 100                   # test rows scored
knowledge: facts.jsonl           # cloze facts {"prompt", "answer"}; only those the base gets right count
```

Each probe is scored on the tuned model and on its base with the same prompts; the record holds
both and their difference. Paths are relative to the YAML file.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path

from pydantic import Field

from deltatune.core.config import StrictConfig
from deltatune.core.recipe_file import read_recipe_file, validate_recipe
from deltatune.data.sources import read_records
from deltatune.evaluation.probes import ClassificationProbe, cloze_precision_at_1, few_shot_accuracy, known_facts
from deltatune.evaluation.retention import base_context
from deltatune.utils.errors import DataError


class InContextProbeSpec(StrictConfig):
    name: str
    test: str
    train: str
    text: str = "text"
    label: str = "label"
    verbalizers: list[str] = Field(min_length=2)
    template: str = "{text}\nAnswer:"
    shots: int = Field(4, ge=0)
    limit: int = Field(100, gt=0)
    seed: int = 0


class ProbeSpec(StrictConfig):
    in_context: list[InContextProbeSpec] = []
    knowledge: str | None = None


def load_probe_spec(path: str | Path) -> tuple[ProbeSpec, Path]:
    data, lines = read_recipe_file(path, "probe file", "in_context, knowledge")
    return validate_recipe(ProbeSpec, data, str(path), lines), Path(path).resolve().parent


def table(path: Path, limit: int) -> list[dict]:
    """The first ``limit`` records of a data file as dicts; a malformed record is an error naming its line."""
    rows = []
    for record in islice(read_records(path), limit):
        if record.error is not None:
            raise DataError(record.error)
        rows.append({**record.data, "_origin": record.origin})
    return rows


def _rows(path: Path, text: str, label: str, limit: int, where: str) -> list[dict]:
    rows = []
    for record in table(path, limit):
        try:
            rows.append({"text": str(record[text]), "label": int(record[label])})
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{record['_origin']}: needs a {text!r} column and an integer {label!r} column ({where})") from None
    return rows


def build_probe(spec: InContextProbeSpec, root: Path) -> ClassificationProbe:
    where = f"probe {spec.name!r}"
    test = _rows(root / spec.test, spec.text, spec.label, spec.limit, where)
    train = _rows(root / spec.train, spec.text, spec.label, max(spec.shots * 50, 200), where)
    return ClassificationProbe(spec.name, test, train, spec.verbalizers, spec.template, spec.shots, spec.seed)


def run_probes(model, tokenizer, path: str | Path) -> dict:
    """``{"in_context": {name: {accuracy, base_accuracy, forgetting}}, "knowledge": {...}}`` for a DeltaModel."""
    spec, root = load_probe_spec(path)
    out: dict = {"in_context": {}}
    for probe_spec in spec.in_context:
        probe = build_probe(probe_spec, root)
        tuned = few_shot_accuracy(model, tokenizer, probe)
        with base_context(model) as base:
            reference = few_shot_accuracy(base, tokenizer, probe)
        out["in_context"][probe.name] = {"accuracy": tuned["accuracy"], "base_accuracy": reference["accuracy"],
                                         "forgetting": reference["accuracy"] - tuned["accuracy"], "n": tuned["n"], "shots": tuned["shots"]}
    if spec.knowledge:
        candidates = [{k: v for k, v in r.items() if k != "_origin"} for r in table(root / spec.knowledge, 10**6)]
        with base_context(model) as base:
            facts = known_facts(base, tokenizer, candidates)
        kept = cloze_precision_at_1(model, tokenizer, facts)["precision_at_1"] if facts else None
        out["knowledge"] = {"candidates": len(candidates), "known_by_base": len(facts), "precision_at_1": kept,
                            "forgetting": None if kept is None else 1.0 - kept}
    return out
