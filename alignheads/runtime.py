"""Process-wide settings a run makes before its stages start."""

from __future__ import annotations

import os
import sys


def pin_torch_threads(threads: int | None) -> None:
    """Run torch's CPU kernels on `threads` threads from now on, in this process and in the
    processes it starts (multi-process training); None leaves torch's own choice alone.

    A matrix product split over more threads sums in another order, so the logits differ in the
    last bits and a sampled token now and then differs: a run whose samples must reproduce elsewhere
    pins the count (`runner.torch_threads`). torch is not imported for it (a cached re-run loads no
    model library): until torch is imported, OMP_NUM_THREADS and MKL_NUM_THREADS, which torch
    reads when it is imported, carry the setting.
    """
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
