"""Examples -> the tokenized training Dataset: in parallel worker processes, and cached across runs.

Parallel: with at least PARALLEL_MIN examples, contiguous chunks are encoded by forked worker processes (one per
available core, shared among the local ranks of a multi-process launch; `LEXFINE_TOKENIZE_WORKERS=N` overrides,
1 = serial). Every example is encoded by the same `masking.encode` either way, and chunks are joined in order,
so the result is identical to the serial path.

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
_JOB: tuple | None = None  # what forked workers encode: set in the parent just before the pool starts


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
    for ex in examples:
        h.update(json.dumps([ex.id, ex.system, ex.context, ex.before, ex.facts, ex.after, ex.answer],
                            ensure_ascii=False, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _encode_range(bounds: tuple[int, int]):
    """Encode examples[start:stop] of the current job: (input_ids values, labels values, lengths, stats)."""
    import numpy as np

    tokenizer, examples, max_length, loss_on, truncation, eot = _JOB
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    stats = EncodeStats()
    for ex in examples[bounds[0]:bounds[1]]:
        enc = masking.encode(tokenizer, ex, max_length, loss_on, truncation, eot)
        ids.extend(enc.input_ids)
        labels.extend(enc.labels)
        lengths.append(len(enc.input_ids))
        stats.n += 1
        stats.truncated += int(enc.truncated)
        stats.max_tokens_cut = max(stats.max_tokens_cut, enc.facts_tokens_cut)
        stats.total_tokens += len(enc.input_ids)
        stats.loss_tokens += sum(1 for x in enc.labels if x != IGNORE)
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), lengths, stats


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


def encode_table(tokenizer, examples: list[Example], max_length: int, loss_on: str = "answer",
                 truncation: str = "middle", workers: int = 1, progress: bool = False):
    """(pyarrow Table of input_ids (list<int32>) and labels (list<int64>), EncodeStats), by `workers` processes."""
    import multiprocessing

    import numpy as np
    import pyarrow as pa
    from tqdm.auto import tqdm

    global _JOB
    # a few chunks per worker balance long and short cases; the order of the chunks is the order of the examples
    chunk = CHUNK if workers <= 1 else max(1, min(CHUNK, -(-len(examples) // (4 * workers))))
    bounds = [(i, min(i + chunk, len(examples))) for i in range(0, len(examples), chunk)]
    _JOB = (tokenizer, examples, max_length, loss_on, truncation, masking.end_of_turn_ids(tokenizer))
    bar = tqdm(total=len(examples), desc="tokenizing", disable=not progress or len(examples) < 200, unit="ex")
    try:
        if workers > 1 and len(bounds) > 1 and "fork" in multiprocessing.get_all_start_methods():
            # fork: workers inherit the tokenizer and examples instead of unpickling them (and re-importing lexfine)
            with multiprocessing.get_context("fork").Pool(min(workers, len(bounds))) as pool:
                parts = []
                for part in pool.imap(_encode_range, bounds):
                    parts.append(part)
                    bar.update(len(part[2]))
        else:
            parts = []
            for b in bounds:
                parts.append(_encode_range(b))
                bar.update(b[1] - b[0])
    finally:
        _JOB = None
        bar.close()
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
        values = np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(values.astype(dtype, copy=False)))
    return pa.table(columns), stats


def _checksum(table) -> int:
    crc = 0
    for name in ("input_ids", "labels"):
        for chunk in table.column(name).chunks:
            for arr in (chunk.offsets, chunk.flatten()):
                crc = zlib.crc32(arr.to_numpy(zero_copy_only=False).tobytes(), crc)
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
    path = root / f"{cache_key(tokenizer, examples, max_length, loss_on, truncation)}.arrow" if root else None
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
    return Dataset(InMemoryTable(table)), stats
