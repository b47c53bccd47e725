"""Gradient accumulation in the one training loop: every optimizer step sees exactly `grad_accum`
micro-batches per process, within one epoch; what does not fill a whole step is dropped."""

from __future__ import annotations

import dataclasses

import pytest

from alignheads.config import DPOTrainConfig, IAVTrainConfig
from alignheads.models.methods import method
from tests.training.test_train import _job, launched, store  # noqa: F401 (the module's store fixture)

pytestmark = pytest.mark.slow


def _counting(kind: str, counts: list[int]):
    """The method's registry entry, whose trainee counts backward passes through its module."""
    entry = method(kind)

    def trainee(model, cfg, device, kl_reference=None):
        made = entry.trainee(model, cfg, device, kl_reference=kl_reference)
        first = next(p for p in made.module.parameters() if p.requires_grad)
        first.register_hook(lambda grad: counts.append(1) or grad)
        return made

    return dataclasses.replace(entry, trainee=trainee)


@pytest.mark.parametrize(
    ("kind", "cfg"),
    [
        ("iav", IAVTrainConfig(batch_size=24, grad_accum=2, epochs=2, lr=1e-2, eval_every=100)),
        ("dpo-dera", DPOTrainConfig(batch_size=24, grad_accum=2, epochs=2, lr=1e-3, eval_every=100)),
    ],
    ids=["head", "baseline"],
)
def test_leftover_micro_batches_never_reach_the_next_epoch(store, tmp_path, kind, cfg):  # noqa: F811
    """64 pairs, batch 24, grad_accum 2: micro-batches of 12, five per epoch, two whole steps.
    The fifth used to run backward() and land in the next epoch's first step (backward passes
    per step [2, 2, 3, 2]); now each step has exactly two and the leftover is dropped."""
    counts: list[int] = []
    per_step: list[int] = []
    job = _job(store, cfg, tmp_path, kind=kind)
    job.method = _counting(kind, counts)

    def log(metrics, step):
        if "loss" in metrics:  # a training step (evaluation logs eval/* only)
            per_step.append(len(counts))
            counts.clear()

    job.log = log
    from alignheads.tasks.training.loop import train

    result = train(job)
    assert result.steps == 4
    assert per_step == [2, 2, 2, 2]
    assert counts == []  # nothing ran after the last step either


def test_two_processes_agree_on_the_steps_of_an_uneven_epoch(store, tmp_path):  # noqa: F811
    """64 pairs, batch 24 over 2 processes: five micro-batches of 12 an epoch, dealt by index, so
    rank 0 held three and rank 1 two. Rank 0 used to run its third alone (a gradient all-reduce
    nobody answered); now both stop after the epoch's two whole steps and the two processes end
    where one process with batch 24 ends."""
    import torch

    from alignheads.models.head_io import load_head
    from alignheads.tasks.training.loop import train

    cfg = IAVTrainConfig(
        batch_size=24, epochs=2, lr=1e-2, eval_every=100, lambda_kl=0, lambda_l2=0, warmup_ratio=0.0
    )
    single = train(_job(store, cfg, tmp_path / "one"))
    result = launched(store, cfg, tmp_path, processes=2)
    assert result["steps"] == single.steps == 4
    two = load_head(tmp_path / "out" / "head").state_dict()
    for name, value in single.trained.state_dict().items():
        assert torch.allclose(value, two[name], atol=1e-5, rtol=0), name
