"""`alignheads generate`: single prompt, --compare, --prompts-file/--output, newest head, and
--interactive driven through a pseudo-terminal with the real console script."""

from __future__ import annotations

import json
import os
import select
import sys
import time
from pathlib import Path

import pytest

from alignheads.cli import _newest_head, main
from alignheads.inference import compare_with_base, generate, load_for_generation
from tests.test_inference import make_world

DECODE = ["--greedy", "--max-new-tokens", "6"]
GREEDY = {"do_sample": False, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("cliworld"))


@pytest.fixture(scope="module")
def expected(world):
    """Greedy responses of the CALM head computed through the Python API."""
    aligned, tok = load_for_generation(world["calm"])
    prompts = ["w3 w4 w5", "w10 w11", "w20 w21"]
    return {
        "prompts": prompts,
        "a1": generate(aligned, tok, prompts, alpha=1.0, **GREEDY),
        "a0": generate(aligned, tok, prompts, alpha=0.0, **GREEDY),
        "a3": generate(aligned, tok, prompts, alpha=3.0, **GREEDY),
        "cmp3": compare_with_base(aligned, tok, prompts, alpha=3.0, **GREEDY),
    }


def test_single_prompt(world, expected, capsys):
    assert main(["generate", "--heads", str(world["calm"]), *DECODE, expected["prompts"][0]]) == 0
    assert capsys.readouterr().out.strip() == expected["a1"][0]


def test_compare_prints_both_and_calm_alpha_zero_is_the_base(world, expected, capsys):
    prompt = expected["prompts"][0]
    assert (
        main(["generate", "--heads", str(world["calm"]), "--compare", "--alpha", "0", *DECODE, prompt]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    base, aligned = out.index("--- base (plain LM) ---"), out.index("--- aligned (calm head, alpha=0) ---")
    assert out[0] == f"prompt: {prompt}" and base < aligned
    assert out[base + 1] == out[aligned + 1] == expected["a0"][0]

    assert (
        main(["generate", "--heads", str(world["calm"]), "--compare", "--alpha", "3", *DECODE, prompt]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[out.index("--- base (plain LM) ---") + 1] == expected["cmp3"][0]["base"]
    assert out[out.index("--- aligned (calm head, alpha=3) ---") + 1] == expected["a3"][0]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json"])
def test_prompts_file_round_trip(world, expected, tmp_path, fmt):
    prompts = expected["prompts"]
    src = tmp_path / f"prompts.{fmt}"
    if fmt == "txt":
        src.write_text("\n".join(prompts) + "\n\n")
    elif fmt == "jsonl":
        src.write_text("".join(json.dumps({"prompt": p, "extra": 1}) + "\n" for p in prompts))
    else:
        src.write_text(json.dumps(prompts))
    out = tmp_path / "out" / "responses.jsonl"
    args = ["generate", "--heads", str(world["calm"]), "--prompts-file", str(src), "--output", str(out)]
    assert main([*args, "--compare", "--alpha", "3", "--batch-size", "2", *DECODE]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # valid JSONL
    assert len(rows) == len(prompts)
    assert [r["prompt"] for r in rows] == prompts
    assert [r["id"] for r in rows] == ["p00000", "p00001", "p00002"]
    assert all(r["alpha"] == 3.0 and r["head"] == "calm" for r in rows)
    # batching with left padding gives the same greedy text as the API's one batch
    assert [r["response"] for r in rows] == expected["a3"]
    assert [r["base"] for r in rows] == [c["base"] for c in expected["cmp3"]]

    # without --compare there is no base field; the output feeds back in as a prompts file
    again = tmp_path / "again.jsonl"
    assert (
        main(
            ["generate", "--heads", str(world["calm"]), "--prompts-file", str(out), "-o", str(again), *DECODE]
        )
        == 0
    )
    rows2 = [json.loads(line) for line in again.read_text().splitlines()]
    assert [r["prompt"] for r in rows2] == prompts and all("base" not in r for r in rows2)
    assert [r["response"] for r in rows2] == expected["a1"]


def test_steering_info_single_prompt_and_prompts_file(world, expected, tmp_path, capsys):
    prompt = expected["prompts"][0]
    assert main(["generate", "--heads", str(world["calm"]), "--steering-info", *DECODE, prompt]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == expected["a1"][0]  # the same response as without the flag
    assert lines[1].startswith("steering: ")
    info = json.loads(lines[1].removeprefix("steering: "))
    assert 0 < info["n_tokens"] <= 6 and info["kl_mean"] >= 0
    assert 0 <= info["strength_min"] <= info["strength_mean"] <= info["strength_max"]

    src, out = tmp_path / "p.txt", tmp_path / "out.json"
    src.write_text("\n".join(expected["prompts"]))
    args = ["generate", "--heads", str(world["calm"]), "--prompts-file", str(src), "--output", str(out)]
    assert main([*args, "--steering-info", *DECODE]) == 0
    rows = json.loads(out.read_text())
    assert [r["response"] for r in rows] == expected["a1"]
    assert all(set(r["steering"]) >= {"n_tokens", "kl_mean", "utilisation", "high_intensity"} for r in rows)


def test_bad_prompts_file_is_a_clean_error(world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w3"}\n')
    assert main(["generate", "--heads", str(world["calm"]), "--prompts-file", str(bad)]) == 1
    assert "field 'prompt' is missing" in capsys.readouterr().err
    assert main(["generate", "--heads", str(world["calm"])]) == 2


def test_newest_head_of_a_kind(tmp_path):
    from alignheads.storage.manifest import write_manifest

    made = {}
    for key, kind in [("a", "iav"), ("b", "calm"), ("c", "iav")]:
        d = tmp_path / "train" / key
        (d / "head").mkdir(parents=True)
        write_manifest(d, stage="train", key=key, stage_version=1, config={}, inputs={}, info={"kind": kind})
        made[key] = d / "head"
        time.sleep(0.01)
    assert _newest_head(tmp_path, "iav") == made["c"]
    assert _newest_head(tmp_path, "calm") == made["b"]
    assert _newest_head(tmp_path, None) == made["c"]
    with pytest.raises(FileNotFoundError, match="no trained calm head"):
        _newest_head(tmp_path / "empty", "calm")


def _read_until(fd: int, needle: str, buffer: list[str], timeout: float = 60.0, count: int = 1) -> str:
    """Read from the pty master until `needle` appears (`count` times) in the text read so far."""
    deadline = time.monotonic() + timeout
    while "".join(buffer).count(needle) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; output so far:\n{''.join(buffer)}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"output ended before {needle!r}:\n{''.join(buffer)}")
            buffer.append(chunk.decode("utf-8", "replace").replace("\r\n", "\n"))
    return "".join(buffer)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_interactive_through_a_pseudo_terminal(world, expected):
    import pty

    script = Path(sys.executable).parent / "alignheads"
    assert script.is_file(), script
    argv = [str(script), "generate", "--interactive", "--heads", str(world["calm"]), "--alpha", "3", *DECODE]
    pid, fd = pty.fork()
    if pid == 0:  # child: the real console script on the terminal
        os.execv(argv[0], argv)
    out: list[str] = []
    try:
        banner = _read_until(fd, "[alpha=3]> ", out)
        for command in (":alpha X", ":alpha (show it)", ":compare", ":info", ":help", ":q"):
            assert command in banner  # every command is listed (issue 21, item 7)
        os.write(fd, (expected["prompts"][0] + "\n").encode())
        _read_until(fd, expected["a3"][0] + "\n", out)
        os.write(fd, b":alpha\n")  # no value: says the current alpha
        _read_until(fd, "alpha = 3\n", out)
        # wait for readline to be reading again: keys typed before are echoed by the terminal
        _read_until(fd, "[alpha=3]> ", out, count=3)
        # readline: Up twice recalls the first prompt, which gets the same reply again (greedy)
        os.write(fd, b"\x1b[A\x1b[A\n")
        _read_until(fd, expected["a3"][0] + "\n", out, count=2)
        assert "^[[A" not in "".join(out)
        os.write(fd, b":alpha 0\n")
        _read_until(fd, "[alpha=0]> ", out)
        os.write(fd, (expected["prompts"][1] + "\n").encode())
        _read_until(fd, expected["a0"][1] + "\n", out)
        os.write(fd, b":compare\n")
        _read_until(fd, "compare with base: on", out)
        os.write(fd, (expected["prompts"][2] + "\n").encode())
        # wait for the aligned reply itself before typing again: the terminal echoes what is typed
        # at once, and under load that echo could land inside the reply's line
        text = _read_until(fd, f"--- aligned (calm head, alpha=0) ---\n{expected['a0'][2]}\n", out)
        os.write(fd, b":info\n")
        text = _read_until(fd, '"head_type": "calm"', out)
        os.write(fd, b":q\n")
        _, status = os.waitpid(pid, 0)
        try:
            while chunk := os.read(fd, 4096):
                out.append(chunk.decode("utf-8", "replace"))
        except OSError:
            pass
    finally:
        os.close(fd)
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    text = "".join(out).replace("\r\n", "\n")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text
    assert "alpha = 0" in text
    # at alpha 0 a CALM head is the base: the compared pair is the same text twice
    assert text.count(f"\n{expected['a0'][2]}\n") >= 2
    assert "Traceback" not in text


def test_generate_help_lists_every_chat_command():
    import subprocess

    exe = Path(sys.executable).parent / "alignheads"
    env = dict(os.environ, COLUMNS="400")  # argparse wraps help at the terminal's width
    out = subprocess.run(
        [str(exe), "generate", "--help"], capture_output=True, text=True, env=env, check=True
    ).stdout
    interactive = next(line for line in out.splitlines() if line.lstrip().startswith("--interactive"))
    for command in (":alpha X", ":alpha (show it)", ":compare", ":info", ":help", ":q"):
        assert command in interactive, interactive
