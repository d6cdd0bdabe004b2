"""Every run writes its cost ledger (runs/<name>/cost.json), and with train.report_to: tensorboard its
log as TensorBoard event files; both checked against what the run itself logged and saved."""
import json
import textwrap

import pytest
from safetensors.torch import load_file

from deltatune.evaluation.ledger import read_ledger
from deltatune.train.config import load_recipe
from deltatune.train.loop import train
from tests.helpers import save_tiny_lm


def recipe(lm_dir, tmp_path, report_to="none"):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""\
        model:
          name: {lm_dir}
        delta:
          method: lora
          r: 4
          targets: all-linear
        generate:
          task: addition
          n_train: 64
          n_eval: 8
          digits: 2
        data:
          template: plain
        train:
          max_steps: 4
          batch_size: 8
          log_every: 1
          progress: false
          report_to: {report_to}
        eval:
          metric: exact_match
          max_new_tokens: 3
        output:
          dir: {tmp_path}
          name: run
        """))
    return load_recipe(path, [])


def test_ledger_numbers_come_from_the_run(tmp_path):
    lm = save_tiny_lm(tmp_path / "lm")
    result = train(recipe(lm, tmp_path, report_to="tensorboard"))
    run = tmp_path / "run"
    ledger = read_ledger(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert ledger["steps"] == 4 and ledger["examples"] == 4 * 8
    assert ledger["tokens"] == pytest.approx(sum(r["tokens_per_s"] * r["step_seconds"] for r in steps), rel=1e-6)
    assert ledger["train_seconds"] == pytest.approx(sum(r["step_seconds"] for r in steps), rel=1e-6)
    assert ledger["stored_params"] == sum(t.numel() for t in saved.values()) == ledger["trainable_params"]
    assert ledger["delta_bytes"] == sum(f.stat().st_size for f in (run / "adapter").iterdir())
    assert ledger["trainable_params"] < ledger["total_params"] and ledger["peak_rss_mb"] > 0
    assert ledger["estimated_flops"] == 4 * ledger["total_params"] * ledger["tokens"] + 2 * ledger["trainable_params"] * ledger["tokens"]
    assert result["cost"] == str(run / "cost.json")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [r["step"] for r in steps]
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert "eval/exact_match" in events.Tags()["scalars"]
