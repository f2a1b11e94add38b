"""Checkpoint selection and early stop from the eval_during metrics.

Rule (eval_during.select): among the evaluated steps after step 0, the one with the highest `metric` whose LEXam
accuracy is at most `max_lexam_drop` below the base model's (step 0) and which does not give one LEXam answer to
`max_top_answer_share` or more of the questions (a collapse). Its adapter (or full weights) is saved to
<run>/best/ whenever a new best appears, and the manifest's `selected_checkpoint` names step, metrics and rule.
Early stop (eval_during.stop_lexam_drop): training ends once LEXam accuracy falls more than that below the base's.

Every rank holds the same gathered metrics, so every rank takes the same decisions (saving is collective under
ZeRO-3).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

from lexfine.rundir import RunDir, atomic_write_json

log = logging.getLogger("lexfine.train")

BEST = "best"


@dataclass
class Decision:
    new_best: bool = False
    stop: str | None = None  # why training should stop


class Selector:
    def __init__(self, select, retention_task: str | None, stop_drop: float | None):
        self.select = select  # SelectArgs | None
        self.retention_key = f"eval/{retention_task}/accuracy" if retention_task else None
        self.share_key = f"eval/{retention_task}/top_answer_share" if retention_task else None
        self.stop_drop = stop_drop
        self.base_retention: float | None = None
        self.best: dict | None = None  # {"step", "value", "metrics"}

    def rule(self) -> dict:
        s = self.select
        return {"metric": s.metric, "max_lexam_drop": s.max_lexam_drop, "retention_metric": self.retention_key,
                "base_retention": self.base_retention, "max_top_answer_share": s.max_top_answer_share,
                "among": "evaluated steps after step 0"}

    def _drop(self, values: dict) -> float | None:
        r = values.get(self.retention_key) if self.retention_key else None
        if r is None or self.base_retention is None:
            return None
        return self.base_retention - r

    def update(self, step: int, values: dict) -> Decision:
        if step == 0:
            self.base_retention = values.get(self.retention_key) if self.retention_key else None
            return Decision()
        d = Decision()
        drop = self._drop(values)
        if self.stop_drop is not None and drop is not None and drop > self.stop_drop:
            d.stop = (f"{self.retention_key} {values[self.retention_key]:.4f} is {drop:.4f} below the base model's "
                      f"{self.base_retention:.4f} (eval_during.stop_lexam_drop={self.stop_drop})")
        s = self.select
        value = values.get(s.metric) if s else None
        if value is None:
            return d
        if s.max_lexam_drop is not None and (drop is None or drop > s.max_lexam_drop + 1e-12):
            return d
        share = values.get(self.share_key) if self.share_key else None
        if s.max_top_answer_share is not None and share is not None and share >= s.max_top_answer_share:
            return d  # collapsed to one answer: not retention, whatever the accuracy
        if self.best is None or value > self.best["value"]:
            self.best = {"step": step, "value": value, "metrics": dict(values)}
            d.new_best = True
        return d

    def restore(self, rows: list[dict], rd: RunDir, main: bool) -> None:
        """On resume: replay the evaluations kept in metrics.jsonl (up to the checkpoint). A best/ saved after that
        checkpoint belongs to steps that will be trained again: it is dropped and selected again if it recurs."""
        for row in sorted(rows, key=lambda r: r["step"]):
            self.update(row["step"], {k: v for k, v in row.items() if k.startswith("eval/")})
        if not main:
            return
        sel = rd.manifest().get("selected_checkpoint")
        if sel and (self.best is None or sel.get("step") != self.best["step"]):
            shutil.rmtree(rd.path / BEST, ignore_errors=True)
            rd.update_manifest(selected_checkpoint=None)
            if self.best is not None:
                log.warning("eval_during: the weights of the best step %d were replaced after the checkpoint; "
                            "best/ is saved again at the next better step", self.best["step"])
                self.best["value"] = float("-inf")  # any eligible step replaces it

    def save_best(self, trainer, tokenizer, rd: RunDir, main: bool, step: int, values: dict) -> None:
        """Save the model as <run>/best/ (all ranks take part: collective under ZeRO-3), swap it in atomically."""
        tmp, out, old = rd.path / f"{BEST}.tmp", rd.path / BEST, rd.path / f"{BEST}.old"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(tmp))
        trainer.accelerator.wait_for_everyone()
        if not main:
            return
        tokenizer.save_pretrained(str(tmp))
        selected = {"step": step, "path": BEST, "metric": self.select.metric, "value": values.get(self.select.metric),
                    "metrics": values, "rule": self.rule()}
        atomic_write_json(tmp / "selected.json", selected)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        rd.update_manifest(selected_checkpoint=selected)
        log.info("eval_during: step %d is the new best (%s = %.4f) -> %s", step, self.select.metric,
                 values.get(self.select.metric), out)
