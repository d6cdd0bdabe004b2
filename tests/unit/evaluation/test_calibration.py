"""Expected calibration error against a hand computation, the classifier and answer-token confidences."""
import pytest
import torch

from deltatune.evaluation.calibration import answer_token_confidences, classifier_confidences, expected_calibration_error, reliability_diagram


def test_ece_matches_the_definition():
    conf = [0.95, 0.9, 0.65, 0.6, 0.3]
    correct = [True, False, True, True, False]
    # 5 bins: (0.8, 1] holds 0.95, 0.9 (acc 0.5, conf 0.925); (0.6, 0.8] holds 0.65 (0.6 is the edge of (0.4, 0.6]);
    # (0.4, 0.6] holds 0.6; (0.2, 0.4] holds 0.3.
    expected = 2 / 5 * abs(0.5 - 0.925) + 1 / 5 * abs(1 - 0.65) + 1 / 5 * abs(1 - 0.6) + 1 / 5 * abs(0 - 0.3)
    result = expected_calibration_error(conf, correct, bins=5)
    assert result["ece"] == pytest.approx(expected)
    assert [b["count"] for b in result["bins"]] == [1, 1, 1, 2] and result["n"] == 5


def test_perfectly_calibrated_and_overconfident_models():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(20000, generator=g)
    calibrated = (torch.rand(20000, generator=g) < conf).tolist()
    assert expected_calibration_error(conf.tolist(), calibrated)["ece"] < 0.02
    always_sure_half_right = expected_calibration_error([1.0] * 10, [True, False] * 5)
    assert always_sure_half_right["ece"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        expected_calibration_error([1.5], [True])


def test_classifier_confidences_are_the_predicted_class_probability():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    conf, correct = classifier_confidences(logits, torch.tensor([0, 0, 0]))
    assert conf == pytest.approx([torch.tensor([2.0, 0.0]).softmax(0)[0].item(), torch.tensor([0.0, 1.0]).softmax(0)[1].item(), 0.5])
    assert correct == [True, False, True]


def test_answer_token_confidence_is_the_first_answer_token(tiny_llama):
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    examples = [{"prompt": "one two", "response": " three"}, {"prompt": "what is", "response": " two"}]
    conf, correct = answer_token_confidences(tiny_llama, tok, examples)
    for ex, c, ok in zip(examples, conf, correct):
        ids = torch.tensor([tok(ex["prompt"])["input_ids"]])
        with torch.no_grad():
            probs = tiny_llama(input_ids=ids).logits[0, -1].softmax(-1)
        assert c == pytest.approx(float(probs.max()), abs=1e-5)
        assert ok == (int(probs.argmax()) == tok(ex["prompt"] + ex["response"])["input_ids"][ids.shape[1]])


def test_reliability_diagram_is_a_png(tmp_path):
    path = reliability_diagram(expected_calibration_error([0.9, 0.2], [True, False]), tmp_path / "r.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
