"""In-context and knowledge probes against hand computations on a tiny LM, and on SmolLM2."""
import pytest
import torch

from deltatune.evaluation.probes import ClassificationProbe, choice_log_likelihoods, cloze_precision_at_1, few_shot_accuracy, known_facts
from deltatune.utils.errors import DataError
from tests.helpers import SHARED_DATA, tiny_tokenizer

ROWS = [{"text": t, "label": i % 2} for i, t in enumerate(["one two", "the cat", "what is", "four five", "six seven", "the mat", "two three", "cat sat"])]


def manual_log_likelihood(model, tok, context, choice):
    ctx, whole = tok(context)["input_ids"], tok(context + choice)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def test_few_shot_accuracy_follows_the_multiple_choice_rule(tiny_llama):
    tok = tiny_tokenizer()
    probe = ClassificationProbe("toy", test=ROWS[:4], train=ROWS[4:], verbalizers=[" one", " two"], template="{text} is", shots=2, seed=3)
    assert len(probe.demonstrations) == 2 and probe.demonstrations == ClassificationProbe("toy", ROWS[:4], ROWS[4:], [" one", " two"], "{text} is", 2, 3).demonstrations
    hits = 0
    for row in probe.test:
        context = probe.context(row["text"])
        assert context.startswith(probe.demonstrations[0]["text"] + " is")
        scores = [manual_log_likelihood(tiny_llama, tok, context, c) for c in (" one", " two")]
        assert choice_log_likelihoods(tiny_llama, tok, context, [" one", " two"]) == pytest.approx(scores, abs=1e-4)
        hits += int(scores.index(max(scores)) == row["label"])
    assert few_shot_accuracy(tiny_llama, tok, probe) == {"accuracy": hits / 4, "n": 4, "shots": 2}


def test_probe_rows_and_templates_are_checked():
    with pytest.raises(DataError, match="must contain {text}"):
        ClassificationProbe("p", ROWS, ROWS, [" a", " b"], template="no slot")
    with pytest.raises(DataError, match="test row 0 needs"):
        ClassificationProbe("p", [{"text": "x", "label": 5}], ROWS, [" a", " b"])
    with pytest.raises(DataError, match="9 shots but only 8"):
        ClassificationProbe("p", ROWS, ROWS, [" a", " b"], shots=9)


def test_cloze_precision_is_top1_of_the_answers_first_token(tiny_llama):
    tok = tiny_tokenizer()
    facts = [{"prompt": "one two", "answer": " three"}, {"prompt": "the cat", "answer": " sat"}, {"prompt": "what is", "answer": " two"}]
    expected = []
    for f in facts:
        ids = tok(f["prompt"])["input_ids"]
        with torch.no_grad():
            top = int(tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        expected.append(top == tok(f["prompt"] + f["answer"])["input_ids"][len(ids)])
    result = cloze_precision_at_1(tiny_llama, tok, facts)
    assert result["hits"] == expected and result["precision_at_1"] == pytest.approx(sum(expected) / 3)
    assert known_facts(tiny_llama, tok, facts) == [f for f, hit in zip(facts, expected) if hit]
    with pytest.raises(DataError, match="fact 0 needs"):
        cloze_precision_at_1(tiny_llama, tok, [{"prompt": "x"}])


@pytest.mark.slow
def test_smollm2_knows_some_facts_and_reads_sst2_in_context(smollm2):
    import csv

    model, tok = smollm2
    candidates = [{"prompt": "The capital of France is", "answer": " Paris"}, {"prompt": "The capital of Japan is", "answer": " Tokyo"},
                  {"prompt": "Water is made of hydrogen and", "answer": " oxygen"}, {"prompt": "The capital of Zorblax is", "answer": " Quinto"}]
    known = known_facts(model, tok, candidates)
    assert {"prompt": "The capital of France is", "answer": " Paris"} in known and candidates[-1] not in known
    path = SHARED_DATA / "sst2" / "validation.tsv"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with open(path) as f:
        rows = [{"text": r["sentence"], "label": int(r["label"])} for r in csv.DictReader(f, delimiter="\t")][:60]
    probe = ClassificationProbe("sst2", test=rows[:40], train=rows[40:], verbalizers=[" negative", " positive"],
                                template="Review: {text}\nSentiment:", shots=4)
    assert few_shot_accuracy(model, tok, probe)["accuracy"] > 0.6  # well above chance (0.5) on 40 reviews
