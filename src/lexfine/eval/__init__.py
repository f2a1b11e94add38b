"""Evaluation: Swiss Judgment Prediction (task skill) and LEXam MCQ (knowledge retention).

    evaluate(target, task, mode="loglik", ...)      one task on a run directory or a model -> summary dict
    run_configured_evals(run_dir, cfg, model, tok)  the tasks in cfg.eval after training (+ cached base scores)

Modes: loglik scores the candidate answers (no generation, no parse failures); generate decodes greedily and parses
the answer as the reference study did. See runner.py for the files written.
"""

from lexfine.eval.configured import run_configured_evals
from lexfine.eval.runner import evaluate, headline
from lexfine.eval.tasks import TASKS

__all__ = ["evaluate", "run_configured_evals", "headline", "TASKS"]
