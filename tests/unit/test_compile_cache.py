"""The compile cache outlives a run (lexfine.compile_cache): the CLI entry points point inductor at lexfine's cache
folder unless the user chose one, and a run's timings say how much it compiled and what the cache held."""

import os
import subprocess
import sys

import torch

from lexfine import compile_cache

PROBE = ("import os, sys; from lexfine import cli\n"
         "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
         "print('DIR=' + os.environ.get('TORCHINDUCTOR_CACHE_DIR', ''), file=sys.stderr)\n"
         "import torch._inductor.config as c\n"
         "print('ISA=' + repr(c.cpp.vec_isa_ok), file=sys.stderr)")


def _cli(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stderr.splitlines() if line.startswith(("DIR=", "ISA=")))


def test_cli_points_inductor_at_lexfines_cache_folder_and_skips_the_cpu_probe(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_VEC_ISA_OK")}
    env["LEXFINE_CACHE"] = str(tmp_path / "lexcache")
    got = _cli(env)
    assert got["DIR"] == str(tmp_path / "lexcache" / "compile" / "inductor")
    assert got["ISA"] == "False"  # inductor takes it as given instead of building and loading test libraries


def test_what_the_user_chose_is_kept(tmp_path):
    env = dict(os.environ, LEXFINE_CACHE=str(tmp_path / "lexcache"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine"),
               TORCHINDUCTOR_VEC_ISA_OK="1")
    assert _cli(env) == {"DIR": str(tmp_path / "mine"), "ISA": "True"}


def test_adopt_sets_only_an_unset_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LEXFINE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    assert compile_cache.in_use() is None
    assert compile_cache.adopt() == str(tmp_path / "compile" / "inductor") == compile_cache.in_use()
    assert os.environ["TORCHINDUCTOR_VEC_ISA_OK"] == "0"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "other"))
    assert compile_cache.adopt() == str(tmp_path / "other")


def test_stats_count_this_process_compilations():
    torch._dynamo.reset()  # also clears the compile-time records of earlier tests
    before = compile_cache.stats()
    assert set(before["compile_cache"]) == {"fxgraph_hits", "fxgraph_misses", "aotautograd_hits",
                                            "aotautograd_misses"}
    f = torch.compile(lambda x: torch.sin(x) * 3, backend="aot_eager", dynamic=True)
    x = torch.randn(5)
    assert torch.allclose(f(x), torch.sin(x) * 3)
    after = compile_cache.stats()
    assert after["compile_s"] > before["compile_s"]
    assert all(isinstance(v, int) for v in after["compile_cache"].values())


def test_an_unwritable_cache_folder_leaves_torchs_default(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LEXFINE_CACHE", str(blocker))  # <file>/compile/inductor can never be created
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_cache.adopt() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert os.environ["TORCHINDUCTOR_VEC_ISA_OK"] == "0"
