"""SLURM scripts with fake sbatch/srun/scontrol on PATH: launch arguments per node, dependent evaluation jobs,
job ids in sweep.jsonl, requeue after preemption, profile errors, and quoting of dangerous paths."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lexfine.errors import ConfigError
from lexfine.sweep.grid import load_sweep
from lexfine.sweep.local import read_state
from lexfine.sweep.slurm import for_profile, load_profile, parse_job_id, submit
from tests.slurm_fakes import flag, install

PROFILE = {"account": "a-test", "partition": "normal", "time": "01:00:00", "nodes": 2, "gpus_per_node": 4,
           "cpus_per_task": 32, "environment": "lexfine", "signal": "USR1@120", "requeue": True,
           "env": {"NCCL_NVLS_ENABLE": 0}, "sbatch_extra": ["--constraint=gpu"], "main_process_port": 29555}


def make(tmp_path: Path, profile: dict | None = None, out: Path | None = None, **sweep) -> tuple:
    data = {"name": "s", "base": {"model": "smollm2-135m"}, "output_dir": str(out or tmp_path / "sweeps"),
            "eval": ["sjp", "lexam_mcq4"], "grid": {"train.lr": [1e-4]}, **sweep}
    sp = tmp_path / "sweep.yaml"
    sp.write_text(yaml.safe_dump(data))
    pp = tmp_path / "profile.yaml"
    pp.write_text(yaml.safe_dump({**PROFILE, **(profile or {})}))
    prof = load_profile(pp)
    return for_profile(load_sweep(sp), prof), prof, sp, pp  # the runs as the jobs train them


def run_script(script: Path, fakes, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=fakes.env(**env))


# ------------------------------------------------------------------------------------------------
# profiles


@pytest.mark.parametrize("missing", ["account", "partition", "time", "nodes", "gpus_per_node"])
def test_profile_missing_required_field(tmp_path, missing):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({k: v for k, v in PROFILE.items() if k != missing}))
    with pytest.raises(ConfigError, match=f"missing required field '{missing}'") as e:
        load_profile(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change,message", [
    ({"acount": "x"}, "unknown field 'acount'"),
    ({"nodes": 0}, "bad value for 'nodes'"),
    ({"account": "a b"}, "must be one word"),
    ({"time": "1:00\n#SBATCH --x"}, "must be one word"),
    ({"sbatch_extra": ["--a\nrm -rf /"]}, "line break"),
    ({"env": {"BAD-NAME": 1}}, "not a valid variable name"),
    ({"launcher": "mpirun"}, "bad value for 'launcher'"),
])
def test_profile_bad_values(tmp_path, change, message):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({**PROFILE, **change}))
    with pytest.raises(ConfigError, match=message) as e:
        load_profile(p)
    assert "\n" not in str(e.value)


def test_time_description_survives_in_the_missing_field_error(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({k: v for k, v in PROFILE.items() if k != "time"}))
    with pytest.raises(ConfigError, match=r"\(Time limit per job, e\.g\. 12:00:00\)"):
        load_profile(p)


def test_unquoted_yaml_time_is_refused_and_numeric_mem_accepted(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("account: a\npartition: null\ntime: 12:00:00\nnodes: 1\ngpus_per_node: 4\n")
    with pytest.raises(ConfigError, match='is a number; write the limit in quotes, e.g. time: "12:00:00"'):
        load_profile(p)
    p.write_text('account: a\npartition: null\ntime: "12:00:00"\nnodes: 1\ngpus_per_node: 4\nmem: 0\n')
    assert load_profile(p).mem == "0"


@pytest.mark.parametrize("name", sorted(x.stem for x in (Path(__file__).parents[2] / "configs/slurm").glob("*.yaml")))
def test_shipped_profiles_load_and_write_scripts(tmp_path, name, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[2])  # shipped profiles are found by name from the repository root
    prof = load_profile(name)
    sweep, _, _, _ = make(tmp_path)
    records = submit(sweep, prof, dry_run=True, workdir=str(tmp_path), echo=lambda _: None)
    assert records
    for rec in records:
        for key in ("script", "eval_script"):
            assert subprocess.run(["bash", "-n", rec[key]]).returncode == 0
    if prof.mem is not None:
        assert f"#SBATCH --mem={prof.mem}\n" in Path(records[0]["script"]).read_text()


def test_parse_job_id():
    assert parse_job_id("12345\n") == "12345"
    assert parse_job_id("12345;clariden\n") == "12345"
    assert parse_job_id("Submitted batch job 777\n") == "777"
    with pytest.raises(Exception, match="job id"):
        parse_job_id("sbatch: error")


# ------------------------------------------------------------------------------------------------
# dry run and submission


def test_dry_run_writes_scripts_and_submits_nothing(tmp_path):
    fakes = install(tmp_path)
    sw, prof, sp, pp = make(tmp_path, grid={"train.lr": [1e-4, 1e-3]})
    out: list[str] = []
    old = os.environ["PATH"]
    os.environ["PATH"] = fakes.env()["PATH"]
    try:
        records = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=out.append)
    finally:
        os.environ["PATH"] = old
    assert len(records) == 2 and fakes.calls("sbatch") == []
    text = "\n".join(out)
    for rec in records:
        train, ev = Path(rec["script"]), Path(rec["eval_script"])
        assert train.parent == sw.sweep_dir / "slurm" and train.is_file() and ev.is_file()
        assert str(train) in text and str(ev) in text
        assert subprocess.run(["bash", "-n", str(train)]).returncode == 0
        assert subprocess.run(["bash", "-n", str(ev)]).returncode == 0
        body = train.read_text()
        for d in ("--account=a-test", "--partition=normal", "--time=01:00:00", "--nodes=2", "--gpus-per-node=4",
                  "--cpus-per-task=32", "--signal=USR1@120", "--requeue", "--constraint=gpu"):
            assert f"#SBATCH {d}\n" in body
        assert "--environment=lexfine" in body and "export NCCL_NVLS_ENABLE=0" in body
    assert "sbatch --parsable" in text and "--dependency=afterok:" in text
    assert not any(sw.sweep_dir.glob("s-*/manifest.json"))  # a dry run plans no run directories


def test_submit_records_job_ids_and_eval_depends_on_training(tmp_path, monkeypatch):
    fakes = install(tmp_path)
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    monkeypatch.setenv("FAKE_SLURM_LOG", str(fakes.log))
    sw, prof, sp, pp = make(tmp_path, grid={"train.lr": [1e-4, 1e-3]})
    records = submit(sw, prof, workdir=str(tmp_path), echo=lambda s: None)
    calls = fakes.calls("sbatch")
    assert [c["job_id"] for c in calls] == ["1001", "1002", "1003", "1004"]
    assert calls[1]["argv"][:2] == ["--parsable", "--dependency=afterok:1001"]
    assert calls[1]["argv"][-1] == records[0]["eval_script"]
    state = read_state(sw.sweep_dir)
    assert [(state[r.run_id]["job_id"], state[r.run_id]["eval_job_id"]) for r in sw.runs] == \
        [("1001", "1002"), ("1003", "1004")]
    assert all((r.run_dir / "manifest.json").is_file() for r in sw.runs)  # planned run directories

    # a completed run with all its evaluations is not submitted again; one missing an eval gets an eval job only
    done, half = sw.runs
    for r, evals in ((done, {"sjp-loglik": {}, "lexam_mcq4-loglik": {}}), (half, {"sjp-loglik": {}})):
        m = json.loads((r.run_dir / "manifest.json").read_text())
        (r.run_dir / "manifest.json").write_text(json.dumps({**m, "status": "completed", "evals": evals}, indent=2))
    submit(sw, prof, workdir=str(tmp_path), echo=lambda s: None)
    calls = fakes.calls("sbatch")[4:]
    assert len(calls) == 1 and calls[0]["argv"][-1].endswith(f"{half.run_id}.eval.sbatch")
    assert not any(a.startswith("--dependency") for a in calls[0]["argv"])


def test_cli_submit_dry_run_prints_paths(tmp_path, monkeypatch):
    from lexfine.cli import app

    fakes = install(tmp_path)
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    sw, prof, sp, pp = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["sweep", "submit", str(sp), "--slurm-profile", str(pp), "--dry-run"])
    assert res.exit_code == 0, res.output
    scripts = sorted((sw.sweep_dir / "slurm").glob("*.sbatch"))
    assert len(scripts) == 2 and all(str(s) in res.output for s in scripts)
    assert fakes.calls("sbatch") == []
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"account": "x"}))
    res = CliRunner().invoke(app, ["sweep", "submit", str(sp), "--slurm-profile", str(bad), "--dry-run"])
    assert res.exit_code == 2 and "missing required field" in res.output


# ------------------------------------------------------------------------------------------------
# what runs on each node


def _node_calls(fakes, tool):
    calls = fakes.calls(tool)
    return {c["env"]["SLURM_NODEID"]: c for c in calls}


def test_two_node_launch_arguments(tmp_path, monkeypatch):
    fakes = install(tmp_path, recorders=("accelerate",))
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    sw, prof, sp, pp = make(tmp_path)
    rec = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    res = run_script(Path(rec["script"]), fakes, tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="nid[001-002]")
    assert res.returncode == 1  # the fake launcher trained nothing: the script must not claim success
    srun = fakes.calls("srun")[0]["argv"]
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun and "--environment=lexfine" in srun
    nodes = _node_calls(fakes, "accelerate")
    assert set(nodes) == {"0", "1"}
    cfg = str(sw.sweep_dir / "configs" / f"{sw.runs[0].run_id}.yaml")
    for rank, call in nodes.items():
        argv = call["argv"]
        assert argv[0] == "launch"
        assert flag(argv, "--machine_rank") == rank
        assert flag(argv, "--main_process_ip") == "nid001"
        assert flag(argv, "--main_process_port") == "29555"
        assert flag(argv, "--num_machines") == "2" and flag(argv, "--num_processes") == "8"
        assert Path(flag(argv, "--config_file")).is_file()
        assert argv[-4:] == ["-m", "lexfine.train", cfg, "eval=[]"]
        assert call["env"]["LEXFINE_REQUEUE"] == "batch" and call["env"]["NCCL_NVLS_ENABLE"] == "0"
        assert call["cwd"] == str(tmp_path)
    # the resolved config carries the job's shape, and its run id is computed from it
    launch = yaml.safe_load(Path(cfg).read_text())["launch"]
    assert (launch["num_machines"], launch["num_processes"]) == (2, 8)


def test_torchrun_launcher_and_auto_port(tmp_path, monkeypatch):
    fakes = install(tmp_path, recorders=("torchrun",))
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    sw, prof, sp, pp = make(tmp_path, profile={"launcher": "torchrun", "main_process_port": "auto"})
    rec = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    run_script(Path(rec["script"]), fakes, tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="nid[001-002]")
    nodes = _node_calls(fakes, "torchrun")
    assert set(nodes) == {"0", "1"}
    for rank, call in nodes.items():
        argv = call["argv"]
        assert flag(argv, "--node_rank") == rank and flag(argv, "--nnodes") == "2"
        assert flag(argv, "--nproc_per_node") == "4" and flag(argv, "--master_addr") == "nid001"
        assert flag(argv, "--master_port") == str(20000 + 4242 % 20000)
        assert argv[-3] == "lexfine.train"


def test_launcher_beside_an_absolute_python_is_used(tmp_path, monkeypatch):
    """A venv the job never activates: profile.python=/venv/bin/python picks /venv/bin/accelerate, not the
    `accelerate` first on PATH (which would be another environment's, or none)."""
    from tests.slurm_fakes import _write, RECORDER

    fakes = install(tmp_path, recorders=("accelerate",))  # the one on PATH: must not be called
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    _write(venv / "python", "TOOL = 'venv-python'\n" + RECORDER)
    _write(venv / "accelerate", "TOOL = 'venv-accelerate'\n" + RECORDER)
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    sw, prof, sp, pp = make(tmp_path, profile={"python": str(venv / "python")})
    rec = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    run_script(Path(rec["script"]), fakes, tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="nid[001-002]")
    assert {c["env"]["SLURM_NODEID"] for c in fakes.calls("venv-accelerate")} == {"0", "1"}
    assert fakes.calls("accelerate") == []
    # a bare `python` keeps the launcher on the job's PATH
    (tmp_path / "plain").mkdir()
    sw, prof, sp, pp = make(tmp_path / "plain")
    rec = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    assert "exec accelerate launch" in Path(rec["script"]).read_text()


def test_single_gpu_runs_python_directly(tmp_path, monkeypatch):
    fakes = install(tmp_path)
    py = fakes.recorder("fakepython")
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    sw, prof, sp, pp = make(tmp_path, profile={"nodes": 1, "gpus_per_node": 1, "python": str(py)})
    rec = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    assert "accelerate launch" not in Path(rec["script"]).read_text()
    run_script(Path(rec["script"]), fakes, tmp_path, SLURM_JOB_ID="9", SLURM_JOB_NODELIST="nid007")
    (call,) = fakes.calls("fakepython")
    assert call["argv"] == ["-m", "lexfine.train", str(sw.sweep_dir / "configs" / f"{sw.runs[0].run_id}.yaml"),
                            "eval=[]"]


def test_variant_can_ask_for_more_nodes(tmp_path):
    sw, prof, sp, pp = make(tmp_path, profile={"nodes": 1}, grid={},
                            variants=[{"method": "lora"}, {"method": "full", "launch.num_machines": 2}])
    from lexfine.sweep.slurm import resources

    assert [resources(prof, r) for r in sw.runs] == [(1, 4), (2, 4)]


@pytest.mark.parametrize("status,expect_rc,requeued", [("completed", 0, False), ("interrupted", 75, True),
                                                        ("failed", 1, False)])
def test_script_outcome_follows_the_manifest(tmp_path, monkeypatch, status, expect_rc, requeued):
    fakes = install(tmp_path, recorders=("accelerate",))
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    sw, prof, sp, pp = make(tmp_path)
    rec = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    sw.runs[0].run_dir.mkdir(parents=True)
    res = run_script(Path(rec["script"]), fakes, tmp_path, SLURM_JOB_ID="55", SLURM_JOB_NODELIST="a,b",
                     FAKE_WRITE_STATUS=status, FAKE_MANIFEST=str(sw.runs[0].run_dir / "manifest.json"))
    assert res.returncode == expect_rc, res.stderr
    requeues = [c["argv"] for c in fakes.calls("scontrol") if c["argv"][:1] == ["requeue"]]
    assert requeues == ([["requeue", "55"]] if requeued else [])


def test_eval_job_runs_lexfine_eval_per_task(tmp_path, monkeypatch):
    fakes = install(tmp_path)
    lx = fakes.recorder("fakelexfine")
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    sw, prof, sp, pp = make(tmp_path, profile={"lexfine": str(lx), "eval": {"gpus_per_node": 1, "time": "00:30:00"}})
    rec = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    body = Path(rec["eval_script"]).read_text()
    assert "#SBATCH --nodes=1\n" in body and "#SBATCH --gpus-per-node=1\n" in body and "--time=00:30:00" in body
    assert "--signal" not in body
    res = run_script(Path(rec["eval_script"]), fakes, tmp_path, SLURM_JOB_ID="56", SLURM_JOB_NODELIST="x")
    assert res.returncode == 0, res.stderr
    calls = fakes.calls("fakelexfine")
    assert [c["argv"][:4] for c in calls] == [["eval", str(sw.runs[0].run_dir), "--task", "sjp"],
                                               ["eval", str(sw.runs[0].run_dir), "--task", "lexam_mcq4"]]


# ------------------------------------------------------------------------------------------------
# quoting

DANGER = "we ird $(touch PWNED1) `touch PWNED2` 'q' \"dq\" ; touch PWNED3 & $HOME"


def test_dangerous_paths_are_quoted(tmp_path, monkeypatch):
    fakes = install(tmp_path, recorders=("accelerate",))
    py = fakes.recorder("fakepython")
    lx = fakes.recorder("fakelexfine")
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    root = tmp_path / DANGER
    work = root / "work"
    work.mkdir(parents=True)
    prof = {"python": str(py), "lexfine": shlex.quote(str(lx)), "environment": str(root / "env $(touch PWNED4).toml")}
    for nodes, gpus in ((1, 1), (2, 4)):
        sw, p, sp, pp = make(tmp_path, profile={**prof, "nodes": nodes, "gpus_per_node": gpus}, out=root / "sweeps")
        rec = submit(sw, p, dry_run=True, workdir=str(work), echo=lambda s: None)[0]
        for script in (rec["script"], rec["eval_script"]):
            assert subprocess.run(["bash", "-n", script]).returncode == 0
            res = run_script(Path(script), fakes, tmp_path, SLURM_JOB_ID="1", SLURM_JOB_NODELIST="nid[1-2]")
            assert "syntax error" not in res.stderr and "No such file" not in res.stderr, res.stderr
        cfg = str(sw.sweep_dir / "configs" / f"{sw.runs[0].run_id}.yaml")
        if nodes == 1:
            assert fakes.calls("fakepython")[-1]["argv"][2] == cfg
        else:
            assert fakes.calls("accelerate")[-1]["argv"][-2] == cfg
        assert fakes.calls("fakelexfine")[-1]["argv"][1] == str(sw.runs[0].run_dir)
        assert all(c["cwd"] == str(work) for c in fakes.calls("fakelexfine"))
        srun = fakes.calls("srun")[-1]["argv"]
        assert f"--environment={root / 'env $(touch PWNED4).toml'}" in srun
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    assert not list(Path(os.path.expanduser("~")).glob("PWNED*"))


def test_log_path_with_spaces_goes_to_sbatch_argv(tmp_path, monkeypatch):
    fakes = install(tmp_path)
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    monkeypatch.setenv("FAKE_SLURM_LOG", str(fakes.log))
    sw, prof, sp, pp = make(tmp_path, out=tmp_path / "with space")
    submit(sw, prof, workdir=str(tmp_path), echo=lambda s: None)
    argv = fakes.calls("sbatch")[0]["argv"]
    assert flag(argv, "--output") == str(sw.sweep_dir / "logs" / f"{sw.runs[0].run_id}.train-%j.out")
    assert "#SBATCH --output" not in Path(argv[-1]).read_text()


def test_profile_spellings_and_optional_directives(tmp_path, monkeypatch):
    fakes = install(tmp_path)
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"account": "acc", "partition": "gpu", "time-limit": "02:00:00", "num-nodes": 1,
                                 "gpus-per-node": 2, "extra_sbatch": "--reservation=r1", "qos": "high",
                                 "constraint": "gpu", "exclusive": True,
                                 "container": {"image": "/img/lexfine.sqsh", "mounts": ["/scratch:/scratch"]}}))
    prof = load_profile(p)
    assert (prof.time, prof.nodes, prof.gpus_per_node, prof.sbatch_extra) == ("02:00:00", 1, 2, ["--reservation=r1"])
    sw, _, sp, pp = make(tmp_path)
    rec = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    body = Path(rec["script"]).read_text()
    for d in ("--qos=high", "--constraint=gpu", "--exclusive", "--reservation=r1", "--gpus-per-node=2"):
        assert f"#SBATCH {d}\n" in body
    assert "--container-image=/img/lexfine.sqsh" in body and "--container-mounts=/scratch:/scratch" in body


# ------------------------------------------------------------------------------------------------
# one run id, one training: the job's process count is part of the run id


def test_run_ids_follow_the_jobs_global_batch(tmp_path, monkeypatch):
    from lexfine.config import load_config
    from lexfine.sweep.status import collect

    monkeypatch.chdir(tmp_path)

    def submitted(nodes, gpus, out):
        sw, prof, sp, pp = make(tmp_path, profile={"nodes": nodes, "gpus_per_node": gpus}, out=tmp_path / out)
        submit(load_sweep(sp), prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)
        files = sorted((tmp_path / out / "s" / "configs").glob("*.yaml"))
        assert len(files) == 1
        cfg = load_config(files[0])
        assert cfg.run_id() == files[0].stem  # the config the job reads names the run directory it trains
        assert cfg.global_batch == 4 * 1 * nodes * gpus
        # `sweep status` shows the runs of the submitted jobs, not a single-process plan of them
        assert [r["run_id"] for r in collect(__import__("lexfine.sweep.cli", fromlist=["_load"])._load(
            sp, submitted=True), query_slurm=False)] == [files[0].stem]
        return files[0].stem

    one_gpu, four, two_by_four, one_by_eight = (submitted(1, 1, "a"), submitted(1, 4, "b"), submitted(2, 4, "c"),
                                                submitted(1, 8, "d"))
    assert len({one_gpu, four, two_by_four}) == 3
    assert two_by_four == one_by_eight  # same global batch, same training: one run
    assert one_gpu == load_sweep(tmp_path / "sweep.yaml").runs[0].run_id  # one process: the plain plan's id
