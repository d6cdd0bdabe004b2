"""lm-evaluation-harness runs a deltatune model (a base + a delta, merged or not) on a local task, offline."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune
from tests.helpers import randomize_delta, save_tiny_lm

pytest.importorskip("lm_eval")

QUESTIONS = ["one two three", "the cat sat", "what is two", "four five six", "seven eight", "nine one two", "the mat", "is it",
             "two plus two", "cat and mat", "five six seven", "three four"]
TASK = """task: deltatune_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} is"
doc_to_choice: [" one", " two"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    lm = save_tiny_lm(root / "lm")
    model = deltatune.attach(deltatune.load_model(lm, task="causal-lm"), {"method": "lora", "r": 4, "targets": "all-linear"})
    randomize_delta(model, std=0.5)
    model.save_delta(root / "delta")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "label": i % 2}) + "\n" for i, q in enumerate(QUESTIONS)))
    (root / "tasks").mkdir()
    (root / "tasks" / "yesno.yaml").write_text(TASK.format(data=data))
    return root, lm


def expected_accuracy(model, tok) -> float:
    """lm-eval's multiple-choice rule by hand: the choice with the highest summed log-likelihood after the context."""
    hits = 0
    for i, question in enumerate(QUESTIONS):
        context = tok(question + " is")["input_ids"]
        scores = []
        for choice in (" one", " two"):
            whole = tok(question + " is" + choice)["input_ids"]
            cont = whole[len(context):]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(logp[len(context) + j - 1, t]) for j, t in enumerate(cont)))
        hits += int(max(range(2), key=lambda c: scores[c]) == i % 2)
    return hits / len(QUESTIONS)


def test_lm_eval_scores_the_model_with_its_delta_merged_or_not(setup, monkeypatch):
    from deltatune.evaluation.harness import run_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, lm = setup
    tok = deltatune.load_tokenizer(lm)
    tuned = deltatune.load_delta(deltatune.load_model(lm, task="causal-lm"), root / "delta")
    base_acc, tuned_acc = expected_accuracy(deltatune.load_model(lm, task="causal-lm"), tok), expected_accuracy(tuned, tok)
    results = {}
    for name, deltas, merge in (("base", None, False), ("delta", [str(root / "delta")], False), ("merged", [str(root / "delta")], True)):
        results[name] = run_tasks(str(lm), deltas, ["deltatune_yesno"], include_path=str(root / "tasks"), batch_size=4, merge=merge,
                                  include_defaults=False)["deltatune_yesno"]["acc,none"]
    assert results["base"] == pytest.approx(base_acc) and results["delta"] == pytest.approx(tuned_acc) and results["merged"] == pytest.approx(tuned_acc)
    assert base_acc != tuned_acc  # the delta changed the answers, so the numbers above tell base and delta apart

    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "deltatune", "eval", "--model", str(lm), "--adapter", str(root / "delta"), "--lm-eval-task",
                        "deltatune_yesno", "--lm-eval-include", str(root / "tasks"), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["lm_eval"]["deltatune_yesno"]["acc,none"] == pytest.approx(tuned_acc)


def test_unknown_task_and_missing_delta_are_one_line_errors(setup):
    from deltatune.evaluation.harness import run_tasks
    from deltatune.utils.errors import ConfigError

    root, lm = setup
    with pytest.raises(ConfigError, match="task 'no_such_task' is not known"):
        run_tasks(str(lm), None, ["no_such_task"], include_path=str(root / "tasks"), include_defaults=False)
    with pytest.raises(ConfigError, match="does not exist"):
        run_tasks(str(lm), [str(root / "missing")], ["deltatune_yesno"], include_path=str(root / "tasks"), include_defaults=False)
