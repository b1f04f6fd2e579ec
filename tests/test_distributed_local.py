"""needle.distributed in one process (no mpirun): the sampler against PyTorch's, the
DataLoader's sampler, the collective ops as graph nodes, SyncBatchNorm in a world of one,
the gradient hooks, and the import rules of the optional extra."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler as TorchSampler

import needle as ndl
import needle.distributed as dist
import needle.static as st
from needle import nn
from needle.core import context
from needle.data import DataLoader, NDArrayDataset


class _TorchOrder(dist.DistributedSampler):
    """Our sampler with PyTorch's permutation (its generator seeded with seed + epoch), so the
    padding and sharding can be compared index for index."""

    def permutation(self):
        if not self.shuffle:
            return super().permutation()
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).numpy()


@pytest.mark.parametrize("n", [1, 7, 10, 11, 12, 13])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_shards_equal_pytorch(n, replicas, drop_last, shuffle):
    data = list(range(n))
    for rank in range(replicas):
        for epoch in (0, 3):
            theirs = TorchSampler(data, num_replicas=replicas, rank=rank, shuffle=shuffle,
                                  seed=5, drop_last=drop_last)
            ours_cls = _TorchOrder if shuffle else dist.DistributedSampler
            ours = ours_cls(data, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=5,
                            drop_last=drop_last)
            theirs.set_epoch(epoch)
            ours.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


def test_sampler_shuffles_disjoint_shards_per_epoch():
    data = list(range(20))
    shards = [dist.DistributedSampler(data, num_replicas=4, rank=r, seed=1) for r in range(4)]
    first = [list(s) for s in shards]
    assert sorted(sum(first, [])) == data  # disjoint, covering
    for s in shards:
        s.set_epoch(1)
    second = [list(s) for s in shards]
    assert sorted(sum(second, [])) == data and second != first
    again = dist.DistributedSampler(data, num_replicas=4, rank=2, seed=1)
    assert list(again) == first[2]  # a function of seed and epoch only
    with pytest.raises(ValueError, match="rank must be in"):
        dist.DistributedSampler(data, num_replicas=2, rank=2)


def test_sampler_defaults_to_the_process_group():
    s = dist.DistributedSampler(list(range(5)))
    assert (s.num_replicas, s.rank) == (dist.world_size(), dist.rank()) == (1, 0)


def test_dataloader_reads_the_sampler_order_and_resumes():
    x = np.arange(22, dtype=np.float32).reshape(11, 2)
    ds = NDArrayDataset(x, np.arange(11))
    sampler = dist.DistributedSampler(ds, num_replicas=3, rank=1, seed=4)
    loader = DataLoader(ds, batch_size=2, sampler=sampler)
    expected = list(sampler)  # 4 indices: padded to 12 and sharded
    assert len(expected) == 4 and len(loader) == 2
    got = [int(i) for _, y in loader for i in y.numpy()]
    assert got == expected
    threaded = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=2)
    assert [int(i) for _, y in threaded for i in y.numpy()] == expected
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    resumed = DataLoader(ds, batch_size=2, sampler=sampler)
    resumed.load_state_dict(state)
    assert [int(i) for _, y in resumed for i in y.numpy()] == expected[2:]
    with pytest.raises(ValueError, match="sampler or shuffle"):
        DataLoader(ds, sampler=sampler, shuffle=True)


def test_collective_ops_are_kept_apart_by_compiled_plans():
    # two all-reduces of one value are two collectives (never merged by CSE), and one of a
    # constant is not folded away: every rank must issue the same calls
    fn = ndl.jit(lambda t: dist.all_reduce(t) + dist.all_reduce(t)
                 + dist.all_reduce(ndl.Tensor(np.ones(3, np.float32))))
    x = ndl.Tensor(np.arange(3, dtype=np.float32))
    np.testing.assert_allclose(fn(x).numpy(), 2 * np.arange(3) + 1)
    steps = [s.op.name for s in fn.lower(x).steps]
    assert steps.count("all_reduce") == 3
    with st.Graph():
        p = st.placeholder((None, 3))
        y = dist.all_gather(dist.broadcast(p) * 2)
        assert y.shape[1] == 3
        out = st.Session().run(y, {p: np.ones((2, 3), np.float32)})
    np.testing.assert_allclose(out, 2 * np.ones((2, 3)))


def test_collectives_refuse_bad_arguments():
    x = ndl.Tensor(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="op must be one of sum, mean"):
        dist.all_reduce(x, op="prod")
    with pytest.raises(ValueError, match="root 1 is not a rank of a world of 1"):
        dist.broadcast(x, root=1)
    with pytest.raises(TypeError, match="expected a Tensor"):
        dist.all_reduce(np.ones(3))


@pytest.mark.parametrize("shape", [(8, 3), (6, 3, 5), (4, 3, 2, 2)])
def test_sync_batchnorm_in_a_world_of_one_is_batchnorm(shape):
    rng = np.random.default_rng(0)
    x_np, w_np = rng.standard_normal(shape) * 3 + 1, rng.standard_normal(shape)
    results = []
    for cls in (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d, nn.SyncBatchNorm):
        bn = cls(3)
        bn.weight.data = np.array([0.5, 1.0, 2.0])
        x = ndl.Tensor(x_np, requires_grad=True)
        y = bn(x)
        (y * ndl.Tensor(w_np)).sum().backward()
        results.append([y.numpy(), x.grad.numpy(), bn.weight.grad.numpy(),
                        bn.bias.grad.numpy(), bn.running_mean.numpy(), bn.running_var.numpy()])
        bn.eval()
        results[-1].append(bn(ndl.Tensor(x_np)).numpy())
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_convert_sync_batchnorm_keeps_the_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    params = model.parameters()
    converted = nn.convert_sync_batchnorm(model)
    assert converted is model
    assert isinstance(model.modules[1], nn.SyncBatchNorm)
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict()) == ["modules.0.weight", "modules.0.bias", "modules.1.weight",
                                        "modules.1.bias", "modules.1.running_mean",
                                        "modules.1.running_var"]


class _Recorder:
    """A gradient hook that records each final gradient and doubles one of them."""

    def __init__(self, target):
        self.target, self.seen = target, []

    def grad_ready(self, leaf, grad):
        self.seen.append((leaf, grad.numpy().copy()))

    def backward_done(self):
        context.remove_grad_hook(self)
        return {self.target: self.target.grad * 2}


def test_grad_hook_hears_each_final_gradient_once_and_may_replace_it():
    a = ndl.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    b = ndl.Tensor(np.array([3.0, 4.0]), requires_grad=True)
    hook = _Recorder(b)
    context.add_grad_hook(hook)
    context.add_grad_hook(hook)  # once only
    (a * b + a * a).sum().backward()
    assert [leaf is a for leaf, _ in hook.seen].count(True) == 1
    assert [leaf is b for leaf, _ in hook.seen].count(True) == 1
    np.testing.assert_allclose(a.grad.numpy(), [5.0, 8.0])  # b + 2a: all consumers summed
    np.testing.assert_allclose(b.grad.numpy(), [2.0, 4.0])  # 2 * a: replaced by the hook
    assert context.state().grad_hooks == []
    (a * b).sum().backward()  # the hook removed itself
    np.testing.assert_allclose(b.grad.numpy(), [1.0, 2.0])


def test_ddp_in_a_world_of_one_is_the_module():
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ddp = dist.DistributedDataParallel(model, bucket_mb=1e-5)
    assert ddp.module is model and len(ddp.reducer.buckets) == 4
    x = ndl.Tensor(np.random.randn(5, 4).astype(np.float32))
    np.testing.assert_array_equal(ddp(x).numpy(), model(x).numpy())
    assert [n for n, _ in ddp.named_parameters()][0] == "module.modules.0.weight"
    with pytest.raises(ValueError, match="bucket_mb must be positive"):
        dist.DistributedDataParallel(model, bucket_mb=0)


def test_buckets_hold_the_last_parameters_first():
    params = [ndl.Tensor(np.zeros(s, np.float32)) for s in [(10,), (300,), (20,), (30,)]]
    from needle.distributed.reducer import plan_buckets

    assert plan_buckets(params, 4 * 60) == [[3, 2], [1], [0]]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_a_world_of_one_does_not_import_mpi4py():
    done = _run("import sys, needle.distributed as d; d.init(); "
                "print(d.world_size(), d.rank(), 'mpi4py' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0", "False"]


def test_under_mpirun_without_mpi4py_one_clear_import_error():
    done = _run("import sys; sys.modules['mpi4py'] = None\n"
                "import needle.distributed as d\n"
                "try:\n    d.init()\nexcept ImportError as e:\n    print(e)",
                OMPI_COMM_WORLD_SIZE="2")
    assert done.returncode == 0, done.stderr
    assert "pip install 'needle[distributed]'" in done.stdout
