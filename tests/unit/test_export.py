"""Export of merged tiny models: HF directories and GGUF files load back with the same outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import deltatune
from deltatune.cli.main import main
from deltatune.export import export_gguf, export_hf
from deltatune.export.gguf import permute_qk
from deltatune.utils.errors import ConfigError, DeltatuneError
from tests.helpers import randomize_delta, save_tiny_lm, tiny_bert_config, tiny_llama_config


def bpe_tokenizer():
    """A tiny byte-level BPE tokenizer (the kind GGUF's ``gpt2`` tokenizer model describes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "a dog and a cat ran to the mat"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tuned_llama(**config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**config)).eval()
    dm = deltatune.attach(model, {"method": "lora", "r": 4, "targets": "all-linear"})
    randomize_delta(dm, std=0.05)
    return dm


IDS = torch.tensor([[3, 17, 42, 5, 99, 7, 8], [1, 2, 3, 4, 5, 6, 7]])


def test_hf_export_matches_base_plus_delta_and_leaves_model_unchanged(tmp_path):
    from transformers import AutoModelForCausalLM

    dm = tuned_llama()
    with torch.no_grad():
        expected = dm(input_ids=IDS).logits
        with dm.disable():
            assert (dm(input_ids=IDS).logits - expected).abs().max() > 0.01  # the delta matters
    export_hf(dm, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=IDS).logits, expected, atol=1e-5)
        assert torch.allclose(dm(input_ids=IDS).logits, expected, atol=1e-5)
    assert dm.merged == [] and dm.active == ["default"]
    assert not any("lora" in k or "base_layer" in k for k in reloaded.state_dict())


def test_hf_export_of_an_encoder_with_ia3(tmp_path):
    from transformers import AutoModel, BertModel

    torch.manual_seed(0)
    dm = deltatune.attach(BertModel(tiny_bert_config()).eval(), {"method": "ia3"})
    randomize_delta(dm, std=0.3)
    with torch.no_grad():
        expected = dm(input_ids=IDS).last_hidden_state
    export_hf(dm, tmp_path / "bert", dtype="float32")
    reloaded = AutoModel.from_pretrained(str(tmp_path / "bert"))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=IDS).last_hidden_state, expected, atol=1e-5)


def test_hf_export_float16_writes_half_weights(tmp_path):
    from safetensors import safe_open

    export_hf(tuned_llama(), tmp_path / "h", dtype="float16")
    with safe_open(str(tmp_path / "h" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


@pytest.mark.parametrize("dtype,atol", [("f32", 1e-5), ("f16", 5e-3)])
def test_gguf_export_loads_back_in_transformers(tmp_path, dtype, atol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = bpe_tokenizer()
    dm = tuned_llama(vocab_size=320, tie_word_embeddings=True)
    with torch.no_grad():
        expected = dm(input_ids=IDS).logits
    export_gguf(dm, tmp_path / "m.gguf", tokenizer=tokenizer, dtype=dtype)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        diff = (reloaded(input_ids=IDS).logits - expected).abs().max().item()
    assert diff < atol, diff
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert tok2("the cat sat on a mat")["input_ids"] == tokenizer("the cat sat on a mat")["input_ids"]


def test_gguf_export_copies_tokenizer_fields_from_a_source_gguf(tmp_path):
    from gguf import GGUFReader

    dm = tuned_llama(vocab_size=320, tie_word_embeddings=False)
    export_gguf(dm, tmp_path / "a.gguf", tokenizer=bpe_tokenizer())
    export_gguf(dm, tmp_path / "b.gguf", source_gguf=tmp_path / "a.gguf")
    a, b = GGUFReader(str(tmp_path / "a.gguf")), GGUFReader(str(tmp_path / "b.gguf"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id"):
        assert a.fields[key].contents() == b.fields[key].contents(), key
    assert "output.weight" in {t.name for t in b.tensors}  # untied head is stored


def test_permute_qk_is_inverted_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).normal(size=(2 * 16, 12)).astype(np.float32)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    back = proc.process(permute_qk(w, 2), "blk.0.attn_k.weight").weights
    assert np.array_equal(back, w)
    assert not np.array_equal(permute_qk(w, 2), w)


def test_gguf_export_refusals_write_nothing(tmp_path):
    from transformers import BertModel

    out = tmp_path / "x.gguf"
    with pytest.raises(ConfigError, match="llama-family"):
        export_gguf(BertModel(tiny_bert_config()), out, tokenizer=bpe_tokenizer())
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        export_gguf(tuned_llama(), out)
    with pytest.raises(ConfigError, match="byte-level BPE"):
        from tests.helpers import tiny_tokenizer

        export_gguf(tuned_llama(), out, tokenizer=tiny_tokenizer())
    with pytest.raises(ConfigError, match="dtype 'q4'"):
        export_gguf(tuned_llama(), out, tokenizer=bpe_tokenizer(), dtype="q4")
    assert list(tmp_path.iterdir()) == []


def test_non_mergeable_delta_and_tied_head_delta_are_refused(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dm = deltatune.attach(LlamaForCausalLM(tiny_llama_config()).eval(), {"method": "bottleneck"})
    with pytest.raises(DeltatuneError, match="cannot be merged"):
        export_hf(dm, tmp_path / "a")
    torch.manual_seed(0)
    tied = deltatune.attach(LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval(), {"method": "lora", "r": 2, "targets": ["lm_head"]})
    with pytest.raises(DeltatuneError, match="tied to 'model.embed_tokens.weight'"):
        export_hf(tied, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_hf_and_bad_arguments(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_lm(tmp_path / "lm")
    dm = deltatune.attach(deltatune.load_model(str(model_dir)), {"method": "lora", "r": 2, "targets": ["q_proj", "v_proj"]})
    randomize_delta(dm, std=0.05)
    dm.save_delta(str(tmp_path / "adapter"))
    with torch.no_grad():
        expected = dm(input_ids=IDS[:, :5] % 30).logits
    assert main(["export", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--to", "hf", str(tmp_path / "out")]) == 0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))(input_ids=IDS[:, :5] % 30).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    capsys.readouterr()
    assert main(["export", "--model", str(model_dir), "--to", "gguf", str(tmp_path / "out.bin")]) == 2
    assert "must be a file name ending in .gguf" in capsys.readouterr().err
    assert main(["export", "--model", str(model_dir), "--adapter", str(tmp_path / "nope"), "--to", "hf", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "out.bin").exists()
