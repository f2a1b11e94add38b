"""Bad input: exit code 2, one line naming the value and the fix, no traceback, and a created run says failed."""

import json

import pytest
import yaml

from lexfine.cli import main


@pytest.fixture
def base(tmp_path, tiny_config):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(tiny_config(data__limit=4, train__max_steps=1)))
    return path


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("rows,needle", [
    ([{"text": "Faits: A.", "label": "maybe"}], "'maybe'"),
    ([{"text": "", "label": 0}], "empty text"),
    ([{"facts": "x", "label": 0}], "data.format"),
])
def test_bad_rows(base, tmp_path, capsys, rows, needle):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = _fails(["train", str(base), f"data.train={data}"], capsys)
    assert needle in msg
    runs = list((tmp_path / "runs").glob("tiny-*"))
    assert runs and json.loads((runs[0] / "manifest.json").read_text())["status"] == "failed"


def test_missing_data_file(base, capsys):
    assert "/nope.jsonl" in _fails(["train", str(base), "data.train=/nope.jsonl"], capsys)


def test_max_length_too_small(base, capsys):
    assert "train.max_length" in _fails(["train", str(base), "train.max_length=20"], capsys)


def test_unknown_model(base, capsys):
    assert "/nope/model" in _fails(["train", str(base), "model=/nope/model"], capsys)


def test_unknown_key(base, capsys):
    assert "train.lrr" in _fails(["train", str(base), "train.lrr=1"], capsys)


def test_secrets_never_reach_run_files_or_errors(base, tmp_path, capsys, monkeypatch):
    secret = "hf_SuperSecretToken42"
    monkeypatch.setenv("HF_TOKEN", secret)
    msg = _fails(["train", str(base), f"data.train=/nope/{secret}.jsonl"], capsys)
    assert secret not in msg and "<HF_TOKEN>" in msg
    # config.yaml is the user's own config, verbatim (it must reproduce the run); what lexfine writes is redacted
    manifests = list((tmp_path / "runs").rglob("manifest.json"))
    assert manifests
    for f in manifests:
        assert secret not in f.read_text() and "<HF_TOKEN>" in f.read_text()


def test_missing_deepspeed_is_refused_before_processes_start(base, tmp_path, capsys, monkeypatch):
    """A multi-process ZeRO launch without DeepSpeed: one line from the parent, no per-rank tracebacks."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setattr("subprocess.call", lambda *a, **k: pytest.fail("processes were started"))
    msg = _fails(["train", str(base), "--num-processes", "2", "--strategy", "zero3"], capsys)
    assert "lexfine[deepspeed]" in msg
    assert not list((tmp_path / "runs").glob("tiny-*"))  # nothing was created
