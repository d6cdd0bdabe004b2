"""``deltatune eval`` records (task vs base, retention, calibration, diagnostics, cost) and
``deltatune compare`` (table, plots, HTML), the report checked in a real headless browser."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import deltatune
from deltatune.evaluation.ledger import CostLedger, write_ledger
from tests.helpers import randomize_delta, save_tiny_lm

REPO = Path(__file__).resolve().parents[2]


def cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "deltatune", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LM, two runs (LoRA r=2 and r=8 with their ledgers and logs), eval data and general text."""
    root = tmp_path_factory.mktemp("compare")
    lm = save_tiny_lm(root / "lm")
    for i, r in enumerate((2, 8)):
        run = root / "runs" / f"lora{r}"
        model = deltatune.attach(deltatune.load_model(lm, task="causal-lm"), {"method": "lora", "r": r, "targets": "all-linear"})
        randomize_delta(model, std=0.2, seed=i)
        model.save_delta(run / "adapter")
        write_ledger(run, CostLedger(trainable_params=r * 1000, total_params=50_000, stored_params=r * 1000, delta_bytes=r * 4000,
                                     train_seconds=3.0 + i, steps=10, tokens=2000, examples=80, peak_rss_mb=400.0 + 50 * i))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - 0.1 * s * (i + 1)}) + "\n" for s in range(1, 11)))
    (root / "eval.jsonl").write_text('{"prompt": "one two", "response": "three"}\n{"prompt": "what is", "response": "two"}\n'
                                     '{"prompt": "the cat", "response": "sat"}\n')
    (root / "general.txt").write_text("the cat sat on the mat . one two three four five six seven .\n" * 20)
    words = ["one two", "the cat", "what is", "four five", "six seven", "the mat", "two three", "cat sat", "five six", "is it"]
    (root / "probe.jsonl").write_text("".join(json.dumps({"sentence": w, "y": i % 2}) + "\n" for i, w in enumerate(words)))
    (root / "facts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in
                                              [("one two", " three"), ("the cat", " sat"), ("what is", " two"), ("four five", " six")]))
    (root / "probes.yaml").write_text("in_context:\n  - name: toy\n    test: probe.jsonl\n    train: probe.jsonl\n    text: sentence\n"
                                      "    label: y\n    verbalizers: [' one', ' two']\n    template: '{text} is'\n    shots: 2\n"
                                      "knowledge: facts.jsonl\n")
    return root, lm


def evaluate_run(root, lm, name, *extra):
    return cli("eval", "--model", str(lm), "--run", str(root / "runs" / name), "--data", str(root / "eval.jsonl"), "--template", "plain",
               "--metric", "exact_match", "--max-new-tokens", "2", "--general-text", str(root / "general.txt"), "--diagnostics", *extra)


def test_eval_record_reads_every_number_against_the_base(runs):
    root, lm = runs
    plot = root / "runs" / "lora2" / "reliability.png"
    evaluate_run(root, lm, "lora2", "--calibration-plot", str(plot), "--probes", str(root / "probes.yaml"))
    record = json.loads((root / "runs" / "lora2" / "eval.json").read_text())
    plain = json.loads(cli("eval", "--model", str(lm), "--data", str(root / "eval.jsonl"), "--template", "plain", "--metric", "exact_match",
                           "--max-new-tokens", "2", "--json").strip().splitlines()[-1])
    assert record["base_task"]["loss"] == pytest.approx(plain["loss"], rel=1e-6)  # the base is the model without the delta
    assert record["loss"] != pytest.approx(plain["loss"], rel=1e-3)               # and the delta changed it
    retention = record["retention"]
    assert retention["forgetting"] == pytest.approx(retention["loss"] - retention["base_loss"]) and retention["file"] == "general.txt"
    assert record["calibration"]["n"] == 3 and 0 <= record["calibration"]["ece"] <= 1 and plot.read_bytes()[:4] == b"\x89PNG"
    diagnostics = record["diagnostics"]
    assert len(diagnostics["modules"]) == 14 and all(row["effective_rank"] <= 2 + 1e-6 for row in diagnostics["modules"].values())
    assert record["cost"]["trainable_params"] == 2000 and record["cost"]["tokens_per_second"] == pytest.approx(2000 / 3.0)

    from deltatune.evaluation.probe_spec import build_probe, load_probe_spec
    from deltatune.evaluation.probes import cloze_precision_at_1, few_shot_accuracy, known_facts

    spec, spec_root = load_probe_spec(root / "probes.yaml")
    probe = build_probe(spec.in_context[0], spec_root)
    tok = deltatune.load_tokenizer(lm)
    base = deltatune.load_model(lm, task="causal-lm")
    tuned = deltatune.load_delta(deltatune.load_model(lm, task="causal-lm"), root / "runs" / "lora2" / "adapter")
    icl = record["probes"]["in_context"]["toy"]
    assert icl["accuracy"] == few_shot_accuracy(tuned, tok, probe)["accuracy"] and icl["base_accuracy"] == few_shot_accuracy(base, tok, probe)["accuracy"]
    facts = [json.loads(line) for line in (root / "facts.jsonl").read_text().splitlines()]
    known = known_facts(base, tok, facts)
    knowledge = record["probes"]["knowledge"]
    assert knowledge["known_by_base"] == len(known)
    assert knowledge["precision_at_1"] == (cloze_precision_at_1(tuned, tok, known)["precision_at_1"] if known else None)


def test_compare_writes_table_plots_and_a_report_that_renders_in_a_browser(runs):
    root, lm = runs
    for name in ("lora2", "lora8"):
        if not (root / "runs" / name / "eval.json").exists():
            evaluate_run(root, lm, name)
    out = root / "report"
    table = cli("compare", str(root / "runs" / "lora2"), str(root / "runs" / "lora8"), "--html", str(out / "report.html"),
                "--plots", str(out / "plots"), "--json", str(out / "rows.json"))
    rows = json.loads((out / "rows.json").read_text())
    for row in rows:
        record = json.loads((root / "runs" / row["name"] / "eval.json").read_text())
        assert row["metric"] == "exact_match" and row["gain"] == pytest.approx(record["exact_match"] - record["base_task"]["exact_match"])
        assert row["forgetting"] == pytest.approx(record["retention"]["forgetting"])
        assert row["intruders"] == record["diagnostics"]["summary"]["intruders"]
        assert f"| {row['name']} | exact_match |" in table
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["cost.png", "gain_vs_forgetting.png", "loss_curves.png"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")  # self-contained

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium package where it runs as root)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1100"]
    dom = subprocess.run([browser, *flags, "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<table id=\"comparison\">" in dom and dom.count("<tr>") == 3 and "lora2" in dom and "lora8" in dom
    shot_dir = REPO / "runs" / "compare-report"  # for a person to look at
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "screenshot.png"
    shot.unlink(missing_ok=True)
    subprocess.run([browser, *flags, f"--screenshot={shot}", (out / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = Image.open(shot).convert("RGB").getdata()
    orange = sum(1 for r, g, b in pixels if r > 230 and 100 < g < 150 and b < 60)    # the cost bars (matplotlib's tab:orange)
    blue = sum(1 for r, g, b in pixels if r < 60 and 100 < g < 140 and b > 160)      # the scatter and a loss curve (tab:blue)
    assert orange > 5000 and blue > 50, f"the plots did not render (orange {orange}, blue {blue} pixels in {shot})"
