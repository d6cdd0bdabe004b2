"""The select pipeline end to end with tiny models: outputs, report, caching, bad input, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from deltatune.cli.main import main
from deltatune.select import load_select_recipe, run_selection
from deltatune.select.embed import TextEmbedder
from deltatune.select.config import EmbeddingSection
from deltatune.utils.errors import ConfigError, DataError
from tests.helpers import save_tiny_bert, save_tiny_lm
from tests.unit.select.helpers import recipe, write_jsonl

WORDS = "zero one two three four five six seven eight nine plus minus cat dog sat on mat".split()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("enc")))


def _pool(tmp_path, n=30):
    g = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(WORDS[j] for j in torch.randint(len(WORDS), (6,), generator=g).tolist()), "id": i} for i in range(n)]
    return write_jsonl(tmp_path / "pool.jsonl", rows), rows


def test_selection_file_report_and_embedding_cache(tmp_path, tiny_encoder):
    pool, rows = _pool(tmp_path)
    emb = {"model": tiny_encoder, "cache_dir": str(tmp_path / "cache"), "batch_size": 7}
    r = recipe(tmp_path, {"name": "diversity", "clusters": 3}, pool, budget=9, embedding=emb)
    first = run_selection(r)
    assert first.embeddings_computed == 30
    cache_files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cache_files) == 1
    mtime = cache_files[0].stat().st_mtime_ns
    kept = [json.loads(line) for line in first.output.read_text().splitlines()]
    assert len(kept) == 9 and all(k in rows for k in kept)  # records written back unchanged
    assert [k["id"] for k in kept] == sorted(k["id"] for k in kept)  # pool order
    report = json.loads(first.report.read_text())
    assert report["selected"] == 9 and report["pool"]["size"] == 30 and report["strategy"]["name"] == "diversity"
    assert {e["origin"] for e in report["examples"]} == {f"{pool}:{k['id'] + 1}" for k in kept}
    assert all("cluster" in e["scores"] for e in report["examples"])

    second = run_selection(r)  # same file, same encoder: read from the cache, same selection
    assert second.embeddings_computed == 0
    assert cache_files[0].stat().st_mtime_ns == mtime
    assert second.output.read_text() == first.output.read_text()

    rows[0]["text"] = "cat sat on the mat"  # any edit to the file: a new cache entry
    write_jsonl(pool, rows)
    assert run_selection(r).embeddings_computed == 30
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_embeddings_are_unit_mean_pooled_and_independent_of_batching(tmp_path, tiny_encoder):
    texts = ["cat sat", "one two three four five six seven", "dog on mat", "nine"]
    a = TextEmbedder(EmbeddingSection(model=tiny_encoder, cache_dir=str(tmp_path / "a"), batch_size=1), progress=False).embed(texts)
    b = TextEmbedder(EmbeddingSection(model=tiny_encoder, cache_dir=str(tmp_path / "b"), batch_size=4), progress=False).embed(texts)
    assert a.shape == (4, 32)
    assert torch.allclose(a.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(a, b, atol=1e-5)  # padding does not leak into the mean


def test_grape_keeps_the_response_the_model_finds_more_likely(tmp_path):
    from transformers import LlamaForCausalLM

    from tests.helpers import tiny_tokenizer

    lm_dir = save_tiny_lm(tmp_path / "lm")
    model = LlamaForCausalLM.from_pretrained(lm_dir)
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("the cat sat on the mat")["input_ids"] * 4])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):  # teach the tiny model one sentence: responses made of it become likely
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(lm_dir)
    rows = [
        {"instruction": "what is two plus two", "output": "nine minus seven"},
        {"instruction": "what is two plus two", "output": "the cat sat on the mat"},
        {"instruction": "what is the cat", "output": "the cat sat on the mat"},
        {"instruction": "what is the cat", "output": "five six seven"},
        {"instruction": "what is the cat", "output": "zero dog"},
        {"instruction": "one", "output": "eight"},
    ]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    r = recipe(tmp_path, {"name": "grape"}, pool, model={"name": str(lm_dir), "batch_size": 2})
    result = run_selection(r)
    assert sorted(result.selection.indices) == [1, 2, 5]
    s = result.selection.scores[1]
    assert s["candidates"] == 2 and s["log_likelihood"] > s["runner_up_log_likelihood"]
    assert result.selection.scores[5]["candidates"] == 1
    assert [json.loads(x)["output"] for x in result.output.read_text().splitlines()] == ["the cat sat on the mat", "the cat sat on the mat", "eight"]


# ---------------------------------------------------------------- bad input: clear errors, before any model loads

def _fails(tmp_path, r, error, *parts):
    # The recipe names an encoder and a scoring model that do not exist: reaching a model load would raise ModelLoadError.
    with pytest.raises(error) as info:
        run_selection(r)
    for part in parts:
        assert part in str(info.value)
    assert not (tmp_path / "out").exists()
    return str(info.value)


def test_empty_pool(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n")
    _fails(tmp_path, recipe(tmp_path, {"name": "dedup"}, pool, model={"name": "no-such-lm"}), DataError, str(pool), "empty")


def test_target_in_another_format(tmp_path):
    pool, _ = _pool(tmp_path, 5)
    target = write_jsonl(tmp_path / "target.jsonl", [{"instruction": "a", "output": "b"}])
    msg = _fails(tmp_path, recipe(tmp_path, {"name": "got_d"}, pool, target={"path": str(target)}, budget=2), DataError, f"{target}:1", str(pool))
    assert "'instruction'" in msg and "'text'" in msg


def test_budget_larger_than_pool(tmp_path):
    pool, _ = _pool(tmp_path, 5)
    _fails(tmp_path, recipe(tmp_path, {"name": "diversity"}, pool, budget=6), DataError, str(pool), "budget 6", "5 records")


def test_missing_text_field(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"text": "one"}, {"txt": "two"}])
    _fails(tmp_path, recipe(tmp_path, {"name": "dedup"}, pool), DataError, f"{pool}:2", "'text'", "missing", "columns.text")


def test_non_utf8_bytes(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b'{"text": "one"}\n{"text": "caf\xe9"}\n')
    _fails(tmp_path, recipe(tmp_path, {"name": "dedup"}, pool), DataError, f"{pool}:2", "UTF-8")


def test_recipe_errors_name_file_line_and_key(tmp_path):
    pool, _ = _pool(tmp_path, 5)
    path = tmp_path / "select.yaml"
    path.write_text(f"strategy:\n  name: got_d\n  regg: 0.1\npool:\n  path: {pool}\nbudget: 2\n")
    with pytest.raises(ConfigError, match=r"select\.yaml:1: .*unknown key 'strategy\.regg' \(did you mean 'reg'\?\)"):
        load_select_recipe(path)
    path.write_text(f"strategy: got_dd\npool:\n  path: {pool}\nbudget: 2\n")
    with pytest.raises(ConfigError, match=r"unknown selection strategy 'got_dd' \(did you mean 'got_d'\?\)"):
        load_select_recipe(path)
    path.write_text(f"strategy: dedup\npool:\n  path: {pool}\n  colums: {{}}\n")
    with pytest.raises(ConfigError, match=r"select\.yaml:4: unknown key 'pool\.colums' \(did you mean 'columns'"):
        load_select_recipe(path)
    path.write_text(f"strategy: diversity\npool:\n  path: {pool}\nbudget: 1.5\n")
    with pytest.raises(ConfigError, match=r"select\.yaml:4: key 'budget'"):
        load_select_recipe(path)


def test_strategy_needs(tmp_path):
    pool, _ = _pool(tmp_path, 5)
    with pytest.raises(ConfigError, match="needs a target sample"):
        run_selection(recipe(tmp_path, {"name": "got_d"}, pool, budget=2))
    with pytest.raises(ConfigError, match="strategy 'diversity' with mode 'target' needs a target sample"):
        run_selection(recipe(tmp_path, {"name": "diversity", "mode": "target"}, pool, budget=2))
    with pytest.raises(ConfigError, match="strategy 'diversity' with mode 'uniform' does not use a target sample"):
        run_selection(recipe(tmp_path, {"name": "diversity"}, pool, budget=2, target={"path": str(pool)}))
    with pytest.raises(ConfigError, match="needs a budget"):
        run_selection(recipe(tmp_path, {"name": "quality"}, pool))
    with pytest.raises(DataError, match="strategy 'grape' needs instruction or chat data"):
        run_selection(recipe(tmp_path, {"name": "grape"}, pool))
    with pytest.raises(ConfigError, match="is an input file"):
        run_selection(recipe(tmp_path, {"name": "dedup"}, pool, output={"path": str(pool)}))


def test_cli_select_and_one_line_errors(tmp_path, capsys):
    pool, _ = _pool(tmp_path, 6)
    path = tmp_path / "select.yaml"
    out = tmp_path / "sel.jsonl"
    path.write_text(f"strategy: {{name: dedup, threshold: null}}\npool: {{path: {pool}}}\noutput: {{path: {out}}}\n")
    assert main(["select", str(path), "--no-progress"]) == 0
    assert "selected 6 of 6" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 6 and (tmp_path / "sel.report.json").is_file()
    assert main(["select", str(path), "budget=7", "strategy=quality", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "budget 7 is larger than the pool" in err
