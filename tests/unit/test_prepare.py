"""Tokenized training data: parallel workers give exactly the serial result; a keyed cache skips the work."""

import pytest

from lexfine.config import DataArgs
from lexfine.data import load_examples
from lexfine.data import prepare
from lexfine.data.prepare import tokenized_dataset


@pytest.fixture(scope="module")
def examples():
    return load_examples(DataArgs(limit=24))  # bundled French SJP cases


def test_parallel_workers_give_the_serial_dataset(smollm_tokenizer, examples, monkeypatch):
    from datasets import Dataset

    from lexfine.data.masking import encode_all

    monkeypatch.setenv("LEXFINE_TOKENIZED_CACHE", "off")  # both computed, neither loaded

    # 1200 tokens: some cases are cut (the truncation path), most are not
    cols, stats = encode_all(smollm_tokenizer, examples, 1200, progress=False)
    before = Dataset.from_dict(cols)  # what training used before
    serial, s1 = tokenized_dataset(smollm_tokenizer, examples, 1200, workers=1, progress=False)
    parallel, s2 = tokenized_dataset(smollm_tokenizer, examples[:], 1200, workers=2, progress=False)
    assert 0 < stats.truncated < stats.n
    assert (s1.workers, s2.workers, s1.cache_hit, s2.cache_hit) == (1, 2, False, False)
    for ds in (serial, parallel):
        assert ds.features == before.features
        assert ds[:] == before[:]
    for s in (s1, s2):
        assert {k: v for k, v in s.as_dict().items() if k in stats.as_dict()} == stats.as_dict()


def test_second_identical_load_hits_the_cache(smollm_tokenizer, examples, tmp_path, monkeypatch):
    monkeypatch.setenv("LEXFINE_TOKENIZED_CACHE", str(tmp_path))
    first, s1 = tokenized_dataset(smollm_tokenizer, examples[:8], 2048, progress=False)

    def no_tokenizing(*a, **k):
        raise AssertionError("a cache hit must tokenize nothing")

    monkeypatch.setattr(prepare.masking, "encode", no_tokenizing)
    second, s2 = tokenized_dataset(smollm_tokenizer, examples[:8], 2048, progress=False)
    assert (s1.cache_hit, s2.cache_hit) == (False, True)
    assert second[:] == first[:] and second.features == first.features
    assert s2.as_dict() | {"cache_hit": False, "prep_s": 0, "workers": 0} == s1.as_dict() | {"prep_s": 0, "workers": 0}
    assert len(list(tmp_path.glob("*.arrow"))) == 1 and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("change", ["max_length", "loss_on", "truncation", "examples", "chat_template"])
def test_a_changed_input_misses_the_cache(smollm_tokenizer, apertus_tokenizer, examples, tmp_path, monkeypatch,
                                         change):
    monkeypatch.setenv("LEXFINE_TOKENIZED_CACHE", str(tmp_path))
    args = dict(tokenizer=smollm_tokenizer, examples=examples[:4], max_length=2048, loss_on="answer",
                truncation="middle")
    _, s1 = tokenized_dataset(**args, progress=False)
    changed = {"max_length": {"max_length": 2000}, "loss_on": {"loss_on": "all"}, "truncation": {"truncation": "tail"},
               "examples": {"examples": examples[1:5]}, "chat_template": {"tokenizer": apertus_tokenizer}}[change]
    ds, s2 = tokenized_dataset(**{**args, **changed}, progress=False)
    assert not s1.cache_hit and not s2.cache_hit
    assert len(list(tmp_path.glob("*.arrow"))) == 2
    if change == "loss_on":
        assert ds[0]["labels"] == ds[0]["input_ids"]  # what was computed, not what the other key held


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_a_damaged_cache_file_is_ignored_and_rewritten(smollm_tokenizer, examples, tmp_path, monkeypatch, caplog,
                                                      damage):
    monkeypatch.setenv("LEXFINE_TOKENIZED_CACHE", str(tmp_path))
    good, _ = tokenized_dataset(smollm_tokenizer, examples[:4], 2048, progress=False)
    (path,) = tmp_path.glob("*.arrow")
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not an arrow file")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one token id changed inside the data: the file still opens, its checksum does not match
        ids = good[0]["input_ids"]
        needle = (ids[5]).to_bytes(4, "little") + (ids[6]).to_bytes(4, "little")
        at = data.index(needle)
        path.write_bytes(data[:at] + (ids[5] + 1).to_bytes(4, "little") + data[at + 4:])
    again, s = tokenized_dataset(smollm_tokenizer, examples[:4], 2048, progress=False)
    assert not s.cache_hit and again[:] == good[:]
    assert "ignoring unusable tokenized cache" in caplog.text
    assert ("checksum" in caplog.text) == (damage == "flipped")
    _, s = tokenized_dataset(smollm_tokenizer, examples[:4], 2048, progress=False)
    assert s.cache_hit  # rewritten


def test_cache_off_writes_nothing(smollm_tokenizer, examples, tmp_path, monkeypatch):
    monkeypatch.setenv("LEXFINE_TOKENIZED_CACHE", "off")
    monkeypatch.setenv("LEXFINE_CACHE", str(tmp_path))
    _, s1 = tokenized_dataset(smollm_tokenizer, examples[:2], 2048, progress=False)
    _, s2 = tokenized_dataset(smollm_tokenizer, examples[:2], 2048, progress=False)
    assert not s1.cache_hit and not s2.cache_hit and not list(tmp_path.rglob("*"))


def test_default_cache_lives_in_lexfine_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LEXFINE_TOKENIZED_CACHE")
    monkeypatch.setenv("LEXFINE_CACHE", str(tmp_path))
    assert prepare.cache_dir() == tmp_path / "tokenized"


def test_worker_count(monkeypatch):
    from lexfine.errors import DataError

    monkeypatch.delenv("LEXFINE_TOKENIZE_WORKERS", raising=False)
    monkeypatch.setattr(prepare.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert prepare.default_workers(200) == 1  # few examples: serial
    assert prepare.default_workers(60000) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks on the node share its cores
    assert prepare.default_workers(60000) == 2
    monkeypatch.setenv("LEXFINE_TOKENIZE_WORKERS", "3")
    assert prepare.default_workers(10) == 3
    monkeypatch.setenv("LEXFINE_TOKENIZE_WORKERS", "many")
    with pytest.raises(DataError, match="LEXFINE_TOKENIZE_WORKERS='many'"):
        prepare.default_workers(10)


def test_fast_tokenizer_encodes_as_transformers_does(smollm_tokenizer, apertus_tokenizer, examples):
    from lexfine.data import masking

    for tok in (smollm_tokenizer, apertus_tokenizer):
        eot = masking.end_of_turn_ids(tok)
        fast = prepare._fast_tokenizer(tok, examples[0], 1200, "answer", "middle", eot)
        assert isinstance(fast, prepare._FastTokenizer)
        encoded = [masking.encode(fast, ex, 1200, "answer", "middle", eot) for ex in examples]
        assert any(e.truncated for e in encoded) and not all(e.truncated for e in encoded)  # cut, decoded, re-encoded
        assert encoded == [masking.encode(tok, ex, 1200, "answer", "middle", eot) for ex in examples]


def test_fast_tokenizer_only_for_transformers_own_encoding(smollm_tokenizer, examples, monkeypatch):
    from lexfine.data import masking

    class OwnEncoding(type(smollm_tokenizer)):  # a tokenizer class that encodes text its own way
        def _encode_plus(self, *a, **k):
            return super()._encode_plus(*a, **k)

    monkeypatch.setattr(smollm_tokenizer, "__class__", OwnEncoding)
    eot = masking.end_of_turn_ids(smollm_tokenizer)
    assert prepare._fast_tokenizer(smollm_tokenizer, examples[0], 1200, "answer", "middle", eot) is smollm_tokenizer


def test_labels_of_any_form_come_back_as_encoded(smollm_tokenizer, examples, monkeypatch):
    """Workers rebuild labels from the ids and the masked-prompt length; a case not of that form is sent as it is."""
    from lexfine.data import masking

    monkeypatch.setenv("LEXFINE_TOKENIZED_CACHE", "off")
    real = masking.encode
    odd_ids = {ex.id for ex in examples[1:6:2]}

    def odd(tokenizer, ex, *a, **k):
        enc = real(tokenizer, ex, *a, **k)
        if ex.id in odd_ids:  # first token in the loss, last one out
            enc.labels = [enc.input_ids[0]] + enc.labels[1:-1] + [masking.IGNORE]
        return enc

    monkeypatch.setattr(prepare.masking, "encode", odd)
    ds, stats = tokenized_dataset(smollm_tokenizer, examples[:6], 2048, workers=1, progress=False)
    expected = [odd(smollm_tokenizer, ex, 2048).labels for ex in examples[:6]]
    assert ds["labels"] == expected and expected[1][0] != masking.IGNORE
    assert stats.loss_tokens == sum(sum(x != masking.IGNORE for x in lab) for lab in expected)
