"""SJP and chat data loading: labels, the official year split, filters, and the hub's data files."""

import json
import lzma

import pytest

from lexfine.config import DataArgs
from lexfine.data import load_examples, sjp
from lexfine.errors import DataError


def _row(i, year, label, language="fr", area="civil law"):
    return {"id": i, "year": year, "text": f"Faits {i}.", "label": label, "language": language, "region": "x",
            "canton": "vd", "legal area": area, "source_language": language}


def test_labels_ints_and_strings_and_year_split(tmp_path):
    rows = [_row(1, 2003, 0), _row(2, 2015, "approval"), _row(3, 2018, 1), _row(4, 2010, "dismissal")]
    path = tmp_path / "sjp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = load_examples(DataArgs(train=str(path), split="train"))
    assert [(e.id, e.answer) for e in train] == [("1", "dismissal"), ("4", "dismissal")]
    assert [e.answer for e in load_examples(DataArgs(train=str(path), split="validation"))] == ["approval"]
    assert [e.meta["year"] for e in load_examples(DataArgs(train=str(path), split="test"))] == [2018]


def test_filters_and_empty_result(tmp_path):
    rows = [_row(1, 2003, 0, "de"), _row(2, 2004, 1, "fr", "penal law"), _row(3, 2005, 1, "it")]
    path = tmp_path / "sjp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_examples(DataArgs(train=str(path), languages=["fr", "it"], legal_areas=["penal law"]))
    assert [e.id for e in ex] == ["2"]
    with pytest.raises(DataError, match="no SJP rows left"):
        load_examples(DataArgs(train=str(path), languages=["rm"]))


def test_hub_reads_the_split_files_and_filters_language(tmp_path, monkeypatch):
    files = {}
    for name, year in (("train.jsonl.xz", 2001), ("val.jsonl.xz", 2015), ("test.jsonl.xz", 2019)):
        p = tmp_path / name
        with lzma.open(p, "wt") as f:
            for lang in ("de", "fr"):
                f.write(json.dumps(_row(f"{name}-{lang}", year, 0, lang)) + "\n")
        files[name] = str(p)
    asked = []

    def fake_download(repo_id, filename, repo_type=None, **kw):
        asked.append((repo_id, filename, repo_type))
        return files[filename]

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    rows = sjp.load_rows(sjp.HUB_ID, split="validation", hub_config="fr")
    assert asked == [(sjp.HUB_ID, "val.jsonl.xz", "dataset")]
    assert [r["id"] for r in rows] == ["val.jsonl.xz-fr"]
    assert len(sjp.load_rows(sjp.HUB_ID, split="all", hub_config="all")) == 6


def test_chat_and_prompt_completion_formats(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Q?"},
                                             {"role": "assistant", "content": "A."}]}) + "\n")
    (ex,) = load_examples(DataArgs(train=str(chat)))
    assert ex.answer == "A." and ex.messages()[-1] == {"role": "user", "content": "Q?"}
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "Q2?", "completion": "A2."}) + "\n")
    (ex,) = load_examples(DataArgs(train=str(pc)))
    assert ex.answer == "A2."


@pytest.mark.parametrize("over,asked", [({"split": "validation"}, "split=validation"),
                                        ({"split": "all", "years": [2003]}, r"data.years=\[2003\]")])
def test_rows_without_a_year_are_refused_by_a_year_filter(tmp_path, over, asked):
    rows = [_row(1, 2003, 0), _row(2, None, 1), _row(3, 2015, 1), {**_row(4, 0, 0), "year": ""}]
    path = tmp_path / "sjp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # before: rows 2 and 4 passed every split filter (trained on and tested on); now a one-line error
    with pytest.raises(DataError, match=rf"2 of 4 SJP rows in '{path}' have no year, so {asked}") as e:
        load_examples(DataArgs(train=str(path), **over))
    assert "\n" not in str(e.value) and "split=all" in str(e.value)
    assert [e.id for e in load_examples(DataArgs(train=str(path), split="all"))] == ["1", "2", "3", "4"]
