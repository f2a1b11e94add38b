"""Compiled decoder layers do not recompile after the warm-up while batch lengths vary (issue 19).

The tiny Apertus trains through lexfine's own recipe with `train.compile_layers=true` over batches built to hit every
cause of a recompilation found (docs/performance.md, "Recompiles"): a short first batch (adaptive checkpointing would
checkpoint no layer), a long one later (checkpointed layers), batches without padding (transformers passes no mask),
lengths equal to the hidden size (64: "duck sizing" tied the two), in a fixed order. On a CPU the layers compile with
aot_eager, as lexfine does there: no kernels are generated, but every guard and recompilation is Dynamo's, the same
as with inductor on a GPU (CUDA-only guards, such as attention kernels' alignment checks, cannot show here).
"""

import json
import random

import pytest

from lexfine.config import validate

# per step: the lengths of its 4 sequences (batch 4, max_length 128: a full batch is 512 tokens; hidden size 64)
BATCHES = [
    [64, 50, 40, 30],      # first batch: length = hidden size; short: adaptive checkpointing alone checkpoints no layer
    [50, 45, 44, 43],
    [128, 128, 120, 100],  # a full batch: one of the two layers checkpointed
    [72, 72, 72, 72],      # no padding (transformers passes no mask)
    [61, 50, 40, 33],
    [88, 88, 88, 88],      # no padding
    [125, 120, 110, 97],
    [25, 24, 23, 22],
    [128, 128, 128, 128],  # no padding, full
    [33, 32, 31, 30],
    [80, 79, 78, 77],
    [64, 64, 64, 64],      # no padding, length = hidden size
]


def synthetic(batches, seed=0):
    from datasets import Dataset

    from lexfine.data.prepare import PreparedStats

    rng = random.Random(seed)
    ids, labels = [], []
    for n in (n for b in batches for n in b):
        seq = [rng.randrange(10, 1000) for _ in range(n)]
        ids.append(seq)
        labels.append([-100] * (n - 4) + seq[-4:])  # loss on the "answer", as lexfine's masking does
    return Dataset.from_dict({"input_ids": ids, "labels": labels}), PreparedStats(n=len(ids))


def train(tiny_config, tmp_path, monkeypatch, name, **over):
    from torch.utils.data import SequentialSampler
    from trl import SFTTrainer

    from lexfine.train import sft

    data = synthetic(BATCHES)
    monkeypatch.setattr(sft, "load_dataset", lambda cfg, tokenizer: data)
    # the batches in the order above (the length-grouped sampler would reorder them)
    monkeypatch.setattr(SFTTrainer, "_get_train_sampler", lambda self, *a, **k: SequentialSampler(self.train_dataset))
    tree = tiny_config(output_dir=str(tmp_path / name), train__max_steps=len(BATCHES), train__batch_size=4,
                       train__max_length=128, train__gradient_checkpointing=True, train__checkpoint_fraction=0.5,
                       train__save_steps=100, **over)
    rd = sft.run(validate(tree))
    return rd.manifest(), [json.loads(r)["loss"] for r in rd.metrics_path.read_text().splitlines()
                           if "loss" in json.loads(r)]


@pytest.mark.slow
@pytest.mark.parametrize("mask_free", [None, False])  # the default (no mask at all), and explicit masks everywhere
def test_compiled_layers_do_not_recompile_after_the_warmup(tiny_config, tmp_path, monkeypatch, mask_free):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m, compiled = train(tiny_config, tmp_path, monkeypatch, "compiled", train__compile_layers=True,
                        train__mask_free_attention=mask_free)
    assert m["status"] == "completed" and m["speed"]["compiled_layers"] is True
    assert m["speed"]["mask_free_attention"] is (mask_free is None)
    assert m["timings"]["warmup_steps"] == 1
    assert m["timings"]["recompiles"] == 0
    # all in step 1: one graph for the checkpointed layer, one for the other
    assert counters["frames"]["total"] == 2

    # padding each batch to a multiple of 8 and the explicit causal mask change nothing that is learned
    _, plain = train(tiny_config, tmp_path, monkeypatch, "plain", train__compile_layers=False,
                     train__mask_free_attention=False)
    assert len(compiled) == len(plain) == len(BATCHES)
    assert compiled == pytest.approx(plain, rel=1e-5)
