"""Metrics with known answers, equal to scikit-learn's, and deterministic bootstrap intervals."""

import random

import pytest

from lexfine.eval import metrics

LABELS = ["dismissal", "approval"]


def test_known_answers():
    gold = ["dismissal"] * 6 + ["approval"] * 4
    pred = ["dismissal"] * 5 + ["approval"] + ["approval"] * 2 + ["dismissal", None]
    rep = metrics.classification_report(gold, pred, LABELS, with_ci=False)
    assert rep["n"] == 10
    assert rep["accuracy"] == pytest.approx(0.7)
    # dismissal: tp 5, predicted 6, support 6; approval: tp 2, predicted 3, support 4 (one unparsed)
    assert rep["per_class"]["dismissal"]["precision"] == pytest.approx(5 / 6)
    assert rep["per_class"]["dismissal"]["recall"] == pytest.approx(5 / 6)
    assert rep["per_class"]["approval"]["precision"] == pytest.approx(2 / 3)
    assert rep["per_class"]["approval"]["recall"] == pytest.approx(0.5)
    f1_app = 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)
    assert rep["macro_f1"] == pytest.approx((5 / 6 + f1_app) / 2)
    assert rep["balanced_accuracy"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert rep["confusion_matrix"]["matrix"] == [[5, 1, 0], [1, 2, 1]]
    assert rep["majority_class"] == "dismissal" and rep["majority_baseline"] == pytest.approx(0.6)
    assert rep["prediction_counts"] == {"dismissal": 6, "approval": 3, "none": 1}


def test_always_majority_has_majority_accuracy_and_half_balanced_accuracy():
    gold = ["dismissal"] * 76 + ["approval"] * 24
    pred = ["dismissal"] * 100
    rep = metrics.classification_report(gold, pred, LABELS, with_ci=False)
    assert rep["accuracy"] == pytest.approx(rep["majority_baseline"]) == pytest.approx(0.76)
    assert rep["balanced_accuracy"] == pytest.approx(0.5)
    assert rep["per_class"]["approval"]["f1"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(seed)
    labels = ["A", "B", "C", "D"]
    gold = [rng.choice(labels) for _ in range(200)]
    pred = [rng.choice(labels + [None]) if rng.random() < 0.6 else g for g in gold]
    enc = [p if p is not None else "none" for p in pred]
    rep = metrics.classification_report(gold, pred, labels, with_ci=False)
    assert rep["accuracy"] == pytest.approx(sk.accuracy_score(gold, enc))
    assert rep["macro_f1"] == pytest.approx(sk.f1_score(gold, enc, labels=labels, average="macro", zero_division=0))
    assert rep["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(gold, enc))
    p, r, f, s = sk.precision_recall_fscore_support(gold, enc, labels=labels, zero_division=0)
    for i, lab in enumerate(labels):
        assert rep["per_class"][lab]["precision"] == pytest.approx(p[i])
        assert rep["per_class"][lab]["recall"] == pytest.approx(r[i])
        assert rep["per_class"][lab]["f1"] == pytest.approx(f[i])
        assert rep["per_class"][lab]["support"] == s[i]
    cm = sk.confusion_matrix(gold, enc, labels=labels + ["none"])
    assert rep["confusion_matrix"]["matrix"] == cm[:4].tolist()


def test_bootstrap_is_deterministic_and_brackets_the_estimate():
    rng = random.Random(3)
    gold = [rng.choice(LABELS) for _ in range(300)]
    pred = [g if rng.random() < 0.7 else rng.choice(LABELS) for g in gold]
    a = metrics.bootstrap_ci(gold, pred, LABELS)
    b = metrics.bootstrap_ci(gold, pred, LABELS)
    assert a == b
    acc = metrics.accuracy(gold, pred)
    f1 = metrics.macro_f1(gold, pred, LABELS)
    assert a["accuracy"][0] < acc < a["accuracy"][1]
    assert a["macro_f1"][0] < f1 < a["macro_f1"][1]
    assert 0.05 < a["accuracy"][1] - a["accuracy"][0] < 0.2  # ~ 4 standard errors of a proportion at n=300
    assert metrics.bootstrap_ci(gold, pred, LABELS, seed=1) != a


def test_bootstrap_macro_f1_matches_direct_computation_per_sample():
    import numpy as np

    gold = ["A", "B", "B", "C", "A", "C", "C"]
    pred = ["A", "B", None, "C", "B", "C", "A"]
    labels = ["A", "B", "C"]
    g, p = metrics._encode(gold, pred, labels)
    samples = np.random.default_rng(0).integers(0, len(gold), size=(5, len(gold)))
    batched = metrics._prf(metrics._confusions(g, p, 3, samples))[2].mean(axis=1)
    for row, value in zip(samples, batched):
        assert value == pytest.approx(metrics.macro_f1([gold[i] for i in row], [pred[i] for i in row], labels))


def test_breakdown_groups():
    gold = ["A", "A", "B", "B"]
    pred = ["A", "B", "B", "B"]
    out = metrics.breakdown(gold, pred, ["de", "de", "en", None], ["A", "B"])
    assert out["de"] == {"n": 2, "accuracy": 0.5, "macro_f1": None, "classes_present": 1, "balanced_accuracy": 0.5,
                         "majority_baseline": 1.0}  # one gold class only: macro-F1 n/a
    assert out["en"]["n"] == 1 and out["n/a"]["accuracy"] == 1.0


def test_group_macro_f1_is_na_with_one_class_and_averages_present_classes_only():
    # group a: only dismissals (all right); group b: both classes; then three of four LEXam letters
    gold = ["dismissal"] * 4 + ["dismissal", "approval", "approval"]
    pred = ["dismissal"] * 4 + ["dismissal", "approval", "dismissal"]
    groups = ["a"] * 4 + ["b"] * 3
    out = metrics.breakdown(gold, pred, groups, LABELS)
    assert out["a"]["macro_f1"] is None  # n/a: "macro" F1 over one class (was 0.5 = (1 + 0) / 2)
    assert out["a"]["classes_present"] == 1 and out["a"]["accuracy"] == 1.0
    f1_dis, f1_app = 2 * 0.5 * 1 / 1.5, 2 * 1 * 0.5 / 1.5
    assert out["b"]["macro_f1"] == pytest.approx((f1_dis + f1_app) / 2)
    assert out["b"]["classes_present"] == 2
    letters = ["A", "B", "C", "D"]
    lex = metrics.breakdown(["A", "B", "C"], ["A", "B", "D"], ["x"] * 3, letters)["x"]
    assert lex["macro_f1"] == pytest.approx(2 / 3)  # A 1, B 1, C 0; D (no case) left out (was 2/4)
    assert lex["classes_present"] == 3
    # the whole set keeps sklearn's macro-F1 over every task label
    assert metrics.classification_report(["A", "B", "C"], ["A", "B", "D"], letters, with_ci=False)["macro_f1"] \
        == pytest.approx(0.5)
