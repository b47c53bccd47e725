"""A catalogue of bad inputs and the exact message a user sees for each (file, row, field).

Each case feeds one bad input to the real reader (ingestion, manifests, shards, head loading,
config validation, the store's writers) and asserts the whole message, so a regression in what
the user is told fails here. Cases covered elsewhere are listed in RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from alignheads.config import ConfigError, SourceConfig, load_config
from alignheads.models import new_head
from alignheads.models.head_io import (
    WEIGHTS_FILE,
    HeadFormatError,
    HeadMismatchError,
    load_head,
    save_head,
)
from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
from alignheads.storage.manifest import ArtifactError, read_manifest, write_manifest
from alignheads.storage.store_errors import StoreWriteError
from alignheads.storage.tables import read_table, write_table
from alignheads.tasks.ingest import BadRowError, DataError, EmptyDatasetError, load_pairs
from alignheads.tasks.refpass import REFPASS_VERSION, check_refcache
from tests.helpers.tiny_models import tiny_llama

GOOD = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}


def _jsonl(tmp_path: Path, lines: list[bytes | str | dict], name: str = "pairs.jsonl") -> SourceConfig:
    path = tmp_path / name
    blobs = [
        line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode()
        for line in lines
    ]
    path.write_bytes(b"\n".join(blobs) + b"\n")
    return SourceConfig(path=str(path))


def _load(src: SourceConfig, **kw):
    return load_pairs(src, "train", **kw)


# --------------------------------------------------------------------------------- preference rows
ROW_CASES = {
    "malformed JSON line": (
        [GOOD, '{"prompt": "x", "chosen": "a" "rejected": "b"}'],
        "pairs.jsonl: row 1 (line 2): malformed JSON: Expecting ',' delimiter (column 31)",
    ),
    "row that is not an object": (
        [GOOD, "[1, 2]"],
        "pairs.jsonl: row 1 (line 2): expected a JSON object, got array",
    ),
    "wrong type": (
        [{**GOOD, "chosen": 3}],
        "pairs.jsonl: row 0 (line 1), field 'chosen': expected a string for format 'trl', got int",
    ),
    "null value": (
        [{**GOOD, "rejected": None}],
        "pairs.jsonl: row 0 (line 1), field 'rejected': missing value (null)",
    ),
    "missing field": (
        [GOOD, {"prompt": "p", "chosen": "c"}],
        "pairs.jsonl: row 1 (line 2), field 'rejected': missing field",
    ),
    "empty string": ([{**GOOD, "chosen": ""}], "pairs.jsonl: row 0 (line 1), field 'chosen': empty string"),
    "whitespace-only string": (
        [{**GOOD, "prompt": "  \n"}],
        "pairs.jsonl: row 0 (line 1), field 'prompt': whitespace-only string",
    ),
    "chosen = rejected": (
        [{**GOOD, "rejected": GOOD["chosen"]}],
        "pairs.jsonl: row 0 (line 1), field 'rejected': identical to 'chosen'",
    ),
    "non-UTF-8 bytes": (
        [GOOD, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'],
        "pairs.jsonl: row 1 (line 2): not valid UTF-8 (invalid continuation byte at byte 15)",
    ),
    "duplicate id": (
        [{**GOOD, "id": "a"}, {**GOOD, "id": "a"}],
        "pairs.jsonl: row 1 (line 2), field 'id': duplicate id 'a' (first used by row 0)",
    ),
    "HH dialogue without an assistant turn": (
        [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"}],
        "pairs.jsonl: row 0 (line 1), field 'chosen': cannot parse the dialogue: no '\\n\\nAssistant:' turn",
    ),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_row_names_file_row_and_field(tmp_path, case):
    lines, message = ROW_CASES[case]
    src = _jsonl(tmp_path, lines)
    with pytest.raises(BadRowError) as err:
        _load(src)
    assert str(err.value) == str(tmp_path / message)


def test_bad_rows_skipped_are_counted_with_the_same_reasons(tmp_path):
    lines = [GOOD] + [lines[-1] for lines, _ in ROW_CASES.values()]
    pairs, rejects = _load(_jsonl(tmp_path, lines), on_bad_rows="skip")
    # nothing silently dropped: the good row and the first use of id 'a' pass, the other 10 are
    # recorded (the format is taken from the first row, so the HH row lacks its 'prompt')
    assert (pairs.num_rows, rejects.num_rows) == (2, 10)
    assert rejects.column("field").to_pylist().count(None) == 3  # malformed, not an object, bad bytes


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(EmptyDatasetError) as err:
        _load(SourceConfig(path=str(path)))
    assert str(err.value) == f"{path}: no rows (an empty dataset cannot be used)"


def test_dataset_whose_rows_are_all_bad(tmp_path):
    src = _jsonl(tmp_path, [{**GOOD, "chosen": ""}, {**GOOD, "rejected": GOOD["chosen"]}])
    with pytest.raises(EmptyDatasetError) as err:
        _load(src, on_bad_rows="skip")
    assert str(err.value) == (
        f"{src.path}: no valid rows: all 2 rows read were rejected "
        f"(first: {src.path}: row 0 (line 1), field 'chosen': empty string)"
    )


def test_truncated_parquet_data_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD] * 50), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        _load(SourceConfig(path=str(path)))
    assert str(err.value).startswith(f"{path}: not a readable Parquet file: ")


def test_json_file_that_is_not_json(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('{"data": [')
    with pytest.raises(DataError) as err:
        _load(SourceConfig(path=str(path)))
    assert str(err.value) == f"{path}: not valid JSON: Expecting value (line 1, column 11)"


def test_prompts_longer_than_the_maximum_are_cut_and_flagged():
    """Not an error: the prompt keeps its last max_prompt_length tokens and says it was cut."""
    from alignheads.tasks.tokenize import truncate_prompt

    ids = list(range(10, 40))
    kept, cut = truncate_prompt(ids, 8, bos_id=None)
    assert (kept, cut) == (ids[-8:], True)
    assert truncate_prompt(ids, 64, bos_id=None) == (ids, False)


# --------------------------------------------------------------------------------- store artifacts
def _artifact(tmp_path: Path):
    table = pa.table({"x": list(range(100))})
    result = ensure_artifact(
        tmp_path / "store",
        "data",
        "k1",
        1,
        {},
        {},
        lambda staging: ArtifactContent({"t": write_table(table, staging, "t", rows_per_shard=40)}),
    )
    return result.path


def test_shard_failing_its_checksum(tmp_path):
    path = _artifact(tmp_path)
    shard = path / "t" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(data))
    manifest = read_manifest(path)
    want = manifest.tables["t"][1].sha256[:12]
    with pytest.raises(
        ArtifactError, match=re.escape(f"{shard}: checksum mismatch (manifest {want}…, file ")
    ):
        read_table(path, "t")


def test_truncated_shard(tmp_path):
    path = _artifact(tmp_path)
    shard = path / "t" / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(ArtifactError, match=re.escape(f"{shard}: checksum mismatch (manifest ")):
        read_table(path, "t")


def test_manifest_from_another_format_version(tmp_path):
    path = _artifact(tmp_path)
    raw = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**raw, "format": 2}))
    with pytest.raises(ArtifactError) as err:
        read_table(path, "t")
    assert str(err.value) == f"{path / 'manifest.json'}: manifest format 2, this version reads 1"


def test_stage_artifact_from_another_stage_version(tmp_path):
    path = tmp_path / "refpass" / "k"
    path.mkdir(parents=True)
    write_manifest(path, stage="refpass", key="k", stage_version=1, config={}, inputs={})
    with pytest.raises(ArtifactError) as err:
        check_refcache(path)
    assert str(err.value) == (
        f"{path / 'manifest.json'}: refpass artifact format version 1, "
        f"this version of alignheads reads {REFPASS_VERSION}"
    )


@pytest.mark.parametrize(
    ("changed", "differs"),
    [
        ({"config": {"model": {"kind": "hub", "id": "other/model", "revision": "main"}}}, "config.model"),
        ({"inputs": {"tokenizer": "f" * 64}}, "inputs.tokenizer"),
    ],
)
def test_cache_for_another_model_or_tokenizer(tmp_path, changed, differs):
    path = tmp_path / "refpass" / "k"
    path.mkdir(parents=True)
    config = {"model": {"kind": "dir", "files": {"model.safetensors": "a" * 64}}, "k": 16}
    inputs = {"tokenize": "t1", "tokenizer": "e" * 64}
    write_manifest(
        path, stage="refpass", key="k", stage_version=REFPASS_VERSION, config=config, inputs=inputs
    )
    plan = types.SimpleNamespace(
        config={**config, **changed.get("config", {})}, inputs={**inputs, **changed.get("inputs", {})}
    )
    with pytest.raises(ArtifactError) as err:
        check_refcache(path, plan)
    assert str(err.value) == (
        f"{path}: refcache built under other settings (differs in {differs}); it cannot serve this run"
    )


# --------------------------------------------------------------------------------- heads
@pytest.fixture
def head_dir(tmp_path) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama(tied=False)
    return save_head(new_head("iav", model), tmp_path / "head", base_model=model), model


def test_head_for_another_vocabulary(head_dir):
    path, _ = head_dir
    other = tiny_llama(tied=False, vocab=80)
    with pytest.raises(HeadMismatchError) as err:
        load_head(path, other, ignore_base_id=True)
    assert str(err.value) == (
        f"{path}: the head does not match this base model: vocabulary size: head 100, base 80"
    )


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_head_file_with_missing_or_extra_tensors(head_dir, change):
    path, model = head_dir
    tensors = {n: p.detach().clone() for n, p in new_head("iav", model).named_parameters()}
    if change == "missing":
        del tensors["align.weight"]
    else:
        tensors["bias"] = torch.zeros(3)
    save_file(tensors, str(path / WEIGHTS_FILE))
    missing, unexpected = (["align.weight"], []) if change == "missing" else ([], ["bias"])
    with pytest.raises(HeadFormatError) as err:
        load_head(path, model)
    assert str(err.value) == (
        f"{path / WEIGHTS_FILE}: tensor names do not match a iav head: "
        f"missing {missing}, unexpected {unexpected}"
    )


def test_truncated_head_weights(head_dir):
    path, model = head_dir
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(HeadFormatError, match=re.escape(f"{weights}: not a readable safetensors file (")):
        load_head(path, model)


# --------------------------------------------------------------------------------- configs
CONFIG_CASES = {
    "unknown key": (
        "tokenize.max_prompt_lenght=3",
        "  tokenize.max_prompt_lenght: unknown key; did you mean 'max_prompt_length'?",
    ),
    "negative beta": ("train.iav.beta=-0.1", "  train.iav.beta: Input should be greater than 0 (got -0.1)"),
    "empty alpha list": (
        "sweep.alphas=[]",
        "  sweep.alphas: List should have at least 1 item after validation, not 0 (got [])",
    ),
    "k of zero": ("refpass.k=0", "  refpass.k: Input should be greater than or equal to 1 (got 0)"),
    "wrong type": ("train.calm.rank=many", "  train.calm.rank: Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    "impossible sampling": (
        "sweep.top_p=1.5",
        "  sweep.top_p: Input should be less than or equal to 1 (got 1.5)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_impossible_config_names_the_key(tmp_path, case):
    override, line = CONFIG_CASES[case]
    config = tmp_path / "run.yaml"
    config.write_text("name: bad\n")
    with pytest.raises(ConfigError) as err:
        load_config(config, [override])
    # the mistake is the --set item's: blamed on it, not on the config file (issue 21, item 5)
    assert str(err.value).splitlines() == [f"invalid configuration (--set {override}):", line]


# k larger than the vocabulary needs the model: refused by plan_refpass before anything runs
# (tests/tasks/test_refpass.py asserts "refpass.k = ... exceeds the vocabulary of the reference model").


# --------------------------------------------------------------------------------- the store's disk
@contextlib.contextmanager
def tiny_filesystem(path: Path, options: str):
    """A real tmpfs mounted at `path` (root only); the test is skipped where mounting is refused."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _build_big(store: Path):
    table = pa.table({"x": pa.array(range(300_000), pa.int64())})  # ~1 MB compressed: over 64 KiB
    return ensure_artifact(
        store,
        "data",
        "k1",
        1,
        {},
        {},
        lambda staging: ArtifactContent({"t": write_table(table, staging, "t")}),
    )


def test_store_on_a_read_only_directory(tmp_path):
    with tiny_filesystem(tmp_path / "ro", "ro,size=64k") as mount, pytest.raises(StoreWriteError) as err:
        _build_big(mount / "store")
    assert str(err.value) == (
        f"{mount / 'store' / 'data' / 'k1'}: cannot write (read-only file system): the store is on a "
        "read-only file system; point --set store=DIR at a writable directory"
    )


def test_store_on_a_full_disk_keeps_nothing_partial(tmp_path):
    with tiny_filesystem(tmp_path / "full", "size=64k") as mount:
        with pytest.raises(StoreWriteError) as err:
            _build_big(mount / "store")
        left = sorted(p.name for p in (mount / "store" / "data").iterdir())
    assert str(err.value) == (
        f"{mount / 'store' / 'data' / 'k1'}: cannot write (no space left on device): no space left "
        "on the device; free some space or point --set store=DIR elsewhere"
    )
    assert left == [".locks"]  # the staging directory was removed; nothing at the final path
