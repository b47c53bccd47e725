"""A head's seeded initialisation does not depend on which other trainings start at the same time."""

from __future__ import annotations

import sys
import threading

import torch

from alignheads.config import CALMTrainConfig
from alignheads.models.trainees import seeded_head
from tests.helpers.tiny_models import tiny_llama


def test_heads_started_in_threads_at_once_equal_one_started_alone() -> None:
    """Eight CALM heads (random D, gate and position embedding) initialised from the same seed by
    eight threads released together, with the interpreter switching threads every microsecond so
    that their draws from torch's one global RNG would interleave, all equal a head initialised
    alone; and the global RNG's state is left as it was."""
    model = tiny_llama(tied=False, hidden=64)
    cfg = CALMTrainConfig(rank=16, seed=7)
    alone = seeded_head("calm", model, cfg).state_dict()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    start = threading.Barrier(8)
    heads: list[dict[str, torch.Tensor]] = []

    def build() -> None:
        start.wait()
        heads.append(seeded_head("calm", model, cfg).state_dict())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=build) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(heads) == 8
    drawn = {name for name, value in alone.items() if value.abs().sum() > 0}
    assert {"down.weight", "gate.weight", "position.weight"} <= drawn  # what the RNG decides
    for head in heads:
        assert head.keys() == alone.keys()
        for name, value in alone.items():
            assert torch.equal(head[name], value), name
    assert torch.equal(torch.random.get_rng_state(), state)
