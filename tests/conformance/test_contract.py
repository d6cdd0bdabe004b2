"""Every tool that reads a saved delta goes through its method, for every registered method.

For each method (plus the LoRA options that change what the file means: PiSSA's frozen offset,
incremental rank masks), on a tiny llama and a tiny BERT: attach, randomise, save; then every tool
either gives the same function as the attached delta (logits within 1e-5) or refuses with a
one-line DeltatuneError. Which tools must accept follows from the method's capabilities only:

- serving pool factors (``read_adapter``), LoRA-aware merge (concat, one input): ``low_rank_factors``
  and no ``modules_to_save`` (whole module copies are not low-rank);
- merged export (``export_hf``) and the merge engine's HF output: ``mergeable``, where the merged
  weights keep the base's tensor names (SSF's shift gives a bias-free Linear a bias, which no
  checkpoint of that architecture has a slot for);
- compress (ComPEFT at density 1.0, exact values): ``mergeable`` deltas not already compressed.
"""
import pytest
import torch
from torch import nn
from transformers import AutoConfig

import deltatune
from deltatune.algebra.compress import compress_adapter
from deltatune.algebra.merge import run_merge
from deltatune.algebra.recipe import parse_recipe
from deltatune.core.inject import iter_logical_modules
from deltatune.export import export_hf
from deltatune.export.hf import logical_state_dict
from deltatune.serve.adapter_pool import read_adapter
from tests.conformance.test_methods import ATTACH_ERRORS, METHODS, MODELS, run
from tests.helpers import randomize_delta

# Config variants beyond each method's defaults whose files a tool could misread.
VARIANTS = {"lora-pissa": {"method": "lora", "init": "pissa", "r": 4},
            "lora-incremental": {"method": "lora", "rank_allocation": "incremental", "r": 4, "initial_r": 2}}
CONFIGS = {**{m: {"method": m} for m in METHODS}, **VARIANTS}
TOLERANCE = 1e-5


@pytest.fixture
def batch():
    return {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))}


class Setup:
    """The base saved as a HF directory, and the randomised delta attached to it and saved."""

    def __init__(self, base: nn.Module, config: dict, root, batch):
        self.root, self.batch = root, batch
        self.model_class, self.state = type(base), {k: v.clone() for k, v in base.state_dict().items()}
        base.save_pretrained(root / "base")
        self.model = deltatune.attach(base, config)
        randomize_delta(self.model, std=0.2)
        self.expected = run(self.model, batch)
        self.delta_config = self.model.delta_configs["default"]
        self.method = deltatune.get_method(self.delta_config.method)
        self.model.save_delta(root / "delta")

    def fresh(self) -> nn.Module:
        model = self.model_class(AutoConfig.from_pretrained(self.root / "base")).eval()
        model.load_state_dict(self.state)
        return model

    def check(self, model: nn.Module, tool: str) -> None:
        gap = (run(model, self.batch) - self.expected).abs().max().item()
        assert gap < TOLERANCE, f"{tool}: logits differ from the attached delta by {gap:.2e}"


def accepts(tool, setup: Setup, must_accept: bool):
    """Run ``tool()``; a refusal must be a one-line DeltatuneError, and only where the capabilities allow it."""
    try:
        return tool()
    except deltatune.DeltatuneError as err:
        message = str(err)
        assert not must_accept, f"{setup.method.name} must be accepted, got: {message}"
        assert message.strip() and "\n" not in message, f"refusal is not one line: {message!r}"
        return None


def served(setup: Setup):
    """(a) The serving pool's factors, added to a fresh base's weights."""
    model = setup.fresh()
    weights = {n: m.weight for n, m in iter_logical_modules(model) if isinstance(m, nn.Linear)}
    low_rank = setup.method.capabilities.low_rank_factors and not setup.delta_config.modules_to_save
    prepared = accepts(lambda: read_adapter(setup.root / "delta", {n: w.detach().clone() for n, w in weights.items()}, 64), setup, low_rank)
    if prepared is None:
        return
    with torch.no_grad():
        for module, (a, b_scaled) in prepared.items():
            weights[module] += b_scaled @ a
    setup.check(model, "serving pool")


def merge_keeps_tensor_names(setup: Setup) -> bool:
    """Whether merging the delta into the weights leaves the base's tensor names as they were."""
    setup.model.merge()
    try:
        return set(logical_state_dict(setup.model.base_model)) == set(setup.state)
    finally:
        setup.model.unmerge()


def exported(setup: Setup):
    """(b) ``export_hf`` of the attached model, and the merge engine's HF output for one input."""
    mergeable = setup.method.capabilities.mergeable and merge_keeps_tensor_names(setup)
    if accepts(lambda: export_hf(setup.model, setup.root / "export"), setup, mergeable) is not None:
        setup.check(setup.model_class.from_pretrained(setup.root / "export").eval(), "export_hf")
    recipe = parse_recipe({"base": str(setup.root / "base"), "inputs": [{"path": str(setup.root / "delta")}],
                           "method": "task_arithmetic", "output": {"path": str(setup.root / "merged")}})
    if accepts(lambda: run_merge(recipe), setup, mergeable) is not None:
        setup.check(setup.model_class.from_pretrained(setup.root / "merged").eval(), "merge engine")


def lora_merged(setup: Setup):
    """(c) LoRA-aware merge of one input (task arithmetic, weight 1, concat), loaded on a fresh base."""
    recipe = parse_recipe({"base": str(setup.root / "base"), "inputs": [{"path": str(setup.root / "delta"), "weight": 1.0}],
                           "method": "task_arithmetic", "lora": {"mode": "concat"}, "output": {"path": str(setup.root / "lora")}})
    low_rank = setup.method.capabilities.low_rank_factors and not setup.delta_config.modules_to_save
    if accepts(lambda: run_merge(recipe), setup, low_rank) is not None:
        setup.check(deltatune.load_delta(setup.fresh(), setup.root / "lora"), "LoRA-aware merge")


def compressed(setup: Setup):
    """(d) ComPEFT at density 1.0 with exact values, loaded on a fresh base."""
    out = setup.root / "compressed"
    must_accept = setup.method.capabilities.mergeable and setup.delta_config.method != "compeft"
    if accepts(lambda: compress_adapter(setup.root / "delta", out, density=1.0, ternary=False), setup, must_accept) is not None:
        setup.check(deltatune.load_delta(setup.fresh(), out), "compress")


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("model_name", MODELS)
def test_every_tool_gives_the_attached_function_or_refuses(case, model_name, batch, request, tmp_path):
    config = CONFIGS[case]
    if (config["method"], model_name) in ATTACH_ERRORS:
        pytest.skip("the method cannot attach to this model (checked in test_methods)")
    setup = Setup(request.getfixturevalue(model_name), config, tmp_path, batch)
    for tool in (served, exported, lora_merged, compressed):
        tool(setup)
