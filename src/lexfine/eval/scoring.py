"""Two ways to compare loglik candidates: the summed log-prob (the headline) and the mean log-prob per answer token.

A candidate's summed log-prob falls with every token it has, so a base model that has never seen the answer format
is biased towards the shorter answer: with the SmolLM2/Apertus tokenizers "approval" + end-of-turn is 3 tokens,
"dismissal" + end-of-turn 5. The length-normalised variant divides each candidate's sum by its token count and is
reported next to the summed one (`length_normalized` in summary.json); the headline numbers stay the summed ones
(`headline_scoring: "sum"`): they are what a fine-tuned model is trained to maximise (the whole answer sequence),
and they are comparable with earlier results. Where every candidate has as many tokens (LEXam letters scored at one
position, `first_token`), both variants coincide and `identical_to_sum` is true.
"""

from __future__ import annotations

HEADLINE_SCORING = "sum"
NORMALIZED = "mean log-prob per answer token"


def per_token(scores: list[float], candidates: list[list[int]]) -> list[float]:
    """Each candidate's summed log-prob divided by its token count (end-of-turn included where it is scored)."""
    return [s / len(c) for s, c in zip(scores, candidates)]


def length_normalized(rows: list[dict], labels: list[str], candidate_tokens: dict[str, int] | None) -> dict | None:
    """The length-normalised variant's metrics (accuracy, macro-F1, their 95% CIs, ...) from the rows'
    `prediction_length_normalized`; None when the rows have none (generate mode)."""
    from lexfine.eval import metrics

    if not rows or "prediction_length_normalized" not in rows[0]:
        return None
    gold = [r["gold"] for r in rows]
    pred = [r["prediction_length_normalized"] for r in rows]
    rep = metrics.classification_report(gold, pred, labels)
    keep = ("accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95", "balanced_accuracy", "prediction_counts")
    return {"scoring": NORMALIZED, **{k: rep[k] for k in keep},
            "agreement_with_sum": sum(r["prediction"] == p for r, p in zip(rows, pred)) / len(rows),
            "identical_to_sum": len(set(candidate_tokens.values())) == 1 if candidate_tokens else None}
