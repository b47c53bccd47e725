"""The parsers, fuzzed with hypothesis: whatever the input, they either succeed or raise the error
type the user is shown (with its place), never an unexpected exception; nothing is silently lost."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignheads.config import ConfigError, SourceConfig, apply_overrides
from alignheads.storage.manifest import ArtifactError, read_manifest
from alignheads.tasks.formats import FormatDetectionError, RowProblem, detect_format, parse_row
from alignheads.tasks.ingest import DataError, load_pairs

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", ""]), "content": st.text(max_size=12)}
    ),
    max_size=3,
)
rows = st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "id", "response", "other"]),
    json_values | messages | st.text(max_size=30),
    max_size=5,
)


@FAST
@given(rows)
def test_a_row_parses_to_three_texts_or_names_its_problem(row):
    try:
        fmt = detect_format(row)
    except FormatDetectionError as exc:
        assert "cannot detect the preference format" in str(exc)
        return
    try:
        prompt, chosen, rejected = parse_row(row, fmt)
    except RowProblem as problem:
        assert problem.field in (None, "prompt", "chosen", "rejected") and problem.reason
        return
    assert all(isinstance(t, str) for t in (prompt, chosen, rejected))
    assert chosen.strip() and rejected.strip() and chosen != rejected


@FAST
@given(st.lists(st.binary(max_size=60) | rows.map(lambda r: json.dumps(r).encode()), min_size=1, max_size=6))
def test_jsonl_bytes_give_pairs_plus_rejects_equal_to_the_lines_read(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines))
        n_lines = sum(1 for blob in path.read_bytes().split(b"\n") if blob.strip())
        try:
            pairs, rejects = load_pairs(SourceConfig(path=str(path)), "train", on_bad_rows="skip")
        except DataError as exc:  # empty, all bad, or an undetectable format: the message names the file
            assert str(path) in str(exc)
            return
        assert pairs.num_rows + rejects.num_rows == n_lines


@FAST
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_manifest_bytes_are_read_or_refused_naming_the_file(blob):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_bytes(blob)
        try:
            read_manifest(Path(tmp))
        except ArtifactError as exc:
            assert str(Path(tmp) / "manifest.json") in str(exc)


@FAST
@given(st.lists(st.text(max_size=30), max_size=4))
def test_overrides_apply_or_name_the_bad_one(items):
    try:
        apply_overrides({}, items)
    except ConfigError as exc:
        assert str(exc).startswith("--set ")
