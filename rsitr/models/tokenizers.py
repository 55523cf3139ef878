"""Tokenizers of the text towers, loadable without timm or the text models themselves (Ray Data's actors
tokenize; importing the model libraries there cost seconds at every pipeline's start)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rsitr.models.naming import JOIN, OFFLINE_VOCABULARIES, resolve_text_model, tower_names


class JoinedTokenizer:
    """Tokenizes for several joined text towers at once: each tower's ids and mask, padded to one common length
    and laid side by side, so the joined row travels through every pipeline like one tower's row."""

    def __init__(self, tokenizers: list[PreTrainedTokenizerBase]) -> None:
        self.tokenizers = tokenizers

    def __call__(self, texts: list[str], return_tensors: str = "np", **options: Any) -> dict[str, Any]:
        parts = [tokenizer(texts, return_tensors="np", **options) for tokenizer in self.tokenizers]
        length = max(part["input_ids"].shape[1] for part in parts)
        ids, masks = [], []
        for tokenizer, part in zip(self.tokenizers, parts, strict=True):
            pad = length - part["input_ids"].shape[1]
            ids.append(np.pad(part["input_ids"], ((0, 0), (0, pad)), constant_values=tokenizer.pad_token_id or 0))
            masks.append(np.pad(part["attention_mask"], ((0, 0), (0, pad))))
        joined = {"input_ids": np.concatenate(ids, axis=1), "attention_mask": np.concatenate(masks, axis=1)}
        if return_tensors == "pt":
            import torch

            return {key: torch.as_tensor(value) for key, value in joined.items()}
        return joined


def load_tokenizer(name: str) -> PreTrainedTokenizerBase | JoinedTokenizer:
    """The tokenizer of a text model (``bert-base-uncased``'s vocabulary comes from the packaged MiniLM); for
    joined towers (``a+b``) a :class:`JoinedTokenizer`."""
    if JOIN in name:
        return JoinedTokenizer([_single_tokenizer(part) for part in tower_names(name)])
    return _single_tokenizer(name)


def _single_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_text_model(OFFLINE_VOCABULARIES.get(name, name)))


@functools.lru_cache(maxsize=8)
def process_tokenizer(name: str) -> PreTrainedTokenizerBase | JoinedTokenizer:
    """:func:`load_tokenizer`, once per process: for Ray Data tasks, whose worker processes Ray reuses from one
    epoch's pipeline to the next. Only where one thread tokenizes at a time (one task at a time per Ray worker):
    a fast tokenizer used by two threads at once raises "Already borrowed"."""
    return load_tokenizer(name)
