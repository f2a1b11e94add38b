"""train.profile_steps: the profiler window and its summary of device time."""

import pytest

from lexfine.config import validate
from lexfine.profiling import family, summarize


def test_kernels_are_grouped_by_family():
    assert family("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert family("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert family("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert family("triton_per_fused_add_mul_rsqrt_0") == "triton"
    assert family("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") \
        == "copy/elementwise"
    assert family("void at::native::reduce_kernel<512, 1>") == "other"


def test_summary_adds_device_time_by_family_and_ignores_host_events():
    events = [
        {"ph": "X", "cat": "kernel", "name": "nvjet_tst_x", "dur": 300_000},
        {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_0", "dur": 100_000},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "dur": 50_000},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 900_000},  # host side: not device time
        {"ph": "i", "cat": "kernel", "name": "marker"},
    ]
    s = summarize(events, wall_s=1.0, steps=2, tokens=8000.0)
    assert s["device_s_by_family"] == {"matmul": 0.3, "triton": 0.1, "copy/elementwise": 0.05}
    assert s["device_busy_s"] == pytest.approx(0.45) and s["device_busy_fraction"] == pytest.approx(0.45)
    assert s["s_per_step"] == 0.5 and s["tokens_per_s"] == 8000.0


@pytest.mark.parametrize("bad", [[0, 3], [5, 4]])
def test_a_window_that_is_not_steps_is_refused(tiny_config, bad):
    with pytest.raises(Exception, match="FIRST"):
        validate(tiny_config(train__profile_steps=bad))


def test_the_profile_is_no_part_of_the_run_id(tiny_config):
    assert validate(tiny_config(train__profile_steps=[2, 3])).run_id() == validate(tiny_config()).run_id()
