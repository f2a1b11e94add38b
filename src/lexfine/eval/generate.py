"""Greedy generation and answer parsing: the reference study's way of evaluating, kept for parity.

SJP: a few new tokens, then the first "approval"/"dismissal" in the text (the study searched the text for them), as
a whole word: "disapproval" or "non-approval" is not "approval".
LEXam: the benchmark's chain-of-thought prompt, then the last `###X###` (as LEXam's own evaluation.py does).
A text without a valid answer is a parse failure: prediction None, counted wrong, and reported separately, so that
"forgot the law" and "stopped writing ###X###" can be told apart.

Backends: transformers `generate` (default; left-padded, length-sorted batches) or vLLM when installed (imported
only when asked for).
"""

from __future__ import annotations

import re

import torch

from lexfine.errors import ModelError

SJP_WORDS = ("approval", "dismissal")
# A label word on its own: no letter, digit, underscore or hyphen right before or after it ("disapproval",
# "non-approval", "approvals", "dismissal_x" are not answers); punctuation, markdown and quotes around it are fine.
_SJP_WORD = re.compile(r"(?<![\w-])(" + "|".join(SJP_WORDS) + r")(?![\w-])", re.IGNORECASE)
_HASH = re.compile(r"###\s*([A-Za-z]{1,2}|\d{1,2})\s*###")


def parse_sjp(text: str) -> str | None:
    """The label word that occurs first in the text as a whole word (case-insensitive), or None.

    Only the English label words count (the ones training teaches, whatever the case's language): a French, German
    or Italian verdict ("rejeté", "abgewiesen", "accolto") is a parse failure, not a guess."""
    m = _SJP_WORD.search(text)
    return m.group(1).lower() if m else None


def parse_hash_answer(text: str, labels: list[str]) -> str | None:
    """The last `###X###` in the text when X is one of the labels, else None (LEXam: last match wins)."""
    matches = _HASH.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip().upper()
    return answer if answer in labels else None


def stop_ids(tokenizer, eot: list[int]) -> list[int]:
    ids = list(eot)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_hf(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                eos_ids: list[int] | None = None, progress: bool = True, desc: str = "generating",
                n_batches_min: int | None = None, synced_gpus: bool = False,
                max_batch_tokens: int | None = None) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens, in input order."""
    from tqdm.auto import tqdm

    from lexfine.eval.loglik import length_batches

    if not prompts:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    batches = length_batches([len(p) + max_new_tokens for p in prompts], batch_size, max_batch_tokens)
    extra = max(0, (n_batches_min or 0) - len(batches))
    out: list[str | None] = [None] * len(prompts)
    ctx = torch.no_grad() if synced_gpus else torch.inference_mode()
    with ctx:
        for b in tqdm(batches + batches[-1:] * extra, desc=desc, unit="batch", disable=not progress, leave=False):
            width = max(len(prompts[i]) for i in b)
            ids = torch.full((len(b), width), pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            for row, i in enumerate(b):  # left padding: every row's continuation starts in the same column
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                att[row, width - len(prompts[i]):] = 1
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, eos_token_id=eos_ids, pad_token_id=pad, use_cache=True,
                synced_gpus=synced_gpus, temperature=None, top_p=None, top_k=None,
            )
            for row, i in enumerate(b):
                out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
    return out  # type: ignore[return-value]


def generate_vllm(model_path: str, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                  eos_ids: list[int] | None = None, lora_path: str | None = None, max_model_len: int | None = None,
                  dtype: str = "auto", lora_rank: int = 16) -> list[str]:
    """The same greedy continuations through vLLM (`pip install vllm`); a LoRA adapter is applied unmerged."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ModelError("--backend vllm needs vLLM: pip install vllm (or use the default --backend hf)") from None
    kwargs = {"model": model_path, "dtype": dtype, "enable_prefix_caching": True}
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if lora_path:
        kwargs.update(enable_lora=True, max_lora_rank=max(lora_rank, 8))
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=eos_ids or None,
                            skip_special_tokens=True)
    request = None
    if lora_path:
        from vllm.lora.request import LoRARequest

        request = LoRARequest("adapter", 1, lora_path)
    try:
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    except ImportError:  # older vLLM
        inputs = [{"prompt_token_ids": p} for p in prompts]
    results = llm.generate(inputs, params, lora_request=request)
    return [r.outputs[0].text for r in results]
