"""The deltatune command run as a user runs it: in a subprocess, checking output and exit codes."""
import os
import subprocess
import sys

import pytest

import deltatune


def cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "deltatune", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def model_dir(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_inspect_tiny(model_dir):
    r = cli("inspect", "--model", str(model_dir))
    assert r.returncode == 0, r.stderr
    assert "parameters:" in r.stdout and "load time:" in r.stdout
    assert "LoRA can target (nn.Linear, 'all-linear' selects all of them): down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in r.stdout
    assert "output head (excluded from all-linear): lm_head" in r.stdout


def test_missing_model_one_line_error():
    r = cli("inspect", "--model", "does/not/exist/here")
    assert r.returncode == 2
    assert r.stderr.startswith("error: model 'does/not/exist/here' not found")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_adapter_for_other_base(model_dir, tiny_bert_cls, tmp_path):
    deltatune.attach(tiny_bert_cls, {"method": "lora"}).save_delta(tmp_path / "bert-delta")
    r = cli("generate", "--model", str(model_dir), "--adapter", str(tmp_path / "bert-delta"), "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "which LlamaForCausalLM does not have" in r.stderr and "another base model" in r.stderr


@pytest.mark.slow
def test_generate_real_model_greedy_and_chat(tmp_path):
    r = cli("generate", "--model", "smollm2-135m-instruct", "--chat", "What is the capital of France?", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r2 = cli("generate", "--model", "smollm2-135m-instruct", "--prompt", "1, 2, 3, 4,", "--max-new-tokens", "8",
             "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--no-stream")
    r3 = cli("generate", "--model", "smollm2-135m-instruct", "--prompt", "1, 2, 3, 4,", "--max-new-tokens", "8",
             "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--no-stream")
    assert r2.returncode == 0 and r2.stdout == r3.stdout and r2.stdout.strip()


@pytest.mark.slow
def test_inspect_real_model_reports_fast_cached_load():
    cli("inspect", "--model", "smollm2-135m-instruct")  # first run may convert the GGUF
    r = cli("inspect", "--model", "smollm2-135m-instruct")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("load time:"))
    assert "LlamaForCausalLM" in r.stdout and "134,515,008" in r.stdout
    assert float(line.split()[2]) < 3.0, line


def test_train_print_config_and_unknown_override():
    r = cli("train", "--print-config", "train.max_steps=7")
    assert r.returncode == 0, r.stderr
    assert "max_steps: 7" in r.stdout and "method: lora" in r.stdout and "task: addition" in r.stdout
    r = cli("train", "optim.learning_rate=0.1")
    assert r.returncode == 2 and r.stderr.startswith("error: <built-in recipe>: unknown key 'optim.learning_rate'")


def test_eval_command_with_adapter(tmp_path):
    import json

    from tests.helpers import greedy_answers, randomize_delta, save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "lm")
    tokenizer = deltatune.load_tokenizer(model_dir)
    model = deltatune.attach(deltatune.load_model(model_dir), {"method": "lora", "r": 2})
    randomize_delta(model, std=0.1)
    model.save_delta(tmp_path / "ad")
    prompts = ["1+2=", "2+2="]
    # References: the adapter's own greedy answers, computed here one prompt at a time.
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=2)
    with model.disable():
        base_answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=2)
    assert all(a != b for a, b in zip(answers, base_answers))  # the adapter changes every answer
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": a}) + "\n" for p, a in zip(prompts, answers)))
    r = cli("eval", "--model", str(model_dir), "--adapter", str(tmp_path / "ad"), "--data", str(data),
            "--template", "plain", "--metric", "exact_match", "--max-new-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    tuned = json.loads(r.stdout.strip().splitlines()[-1])
    base = tuned["base_task"]  # the same data scored with the delta disabled
    assert (tuned["n"], tuned["exact_match"], base["exact_match"]) == (2, 1.0, 0.0)
    assert tuned["loss"] < base["loss"]  # the references are the adapter's likeliest tokens
