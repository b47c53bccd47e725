"""IAV's alignment head as a PEFT LoRA adapter on lm_head: the SVD factors, and real PEFT loading
the exported adapter onto real (tiny) transformers models, tied and untied, with a final-logit cap."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from alignheads.models import AlignedLM, save_head
from alignheads.models.lora_export import NotALoraError, lora_factors
from alignheads.tasks.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_RECORD, export_peft
from tests.helpers.tiny_models import (
    left_padded_batch,
    make_head,
    randomise,
    tiny_gemma2,
    tiny_llama,
    tiny_tokenizer,
)


def test_full_rank_factors_reproduce_the_matrix_and_truncation_error_is_the_dropped_spectrum() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(100, 32, generator=gen)
    full = lora_factors(w)
    assert (full.A.shape, full.B.shape, full.rank) == ((32, 32), (100, 32), 32)
    assert torch.allclose(full.B @ full.A, w, atol=1e-5) and full.relative_error == 0.0
    low = lora_factors(w, 4)
    measured = (
        torch.linalg.matrix_norm(w.double() - (low.B @ low.A).double()) / torch.linalg.matrix_norm(w.double())
    ).item()
    assert low.rank == 4 and measured == pytest.approx(low.relative_error, rel=1e-5)
    assert lora_factors(w, 500).rank == 32  # clamped to full rank
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora_factors(w, 0)


def _base(tmp_path: Path, model) -> Path:
    directory = tmp_path / "base"
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def _aligned_head(model, seed: int = 3):
    """A trained-looking IAV head whose base head is the model's own lm_head (base_head: frozen)."""
    head = make_head("iav", model)
    with torch.no_grad():
        head.align.weight.copy_(
            torch.randn(head.align.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.15
        )
    return head


def _load_peft(base_dir: Path, adapter: Path, model_cls):
    base = model_cls.from_pretrained(base_dir).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that a tied layer is adapted (handled: no merge)
        return base, PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied", "gemma2-capped"])
def test_peft_loads_the_exported_adapter_and_reproduces_the_head_at_alpha_1(
    tmp_path: Path, kind: str
) -> None:
    from transformers import AutoModelForCausalLM

    model = {"llama-tied": lambda: tiny_llama(tied=True), "llama-untied": lambda: tiny_llama(tied=False),
             "gemma2-capped": lambda: tiny_gemma2(cap=3.0)}[kind]()  # fmt: skip
    base_dir = _base(tmp_path, model)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    heads = save_head(_aligned_head(model), tmp_path / "head", base_model=model)
    ids, mask = left_padded_batch([5, 9, 7])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        aligned = AlignedLM(model, _aligned_head(model), alpha=1.0)  # installs the head in `model`
        want = aligned(input_ids=ids, attention_mask=mask).logits
        with aligned.use_alpha(2.0):
            at2 = aligned(input_ids=ids, attention_mask=mask).logits

    out = export_peft(heads, tmp_path / "adapter")  # full rank
    assert sorted(p.name for p in out.out.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_RECORD]
    )
    config = json.loads((out.out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["lm_head"]
    assert config["r"] == 32 and config["lora_alpha"] / config["r"] == 1.0 and not config["use_rslora"]
    with safe_open(str(out.out / ADAPTER_WEIGHTS), "pt") as fh:  # the two factors only, not lm_head
        assert sorted(fh.keys()) == [
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.lm_head.lora_B.weight",
        ]
    assert out.tied_embeddings is (kind == "llama-tied")

    base, peft_model = _load_peft(base_dir, out.out, AutoModelForCausalLM)
    embeddings = base.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (got - want)[keep].abs().max().item() <= 1e-4
    assert (plain - want)[keep].abs().max().item() > 0.1  # the head does change the logits
    assert torch.equal(peft_model.get_input_embeddings().weight, embeddings)  # tied or not: inputs unchanged

    # the LoRA scale is α: scaling 2 is the head at α = 2 (set_scale multiplies lora_alpha / r)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", 2.0)
    with torch.no_grad():
        got2 = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (got2 - at2)[keep].abs().max().item() <= 1e-4


def test_low_rank_adapters_approximate_and_alpha_is_baked_into_lora_alpha(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir = _base(tmp_path, tiny_llama(tied=False))
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    heads = save_head(_aligned_head(model), tmp_path / "head", base_model=model)
    out = export_peft(heads, tmp_path / "r8", rank=8, alpha=1.5)
    config = json.loads((out.out / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 12.0) and 0 < out.relative_error < 1
    record = json.loads((out.out / EXPORT_RECORD).read_text())
    assert record["rank"] == 8 and record["alpha"] == 1.5 and record["relative_error"] == out.relative_error
    with pytest.raises(FileExistsError):
        export_peft(heads, tmp_path / "r8", rank=8)


def test_calm_and_a_trained_base_head_are_refused_with_the_reason(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir = _base(tmp_path, tiny_llama(tied=False))
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    calm = save_head(randomise(make_head("calm", model)), tmp_path / "calm", base_model=model)
    with pytest.raises(NotALoraError, match=r"calm head cannot be exported.*context mean.*position"):
        export_peft(calm, tmp_path / "out-calm")
    trained = save_head(randomise(make_head("iav", model)), tmp_path / "iav", base_model=model)  # W_b moved
    with pytest.raises(NotALoraError, match=r"W_b differs from the model's lm_head.*alignheads merge"):
        export_peft(trained, tmp_path / "out-iav")
    assert not (tmp_path / "out-calm").exists() and not (tmp_path / "out-iav").exists()


def test_the_command_line_refuses_calm_in_one_line_and_writes_an_iav_adapter(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from alignheads.cli import main

    base_dir = _base(tmp_path, tiny_llama(tied=True))
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    calm = save_head(randomise(make_head("calm", model)), tmp_path / "calm", base_model=model)
    iav = save_head(_aligned_head(model), tmp_path / "iav", base_model=model)
    store = ["--set", f"store={tmp_path / 'store'}"]
    assert (
        main(["export", "--format", "peft", "--heads", str(calm), "--out", str(tmp_path / "a"), *store]) == 1
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: a calm head cannot be exported as a PEFT LoRA")
    out = tmp_path / "b"
    argv = [
        "export",
        "--format",
        "peft",
        "--heads",
        str(iav),
        "--out",
        str(out),
        "--rank",
        "8",
        "--alpha",
        "2",
    ]
    assert main([*argv, *store]) == 0
    assert "rank 8 of 32" in capsys.readouterr().out
    assert json.loads((out / ADAPTER_CONFIG).read_text())["lora_alpha"] == 16.0
