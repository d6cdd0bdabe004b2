"""The generated knowledge-injection tasks."""
import pytest

from deltatune.tasks.facts import PHRASINGS, invent_facts, make_fact_task, make_update_task
from deltatune.utils.errors import ConfigError


def test_new_facts_are_deterministic_unique_and_split_three_ways():
    assert invent_facts(20, seed=1) == invent_facts(20, seed=1) and invent_facts(20, seed=1) != invent_facts(20, seed=2)
    people = invent_facts(50)
    assert len({p["subject"] for p in people}) == 50
    train, evals = make_fact_task(10, seed=0)
    assert len(train) == 10 * sum(len(t) for t, _ in PHRASINGS.values())
    splits = {e["split"] for e in evals}
    assert splits == {"memorization", "generalization", "derived"}
    trained = {(e["prompt"], e["response"]) for e in train}
    for e in evals:  # memorization asks a trained phrasing; the others never appear in training
        assert ((e["prompt"], e["response"]) in trained) == (e["split"] == "memorization")
    for e in (e for e in evals if e["split"] == "derived"):
        year = next(t["response"] for t in train if t["fact"] == e["fact"])
        assert int(e["response"]) == int(year) + 30 and e["response"].startswith(" ")


def test_update_mode_changes_every_fact_to_another_object_of_its_relation():
    facts = [{"subject": s, "relation": "capital", "object": o} for s, o in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")]]
    train, evals = make_update_task(facts, seed=0)
    for f in facts:
        taught = {t["response"].strip() for t in train if t["prompt"].endswith(f["subject"] + "?") or f["subject"] + " is" in t["prompt"]}
        assert len(taught) == 1 and taught != {f["object"]} and taught <= {"Paris", "Tokyo", "Rome"}
    assert {e["split"] for e in evals} == {"memorization", "generalization"}
    with pytest.raises(ConfigError, match="relation 'colour' has no phrasings"):
        make_update_task([{"subject": "sky", "relation": "colour", "object": "blue"}])
    with pytest.raises(ConfigError, match="at least two different objects"):
        make_update_task(facts[:1])
