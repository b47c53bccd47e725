"""The heads' objectives computed a chunk of tokens at a time equal the whole-grid objectives.

A tiny LM's output layer (in float64, so that agreement can be asked to 1e-12) and a randomised
head; a batch of ragged response lengths with padding columns. For every chunk size (one token,
sizes that do not divide the token count, all tokens in one chunk) the chunked loss, its
components and every head gradient equal those of `iav_objective` / `calm_objective` over the
head's full `(2B, R, V)` output. Then the structural reason peak memory stays flat: with more
than one chunk the autograd graph keeps no vocabulary-sized tensor.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
from torch import nn

from alignheads.models.context import TokenContext
from alignheads.models.head_base import lm_output_layer, soft_cap
from alignheads.models.losses import (
    IN_PLACE_GRAD_ELEMENTS,
    CALMWeights,
    IAVWeights,
    add_weight_grad,
    chunk_tokens,
    chunked_rows,
    topk_extrapolated_kl,
)
from alignheads.models.objectives import (
    PairBatch,
    calm_chunked_objective,
    calm_objective,
    exact_kl_estimate,
    exact_kl_per_token,
    head_response_logps,
    iav_chunked_objective,
    iav_objective,
    response_logps,
    scored_tokens,
    topk_kl_per_token,
)
from tests.helpers.tiny_models import VOCAB, make_head, randomise, tiny_llama

LENGTHS = [5, 2, 4, 1, 3, 5]  # scored tokens per sequence: 3 pairs, 20 tokens, R = 5
K = 8
CHUNKS = [1, 3, 7, 20, 64]  # 3 and 7 do not divide 20; 20 and 64: one chunk
IAV_WEIGHTS = IAVWeights(beta=0.1, kl=0.3, l2=0.05)
CALM_WEIGHTS = CALMWeights(beta=0.1, l2=0.05, var=0.2, ent=0.1)


def _setup(kind: str, seed: int = 0, data_seed: int | None = None):
    """(head, frozen lm_head, batch, hidden (2B, R, H), context or None), all float64; the batch
    from ``data_seed`` (default ``seed``)."""
    model = tiny_llama(tied=False, seed=seed).double()
    frozen = lm_output_layer(model)
    head = randomise(make_head(kind, model), seed=seed + 1).double()
    gen = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    n, width, hidden_size = len(LENGTHS), max(LENGTHS), frozen.weight.shape[1]
    mask = torch.arange(width)[None] < torch.tensor(LENGTHS)[:, None]
    hidden = torch.randn(n, width, hidden_size, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (n, width), generator=gen)
    with torch.no_grad():
        ref_lp = torch.log_softmax(frozen(hidden) + 0.5 * torch.randn(n, width, VOCAB, generator=gen), -1)
    top = ref_lp.topk(K, -1)
    batch = PairBatch(
        targets=targets,
        mask=mask,
        ref_logps=torch.randn(n, generator=gen, dtype=torch.float64),
        ref_topk_ids=top.indices,
        ref_topk_logprobs=top.values,
    )
    context = None
    if head.needs_token_context:
        positions = torch.arange(width).expand(n, width) + 3
        context = TokenContext(
            positions, torch.randn(n, width, hidden_size, generator=gen, dtype=torch.float64)
        )
    return head, frozen, batch, hidden, context


def _grads(head: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    head.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in head.named_parameters() if p.grad is not None}


def _assert_same(chunked, whole, head, names: tuple[str, ...]) -> None:
    for name in names:
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=1e-12, rtol=1e-12)
    a, b = _grads(head, chunked.loss), _grads(head, whole.loss)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kl", ["topk", "exact"])
@pytest.mark.parametrize("cap", [None, 3.0], ids=["uncapped", "softcapped"])
def test_iav_chunked_equals_the_whole_grid(chunk, kl, cap):
    head, frozen, batch, hidden, _ = _setup("iav")
    head.base.requires_grad_(True)  # W_b trains too (through the KL alone), as against another reference
    out = head(hidden, frozen_head=frozen)
    base = soft_cap(out.base_logits, cap)
    if kl == "topk":
        kl_grid, estimate = topk_kl_per_token(base, batch), topk_kl_per_token
    else:
        kl_grid = exact_kl_per_token(base, soft_cap(frozen(hidden), cap).detach())
        estimate = exact_kl_estimate(frozen, cap)
    whole = iav_objective(out, batch, kl_grid, IAV_WEIGHTS, nll_weight=0.7, cap=cap)
    tokens = scored_tokens(batch, hidden, None)
    result = iav_chunked_objective(
        head, tokens, batch, frozen, estimate, IAV_WEIGHTS, nll_weight=0.7, cap=cap, chunk=chunk
    )
    assert result.terms.shape == (*batch.mask.shape, 3)
    assert torch.count_nonzero(result.terms[~batch.mask]) == 0  # padding columns hold nothing
    assert result.loss.kl.item() > 1e-3 and result.loss.l2.item() > 1e-3  # every term is non-trivial
    _assert_same(result.loss, whole, head, ("loss", "pref", "kl", "l2"))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("cap", [None, 3.0], ids=["uncapped", "softcapped"])
def test_calm_chunked_equals_the_whole_grid(chunk, cap):
    head, frozen, batch, hidden, context = _setup("calm")
    whole = calm_objective(
        head(hidden, frozen_head=frozen, context=context), batch, CALM_WEIGHTS, nll_weight=0.7, cap=cap
    )
    tokens = scored_tokens(batch, hidden, context)
    result = calm_chunked_objective(
        head, tokens, batch, frozen, CALM_WEIGHTS, nll_weight=0.7, cap=cap, chunk=chunk
    )
    assert result.loss.strength_var.item() > 1e-3  # the gate varies over the tokens
    _assert_same(result.loss, whole, head, ("loss", "pref", "l2", "strength_var", "entropy"))


@pytest.mark.parametrize("kind", ["iav", "calm"])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5])
def test_chunked_response_logps_are_the_full_logits_ones(kind, alpha):
    head, frozen, batch, hidden, context = _setup(kind)
    with torch.no_grad():
        full = soft_cap(head.logits(hidden, alpha, frozen_head=frozen, context=context), 3.0)
        want = response_logps(full, batch)
        got = head_response_logps(head, scored_tokens(batch, hidden, context), frozen, alpha, 3.0, chunk=3)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_scored_tokens_are_the_real_ones_in_row_order():
    _, _, batch, hidden, _ = _setup("iav")
    tokens = scored_tokens(batch, hidden, None)
    assert tokens.n == sum(LENGTHS)
    assert tokens.rows.tolist() == [r for r, n in enumerate(LENGTHS) for _ in range(n)]
    assert tokens.cols.tolist() == [c for n in LENGTHS for c in range(n)]
    torch.testing.assert_close(tokens.hidden, hidden[batch.mask])
    part = tokens.part(3, 9)
    assert part.targets.tolist() == batch.targets[batch.mask][3:9].tolist()
    grid = tokens.grid(torch.arange(1, tokens.n + 1, dtype=torch.float64))
    assert grid[batch.mask].tolist() == list(range(1, tokens.n + 1))
    assert torch.count_nonzero(grid[~batch.mask]) == 0


def test_chunk_tokens_keep_one_logits_copy_within_the_budget():
    """2^22 float32 logits per chunk: 131 tokens at V = 32,000, 65 at 64,000, 32 at 128,000."""
    assert [chunk_tokens(v) for v in (512, 32_000, 64_000, 128_000)] == [8192, 131, 65, 32]
    assert chunk_tokens(10**9) == 1
    assert chunk_tokens(100, budget=250) == 2


def _largest_saved(fn) -> int:
    """Elements of the largest tensor autograd saves (for the backward pass) while ``fn`` runs."""
    sizes = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_more_than_one_chunk_keeps_no_vocabulary_sized_tensor_for_backward():
    """Unchunked, the graph holds (N, V) log-softmaxes until backward; in chunks of 3 tokens it
    holds nothing larger than a chunk's inputs and the per-token terms (V = 100 here)."""
    head, frozen, batch, hidden, _ = _setup("iav")
    tokens = scored_tokens(batch, hidden, None)

    def loss(chunk: int) -> None:
        iav_chunked_objective(
            head, tokens, batch, frozen, topk_kl_per_token, IAV_WEIGHTS, 0.7, chunk=chunk
        ).loss.loss.backward()

    assert _largest_saved(lambda: loss(64)) >= tokens.n * VOCAB
    assert _largest_saved(lambda: loss(3)) < 3 * VOCAB


def test_chunked_rows_calls_every_range_once_and_concatenates():
    calls = []

    def fn(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        return torch.arange(start, stop, dtype=torch.float64)[:, None] * 2

    with torch.no_grad():
        out = chunked_rows(fn, 10, 4)
    assert calls == [(0, 4), (4, 8), (8, 10)]
    assert out[:, 0].tolist() == [2.0 * i for i in range(10)]
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_rows(fn, 10, 0)


def test_topk_kl_of_scored_tokens_is_the_grid_one():
    """`topk_kl_per_token` (`kl: topk`, the extrapolated estimate) reads the same cached columns
    from ScoredTokens and from the batch."""
    head, frozen, batch, hidden, _ = _setup("iav")
    with torch.no_grad():
        base = head(hidden, frozen_head=frozen).base_logits
        grid = topk_kl_per_token(base, batch)
        tokens = scored_tokens(batch, hidden, None)
        flat = topk_kl_per_token(base[batch.mask], tokens)
    torch.testing.assert_close(flat, grid[batch.mask], atol=0, rtol=0)
    want = topk_extrapolated_kl(batch.ref_topk_ids[0, 0], batch.ref_topk_logprobs[0, 0], base[0, 0])
    assert math.isclose(flat[0].item(), want.item(), rel_tol=0, abs_tol=0)


def _iav_step(chunk: int):
    from functools import partial

    from alignheads.models.trainees import HeadStep

    head, frozen, _, _, _ = _setup("iav")
    objective = partial(
        iav_chunked_objective, frozen=frozen, kl=topk_kl_per_token, weights=IAV_WEIGHTS, chunk=chunk
    )
    return HeadStep(head, objective), frozen


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, in_place: bool) -> None:
    """One process of a 2-process (gloo) run: the chunked loss through a DDP-wrapped HeadStep on
    this rank's batch; writes the synchronised gradient. ``in_place``: W_a's and W_b's gradients
    summed in place over the chunks (as a 7B-sized W_a's is)."""
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    from alignheads.models import losses

    if in_place:
        losses.IN_PLACE_GRAD_ELEMENTS = 0

    torch.set_num_threads(1)
    # a TCP store on loopback: a file store can leave the slower rank waiting on a file the
    # faster one already removed while tearing down (seen as a hang on a loaded machine)
    torch.distributed.init_process_group(
        "gloo", init_method=init_file, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    step, _ = _iav_step(chunk=3)
    _, _, batch, hidden, _ = _setup("iav", data_seed=10 + rank)
    wrapped = DistributedDataParallel(step)
    wrapped(scored_tokens(batch, hidden, None), batch).loss.loss.backward()
    grads = {n: p.grad.contiguous() for n, p in step.head.named_parameters() if p.grad is not None}
    save_file(grads, f"{out_dir}/rank{rank}.safetensors")
    # Both ranks have written their file once they pass this barrier; then leave without tearing
    # gloo down. destroy_process_group while the other rank still finishes has hung on a loaded
    # machine, and a plain exit with the group alive sometimes aborted the process ("terminate
    # called without an active exception": gloo's threads outlived the interpreter), failing the
    # run after its results were written. os._exit skips those destructors.
    torch.distributed.barrier()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("in_place", [False, True], ids=["autograd-sums", "in-place-sums"])
def test_two_processes_average_the_chunked_gradients(tmp_path, in_place):
    """The chunked, checkpointed loss runs inside one forward of the wrapped HeadStep, so
    DistributedDataParallel averages its gradients as for any module: each rank ends with the
    mean of the two single-process gradients of its batch (chunks of 3 tokens)."""
    import socket
    import time

    from safetensors.torch import load_file

    with socket.socket() as probe:  # a free port on loopback for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = torch.multiprocessing.start_processes(
        _ddp_worker,
        args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path), in_place),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120  # a hang fails the test instead of stalling the suite
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish within 120 s")
    single = []
    for rank in range(2):
        step, _ = _iav_step(chunk=3)
        _, _, batch, hidden, _ = _setup("iav", data_seed=10 + rank)
        single.append(_grads(step.head, step(scored_tokens(batch, hidden, None), batch).loss.loss))
    assert not torch.allclose(single[0]["align.weight"], single[1]["align.weight"])
    for rank in range(2):
        synced = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert synced.keys() == single[0].keys() == {"align.weight", "base.weight"}
        for name, grad in synced.items():
            torch.testing.assert_close(grad, (single[0][name] + single[1][name]) / 2, atol=1e-12, rtol=1e-10)


# --- the weight gradients summed in place --------------------------------------------------------


def test_add_weight_grad_is_autograds_weight_gradient_summed_in_place():
    """Two chunks of a linear map: the first makes the ``(O, I)`` buffer, the second is added into
    it in place (the same tensor); the sum is autograd's gradient of the weight over both."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(1, 9, 5, dtype=torch.float64, generator=gen)
    grad_out = torch.randn(1, 9, 7, dtype=torch.float64, generator=gen)
    torch.nn.functional.linear(x, weight).backward(grad_out)
    sink = add_weight_grad(None, grad_out[:, :4], x[:, :4], torch.float64)
    assert sink.shape == weight.shape and sink.dtype == torch.float64
    ptr = sink.data_ptr()
    sink = add_weight_grad(sink, grad_out[:, 4:], x[:, 4:], torch.float64)
    assert sink.data_ptr() == ptr
    torch.testing.assert_close(sink, weight.grad, atol=1e-12, rtol=1e-12)


def test_add_weight_grad_rounds_bf16_products_as_autocast_does():
    """Under bf16 autocast a linear map's weight gradient is a bf16 product cast to float32; the
    sum over chunks adds those casts, so one chunk's gradient is autograd's bit for bit."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 4, generator=gen, requires_grad=True)
    x = torch.randn(5, 4, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.nn.functional.linear(x, weight)
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    out.backward(grad_out)
    sink = add_weight_grad(None, grad_out, x, torch.float32)
    assert sink.dtype == torch.float32
    assert torch.equal(sink, weight.grad)
    twice = add_weight_grad(sink.clone(), grad_out, x, torch.float32)
    assert torch.equal(twice, 2 * weight.grad)


@pytest.fixture
def every_weight_in_place(monkeypatch):
    """Sum every linear map's weight gradient in place, however small (the tiny heads' maps are
    below :data:`IN_PLACE_GRAD_ELEMENTS`); counts the in-place additions."""
    from alignheads.models import losses

    calls = []

    def counted(sink, grad_out, inputs, dtype):
        out = losses_add(sink, grad_out, inputs, dtype)
        calls.append(out.data_ptr())
        return out

    losses_add = losses.add_weight_grad
    monkeypatch.setattr(losses, "IN_PLACE_GRAD_ELEMENTS", 0)
    monkeypatch.setattr(losses, "add_weight_grad", counted)
    return calls


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_iav_in_place_sums_equal_the_whole_grid(chunk, every_weight_in_place):
    """With W_a and W_b summed in place (W_b trains through the KL, as against another
    reference), the chunked loss and its gradients are the whole grid's."""
    head, frozen, batch, hidden, _ = _setup("iav")
    head.base.requires_grad_(True)
    out = head(hidden, frozen_head=frozen)
    whole = iav_objective(out, batch, topk_kl_per_token(out.base_logits, batch), IAV_WEIGHTS, nll_weight=0.7)
    result = iav_chunked_objective(
        head, scored_tokens(batch, hidden, None), batch, frozen, topk_kl_per_token, IAV_WEIGHTS,
        nll_weight=0.7, chunk=chunk,
    )  # fmt: skip
    _assert_same(result.loss, whole, head, ("loss", "pref", "kl", "l2"))
    assert len(every_weight_in_place) == 2 * math.ceil(sum(LENGTHS) / chunk)  # W_a, W_b per chunk


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_calm_in_place_sums_equal_the_whole_grid(chunk, every_weight_in_place):
    head, frozen, batch, hidden, context = _setup("calm")
    whole = calm_objective(head(hidden, frozen_head=frozen, context=context), batch, CALM_WEIGHTS, 0.7)
    result = calm_chunked_objective(
        head, scored_tokens(batch, hidden, context), batch, frozen, CALM_WEIGHTS, nll_weight=0.7, chunk=chunk
    )
    _assert_same(result.loss, whole, head, ("loss", "pref", "l2", "strength_var", "entropy"))
    assert len(every_weight_in_place) == 3 * math.ceil(sum(LENGTHS) / chunk)  # down, up, gate


def test_the_in_place_sum_becomes_the_weights_grad(every_weight_in_place):
    """The buffer the chunks are summed into is handed to autograd once and becomes ``.grad``
    itself: no copy of the weight's size is made after the chunks."""
    head, frozen, batch, hidden, _ = _setup("iav")
    head.base.requires_grad_(False)  # as the trainee keeps it: W_a is the one weight summed
    result = iav_chunked_objective(
        head, scored_tokens(batch, hidden, None), batch, frozen, topk_kl_per_token, IAV_WEIGHTS, chunk=3
    )
    result.loss.loss.backward()
    assert head.align.weight.grad.data_ptr() == every_weight_in_place[-1]
    assert len(every_weight_in_place) == math.ceil(sum(LENGTHS) / 3)
    assert head.base.weight.grad is None  # a frozen W_b gets no sink and no gradient


def _backward_peak_bytes(loss: torch.Tensor) -> int:
    """Peak of torch's CPU allocations during ``loss.backward()`` above what was allocated before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    events = prof.profiler.kineto_results.events()
    current = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        current += nbytes
        peak = max(peak, current)
    return peak


def test_a_large_weights_gradient_is_one_buffer_during_backward():
    """A weight above :data:`IN_PLACE_GRAD_ELEMENTS` (a 2,048 x 2,049 map, 32 MiB in float64) in a
    loss of 10 chunks: the backward pass allocates its gradient once plus one chunk's working
    memory, where summing per-chunk gradients would hold a second weight-sized tensor."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.zeros(2048, 2049, dtype=torch.float64, requires_grad=True)
    assert weight.numel() > IN_PLACE_GRAD_ELEMENTS
    x = torch.randn(40, 2049, dtype=torch.float64, generator=gen)

    def fn(start: int, stop: int) -> torch.Tensor:
        return torch.logsumexp(torch.nn.functional.linear(x[start:stop], weight), -1, keepdim=True)

    loss = chunked_rows(fn, 40, 4, [weight]).sum()
    peak = _backward_peak_bytes(loss)
    size = weight.numel() * weight.element_size()
    assert size <= peak < size + 8 * 4 * 2048 * 8  # the gradient + a few (4, 2048) chunk tensors
    want = torch.softmax(x @ weight.detach().t(), -1).t() @ x
    torch.testing.assert_close(weight.grad, want, atol=1e-12, rtol=1e-10)


def test_a_weight_changed_in_place_before_backward_is_refused():
    """The backward pass recomputes the chunks from the weights: one modified in place since the
    forward pass would give another function's gradient, so it raises (as autograd does)."""
    weight = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 2, dtype=torch.float64)
    loss = chunked_rows(lambda a, b: torch.nn.functional.linear(x[a:b], weight), 6, 2, [weight]).sum()
    with torch.no_grad():
        weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_chunks_without_weights_are_recorded_plainly():
    """No weights named: the chunks are recorded as they run (gradients still right)."""
    weight = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 2, dtype=torch.float64)
    chunked_rows(lambda a, b: torch.nn.functional.linear(x[a:b], weight) ** 2, 6, 2).sum().backward()
    torch.testing.assert_close(weight.grad, 2 * (x @ weight.detach().t()).t() @ x)
