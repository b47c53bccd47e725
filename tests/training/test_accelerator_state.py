"""`new_accelerator` keeps accelerate's process-wide state for the same setting and clears it for another."""

from __future__ import annotations

from accelerate.state import AcceleratorState

from alignheads.tasks.training.loop import new_accelerator


def test_the_same_setting_keeps_the_state_another_clears_it() -> None:
    """A second training with the first one's setting must not clear the state the first one is
    reading (trials train in threads at once); a training with another mixed-precision setting
    starts from a cleared state, since accelerate refuses to change the setting in place."""
    first = new_accelerator("no")
    AcceleratorState._shared_state["_probe"] = "the first training's state"
    second = new_accelerator("no")
    assert AcceleratorState._shared_state.get("_probe") == "the first training's state"
    assert first.mixed_precision == second.mixed_precision == "no"
    third = new_accelerator("bf16")
    assert "_probe" not in AcceleratorState._shared_state
    assert third.mixed_precision == "bf16"
    fourth = new_accelerator("no")  # and back, as a pipeline's next head would
    assert fourth.mixed_precision == "no"
