"""From a DataConfig to tokenized train/validation streams and a tokenizer, cached on disk."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Optional

import numpy as np

from jaxformer.data.config import DataConfig
from jaxformer.data.corpus import resolve_data_dir, text_source
from jaxformer.data.objectives import SpecialIds
from jaxformer.data.tokenizer import Tokenizer, tokenize_documents, train_tokenizer


@dataclasses.dataclass
class PreparedData:
    """A tokenizer and the train/validation token streams (documents end with EOS)."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray
    train_offsets: np.ndarray
    eval_tokens: np.ndarray
    eval_offsets: np.ndarray

    @property
    def special_ids(self) -> SpecialIds:
        """Ids the objectives treat specially."""
        tok = self.tokenizer
        return SpecialIds(vocab_size=tok.vocab_size, pad=tok.pad_id, eos=tok.eos_id,
                          mask=tok.mask_id,
                          sentinels=tuple(tok.sentinel_id(i) for i in range(tok.num_sentinels)),
                          no_mask_ids=tuple(i for i in (tok.unk_id, tok.bos_id) if i >= 0))


def _cache_key(cfg: DataConfig, split: str, tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256(tokenizer.serialized_model())
    digest.update(f"{cfg.dataset}|{split}|{cfg.text_key}|{cfg.max_documents}".encode())
    return digest.hexdigest()[:16]


def prepare_data(cfg: DataConfig, work_dir: str, *,
                 tokenizer_model: Optional[bytes] = None) -> PreparedData:
    """Loads the splits, trains (or reuses) the tokenizer, tokenizes both splits with caching.

    `work_dir` holds tokenizer.model; token caches live beside the TFDS data so runs share them.
    A given `tokenizer_model` (e.g. from a checkpoint) wins over training one.
    """
    train_texts = text_source(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.text_key,
                              cfg.max_documents)
    eval_texts = text_source(cfg.dataset, cfg.eval_split, cfg.data_dir, cfg.text_key,
                             cfg.max_documents)
    tokenizer_path = os.path.join(work_dir, "tokenizer.model")
    if tokenizer_model is not None:
        tokenizer = Tokenizer.from_bytes(tokenizer_model)
        if not os.path.exists(tokenizer_path):
            tokenizer.save(tokenizer_path)
    elif cfg.tokenizer_path:
        tokenizer = Tokenizer.load(cfg.tokenizer_path)
        tokenizer.save(tokenizer_path)
    else:
        logging.info("training a %d-piece sentencepiece tokenizer", cfg.vocab_size)
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size, tokenizer_path)
    cache_dir = os.path.join(resolve_data_dir(cfg.data_dir), "jaxformer_tokens")
    streams = []
    for split, texts in ((cfg.train_split, train_texts), (cfg.eval_split, eval_texts)):
        cache = os.path.join(cache_dir, f"{_cache_key(cfg, split, tokenizer)}.npz")
        streams.append(tokenize_documents(texts, tokenizer, cache))
    (train_tokens, train_offsets), (eval_tokens, eval_offsets) = streams
    return PreparedData(tokenizer, train_tokens, train_offsets, eval_tokens, eval_offsets)
