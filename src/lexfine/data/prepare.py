"""Examples -> the tokenized training Dataset: in parallel worker processes, and cached across runs.

Parallel: with at least PARALLEL_MIN examples, contiguous chunks are encoded by forked worker processes (one per
available core, shared among the local ranks of a multi-process launch; `LEXFINE_TOKENIZE_WORKERS=N` overrides,
1 = serial). Every example is encoded by the same `masking.encode` either way, and chunks are joined in order,
so the result is identical to the serial path. masking.encode gets the tokenizer wrapped in `_FastTokenizer`, which
sends its text to the Rust backend's `encode_batch_fast` (the ids transformers' call gives, without the offsets it
also computes; checked on the first example, else the tokenizer is used as it is), and workers send back int32
arrays, the labels rebuilt from the ids and the masked-prompt length of each case.

Cached: the Dataset is saved in `tokenized/` of lexfine's cache folder (`$LEXFINE_CACHE`, default ~/.cache/lexfine;
`$LEXFINE_TOKENIZED_CACHE` names this folder alone) as one Arrow file named by a sha256 of everything that decides
its content:
  * the examples as the data config produced them (text of every turn, system prompt, answer, in order): the data
    file's content, prompt template, system prompt, languages, years, limit and shuffling are all in there;
  * the tokenizer (its full serialised vocabulary, merges and normalisers), its chat template and special tokens;
  * train.max_length, data.loss_on, data.truncation;
  * the source of lexfine's masking code (masking.py, example.py, this file) and the transformers/tokenizers versions.
Change any of them and the key changes (a miss); nothing is ever invalidated in place. A file is written to a
temporary name and renamed, so concurrent runs never read half a file: two runs racing both tokenize and the last
rename wins (both wrote the same content). A file that fails to load or to match its own checksum is ignored and
rewritten. `LEXFINE_TOKENIZED_CACHE=off` disables the cache; deleting the folder is always safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from lexfine.data import example as _example_module
from lexfine.data import masking
from lexfine.data.example import Example
from lexfine.data.masking import IGNORE, EncodeStats
from lexfine.errors import DataError

log = logging.getLogger("lexfine.data")

PARALLEL_MIN = 1000  # fewer examples: forking workers costs more than it saves
CHUNK = 256
_META = b"lexfine_tokenized"
_JOB = None  # what forked workers run, fn(start, stop): set in the parent just before the pool starts


@dataclass
class PreparedStats(EncodeStats):
    cache_hit: bool = False
    prep_s: float = 0.0
    workers: int = 1

    def as_dict(self) -> dict:
        return {**super().as_dict(), "cache_hit": self.cache_hit, "prep_s": self.prep_s, "workers": self.workers}


def cache_dir() -> Path | None:
    """`$LEXFINE_TOKENIZED_CACHE`, else `tokenized/` in lexfine's cache ($LEXFINE_CACHE or ~/.cache/lexfine);
    None when the variable says off."""
    from lexfine.models import cache_dir as lexfine_cache

    own = os.environ.get("LEXFINE_TOKENIZED_CACHE")
    if own and own.lower() in ("off", "0", "none", "false"):
        return None
    return Path(own).expanduser() if own else lexfine_cache() / "tokenized"


def _tokenizer_fingerprint(tokenizer) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return json.dumps([type(tokenizer).__name__, vocab, getattr(tokenizer, "chat_template", None),
                       tokenizer.all_special_tokens, sorted(getattr(tokenizer, "added_tokens_encoder", {}).items())],
                      ensure_ascii=False, default=str).encode()


def cache_key(tokenizer, examples: list[Example], max_length: int, loss_on: str, truncation: str) -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256()
    code = b"".join(Path(m.__file__).read_bytes() for m in (masking, _example_module)) + Path(__file__).read_bytes()
    h.update(hashlib.sha256(code).digest())
    h.update(json.dumps([max_length, loss_on, truncation, transformers.__version__, tokenizers.__version__]).encode())
    h.update(hashlib.sha256(_tokenizer_fingerprint(tokenizer)).digest())
    for ex in examples:  # every field length-prefixed (unambiguous); plain UTF-8 is ~3x faster than json.dumps
        for v in (ex.id, ex.system, ex.context, ex.before, ex.facts, ex.after, ex.answer):
            b = v.encode("utf-8", "surrogatepass") if isinstance(v, str) else \
                b"\1" + json.dumps(v, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


class _FastTokenizer:
    """The tokenizer as masking.encode calls it, with its two text-tokenizing calls, `tokenizer(text,
    add_special_tokens=...)` and `apply_chat_template(messages, add_generation_prompt=..., tokenize=True)`, sent
    straight to the Rust backend's `encode_batch_fast`. transformers' own path for both is `backend.encode_batch` on
    the same text (the chat template rendered by the same `apply_chat_template(tokenize=False)`), so the ids are the
    same; what it skips is the character offsets and the BatchEncoding built around them: about a quarter of a case's
    time. `decode(list of ids)` skips transformers' check that every id is a Python int (a copy of the list; the
    ids masking decodes are those these calls returned) for the same `_decode`: half the time of a truncated case's
    two decodes. Any other call, and every other attribute (special tokens, ...), is the tokenizer's own."""

    def __init__(self, tokenizer):
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        self._tok = tokenizer
        self._encode = tokenizer.backend_tokenizer.encode_batch_fast
        self._decode = tokenizer._decode if type(tokenizer).decode is PreTrainedTokenizerBase.decode else None

    def __getattr__(self, name):
        if name in ("_tok", "_encode", "_decode"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._tok, name)

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs):
        if kwargs or self._decode is None or type(token_ids) is not list or \
                (token_ids and type(token_ids[0]) is not int):
            return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        return self._decode(token_ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, text=None, add_special_tokens: bool = True, **kwargs):
        if kwargs or not isinstance(text, str):
            return self._tok(text, add_special_tokens=add_special_tokens, **kwargs)
        return {"input_ids": self._encode([text], add_special_tokens=add_special_tokens)[0].ids}

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True, **kwargs):
        if kwargs or not tokenize:
            return self._tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tokenize=tokenize, **kwargs)
        text = self._tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
        if not isinstance(text, str):  # a batch of conversations: not masking's call
            return self._tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        return self._encode([text], add_special_tokens=False)[0].ids


def _fast_tokenizer(tokenizer, probe: Example | None, max_length: int, loss_on: str, truncation: str, eot):
    """`_FastTokenizer(tokenizer)` where its calls are provably transformers' own, else `tokenizer` itself: a plain
    TokenizersBackend (no subclass overriding how text is encoded), a backend without truncation or padding, and the
    same Encoded either way for `probe` (the first example, its facts shortened to 2,000 characters)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return tokenizer
    cls = type(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not (isinstance(tokenizer, TokenizersBackend) and hasattr(backend, "encode_batch_fast")
            and cls._encode_plus is TokenizersBackend._encode_plus and cls.__call__ is PreTrainedTokenizerBase.__call__
            and cls.apply_chat_template is PreTrainedTokenizerBase.apply_chat_template
            and not hasattr(tokenizer, "_switch_to_input_mode") and probe is not None):
        return tokenizer
    # transformers sets the backend's truncation, padding and special-token splitting before each of its calls
    tokenizer("", add_special_tokens=False)
    if backend.truncation is not None or backend.padding is not None or \
            backend.encode_special_tokens != bool(tokenizer.split_special_tokens):
        return tokenizer
    fast = _FastTokenizer(tokenizer)
    probe = dataclasses.replace(probe, facts=probe.facts[:2000])  # its template and text, at a fraction of the cost
    try:
        same = masking.encode(fast, probe, max_length, loss_on, truncation, eot) == \
            masking.encode(tokenizer, probe, max_length, loss_on, truncation, eot)
    except Exception:  # e.g. a DataError of this example: the real run reports it, through the tokenizer itself
        return tokenizer
    if not same:
        log.warning("the fast tokenizer path differs from transformers' for %s; tokenizing through transformers",
                    cls.__name__)
        return tokenizer
    return fast


def _encode_range(job: tuple, start: int, stop: int):
    """Encode examples[start:stop] of `job`: (input_ids values, labels values, lengths, stats); the values are int32
    (token ids and -100), half the bytes of int64 to send back from a worker."""
    import numpy as np

    tokenizer, examples, max_length, loss_on, truncation, eot = job
    ids: list[int] = []
    lengths: list[int] = []
    masked: list[int] = []  # per case: labels = [IGNORE] * masked + input_ids[masked:] (checked below)
    other: list[tuple[int, list[int]]] = []  # (offset, labels) of a case whose labels are not of that form
    stats = EncodeStats()
    for ex in examples[start:stop]:
        enc = masking.encode(tokenizer, ex, max_length, loss_on, truncation, eot)
        n = len(enc.input_ids)
        if len(enc.labels) != n:
            raise DataError(f"example {ex.id!r}: {len(enc.labels)} labels for {n} input_ids")
        k = enc.labels.count(IGNORE)
        tail = enc.labels[k:]
        if tail != enc.input_ids[k:] or IGNORE in tail:  # then the k IGNOREs are not exactly the first k labels
            other.append((len(ids), enc.labels))
        masked.append(k)
        ids += enc.input_ids
        lengths.append(n)
        stats.n += 1
        stats.truncated += int(enc.truncated)
        stats.max_tokens_cut = max(stats.max_tokens_cut, enc.facts_tokens_cut)
        stats.total_tokens += n
        stats.loss_tokens += n - k
    ids_arr = np.fromiter(ids, dtype=np.int32, count=len(ids))
    n_arr = np.asarray(lengths, dtype=np.int64)
    starts = np.repeat(np.cumsum(n_arr) - n_arr, n_arr)
    position = np.arange(len(ids), dtype=np.int64) - starts  # of each token within its case
    labels = np.where(position < np.repeat(np.asarray(masked, dtype=np.int64), n_arr), np.int32(IGNORE), ids_arr)
    for at, lab in other:
        labels[at:at + len(lab)] = lab
    return ids_arr, labels.astype(np.int32, copy=False), lengths, stats


def default_workers(n_examples: int) -> int:
    env = os.environ.get("LEXFINE_TOKENIZE_WORKERS")
    if env:
        if not env.strip().isdigit():
            raise DataError(f"LEXFINE_TOKENIZE_WORKERS={env!r} is not a whole number: set the number of tokenizing "
                            "processes (1 = serial) or unset it")
        return max(1, int(env))
    if n_examples < PARALLEL_MIN:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(per_rank, n_examples // CHUNK))


def _run_range(bounds: tuple[int, int]):
    return _JOB(*bounds)


def forked_chunks(fn, n: int, workers: int = 1, bar=None) -> list:
    """[fn(start, stop) for contiguous ranges covering 0..n], in order, computed by `workers` forked processes
    (serially with 1, or where fork is missing). Forked workers inherit `fn` and what it closes over (a tokenizer,
    the examples) instead of unpickling them or re-importing lexfine; only the ranges and the results travel. About
    8 ranges per worker, at most CHUNK items each, balance long and short items, so that no worker is left with a
    long last range while the others idle. `bar`: a tqdm bar advanced by each range's size."""
    import multiprocessing

    global _JOB
    chunk = CHUNK if workers <= 1 else max(1, min(CHUNK, -(-n // (8 * workers))))
    bounds = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    parts = []
    _JOB = fn
    try:
        if workers > 1 and len(bounds) > 1 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(min(workers, len(bounds))) as pool:
                for (start, stop), part in zip(bounds, pool.imap(_run_range, bounds)):
                    parts.append(part)
                    if bar is not None:
                        bar.update(stop - start)
        else:
            for start, stop in bounds:
                parts.append(fn(start, stop))
                if bar is not None:
                    bar.update(stop - start)
    finally:
        _JOB = None
    return parts


def encode_table(tokenizer, examples: list[Example], max_length: int, loss_on: str = "answer",
                 truncation: str = "middle", workers: int = 1, progress: bool = False):
    """(pyarrow Table of input_ids (list<int32>) and labels (list<int64>), EncodeStats), by `workers` processes."""
    from functools import partial

    import numpy as np
    import pyarrow as pa
    from tqdm.auto import tqdm

    eot = masking.end_of_turn_ids(tokenizer)
    fast = _fast_tokenizer(tokenizer, examples[0] if examples else None, max_length, loss_on, truncation, eot)
    job = (fast, examples, max_length, loss_on, truncation, eot)
    with tqdm(total=len(examples), desc="tokenizing", disable=not progress or len(examples) < 200, unit="ex") as bar:
        parts = forked_chunks(partial(_encode_range, job), len(examples), workers, bar)
    stats = EncodeStats()
    for *_, s in parts:
        stats.n += s.n
        stats.truncated += s.truncated
        stats.max_tokens_cut = max(stats.max_tokens_cut, s.max_tokens_cut)
        stats.total_tokens += s.total_tokens
        stats.loss_tokens += s.loss_tokens
    lengths = np.asarray([n for p in parts for n in p[2]], dtype=np.int64)
    if lengths.sum() >= 2**31:  # Arrow lists index their values with int32 offsets
        raise DataError(f"{int(lengths.sum()):,} tokens in one training set is more than 2^31: use data.limit or "
                        "fewer data.years")
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns = {}
    # the types Dataset.from_dict gives these lists (datasets stores input_ids as int32): the same Dataset either way
    for name, i, dtype in (("input_ids", 0, np.int32), ("labels", 1, np.int64)):
        values = np.concatenate([p[i] for p in parts], dtype=dtype) if parts else np.zeros(0, dtype=dtype)
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(values))
    return pa.table(columns), stats


def _checksum(table) -> int:
    crc = 0
    for name in ("input_ids", "labels"):
        for chunk in table.column(name).chunks:
            for arr in (chunk.offsets, chunk.flatten()):
                crc = zlib.crc32(memoryview(arr.to_numpy(zero_copy_only=False)).cast("B"), crc)  # no copy
    return crc


def _read(path: Path):
    """(table, stats dict) of a cache file, or None when it is missing or unusable."""
    import pyarrow as pa

    if not path.is_file():
        return None
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        meta = json.loads(table.schema.metadata[_META])
        if table.num_rows != meta["stats"]["examples"] or _checksum(table) != meta["crc"]:
            raise ValueError("content does not match its checksum")
        return table.replace_schema_metadata(None), meta["stats"]
    except Exception as e:  # a half-copied or damaged file: tokenize again and replace it
        log.warning("ignoring unusable tokenized cache %s (%s); rewriting it", path, str(e).splitlines()[0] if str(e)
                    else type(e).__name__)
        return None


def _write(path: Path, table, stats: EncodeStats) -> None:
    import pyarrow as pa

    meta = json.dumps({"stats": stats.as_dict(), "crc": _checksum(table)}).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = table.replace_schema_metadata({_META: meta})
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk must not fail the run: the data is in memory already
        log.warning("could not write the tokenized cache %s: %s", path, e)
        tmp.unlink(missing_ok=True)


def tokenized_dataset(tokenizer, examples: list[Example], max_length: int, loss_on: str = "answer",
                      truncation: str = "middle", progress: bool = True, workers: int | None = None):
    """The training Dataset (input_ids, labels) and its PreparedStats, from the cache when it holds them."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    t0 = time.perf_counter()
    root = cache_dir()
    key = cache_key(tokenizer, examples, max_length, loss_on, truncation) if root else None
    path = root / f"{key}.arrow" if root else None
    cached = _read(path) if path is not None else None
    workers = default_workers(len(examples)) if workers is None else max(1, workers)
    if cached is not None:
        table, saved = cached
        stats = PreparedStats(n=saved["examples"], truncated=saved["truncated"],
                              max_tokens_cut=saved["max_facts_tokens_cut"], total_tokens=saved["total_tokens"],
                              loss_tokens=saved["loss_tokens"], cache_hit=True, workers=0)
        log.info("tokenized data from the cache: %s", path)
    else:
        table, enc = encode_table(tokenizer, examples, max_length, loss_on, truncation, workers, progress)
        stats = PreparedStats(**vars(enc), workers=workers)
        if path is not None:
            _write(path, table, enc)
    stats.prep_s = round(time.perf_counter() - t0, 3)
    # the key decides the content: as the Dataset's fingerprint it spares `datasets` hashing every token (serially)
    return Dataset(InMemoryTable(table), fingerprint=key), stats
