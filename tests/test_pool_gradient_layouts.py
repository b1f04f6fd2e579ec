"""Max pooling's compiled scatter with output gradients in other layouts than channels-last:
a broadcast one (the gradient of a sum or mean of the pooled map) and an NCHW-contiguous one
(from a flatten into a Linear head). The loop gets them channels-last (read with their own
strides it ran 15-25x slower), and the results equal the NumPy reference and PyTorch."""

import numpy as np
import pytest

from needle.kernels import cpu_kernels, pool

torch = pytest.importorskip("torch")

needs_numba = pytest.mark.skipif(not cpu_kernels.enabled(np.dtype(np.float32)),
                                 reason="numba is not installed or NEEDLE_NUMBA=0")


def _gradients(rng, y_shape):
    n, c, ho, wo = y_shape
    return {"broadcast": np.broadcast_to(np.float32(0.25), y_shape),
            "nchw": rng.standard_normal(y_shape).astype(np.float32),
            "channels-last": rng.standard_normal((n, ho, wo, c)).astype(np.float32)
            .transpose(0, 3, 1, 2)}


@needs_numba
@pytest.mark.parametrize("k,s", [(2, 2), (3, 2)])
def test_scatter_takes_every_gradient_layout_channels_last(monkeypatch, k, s):
    rng = np.random.default_rng(k + s)
    x = rng.standard_normal((3, 9, 9, 8)).astype(np.float32).transpose(0, 3, 1, 2)
    x[0, 0, 0, 0] = x[0, 0, 0, 1]  # a tie
    y = pool.max_pool(x, k, s)
    seen = []
    loop = cpu_kernels._kernels()["max_pool_scatter"]

    def spy(xt, yt, gt, *rest):
        seen.append(yt.flags.c_contiguous and gt.flags.c_contiguous)
        return loop(xt, yt, gt, *rest)

    monkeypatch.setitem(cpu_kernels._kernels(), "max_pool_scatter", spy)
    tx = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, k, s)
    for name, g in _gradients(rng, y.shape).items():
        seen.clear()
        dx = pool.max_pool_scatter(x, y, g, k, s)
        assert seen and all(seen), name
        cpu_kernels._disabled.append("test")  # the NumPy reference
        try:
            reference = pool.max_pool_scatter(x, y, g, k, s)
        finally:
            cpu_kernels._disabled.remove("test")
        tx.grad = None
        ty.backward(torch.from_numpy(np.ascontiguousarray(g)), retain_graph=True)
        if s == k:  # each input in one window: the same single values
            np.testing.assert_array_equal(dx, reference, err_msg=name)
            np.testing.assert_array_equal(dx, tx.grad.numpy(), err_msg=name)
        else:  # overlapping windows add two gradients, in another order
            np.testing.assert_allclose(dx, reference, rtol=1e-6, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
