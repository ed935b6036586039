"""Fixtures shared by the tests: the stdlib corpus and a small tokenizer (built once per session),
and the overrides of a tiny training run on them."""

import hashlib
import os

import pytest

from jaxformer.data import corpus
from jaxformer.data.tokenizer import Tokenizer, train_tokenizer

TEST_VOCAB = 1024


@pytest.fixture(scope="session")
def stdlib_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding the prepared stdlib_code dataset."""
    # basetemp is shared by the session, so a second module importing this fixture reuses the build.
    data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    corpus.build_stdlib_corpus(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def stdlib_tokenizer(stdlib_data_dir, tmp_path_factory) -> Tokenizer:
    """A small-vocabulary tokenizer trained on the stdlib train split (cached by path)."""
    path = str(tmp_path_factory.getbasetemp() / f"stdlib_{TEST_VOCAB}.model")
    texts = corpus.text_source("stdlib_code", "train", stdlib_data_dir)
    return train_tokenizer(texts, TEST_VOCAB, path)


# A tiny pretraining run: two-layer GPT, 8 rows of 32 tokens, every step logged, synchronous saves.
TINY_RUN = [
    "model.preset=gpt-tiny",
    "data.seq_len=32",
    "data.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "optimizer.warmup_steps=1",
    "checkpoint.async_save=false",
]


@pytest.fixture
def tiny_overrides(stdlib_data_dir, stdlib_tokenizer, tmp_path) -> list[str]:
    """TINY_RUN on the stdlib corpus with the shared tokenizer (saved into this test's tmp_path)."""
    tokenizer_path = os.path.join(tmp_path, "shared.model")
    stdlib_tokenizer.save(tokenizer_path)
    return TINY_RUN + [
        f"data.data_dir={stdlib_data_dir}",
        f"data.tokenizer_path={tokenizer_path}",
        f"data.vocab_size={stdlib_tokenizer.vocab_size}",
    ]


def snapshot(directory) -> dict:
    """{relative path: sha256} of every file below directory (to show nothing was touched)."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def train_interrupted(cfg, until: int) -> None:
    """Trains `cfg` to step `until` (checkpointing there), then resumes it in a new Trainer."""
    from jaxformer.training.loop import Trainer

    first = Trainer(cfg, show_progress=False, log=lambda _: None)
    first.run(until=until)
    first.close()
    second = Trainer(cfg, show_progress=False, log=lambda _: None)
    assert second.start_step == until
    second.run()
    second.close()
