"""fusednorm under torch.distributed on CPU (gloo): DDP and FSDP2 train as one process does;
the sequence-parallel recipe of docs/DESIGN.md with plain tensors (DTensor tensor and sequence
parallelism: test_tensor_parallel.py).

Two spawned processes (fork would hang in OpenMP), rendezvous through a file in tmp_path (no
port to race for). The workers load the test run's -p plugins, so they run the same kernels.
"""

import importlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessExitedException

import fusednorm

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD, D, STEPS, LR = 2, 32, 3, 0.1


class Block(nn.Module):
    """Pre-norm block with the residual stream carried through the fused norms."""

    def __init__(self):
        super().__init__()
        self.ln = fusednorm.LayerNorm(D)
        self.mix = nn.Linear(D, D)  # stands in for attention
        self.rms = fusednorm.RMSNorm(D, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x, residual):
        y, residual = self.ln(x, residual=residual)
        y, residual = self.rms(self.mix(y), residual=residual)
        return self.mlp(y), residual


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = fusednorm.LayerNorm(D)
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        residual = torch.zeros_like(x)
        for block in self.blocks:
            x, residual = block(x, residual)
        y, _ = self.norm(x, residual=residual)
        return self.head(y)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, D, generator=g), torch.randn(8, 6, 1, generator=g))
            for _ in range(STEPS)]


def train(model, rank=0, world=1):
    """SGD on each rank's equal share of every batch (the mean loss: ranks average grads)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, target in batches():
        x, target = x.chunk(world)[rank], target.chunk(world)[rank]
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in model.state_dict().items()}


def run_workers(worker, request, tmp_path, *args, world=WORLD):
    plugins = [p for p in request.config.option.plugins or [] if not p.startswith("no:")]
    try:
        mp.spawn(_bootstrap, args=(worker, f"file://{tmp_path}/rendezvous", plugins, tmp_path,
                                   world, *args), nprocs=world, join=True)
    except ProcessExitedException:
        # gloo's threads can abort a process as the group is torn down ("terminate called
        # without an active exception", seen with FSDP2 under a full test run's load): the work
        # was done where every rank marked the end of its last barrier before the teardown
        if not all((tmp_path / f"done{rank}").exists() for rank in range(world)):
            raise
    return torch.load(tmp_path / "rank0.pt")


def _bootstrap(rank, worker, init, plugins, tmp_path, world, *args):
    for name in plugins:
        importlib.import_module(name)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = worker(rank, *args)
        if rank == 0:
            torch.save(result, tmp_path / "rank0.pt")
        # no rank tears its connections down while the other still uses them (gloo's threads
        # then abort the process: seen once with FSDP2 under load)
        dist.barrier()
        (tmp_path / f"done{rank}").touch()
    finally:
        dist.destroy_process_group()


def _data_parallel(rank, how):
    torch.manual_seed(0)
    model = Net()
    if how == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    state = train(model, rank, WORLD)
    return {k.removeprefix("module."): v for k, v in state.items()}


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_data_parallel_training_matches_one_process(request, tmp_path, how):
    torch.manual_seed(0)
    expected = train(Net())
    got = run_workers(_data_parallel, request, tmp_path, how)
    assert list(got) == list(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=k)


def _sequence_parallel(rank):
    """docs/DESIGN.md's recipe: each rank normalizes its part of the sequence with replicated
    weights, then the norm weights' gradients are summed over the sequence-parallel group."""
    torch.manual_seed(0)
    ln, rms = fusednorm.LayerNorm(D), fusednorm.RMSNorm(D)
    with torch.no_grad():
        for p in [*ln.parameters(), *rms.parameters()]:
            p.normal_()
    x, r, dy = (t.chunk(WORLD, dim=1)[rank] for t in torch.randn(3, 4, 10, D))
    x.requires_grad_()
    y, h = ln(x, residual=r)
    ((rms(y) * dy).sum() + h.square().sum()).backward()
    for p in [*ln.parameters(), *rms.parameters()]:
        dist.all_reduce(p.grad)  # the sequence-parallel group (here: the world)
    grads = [p.grad for p in [*ln.parameters(), *rms.parameters()]]
    gathered = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(gathered, x.grad)
    return grads, torch.cat(gathered, dim=1)


def test_sequence_parallel_recipe(request, tmp_path):
    torch.manual_seed(0)
    ln, rms = fusednorm.LayerNorm(D), fusednorm.RMSNorm(D)
    with torch.no_grad():
        for p in [*ln.parameters(), *rms.parameters()]:
            p.normal_()
    x, r, dy = torch.randn(3, 4, 10, D)
    x.requires_grad_()
    y, h = ln(x, residual=r)
    ((rms(y) * dy).sum() + h.square().sum()).backward()
    grads, dx = run_workers(_sequence_parallel, request, tmp_path)
    for got, p in zip(grads, [*ln.parameters(), *rms.parameters()]):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-5)
