"""Test-only, on PYTHONPATH of 2 gloo CPU processes under torchrun: FSDP2 and ZeRO-3 on a CPU
(tests/integration/test_distributed_cpu.py; tests/gpu/test_multigpu.py with LEXFINE_MGPU_ON_CPU=1).

In the training processes (RANK set): LEXFINE_CPU_SHIM_FSDP=1 makes accelerate take the CPU processes for a multi-GPU
job, so that the Trainer applies FSDP2 (accelerate does only for GPU-like devices; plain DDP must not get it: it would
pass GPU device ids); LEXFINE_CPU_SHIM_DS=1 starts DeepSpeed's process group with gloo (DS_ACCELERATOR=cpu) before
transformers builds the model under ZeRO-3 (with `use_cpu` the Trainer does not). Never needed on a GPU machine.
"""

import os

if os.environ.get("LEXFINE_CPU_SHIM_FSDP") == "1" and "RANK" in os.environ:
    import accelerate.state as _state
    from accelerate.utils import DistributedType as _DT

    _init = _state.PartialState.__init__

    def _as_multi_gpu(self, *a, **k):
        _init(self, *a, **k)
        if self.distributed_type == _DT.MULTI_CPU:
            self.distributed_type = _DT.MULTI_GPU

    _state.PartialState.__init__ = _as_multi_gpu
if os.environ.get("LEXFINE_CPU_SHIM_DS") == "1" and "RANK" in os.environ:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
