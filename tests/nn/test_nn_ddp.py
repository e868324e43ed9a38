"""MX-compressed DDP gradients: 2 gloo processes match single-process training within MX rounding
(acceptance item 5)."""

import gc
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from microscale import nn as mnn

STEPS, LR, BATCH = 5, 0.1, 16


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.Tanh(), nn.Linear(96, 10))


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 48, generator=g), torch.randn(BATCH, 10, generator=g)) for _ in range(STEPS)]


def train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches:
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _worker(rank, world, port, fmt, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = None
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        state = mnn.MXCommState(fmt)
        model.register_comm_hook(state, mnn.mx_allreduce_hook)
        half = BATCH // world
        train(model, [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in data()])
        torch.save(([p.detach().clone() for p in model.module.parameters()],
                    (state.bytes_sent, state.fp32_bytes, state.calls)), f"{out}/rank{rank}.pt")
        dist.barrier()  # both ranks done with the group before either tears it down
    finally:
        # DDP's reducer holds the process group: free it while the group is alive, then destroy the group.
        # (Freed at interpreter exit instead, the gloo group's destructor joined threads waiting on the peer
        # that had already exited: a hang seen once in a CI run.)
        del model
        gc.collect()
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(fmt, out):
    # fork: the children need not re-import torch (spawn costs ~10 s more on a loaded 2-core machine)
    ctx = mp.start_processes(_worker, args=(2, free_port(), fmt, str(out)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP workers still running after 300 s (killed)")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3"])
def test_ddp_mx_hook_matches_single_process(fmt, tmp_path):
    (p0, (sent, fp32, calls)), (p1, _) = run_ddp(fmt, tmp_path)
    for a, b in zip(p0, p1):  # every rank sums the same payloads in the same order
        assert torch.equal(a, b)
    init = list(make_model().parameters())
    single = list(train(make_model(), data()).parameters())
    # The update differs from the exact one only by the MXFP8 rounding of each rank's gradient
    # (relative error <= 2^-4 per element against its block's scale): measured ~1.5% of the update's norm.
    num = sum(((a - s.detach()) ** 2).sum() for a, s in zip(p0, single)).sqrt()
    den = sum(((s.detach() - i.detach()) ** 2).sum() for s, i in zip(single, init)).sqrt()
    print(f"\nrelative deviation from single-process training: {(num / den).item():.4f}")
    assert (num / den).item() < 0.05, (num / den).item()
    n_params = sum(p.numel() for p in init)
    # Bytes on the wire: 8.25 bits per gradient instead of 32, for each bucket of every step.
    assert fp32 == n_params * 4 * STEPS
    print(f"MX DDP hook ({fmt}): {calls} buckets, {sent} bytes sent per rank vs {fp32} as FP32 "
          f"({fp32 / sent:.2f}x less)")
    assert 3.8 < fp32 / sent < 3.9
