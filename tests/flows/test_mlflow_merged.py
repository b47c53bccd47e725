"""`alignheads merge --mlflow`: the merged IAV checkpoint logged with the real mlflow.transformers
flavor on a real SQLite registry, registered as `<name>-iav-merged`, and loadable back as the
plain transformers model it is."""

from __future__ import annotations

from pathlib import Path

import torch

from alignheads.cli import main
from alignheads.models import save_head
from tests.helpers.tiny_models import left_padded_batch, make_head, randomise, tiny_llama, tiny_tokenizer


def test_a_merged_checkpoint_is_logged_as_a_transformers_model_and_registered(
    tmp_path: Path, monkeypatch
) -> None:
    import mlflow
    import mlflow.transformers
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = tmp_path / "base"
    tiny_llama(tied=True).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    heads = save_head(randomise(make_head("iav", model)), tmp_path / "head", base_model=model)
    store, out = tmp_path / "store", tmp_path / "merged"
    argv = ["merge", "--heads", str(heads), "--alpha", "1.5", "--out", str(out), "--mlflow"]
    assert main([*argv, "--set", f"store={store}", "--set", "name=shared"]) == 0

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    try:
        loaded = mlflow.transformers.load_model("models:/shared-iav-merged@newest", return_type="components")
        flavors = mlflow.models.get_model_info("models:/shared-iav-merged@newest").flavors
    finally:
        mlflow.set_tracking_uri(None)
    assert {"transformers", "python_function"} <= set(flavors)
    assert flavors["transformers"]["task"] == "text-generation"
    ids, mask = left_padded_batch([4, 6])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = merged(input_ids=ids, attention_mask=mask).logits
        got = loaded["model"].eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
