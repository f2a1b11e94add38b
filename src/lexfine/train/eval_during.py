"""Evaluation during training: the tasks of `eval_during` scored every N optimizer steps, at the end, and once before
step 1 (the base model: step 0), with the loglik code of `lexfine eval` (same cases, prompts, candidates, metrics).

Cases are loaded and tokenized once, at train begin; each evaluation is then forward passes only (model in eval
mode, no_grad, compiled training layers bypassed, RNG states restored: a run trains identically with and without
it). Every rank scores its shard (eval/dist.py) and all ranks get the gathered metrics, so they decide the same
(best checkpoint, early stop); sharded models (ZeRO-3, FSDP2) run the same number of forward passes on every rank.

Rank 0 appends one row per evaluation to metrics.jsonl: {"step", "epoch", "eval_s", "eval/<task>[/<split>]/<metric>"}
and logs the same values to the tracker (train.report_to) as eval_<task>/... (W&B shows them as eval/<task>/...).
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

from transformers import TrainerCallback

from lexfine.config import RunConfig
from lexfine.eval import dist
from lexfine.eval.tasks import EvalCase, Task, get_task, load_cases
from lexfine.rundir import RunDir
from lexfine.train.select import Selector

log = logging.getLogger("lexfine.train")

METRICS = ("accuracy", "macro_f1", "n")
BUNDLED_SJP = "bundled:sjp_fr_heldout"  # 2015-2016: the validation years


@dataclass
class Prepared:
    task: Task
    prefix: str  # eval/sjp/validation, eval/lexam_mcq4
    cases: list[EvalCase]
    info: dict
    mine: list[int]  # this rank's case indices
    scored: list  # loglik.Case for each of `mine` (a dummy when `mine` is empty)
    n_batches: int  # forward batches every rank runs (lock-step for sharded models)
    pad_id: int


def metric_prefix(task: str, split: str | None) -> str:
    return f"eval/{task}/{split}" if task == "sjp" else f"eval/{task}"


def load_task_cases(cfg: RunConfig, task: Task, seed: int = 0) -> tuple[list[EvalCase], dict]:
    """The cases of one task. SJP without eval_during.sjp_data: the validation years of the run's own data when it
    has them (data.train read with the SJP split), else the bundled held-out cases (also 2015-2016)."""
    ed = cfg.eval_during
    data_args = cfg.data.model_copy(update={"years": None})  # the split picks the years, not the training filter
    if task.kind != "sjp":
        return load_cases(task, "loglik", ed.lexam_data, data_args, None, ed.limit, seed)
    if ed.sjp_data:
        return load_cases(task, "loglik", ed.sjp_data, data_args, ed.sjp_split, ed.limit, seed)
    if cfg.data.format in ("auto", "sjp"):
        try:
            return load_cases(task, "loglik", cfg.data.train, data_args, ed.sjp_split, ed.limit, seed)
        except Exception as e:  # no such years, not SJP rows, hub offline: the bundled cases stand in
            log.info("eval_during: no %s SJP cases in %s (%s); using %s", ed.sjp_split, cfg.data.train,
                     str(e).splitlines()[0] if str(e) else type(e).__name__, BUNDLED_SJP)
    return load_cases(task, "loglik", BUNDLED_SJP, data_args, ed.sjp_split, ed.limit, seed)


def prepare(cfg: RunConfig, tokenizer, info: dist.DistInfo, device) -> list[Prepared]:
    """Load and tokenize every task's cases once (this rank's shard only)."""
    from lexfine.eval.loglik import Case, _block, length_batches
    from lexfine.eval.runner import _pad_id, batch_limits, build_prompt, make_plan

    max_length = cfg.eval_options.max_length or cfg.train.max_length  # as `lexfine eval <run>` (eval/target.py)
    bs, cap = batch_limits("loglik", device, cfg.eval_during.batch_size, None)
    out = []
    for name in cfg.eval_during.tasks:
        task = get_task(name)
        cases, meta = load_task_cases(cfg, task)
        plan = make_plan(tokenizer, task, "loglik", max_length)
        mine = dist.shard([len(c.example.before) + len(c.example.facts) + len(c.example.after) for c in cases], info)
        prompts = [build_prompt(tokenizer, cases[i].example, plan, cfg.data.truncation)[0] for i in (mine or [0])]
        scored = [Case(p, plan.candidates) for p in prompts]
        # the batches score_cases will form (same lengths, same limits): the count each rank must reach
        n = len(length_batches([len(c.prompt) + len(_block(c.candidates)[0]) for c in scored], bs, cap))
        if info.world > 1:
            import torch

            counts: list = [None] * info.world
            torch.distributed.all_gather_object(counts, n)
            n = max(counts)
        prefix = metric_prefix(task.name, meta["split"] if task.kind == "sjp" else None)
        out.append(Prepared(task, prefix, cases, meta, mine, scored, n, _pad_id(tokenizer, plan.eot)))
    return out


@contextmanager
def preserved_rng():
    """Evaluation must not move the training's random streams (dropout, data order): save and restore them."""
    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@contextmanager
def eager_eval(model):
    """Eval mode, and decoder layers compiled for training bypassed (cached scoring was not what they were traced
    for); both restored afterwards."""
    from lexfine.train.speed import decoder_layers

    was_training = model.training
    try:
        layers = decoder_layers(model)
    except Exception:
        layers = []
    saved = [(layer, layer._compiled_call_impl) for layer in layers if getattr(layer, "_compiled_call_impl", None)]
    for layer, _ in saved:
        layer._compiled_call_impl = None
    model.eval()
    try:
        yield
    finally:
        for layer, impl in saved:
            layer._compiled_call_impl = impl
        model.train(was_training)


def score(model, prepared: list[Prepared], info: dist.DistInfo, batch_size: int | None, lockstep: bool) -> dict:
    """{"eval/<task>[/<split>]/<metric>": value} for every task; the same on every rank."""
    from lexfine.eval.loglik import predict, score_cases
    from lexfine.eval.runner import batch_limits, build_summary, model_device
    from lexfine.eval.metrics import top_answer_share

    bs, cap = batch_limits("loglik", model_device(model), batch_size, None)
    values: dict = {}
    for p in prepared:
        outs = score_cases(model, p.scored, bs, p.pad_id, progress=False, desc=p.task.name, max_batch_tokens=cap,
                           n_batches_min=p.n_batches if lockstep else None)
        merged = dist.gather(dict(zip(p.mine, outs)), info)  # an empty shard scored a dummy: nothing to send
        labels = p.task.labels
        rows = [{"gold": c.gold, "prediction": predict(merged[i], labels), **c.groups} for i, c in enumerate(p.cases)]
        summary = build_summary(p.task, "loglik", rows)
        values.update({f"{p.prefix}/{k}": summary[k] for k in METRICS if summary.get(k) is not None})
        share = top_answer_share(summary.get("prediction_counts"))
        if share is not None:  # one answer for (nearly) every case: a collapse that accuracy alone can hide
            values[f"{p.prefix}/top_answer_share"] = share
        # a continuous score (accuracy moves in steps of 1/n): the mean summed log-prob of the gold answer, as
        # predictions.jsonl's `scores` of `lexfine eval` give it
        gold = [merged[i][labels.index(c.gold)] for i, c in enumerate(p.cases) if c.gold in labels]
        if gold:
            values[f"{p.prefix}/gold_logprob"] = round(float(sum(gold) / len(gold)), 6)
    return values


class EvalDuringCallback(TrainerCallback):
    """Scores cfg.eval_during.tasks at step 0, every `every_steps` optimizer steps and at the end of training."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, tokenizer, main: bool, clocks=()):
        self.cfg, self.rd, self.tokenizer, self.main = cfg, run_dir, tokenizer, main
        self.clocks = clocks  # callbacks with exclude_time(s): their throughput leaves evaluation time out
        self.trainer = None  # set after the trainer is built: trainer.log reaches the trackers, save_model the best
        self.prepared: list[Prepared] | None = None
        self.info = None
        self.last_step: int | None = None
        self.seconds = 0.0
        self.evaluations = 0
        ed = cfg.eval_during
        self.selector = Selector(ed.select, ed.retention_task, ed.stop_lexam_drop)

    def on_train_begin(self, args, state, control, model=None, **kw):
        t0 = time.perf_counter()
        self.info = dist.setup()
        with preserved_rng():
            self.prepared = prepare(self.cfg, self.tokenizer, self.info, next(model.parameters()).device)
        prep_s = time.perf_counter() - t0
        # resumed: the evaluations up to the checkpoint (filtered here too: other ranks may read before rank 0 has
        # truncated the file, and every rank must replay the same rows to take the same decisions)
        done = [r for r in self.rd.metrics() if any(k.startswith("eval/") for k in r)
                and r.get("step", 0) <= state.global_step] if state.global_step else []
        self.selector.restore(done, self.rd, self.main)
        if self.main:
            prev = (self.rd.manifest().get("eval_during") or {}) if state.global_step else {}
            self.seconds, self.evaluations = float(prev.get("seconds") or 0.0), int(prev.get("evaluations") or 0)
            self._record(prepare_s=round(prep_s, 2),
                         cases={p.prefix: len(p.cases) for p in self.prepared},
                         data={p.prefix: {k: p.info[k] for k in ("data", "split", "limit", "fingerprint")}
                               for p in self.prepared})
        if not done:  # a fresh start: the base model is the first point of every curve
            self._evaluate(args, state, control, model)

    def on_step_end(self, args, state, control, model=None, **kw):
        every = self.cfg.eval_during.every_steps
        if every and state.global_step % every == 0:
            self._evaluate(args, state, control, model)

    def on_train_end(self, args, state, control, model=None, **kw):
        # Stopped before max_steps: preempted (the grace period is for the checkpoint) or stopped early (scored).
        if self.last_step != state.global_step and state.global_step >= state.max_steps:
            self._evaluate(args, state, control, model)

    def _evaluate(self, args, state, control, model) -> None:
        import torch

        from lexfine.eval.runner import model_device
        from lexfine.train.strategies import autocast_by_deepspeed

        t0 = time.perf_counter()
        lockstep = self.cfg.launch.strategy in ("zero3", "fsdp2") and self.info.world > 1
        autocast = _null()
        if self.trainer and self.cfg.method == "full":  # fp32 weights: score in the bf16 the training computes in
            autocast = (torch.autocast(model_device(model).type, dtype=torch.bfloat16)
                        if autocast_by_deepspeed(self.trainer.args) else self.trainer.accelerator.autocast())
        with preserved_rng(), eager_eval(model), torch.no_grad(), autocast:
            values = score(model, self.prepared, self.info, self.cfg.eval_during.batch_size, lockstep)
        forget_zero3_trace(self.trainer)
        seconds = time.perf_counter() - t0
        self.last_step = state.global_step
        self.seconds += seconds
        self.evaluations += 1
        for clock in self.clocks:
            clock.exclude_time(seconds)
        step = state.global_step
        if self.main:
            row = {"step": step, "epoch": round(float(state.epoch or 0.0), 4), "eval_s": round(seconds, 3), **values}
            self.rd.append_metrics(row)
            self._record(seconds=round(self.seconds, 2), evaluations=self.evaluations)
        log.info("eval_during step %d (%.1f s): %s", step, seconds,
                 ", ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in values.items() if not k.endswith("/n")))
        if self.trainer is not None:
            # eval_ prefix: trackers file them under eval/ (W&B's rewrite_logs); metrics.jsonl already has the row
            # the callback handler clears should_log on every log: the training row of this step must still come
            should_log = control.should_log
            self.trainer.log({"eval_" + k.removeprefix("eval/"): v for k, v in values.items()})
            control.should_log = self.trainer.control.should_log = should_log
        decision = self.selector.update(step, values)
        if decision.new_best and self.trainer is not None and step > 0:
            self.selector.save_best(self.trainer, self.tokenizer, self.rd, self.main, step, values)
        if decision.stop:
            control.should_training_stop = True
            if self.main:
                self.rd.update_manifest(stopped_early={"step": step, "reason": decision.stop})
            log.warning("eval_during: stopping early at step %d: %s", step, decision.stop)

    def _record(self, **fields) -> None:
        m = self.rd.manifest().get("eval_during") or {}
        self.rd.update_manifest(eval_during={**m, **fields})


@contextmanager
def _null():
    yield


def forget_zero3_trace(trainer) -> None:
    """DeepSpeed ZeRO-3 prefetches parameters in the module order it recorded. After scoring, that is the evaluation's
    order, which calls lm_head as a module; the next training forward then prefetched lm_head while TRL's fused loss
    gathered it by hand, and failed ("Cannot partition a param in flight", 2 gloo processes, DeepSpeed 0.19.8). An
    invalid trace makes the next forward record training's own order. No-op without ZeRO-3."""
    engine = getattr(trainer, "deepspeed", None) if trainer is not None else None
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    if coordinator is None:
        return
    if not hasattr(coordinator, "_invalidate_trace"):  # a private method: say so if a DeepSpeed release renames it
        log.warning("eval_during: this DeepSpeed has no _invalidate_trace; ZeRO-3 training after an evaluation may "
                    "fail with 'Cannot partition a param in flight'")
        return
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
