import pytest

from deltatune.core.targets import select_targets
from deltatune.utils.errors import TargetError


def test_plain_name_matches_suffix(tiny_llama):
    names = select_targets(tiny_llama, ["q_proj", "v_proj"])
    assert names == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]


def test_all_linear_excludes_lm_head(tiny_llama):
    names = select_targets(tiny_llama, "all-linear")
    assert len(names) == 2 * 7
    assert "lm_head" not in names


def test_all_linear_excludes_classifier(tiny_bert_cls):
    names = select_targets(tiny_bert_cls, "all-linear")
    assert "classifier" not in names
    assert "bert.encoder.layer.0.attention.self.query" in names


def test_glob_regex_and_exclude(tiny_llama):
    assert select_targets(tiny_llama, "model.layers.1.mlp.*") == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert select_targets(tiny_llama, r"re:.*layers\.0\..*_proj", exclude=["mlp.*", "re:.*[kv]_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_unknown_target_names_closest(tiny_llama):
    with pytest.raises(TargetError, match=r"'q_prj' matches no module.*closest module names: q_proj"):
        select_targets(tiny_llama, ["q_prj"])


def test_wrong_module_type_is_named(tiny_llama):
    with pytest.raises(TargetError, match=r"'input_layernorm' matches 'model.layers.0.input_layernorm' \(LlamaRMSNorm\).*nn.Linear"):
        select_targets(tiny_llama, "input_layernorm")


def test_bad_regex(tiny_llama):
    with pytest.raises(TargetError, match="not a valid regular expression"):
        select_targets(tiny_llama, "re:(")


def test_exclude_everything(tiny_llama):
    with pytest.raises(TargetError, match="leave no module"):
        select_targets(tiny_llama, "q_proj", exclude=["q_proj"])
