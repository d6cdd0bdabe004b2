"""The training loop on tiny models built in code: loss goes down, files are written, accumulation,
resume after a hard kill and data parallelism give the same losses."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import deltatune
from deltatune.train.config import load_recipe
from deltatune.train.loop import train
from tests.helpers import greedy_exact_match, save_tiny_bert, save_tiny_lm, write_constant_answer_task


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm")


def lm_recipe(lm_dir, tmp_path, name="run", **overrides):
    text = textwrap.dedent(f"""\
        model:
          name: {lm_dir}
        delta:
          method: lora
          r: 4
          alpha: 8
          targets: all-linear
        generate:
          task: addition
          n_train: 96
          n_eval: 16
          digits: 2
        data:
          template: plain
        optim:
          lr: 0.01
        train:
          max_steps: 12
          batch_size: 8
          log_every: 1
          progress: false
        eval:
          metric: exact_match
          max_new_tokens: 4
        output:
          dir: {tmp_path}
          name: {name}
        """)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path, [f"{k}={v}" for k, v in overrides.items()]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_lm_run_writes_everything_and_learns(lm_dir, tmp_path):
    path, over = lm_recipe(lm_dir, tmp_path, **{"eval.before_training": "true"})
    result = train(load_recipe(path, over))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml", "cost.json", "data", "loss.png", "metrics.jsonl", "summary.json"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval_loss" in rows[0]  # before-training eval
    first = next(r for r in rows if "loss" in r)
    assert {"step", "loss", "lr", "tokens_per_s", "peak_rss_mb"} <= set(first) and first["peak_rss_mb"] > 0
    assert result["after"]["loss"] < result["before"]["loss"]
    base = deltatune.load_model(lm_dir)
    model = deltatune.load_delta(base, run / "adapter")
    assert model.delta_configs["default"].r == 4
    assert "loss:" not in (run / "config.yaml").read_text() and "max_steps: 12" in (run / "config.yaml").read_text()


def test_reported_exact_match_is_the_saved_adapters(lm_dir, tmp_path):
    train_path, eval_path, rows = write_constant_answer_task(tmp_path)
    path, over = lm_recipe(lm_dir, tmp_path, **{"eval.before_training": "true", "generate": "null",
                                                "data.path": train_path, "data.eval_path": eval_path})
    result = train(load_recipe(path, over))
    # Scored independently: the saved adapter's greedy answers, one prompt at a time. It learned to
    # answer "7", which half the references are; the untrained delta answers none.
    model = deltatune.load_delta(deltatune.load_model(lm_dir), tmp_path / "run" / "adapter")
    assert result["after"]["exact_match"] == greedy_exact_match(model, deltatune.load_tokenizer(lm_dir), rows, max_new_tokens=4) == 0.5
    assert result["before"]["exact_match"] == 0.0


def test_grad_accumulation_equals_big_batch(lm_dir, tmp_path):
    a, oa = lm_recipe(lm_dir, tmp_path, "big", **{"train.max_steps": 4})
    b, ob = lm_recipe(lm_dir, tmp_path, "accum", **{"train.max_steps": 4, "train.batch_size": 4, "train.grad_accum": 2})
    train(load_recipe(a, oa))
    train(load_recipe(b, ob))
    la, lb = losses(tmp_path / "big"), losses(tmp_path / "accum")
    assert la.keys() == lb.keys()
    for step in la:
        assert abs(la[step] - lb[step]) < 1e-5, step


KILL_DRIVER = """
import os, signal, sys
from deltatune.train import checkpoint
from deltatune.train.config import load_recipe
from deltatune.train.loop import train
original = checkpoint.save_checkpoint
def save_then_die(run_dir, step, *args, **kwargs):
    if step == int(sys.argv[3]):  # die while writing: the temp dir exists, the rename never happens
        import deltatune.train.checkpoint as c
        real_save_file = c.save_file
        c.save_file = lambda *a, **k: (real_save_file(*a, **k), os.kill(os.getpid(), signal.SIGKILL))
    out = original(run_dir, step, *args, **kwargs)
    if step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill right after the checkpoint, no clean exit
    return out
checkpoint.save_checkpoint = save_then_die
train(load_recipe(sys.argv[1], []))
"""


@pytest.mark.parametrize("die_during_write", [False, True])
def test_resume_after_kill_matches_uninterrupted(lm_dir, tmp_path, die_during_write):
    full, fo = lm_recipe(lm_dir, tmp_path, "full", **{"train.save_every": 6, "model.name": lm_dir})
    train(load_recipe(full, fo))

    cut, _ = lm_recipe(lm_dir, tmp_path, "cut")
    text = cut.read_text().replace("progress: false", "progress: false\n  save_every: 3")
    cut.write_text(text)
    # Die right after the step-3 checkpoint, or in the middle of writing the step-6 one.
    kill_after, kill_during = ("999", "6") if die_during_write else ("3", "999")
    if die_during_write:
        cut.write_text(text.replace("max_steps: 12", "max_steps: 12\n  keep_last: 5"))
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(cut), kill_after, kill_during], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000003"]  # a half-written checkpoint never takes a real name
    r = subprocess.run([sys.executable, "-m", "deltatune", "train", str(cut), "--resume", str(tmp_path / "cut")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lf, lc = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(lc) == list(range(1, 13))
    for step in lf:
        assert abs(lf[step] - lc[step]) < 1e-6, (step, lf[step], lc[step])


def test_classification_run(tmp_path):
    model_dir = save_tiny_bert(tmp_path / "bert")
    rows = ["text\tlabel"] + [f"{'cat sat on the mat' if i % 2 else 'dog is the one'} {i % 7}\t{'pos' if i % 2 else 'neg'}" for i in range(64)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    recipe = tmp_path / "cls.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{name: {model_dir}, task: sequence-classification}}
        delta: {{method: lora, r: 4, targets: [query, value]}}
        data: {{path: {tmp_path / 'train.tsv'}, eval_fraction: 0.25}}
        optim: {{lr: 0.01}}
        train: {{max_steps: 30, batch_size: 8, progress: false}}
        output: {{dir: {tmp_path}, name: cls}}
        """))
    result = train(load_recipe(recipe))
    assert result["after"]["accuracy"] == 1.0 and result["after"]["macro_f1"] == 1.0
    saved = json.loads((tmp_path / "cls" / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"] and saved["task_type"] == "SEQ_CLS"


def test_bad_record_reported_by_cli(lm_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "respons": "4"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {lm_dir}}}\ndata: {{path: {data}}}\noutput: {{dir: {tmp_path}}}\n")
    r = subprocess.run([sys.executable, "-m", "deltatune", "train", str(recipe)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{data}:2:" in r.stderr and "'response' is missing" in r.stderr


@pytest.mark.slow
def test_two_processes_match_one(lm_dir, tmp_path):
    one, o1 = lm_recipe(lm_dir, tmp_path, "one", **{"train.max_steps": 5})
    train(load_recipe(one, o1))
    two, _ = lm_recipe(lm_dir, tmp_path, "two")
    two.write_text(two.read_text().replace("max_steps: 12", "max_steps: 5"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        "-m", "deltatune", "train", str(two)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert l1.keys() == l2.keys()
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-5, (step, l1[step], l2[step])
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())


def test_early_stopping(lm_dir, tmp_path):
    # lr 0: the eval metric never improves, so patience 2 stops the run at the third evaluation.
    path, over = lm_recipe(lm_dir, tmp_path, "early", **{"optim.lr": "1e-12", "train.eval_every": 2,
                                                        "train.early_stopping_patience": 2, "eval.metric": "loss"})
    result = train(load_recipe(path, over))
    assert result["step"] == 6
    evals = [json.loads(line) for line in (tmp_path / "early" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [e["step"] for e in evals] == [2, 4, 6, 6]


def test_full_finetune_saves_a_model(lm_dir, tmp_path):
    path, over = lm_recipe(lm_dir, tmp_path, "full-ft", **{"train.max_steps": 3, "optim.lr": "1e-3"})
    text = path.read_text().replace("delta:\n  method: lora\n  r: 4\n  alpha: 8\n  targets: all-linear\n", "delta: null\n")
    path.write_text(text)
    result = train(load_recipe(path, over))
    saved = tmp_path / "full-ft" / "model"
    assert result["adapter"] == str(saved) and (saved / "model.safetensors").is_file()
    tuned, base = deltatune.load_model(saved), deltatune.load_model(lm_dir)
    changed = [n for (n, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert len(changed) == len(list(base.named_parameters()))  # every weight was trained


@pytest.mark.slow
def test_torch_compile_matches_eager(lm_dir, tmp_path):
    """`train.compile: true` runs the objective through torch.compile (inductor needs a C compiler)
    and must not change what is learned: same losses as eager within float tolerance."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    eager, oe = lm_recipe(lm_dir, tmp_path, "eager", **{"train.max_steps": 3})
    compiled, oc = lm_recipe(lm_dir, tmp_path, "compiled", **{"train.max_steps": 3, "train.compile": "true"})
    train(load_recipe(eager, oe))
    train(load_recipe(compiled, oc))
    le, lc = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert le.keys() == lc.keys() and len(le) == 3
    for step in le:
        assert abs(le[step] - lc[step]) < 1e-4 * max(1.0, abs(le[step])), step
