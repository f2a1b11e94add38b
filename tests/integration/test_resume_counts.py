"""Token counts after a resume equal those of the uninterrupted run, at every resume point (issue 16, item 4).

A crash right after checkpoint k is saved (an exception from a callback's on_save: what a kill -9 leaves, minus the
half-written files) and a rerun of the same config; the chain crashes after step 1, in the middle and at the
last-but-one step, then completes.
"""

import pytest

from lexfine.config import validate
from lexfine.rundir import RunDir
from lexfine.train import run


class Crash(RuntimeError):
    pass


def _column(rd: RunDir, key: str) -> list:
    return [r[key] for r in rd.metrics()]


def test_token_counts_survive_resumes(tiny_config, tmp_path, monkeypatch):
    from lexfine.train import callbacks

    over = dict(train__max_steps=5, train__save_steps=1, train__save_total_limit=1, train__keep_checkpoints=True,
                train__logging_steps=2, train__max_length=320, data__limit=12)
    reference = run(validate(tiny_config(output_dir=str(tmp_path / "ref"), **over)))
    ref_tokens = _column(reference, "num_tokens")
    assert len(set(ref_tokens)) == len(ref_tokens) and None not in ref_tokens

    cfg = validate(tiny_config(**over))
    for crash_after in (1, 3, 4):
        def crash(self, args, state, control, **kw):
            if state.global_step == crash_after:
                raise Crash(f"simulated crash after checkpoint-{crash_after}")

        monkeypatch.setattr(callbacks.MetricsCallback, "on_save", crash, raising=False)
        with pytest.raises(Crash):
            run(cfg)
        rd = RunDir(cfg.run_dir())
        assert rd.latest_checkpoint().name == f"checkpoint-{crash_after}"
        n = len(rd.metrics())
        assert _column(rd, "num_tokens") == ref_tokens[:n]
    monkeypatch.undo()

    rd = run(cfg)
    m, ref = rd.manifest(), reference.manifest()
    assert m["status"] == "completed" and m["resumed_from"] == "checkpoint-4"
    assert _column(rd, "step") == _column(reference, "step")
    # (losses: test_train.py; a row logged right after a resume averages only the steps since the resume)
    assert _column(rd, "num_tokens") == ref_tokens
    # logged at steps 1, 2, 4 (and 5?): the manifest counts every step trained, the last one included
    assert m["train_tokens"] == ref["train_tokens"] >= ref_tokens[-1]
    # tokens/s over the whole training: every token once, over the summed wall time of all sessions
    assert m["tokens_per_s"] == pytest.approx(m["train_tokens"] / m["wall_time_s"], rel=0.01)
    assert all(r["tokens_per_s"] is None or r["tokens_per_s"] > 0 for r in rd.metrics())
