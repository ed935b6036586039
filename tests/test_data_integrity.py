"""Token stores prove their integrity: sizes checked on open, checksums and ids on demand; a
damaged file is one error naming it and how to rebuild the store."""

import json
import os

import numpy as np
import pytest

from jaxformer.data import token_store as ts

VOCAB = 300


@pytest.fixture
def store_root(tmp_path):
    """A two-shard store of random ids below VOCAB."""
    root = str(tmp_path / "store")
    os.makedirs(root)
    rng = np.random.default_rng(0)
    markers = []
    for i in range(2):
        lengths = rng.integers(1, 30, 10)
        tokens = rng.integers(0, VOCAB, int(lengths.sum()))
        markers.append(ts.write_shard(root, i, tokens, lengths, VOCAB, {}))
    ts.write_manifest(root, markers, VOCAB, {})
    return root


def test_the_manifest_records_each_file_and_a_sound_store_verifies(store_root):
    manifest = json.loads(open(os.path.join(store_root, ts.MANIFEST)).read())
    size, digest = manifest["shard_files"][1]["tokens"]
    assert size == os.path.getsize(os.path.join(store_root, "shard-00001.tokens"))
    assert len(digest) == 64
    ts.TokenStore(store_root).verify()


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2)


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(0)
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0x01]))


def _garble(path):
    with open(path, "w") as f:
        f.write('{"format": 2, "vocab')


def _drop_key(path):
    with open(path) as f:
        manifest = json.load(f)
    del manifest["shard_tokens"]
    with open(path, "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize(
    "damage, name, why",
    [
        (_truncate, "shard-00001.tokens", "where the manifest says"),
        (_truncate, "shard-00000.docs", "where the manifest says"),
        (os.remove, "shard-00000.counts", "is missing"),
        (_garble, ts.MANIFEST, "is damaged (not JSON"),
        (_drop_key, ts.MANIFEST, "is damaged (KeyError"),
    ],
)
def test_opening_a_damaged_store_names_the_file_and_the_rebuild(store_root, damage, name, why):
    path = os.path.join(store_root, name)
    damage(path)
    with pytest.raises(ts.TokenStoreError) as raised:
        ts.TokenStore(store_root)
    message = str(raised.value)
    assert message.startswith(f"{path} ") and why in message, message
    assert f"delete {store_root} and rerun the same command" in message
    assert "python -m jaxformer.data.prepare" in message


def test_damage_that_keeps_sizes_is_found_by_verify(store_root):
    _flip_byte(os.path.join(store_root, "shard-00000.docs"))
    store = ts.TokenStore(store_root)  # opening checks sizes only
    with pytest.raises(ts.TokenStoreError, match=r"shard-00000.docs is damaged \(its SHA-256"):
        store.verify()


def test_a_token_id_outside_the_vocabulary_is_a_data_error(store_root):
    path = os.path.join(store_root, "shard-00001.tokens")
    with open(path, "r+b") as f:
        f.write(np.uint16(VOCAB + 5).tobytes())  # same size: the open check cannot see it
    store = ts.TokenStore(store_root)
    first = int(store.manifest["shard_tokens"][0])
    with pytest.raises(ts.TokenStoreError, match=rf"holds token id {VOCAB + 5}, outside the vocab"):
        store.tokens(first, first + 4)
