"""Classification metrics without scikit-learn (tests check them against it).

Predictions may be None (a generation that could not be parsed): such a case counts as wrong for accuracy and as a
miss (false negative of its gold class, false positive of no class) for precision/recall/F1 — exactly what
scikit-learn computes with `labels=<the gold classes>` and the failure encoded as an extra label.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

N_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0


def _encode(gold: list[str], pred: list[str | None], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)
    g = np.array([index[x] for x in gold], dtype=np.int64)
    p = np.array([index.get(x, k) if x is not None else k for x in pred], dtype=np.int64)  # k = no valid answer
    return g, p


def _confusions(g: np.ndarray, p: np.ndarray, k: int, samples: np.ndarray | None = None) -> np.ndarray:
    """Confusion counts [gold, pred(+none)], or one per bootstrap sample ([B, k, k+1]) in a single bincount."""
    code = g * (k + 1) + p
    if samples is None:
        return np.bincount(code, minlength=k * (k + 1)).reshape(k, k + 1)
    b = samples.shape[0]
    flat = (np.arange(b)[:, None] * (k * (k + 1)) + code[samples]).ravel()
    return np.bincount(flat, minlength=b * k * (k + 1)).reshape(b, k, k + 1)


def _prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1, support from confusion counts (zero division -> 0, as sklearn's default)."""
    k = cm.shape[-2]
    tp = np.diagonal(cm[..., :k], axis1=-2, axis2=-1).astype(float)
    pred_pos = cm[..., :k].sum(axis=-2).astype(float)
    support = cm.sum(axis=-1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred_pos > 0, tp / pred_pos, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    return precision, recall, f1, support


def accuracy(gold: list[str], pred: list[str | None]) -> float:
    return float(np.mean([g == p for g, p in zip(gold, pred)])) if gold else float("nan")


def macro_f1(gold: list[str], pred: list[str | None], labels: list[str]) -> float:
    g, p = _encode(gold, pred, labels)
    return float(_prf(_confusions(g, p, len(labels)))[2].mean())


def macro_f1_present(gold: list[str], pred: list[str | None], labels: list[str]) -> float | None:
    """Macro-F1 over the classes present in `gold` only; None (n/a) when fewer than two are present.

    A class a subset has no case of scores F1 0 (no true positive possible), so averaging over every label would
    halve an all-dismissal group's macro-F1 whatever the model did; with a single class present, "macro" F1 is that
    class's F1, a function of its recall alone. Breakdowns by group use this; the whole set uses `macro_f1`.
    """
    g, p = _encode(gold, pred, labels)
    _, _, f1, support = _prf(_confusions(g, p, len(labels)))
    present = support > 0
    return float(f1[present].mean()) if present.sum() >= 2 else None


def balanced_accuracy(gold: list[str], pred: list[str | None], labels: list[str]) -> float:
    """Mean recall over the classes present in `gold` (sklearn's balanced_accuracy_score)."""
    g, p = _encode(gold, pred, labels)
    _, recall, _, support = _prf(_confusions(g, p, len(labels)))
    return float(recall[support > 0].mean())


def bootstrap_ci(gold: list[str], pred: list[str | None], labels: list[str], n_boot: int = N_BOOTSTRAP,
                 seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals for accuracy and macro-F1 (cases resampled with replacement, fixed seed)."""
    n = len(gold)
    if n == 0:
        return {"accuracy": [float("nan")] * 2, "macro_f1": [float("nan")] * 2}
    g, p = _encode(gold, pred, labels)
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    accs, f1s = [], []
    chunk = max(1, min(n_boot, 20_000_000 // max(n, 1)))  # bound memory at ~160 MB of indices
    for start in range(0, n_boot, chunk):
        samples = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        accs.append((g[samples] == p[samples]).mean(axis=1))
        f1s.append(_prf(_confusions(g, p, len(labels), samples))[2].mean(axis=1))
    acc, f1 = np.concatenate(accs), np.concatenate(f1s)
    return {
        "accuracy": [float(np.quantile(acc, lo_q)), float(np.quantile(acc, hi_q))],
        "macro_f1": [float(np.quantile(f1, lo_q)), float(np.quantile(f1, hi_q))],
    }


def majority(gold: list[str]) -> tuple[str | None, float]:
    """The most frequent gold class and the accuracy of always predicting it."""
    if not gold:
        return None, float("nan")
    label, count = Counter(gold).most_common(1)[0]
    return label, count / len(gold)


def classification_report(gold: list[str], pred: list[str | None], labels: list[str],
                          with_ci: bool = True) -> dict:
    g, p = _encode(gold, pred, labels)
    cm = _confusions(g, p, len(labels))
    precision, recall, f1, support = _prf(cm)
    maj_label, maj_acc = majority(gold)
    out = {
        "n": len(gold),
        "accuracy": accuracy(gold, pred),
        "macro_f1": float(f1.mean()),
        "balanced_accuracy": float(recall[support > 0].mean()) if len(gold) else float("nan"),
        "per_class": {
            lab: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                  "support": int(support[i])}
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": {"rows": "gold", "columns": labels + ["none"], "labels": labels,
                             "matrix": cm.tolist()},
        "majority_class": maj_label,
        "majority_baseline": maj_acc,
        "prediction_counts": {lab: int(c) for lab, c in zip(labels + ["none"], cm.sum(axis=0))},
    }
    if with_ci:
        ci = bootstrap_ci(gold, pred, labels)
        out["accuracy_ci95"] = ci["accuracy"]
        out["macro_f1_ci95"] = ci["macro_f1"]
    return out


def breakdown(gold: list[str], pred: list[str | None], groups: list, labels: list[str]) -> dict[str, dict]:
    """Per-group n, accuracy, macro-F1, balanced accuracy and majority baseline (groups with a None key: 'n/a').

    A group's macro-F1 averages over the gold classes present in that group and is None when only one is
    (`macro_f1_present`); `classes_present` says how many there are."""
    by: dict[str, list[int]] = {}
    for i, key in enumerate(groups):
        by.setdefault("n/a" if key is None or key == "" else str(key), []).append(i)
    out = {}
    for key in sorted(by):
        idx = by[key]
        g = [gold[i] for i in idx]
        p = [pred[i] for i in idx]
        _, maj = majority(g)
        out[key] = {"n": len(idx), "accuracy": accuracy(g, p), "macro_f1": macro_f1_present(g, p, labels),
                    "classes_present": len(set(g)), "balanced_accuracy": balanced_accuracy(g, p, labels), "majority_baseline": maj}
    return out


def top_answer_share(counts: object) -> float | None:
    """Share of the most frequent answer among the predictions ({"A": 0, "D": 1651, "none": 0} -> ~0.998)."""
    if not isinstance(counts, dict):
        return None
    values = [float(v) for v in counts.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    total = sum(values)
    return max(values) / total if values and total > 0 else None
