"""Session fixtures shared by the data tests: the stdlib corpus and a small tokenizer, built once."""

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
