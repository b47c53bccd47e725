"""The store's memo of tokenizer fingerprints: the same fingerprint as loading and hashing, no
load while the tokenizer's files are unchanged, a load again as soon as one of them changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignheads.loading import load_tokenizer
from alignheads.storage.fingerprint import tokenizer_fingerprint
from alignheads.storage.tokenizer_memo import MEMO_DIR, memo_key, memoized_fingerprint
from tests.helpers.tiny_models import tiny_tokenizer


@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    path = tmp_path / "model"
    tiny_tokenizer().save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"weights")
    return path


class Counting:
    """The real load-and-hash, counting its calls."""

    def __init__(self, source: dict) -> None:
        self.source, self.calls = source, 0

    def __call__(self) -> str:
        self.calls += 1
        return tokenizer_fingerprint(load_tokenizer(**self.source))


def _source(path: Path, **extra) -> dict:
    return {"name_or_path": str(path), "revision": None, "trust_remote_code": False, **extra}


def test_the_memo_answers_with_the_loaded_fingerprint_without_loading(tmp_path, tokenizer_dir):
    source = _source(tokenizer_dir)
    compute = Counting(source)
    first = memoized_fingerprint(tmp_path / "store", source, compute)
    again = memoized_fingerprint(tmp_path / "store", source, compute)
    assert first == again == tokenizer_fingerprint(load_tokenizer(str(tokenizer_dir)))
    assert compute.calls == 1
    (memo,) = (tmp_path / "store" / MEMO_DIR).iterdir()
    assert json.loads(memo.read_text()) == {"fingerprint": first, "name_or_path": str(tokenizer_dir)}


def test_an_edited_tokenizer_file_misses_the_memo(tmp_path, tokenizer_dir):
    source = _source(tokenizer_dir)
    compute = Counting(source)
    before = memoized_fingerprint(tmp_path / "store", source, compute)
    config = tokenizer_dir / "tokenizer_config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps(raw | {"chat_template": "{{ messages[0]['content'] }}"}))
    after = memoized_fingerprint(tmp_path / "store", source, compute)
    assert compute.calls == 2 and after != before  # the chat template is part of the fingerprint
    assert after == tokenizer_fingerprint(load_tokenizer(str(tokenizer_dir)))


def test_weights_are_not_part_of_the_key(tokenizer_dir):
    key = memo_key(_source(tokenizer_dir))
    (tokenizer_dir / "model.safetensors").write_bytes(b"other weights")
    assert memo_key(_source(tokenizer_dir)) == key
    (tokenizer_dir / "special_tokens_map.json").write_text("{}")
    assert memo_key(_source(tokenizer_dir)) != key


def test_hub_ids_and_remote_code_are_always_loaded(tmp_path, tokenizer_dir):
    assert memo_key(_source("org/some-model")) is None
    assert memo_key(_source(tokenizer_dir, trust_remote_code=True)) is None
    calls = []
    for _ in range(2):
        memoized_fingerprint(tmp_path / "store", _source("org/some-model"), lambda: calls.append(1) or "f" * 64)
    assert len(calls) == 2 and not (tmp_path / "store" / MEMO_DIR).exists()


@pytest.mark.parametrize("damage", ["{not json", '{"fingerprint": 3}', "[]", '{"fingerprint": "abc"}'])
def test_a_damaged_memo_is_computed_again_and_rewritten(tmp_path, tokenizer_dir, damage):
    source = _source(tokenizer_dir)
    compute = Counting(source)
    value = memoized_fingerprint(tmp_path / "store", source, compute)
    (memo,) = (tmp_path / "store" / MEMO_DIR).iterdir()
    memo.write_text(damage)
    assert memoized_fingerprint(tmp_path / "store", source, compute) == value
    assert compute.calls == 2 and json.loads(memo.read_text())["fingerprint"] == value


def test_a_memo_that_cannot_be_written_still_gives_the_fingerprint(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    store.mkdir()
    (store / ".cache").write_text("a file where the memo's directory would go")  # mkdir fails, even as root
    source = _source(tokenizer_dir)
    compute = Counting(source)
    assert memoized_fingerprint(store, source, compute) == memoized_fingerprint(store, source, compute)
    assert compute.calls == 2 and (store / ".cache").is_file()
