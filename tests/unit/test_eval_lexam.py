"""LEXam loading: choices as lists or Python-literal strings, gold as index or letter, files, folders, errors."""

import json

import pytest

from lexfine.data import lexam
from lexfine.errors import DataError

ROW = {"question": "Welche Aussage ist richtig?", "choices": ["eins", "zwei", "drei", "vier"], "gold": 2,
       "course": "Strafrecht", "language": "de", "area": "Criminal", "jurisdiction": "Swiss", "year": 2021,
       "id": "q1"}


def test_choices_as_string_holding_a_python_list():
    row = {**ROW, "choices": "['eins', \"zwei's\", 'drei', 'vier']"}
    out = lexam.normalize_row(row, 0, 4)
    assert out["choices"] == ["eins", "zwei's", "drei", "vier"]
    assert out["gold"] == "C"


@pytest.mark.parametrize("gold,letter", [(0, "A"), ("3", "D"), ("B", "B"), ("c", "C"), (1.0, "B")])
def test_gold_as_index_or_letter(gold, letter):
    assert lexam.normalize_row({**ROW, "gold": gold}, 0, 4)["gold"] == letter


@pytest.mark.parametrize("bad,match", [
    ({"choices": "not a list"}, "Python list literal"),
    ({"gold": 7}, "gold 7"),
    ({"choices": ["a", "b"]}, "2 choices but the task expects 4"),
    ({"question": "  "}, "empty question"),
])
def test_bad_rows_are_one_line_errors(bad, match):
    with pytest.raises(DataError, match=match):
        lexam.normalize_row({**ROW, **bad}, 3, 4)


def test_missing_column():
    row = dict(ROW)
    del row["choices"]
    with pytest.raises(DataError, match="no 'choices' column"):
        lexam.normalize_row(row, 0, 4)


def test_bundled_sample_and_limit():
    rows = lexam.load_rows(None, 4, limit=20)
    assert len(rows) == 20 and all(len(r["choices"]) == 4 for r in rows)
    assert rows == lexam.load_rows("bundled:lexam_mcq4_sample", 4, limit=20)  # seeded subset
    assert {r["language"] for r in lexam.load_rows(None, 4)} <= {"de", "en"}


def test_folder_picks_the_file_of_the_task(tmp_path):
    for n in (4, 8):
        rows = [{**ROW, "id": f"{n}-{i}", "choices": [f"c{j}" for j in range(n)], "gold": i % n} for i in range(3)]
        (tmp_path / f"mcq_{n}_choices_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["id"] for r in lexam.load_rows(str(tmp_path), 8)] == ["8-0", "8-1", "8-2"]
    assert lexam.load_rows(str(tmp_path / "mcq_4_choices_test.jsonl"), 4)[1]["gold"] == "B"
    with pytest.raises(DataError, match="mcq_16_choices"):
        lexam.load_rows(str(tmp_path), 16)
    with pytest.raises(DataError, match="3 choices|4 choices"):
        lexam.load_rows(str(tmp_path / "mcq_4_choices_test.jsonl"), 8)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        lexam.load_rows(str(tmp_path / "nope.jsonl"), 4)


def test_cot_prompt_is_the_benchmarks_letters_prompt():
    row = lexam.normalize_row(ROW, 0, 4)
    ex = lexam.cot_example(row, None)
    user = ex.messages()[-1]["content"]
    assert user.startswith("You are an expert in Strafrecht and address legal issues")
    assert " Correct Answer: ###C### \n\nQuestion:\n Welche Aussage ist richtig?\nA. eins\nB. zwei" in user
    assert user.endswith("\nD. vier\n\nAnswer:")
    assert ex.facts == "Welche Aussage ist richtig?"  # only the question may be cut, never the choices


def test_direct_prompt_keeps_choices_outside_the_truncatable_span():
    ex = lexam.direct_example(lexam.normalize_row(ROW, 0, 4), "sys")
    assert ex.system == "sys" and ex.answer == "C"
    assert "\nA. eins\nB. zwei\nC. drei\nD. vier\n\nAnswer with the letter" in ex.after


def test_shared_files_load(shared_data):
    for n, expected in ((4, 1655), (8, 1463), (16, 1028), (32, 550)):
        rows = lexam.load_rows(str(shared_data / "lexam"), n)
        assert len(rows) == expected
        labels = lexam.choice_labels(n)
        assert all(r["gold"] in labels for r in rows)
