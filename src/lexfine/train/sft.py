"""The training recipe, top to bottom: resolve the run directory -> data -> model -> TRL SFTTrainer -> save.

Re-running the same config resumes from the latest checkpoint; a completed run is skipped.
Only the main process writes to the run directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from pathlib import Path

from lexfine.config import RunConfig
from lexfine.errors import LexfineError
from lexfine.rundir import RunDir, git_sha, hardware, now_iso, package_versions, redact
from lexfine.train.strategies import precision

log = logging.getLogger("lexfine.train")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(cfg: RunConfig) -> RunDir:
    """Train (or resume, or skip) the run that `cfg` describes; returns its run directory.
    The main process holds the run's lock (lexfine.runlock) from before its first write to its last."""
    from contextlib import nullcontext

    from lexfine.runlock import RunLock
    from lexfine.train.signals import StopOnSignal

    rd = RunDir(cfg.run_dir())
    if rd.status == "completed":
        log.warning("run %s is already completed: %s (`lexfine train --force` trains it again)", cfg.run_id(), rd.path)
        return rd
    from lexfine.quantize import check_runtime
    from lexfine.train.divergence import TrainingDiverged
    from lexfine.train.global_batch import check_launch

    check_runtime(cfg)  # lora.quantize on a machine that cannot run it: one line, before a run directory exists

    if rd.status == "diverged":
        raise TrainingDiverged(f"run {cfg.run_id()} diverged before (step {rd.manifest().get('diverged_at_step')}): "
                               f"{rd.path}; lower train.lr and `lexfine train --force` trains it again")
    ckpt = rd.latest_checkpoint()
    global_batch = check_launch(cfg, rd.manifest(), ckpt.name if ckpt else None)
    main = is_main_process()
    with RunLock(rd.path) if main else nullcontext(), StopOnSignal() as guard:
        if main and rd.status == "completed":  # the previous holder completed it after our first look
            return rd
        if main:
            rd.create(cfg.to_yaml(), cfg.run_id())
            rd.set_status("running", started=now_iso(), versions=package_versions(), git_sha=git_sha(),
                          hardware=hardware(), world_size=world_size(), global_batch=global_batch)
        try:
            preempted = _train(cfg, rd, main, guard)
        except BaseException as e:
            if main and not isinstance(e, TrainingDiverged):  # record_divergence wrote the manifest
                _record_failure(rd, e)
            raise
        if preempted:
            from lexfine.train.preemption import requeue_if_preempted

            if main:
                rd.set_status("interrupted", error="preempted: checkpoint saved, resume by running the same command")
            requeue_if_preempted(True)
    return rd


def _record_failure(rd: RunDir, e: BaseException) -> None:
    """The manifest says what happened, never a mix: a completed run keeps `completed` (only its evaluations were
    cut short); otherwise `interrupted` for a signal or Ctrl-C, `failed` (with the stage) for an error."""
    from lexfine.train.signals import Interrupted

    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    if rd.status == "completed":
        if isinstance(e, KeyboardInterrupt):
            rd.update_manifest(eval_error=f"{detail}: the evaluations after training did not finish; "
                                          "run them with `lexfine eval`")
        return
    stage = "training" if rd.metrics_path.exists() or any(rd.checkpoints.glob("checkpoint-*")) else "setup"
    if isinstance(e, KeyboardInterrupt):
        why = detail if isinstance(e, Interrupted) else "interrupted (Ctrl-C)"
        rd.set_status("interrupted", error=f"{why} during {stage}: rerun the same command to resume")
    else:
        rd.set_status("failed", failed_stage=stage, error=redact(f"{type(e).__name__}: {detail}"),
                      traceback=None if isinstance(e, LexfineError) else redact(traceback.format_exc()[-4000:]))


def build_args(cfg: RunConfig, rd: RunDir):
    """SFTConfig from the RunConfig. Built before the model is loaded: ZeRO-3 must know it before weights exist."""
    import torch
    from trl import SFTConfig

    from lexfine.train.speed import pad_to_multiple_of
    from lexfine.train.strategies import training_fields, zero_autocast

    t = cfg.train
    cuda = torch.cuda.is_available()
    bf16 = t.bf16 if t.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    # full fine-tuning under ZeRO: DeepSpeed applies the bf16 autocast itself (its bf16 mode would compute on bf16
    # weights), so the Trainer's own bf16 (which would turn DeepSpeed's bf16 mode on) stays off
    autocast = zero_autocast(cfg.launch.strategy, cfg.method, bf16)
    fields = dict(
        output_dir=str(rd.checkpoints),
        learning_rate=t.lr,
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        lr_scheduler_type=lr_scheduler(t),
        warmup_steps=warmup_steps(t.warmup_ratio),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16 and not autocast,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        use_liger_kernel=t.liger,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # counted into trainer_state.json, so a resume continues the count exactly (metrics.jsonl num_tokens)
        include_num_input_tokens_seen="all" if t.padding_free else "non_padding",
        # Log a NaN/inf loss as it is: the default filter logs the running mean instead (0.0 on a window's first
        # step), and a blown-up run looks perfect. train/divergence.py stops such a run.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=[] if t.report_to == "none" else [t.report_to],
        run_name=cfg.run_id(),
        dataloader_num_workers=t.dataloader_workers,
        # The dataset is tokenized by lexfine (masking + truncation that keeps the answer); TRL must not re-cut it.
        max_length=None,
        packing=False,
        padding_free=t.padding_free,
        pad_to_multiple_of=pad_to_multiple_of(cfg),
        completion_only_loss=None,
        remove_unused_columns=True,
        disable_tqdm=not is_main_process(),
        use_cpu=not cuda,
    )
    fields.update(training_fields(cfg.launch.strategy, t.gradient_checkpointing, autocast))
    if cfg.launch.strategy == "fsdp2" and not cuda and world_size() > 1:
        log.warning("launch.strategy=fsdp2 needs CUDA GPUs: on a CPU accelerate trains these processes with plain DDP")
    return SFTConfig(**_compatible(SFTConfig, fields))


def lr_scheduler(t) -> str:
    """`constant` has no warm-up in transformers: with a warm-up it must be constant_with_warmup."""
    return "constant_with_warmup" if t.lr_scheduler == "constant" and t.warmup_ratio > 0 else t.lr_scheduler


def warmup_steps(ratio: float) -> float:
    """transformers 5 reads warmup_steps < 1 as a fraction of the run's steps and >= 1 as a step count, so 1.0
    would be one step. The largest float below 1 gives ceil(steps x ratio) = every step (for < 2**52 steps)."""
    import math

    return math.nextafter(1.0, 0.0) if ratio >= 1.0 else float(ratio)


def _compatible(config_cls, fields: dict) -> dict:
    """transformers renamed a few arguments during 5.x (group_by_length -> train_sampling_strategy)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_cls)}
    if "train_sampling_strategy" not in known:
        fields["group_by_length"] = fields.pop("train_sampling_strategy") == "group_by_length"
    dropped = [k for k in fields if k not in known]
    for k in dropped:
        log.warning("this transformers/TRL version has no %r; ignored", k)
        fields.pop(k)
    return fields


def lora_config(cfg: RunConfig):
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      use_rslora=lc.use_rslora, use_dora=lc.use_dora, bias="none", task_type="CAUSAL_LM")


def weights_dtype(cfg):
    """The dtype training loads the weights in: fp32 master weights for full fine-tuning (bf16 autocast does the
    compute; bf16 weights would round away small updates), else the model_args dtype (None: as configured)."""
    import torch

    return torch.float32 if cfg.method == "full" and cfg.model_args.dtype == "auto" else None


def check_lora_targets(model, target_modules) -> None:
    """A typo in target_modules would otherwise train nothing (or fail deep inside PEFT)."""
    if target_modules == "all-linear":
        return
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise LexfineError(f"lora.target_modules {missing} match no module of this model; its linear layers: {linear}")


def load_dataset(cfg: RunConfig, tokenizer):
    from lexfine.data import load_examples
    from lexfine.data.prepare import tokenized_dataset

    examples = load_examples(cfg.data, seed=cfg.train.seed)
    return tokenized_dataset(tokenizer, examples, cfg.train.max_length, cfg.data.loss_on, cfg.data.truncation,
                             progress=is_main_process())


def _resume_state(rd: RunDir, main: bool) -> tuple[Path | None, float, int]:
    ckpt = rd.latest_checkpoint(discard_incomplete=main)
    if ckpt is None:
        if main and rd.metrics_path.exists():
            # no complete checkpoint: training starts over and logs every row again, the base model's evaluation
            # (step 0) included; kept, it would appear twice
            rd.truncate_metrics_after(-1)
        return None, 0.0, 0
    step = int(ckpt.name.split("-")[1])
    rows = [r for r in rd.train_metrics() if r.get("step", 0) <= step]
    if main:
        rd.truncate_metrics_after(step)
    last = rows[-1] if rows else {}
    return ckpt, float(last.get("elapsed_s") or 0.0), int(last.get("num_tokens") or 0)


def peak_gpu_gib(rd: RunDir) -> float | None:
    """This process's peak GPU memory (GiB), or that of an earlier process of the same run (stopped, then resumed)
    when it was higher: a resumed run's manifest reports the whole run's peak. None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    now = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    before = rd.manifest().get("peak_gpu_memory_gib")
    return max(now, before) if isinstance(before, (int, float)) else now


def _train(cfg: RunConfig, rd: RunDir, main: bool, guard) -> bool:
    """Returns True when training stopped early for preemption (a checkpoint was saved)."""
    import torch
    from trl import SFTTrainer

    from lexfine import models
    from lexfine.train.callbacks import MetricsCallback
    from lexfine.train.divergence import DivergenceCallback, record_divergence
    from lexfine.train.preemption import PreemptionCallback
    from lexfine.train.speed import apply_speed_levers, attention_kernels
    from lexfine.train.timings import TimingsCallback

    # Resolved before build_args: under ZeRO-3 the SFTConfig switches transformers to zero.Init, and the embedded
    # model's conversion and a random architecture's CPU copy (models.random_weights_dir) must not be built under it.
    spec = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(spec, cfg.model_args)
    t0 = time.perf_counter()
    if spec.is_random:
        models.random_weights_dir(spec, cfg.model_args, tokenizer)
    build_s = time.perf_counter() - t0
    args = build_args(cfg, rd)
    t0 = time.perf_counter()
    dataset, stats = load_dataset(cfg, tokenizer)
    timings = {"data_prep_s": round(time.perf_counter() - t0, 2)}
    if main:
        rd.update_manifest(data=stats.as_dict(), precision=precision(args))
        log.info("data: %d examples, %d truncated (facts cut)", stats.n, stats.truncated)

    dtype = weights_dtype(cfg)
    device = None
    if spec.is_random and torch.cuda.is_available() and cfg.launch.strategy in ("none", "ddp"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # building 8B random weights on a CPU takes minutes
    t0 = time.perf_counter()
    if cfg.method == "lora" and cfg.lora.quantize != "none":
        from lexfine.quantize import load_quantized

        model = load_quantized(spec, cfg, tokenizer)
    else:
        model = models.load_model(spec, cfg.model_args, tokenizer=tokenizer, dtype=dtype, device=device)
    timings["model_load_s"] = round(build_s + time.perf_counter() - t0, 2)
    callbacks, speed = apply_speed_levers(cfg, model)
    if main:
        rd.update_manifest(speed=speed)
    peft_config = None
    if cfg.method == "lora":
        check_lora_targets(model, cfg.lora.target_modules)
        peft_config = lora_config(cfg)

    ckpt, elapsed0, tokens0 = _resume_state(rd, main)
    metrics_cb = MetricsCallback(rd, elapsed_offset=elapsed0, resumed_tokens=tokens0)
    preempt_cb = PreemptionCallback()
    timings_cb = TimingsCallback((lambda t: rd.update_manifest(timings=t)) if main else None, timings)
    diverge_cb = DivergenceCallback(cfg.train.max_nonfinite_steps)  # after preempt_cb: it sees its save requests
    if main and cfg.train.profile_steps:
        from lexfine.train.profile import ProfileCallback

        callbacks.append(ProfileCallback(rd.path / "profile", *cfg.train.profile_steps))
    eval_cb = None
    if cfg.eval_during.every_steps:
        from lexfine.train.eval_during import EvalDuringCallback

        eval_cb = EvalDuringCallback(cfg, rd, tokenizer, main, clocks=(metrics_cb, timings_cb))
        callbacks.append(eval_cb)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[metrics_cb, preempt_cb, diverge_cb, timings_cb, *callbacks])
    diverge_cb.attach(trainer)
    if speed["mask_free_attention"]:
        from lexfine.train.speed import RightPadded

        trainer.data_collator = RightPadded(trainer.data_collator)
    if eval_cb is not None:
        eval_cb.trainer = trainer  # it logs to the trackers and saves the best checkpoint through the trainer
    if main:
        rd.update_manifest(parameters=models.count_parameters(trainer.model), resumed_from=ckpt.name if ckpt else None)
        if ckpt:
            log.info("resuming from %s", ckpt)

    start = time.perf_counter()
    guard.armed = False  # in the loop a signal means "checkpoint at the next step" (PreemptionCallback)
    with attention_kernels(speed):
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    preempt_cb.uninstall()
    guard.armed = True  # from here (saving, evaluating) a signal stops at once
    wall = elapsed0 + time.perf_counter() - start
    if diverge_cb.diverged_at is not None:
        trainer.accelerator.wait_for_everyone()
        raise record_divergence(rd, diverge_cb, main)
    if preempt_cb.preempted:
        if main:  # how far this process got, for a run that stays interrupted until the same command resumes it
            rd.update_manifest(stopped_at_step=trainer.state.global_step, peak_gpu_memory_gib=peak_gpu_gib(rd))
        return True

    out = rd.adapter_dir if cfg.method == "lora" else rd.model_dir
    tmp = out.with_name(out.name + ".tmp")
    if main and tmp.exists():
        shutil.rmtree(tmp)
    t_save = time.perf_counter()
    trainer.save_model(str(tmp))  # collective under ZeRO-3/FSDP: every rank takes part, rank 0 writes
    trainer.accelerator.wait_for_everyone()
    save_s = round(time.perf_counter() - t_save, 2)
    if main:
        if cfg.method == "lora":
            from lexfine.train.saved_adapter import adapted_modules, check_saved_adapter

            rd.update_manifest(adapter_check=check_saved_adapter(
                tmp, adapted_modules(trainer.model), trained=trainer.state.global_step > 0 and cfg.train.lr > 0))
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        rows = rd.train_metrics()
        tokens = rows[-1]["num_tokens"] if rows and rows[-1].get("num_tokens") is not None else None
        tokens = max(int(trainer.state.num_input_tokens_seen), tokens or 0) or None  # steps after the last log too
        rd.set_status(
            "completed", finished=now_iso(), wall_time_s=round(wall, 2), steps=trainer.state.global_step,
            final_loss=rows[-1]["loss"] if rows else None, train_loss_mean=result.training_loss,
            train_tokens=tokens, tokens_per_s=round(tokens / wall, 1) if tokens and wall > 0 else None,
            output=out.name, save_s=save_s,
            peak_gpu_memory_gib=peak_gpu_gib(rd),
        )
        if not cfg.train.keep_checkpoints:
            shutil.rmtree(rd.checkpoints, ignore_errors=True)
    if preempt_cb.received:  # the signal came after the last step: training is saved, the evaluations are not run
        from lexfine.train.signals import Interrupted

        raise Interrupted(preempt_cb.signum)
    if cfg.eval:
        try:
            _evaluate(cfg, rd, trainer, tokenizer, main)
        except Exception as e:
            # The trained weights are saved and the run stays completed: an evaluation can be redone with
            # `lexfine eval`, while marking the run failed would make a rerun retrain it from scratch.
            if main:
                rd.update_manifest(eval_error=redact(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            log.error("evaluation after training failed (the run is saved and completed): %s", e)
            raise EvalAfterTrainingError(str(e)) from e
    return False


class EvalAfterTrainingError(LexfineError):
    """Training completed and was saved; the evaluations that followed failed."""


def _evaluate(cfg: RunConfig, rd: RunDir, trainer, tokenizer, main: bool) -> None:
    if world_size() > 1:
        # Sharded models (ZeRO-3/FSDP) cannot be scored by one rank; a separate `lexfine eval` job does it.
        if main:
            log.warning("evaluations after a multi-process run: run `lexfine eval %s --task ...` (%s)",
                        rd.path, ", ".join(cfg.eval))
        return
    from lexfine.eval import run_configured_evals
    from lexfine.speed import uncompile_decoder_layers

    if cfg.lora.quantize != "none":
        # The in-memory model is the 4-bit training view: score the saved adapter on the bf16 base instead, as
        # `lexfine eval RUN` does (and the base scores it caches are keyed as the bf16 base's).
        from lexfine.quantize import release_trainer_model

        release_trainer_model(trainer)
        run_configured_evals(rd, cfg)
        return
    model = trainer.model
    model.eval()
    uncompile_decoder_layers(model)
    run_configured_evals(rd, cfg, model=model, tokenizer=tokenizer)
