"""Did a run diverge? A rule that a noisy answer-only loss (3-5 tokens a case) does not trip by chance.

A run is **diverged** when any of these holds (docs/report.md, "Divergence"):

1. `nonfinite`: a logged loss is NaN/inf/null, or a metrics row carries a `nonfinite` flag (the trainer's record
   of a non-finite loss or grad norm), or the run's status is `diverged`.
2. `rising`: the late window ends clearly above the early window. Windows are the first and last `w` logged
   losses, w = min(`smooth_last`, max(1, n // 4)) for n logged steps. "Clearly" means the late mean exceeds the
   early mean by more than max(`rise_margin` x early mean, `z` standard errors of the difference of the two
   means), and the late median exceeds the early median too: one noisy batch, or a low-LR run that barely moves,
   stays below that margin.
3. `spike`: the late window sits far above the run's best smoothed loss (the lowest rolling mean of `w`
   consecutive losses): late mean > best x (1 + `spike_ratio`), the gap is more than `z` standard errors of the
   late window and more than `rise_margin` x the early mean (a loss that ends near zero, 0.01 -> 0.02, is not a
   spike), and the late median is above the best rolling median x (1 + `spike_ratio`) as well. This catches a
   blow-up after a good stretch, also one that starts from a high loss. Only from w >= 3 (12 logged steps): a
   window of one or two noisy losses says nothing about a spike.

Why medians too: an answer-only loss (3-5 tokens a case) is ~0 for a case the model gets right and 1-2 for one
it gets wrong, so a healthy late window holds a few 1.x values among 0.00x ones: its mean jumps, its median does
not. A real blow-up moves both. Measured on a SmolLM2 LoRA run (tests/data/noisy_answer_only_metrics.jsonl) and
the study's 40 exported histories: none is flagged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class DivergenceRule:
    smooth_last: int = 20
    """Window length cap (the same K as the final-loss smoothing)."""
    rise_margin: float = 0.02
    """Relative margin over the early window's mean."""
    z: float = 3.0
    """Standard errors a rise or spike must exceed (noise of the window means)."""
    spike_ratio: float = 0.5
    """A late window this fraction above the best smoothed loss is a spike."""

    def describe(self) -> str:
        return (f"non-finite loss or flag; or last-window mean > first-window mean by more than "
                f"max({self.rise_margin:g} relative, {self.z:g} standard errors); or last-window mean > "
                f"{1 + self.spike_ratio:g} x the best rolling mean (windows of min({self.smooth_last}, n/4) steps)")


def window(n: int, smooth_last: int) -> int:
    return max(1, min(smooth_last, n // 4)) if n else 0


def _sem(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


def divergence(losses: list[float], rule: DivergenceRule, *, nonfinite_steps: int = 0,
               status: str | None = None) -> str | None:
    """The reason a run counts as diverged (`nonfinite`, `rising`, `spike`), or None when it did not."""
    if status == "diverged" or nonfinite_steps > 0 or any(not math.isfinite(x) for x in losses):
        return "nonfinite"
    n = len(losses)
    if n < 2:
        return None
    w = window(n, rule.smooth_last)
    early, late = losses[:w], losses[-w:]
    m_early, m_late = sum(early) / w, sum(late) / w
    med = statistics.median
    noise = math.sqrt(_sem(early) ** 2 + _sem(late) ** 2)
    floor = rule.rise_margin * abs(m_early)
    if m_late - m_early > max(floor, rule.z * noise) and med(late) > med(early):
        return "rising"
    best = min(sum(losses[i:i + w]) / w for i in range(n - w + 1))
    best_median = min(med(losses[i:i + w]) for i in range(n - w + 1))
    gap = m_late - best
    if (w >= 3 and m_late > best * (1 + rule.spike_ratio) and gap > rule.z * _sem(late) and gap > floor
            and med(late) > best_median * (1 + rule.spike_ratio)):
        return "spike"
    return None
