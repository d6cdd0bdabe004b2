"""Export round trips on the real SmolLM2-135M-Instruct: merged logits survive HF and GGUF files."""
from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.cli.main import main
from deltatune.generation import SamplingParams, generate_text
from tests.helpers import randomize_delta

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """SmolLM2 + a LoRA with random (non-zero) weights, saved as an adapter directory."""
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model = deltatune.load_model("smollm2-135m-instruct")
    dm = deltatune.attach(model, {"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj", "down_proj"]})
    randomize_delta(dm, std=0.01, seed=3)
    dm.save_delta(str(path))
    tokenizer = deltatune.load_tokenizer("smollm2-135m-instruct")
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = dm(input_ids=ids).logits
        with dm.disable():
            base_logits = dm(input_ids=ids).logits
    text = generate_text(dm, tokenizer, PROMPT, SamplingParams(max_new_tokens=8))
    return {"adapter": path, "ids": ids, "logits": logits, "base_logits": base_logits, "text": text}


def test_gguf_export_loads_in_transformers_and_deltatune_generate(tuned, tmp_path, monkeypatch, capsys):
    # The delta changes the logits a lot, so agreement below means the merge really was exported.
    assert (tuned["logits"] - tuned["base_logits"]).abs().max() > 0.1
    out = tmp_path / "merged.gguf"
    assert main(["export", "--model", "smollm2-135m-instruct", "--adapter", str(tuned["adapter"]), "--to", "gguf", str(out)]) == 0
    assert out.stat().st_size > 4 * 134_000_000  # f32: ~4 bytes per parameter (tied output head not stored twice)

    # `deltatune generate` loads the file (through transformers' GGUF reader, cached as a HF directory) ...
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", PROMPT, "--max-new-tokens", "8", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == tuned["text"].strip()

    # ... and that converted model is exactly what transformers made of `gguf_file=`: compare its logits.
    from deltatune.models.gguf_cache import converted_dir
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(converted_dir(out)), dtype=torch.float32)
    with torch.no_grad():
        logits = reloaded(input_ids=tuned["ids"]).logits
    assert torch.allclose(logits, tuned["logits"], atol=1e-3, rtol=0), (logits - tuned["logits"]).abs().max()


def test_hf_export_loads_with_transformers(tuned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", "--model", "smollm2-135m-instruct", "--adapter", str(tuned["adapter"]), "--to", "hf", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        logits = model(input_ids=tuned["ids"]).logits
    assert torch.allclose(logits, tuned["logits"], atol=1e-3, rtol=0), (logits - tuned["logits"]).abs().max()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer(PROMPT, return_tensors="pt")["input_ids"].tolist() == tuned["ids"].tolist()
