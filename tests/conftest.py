import os

# Without a GPU, Triton kernels run in Triton's interpreter. Triton reads this when its language
# module and our kernels are first imported, so it is set before anything imports triton.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests run on CPU in a few threads; keep compile caches per test session.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def dyt_reference(x, alpha, weight, bias=None, channels_last=True):
    """Float64 pure-torch DyT: the ground truth every backend is checked against."""
    x64 = x.double()
    w64 = weight.double()
    b64 = None if bias is None else bias.double()
    if not channels_last:
        shape = (-1,) + (1,) * (x.ndim - 2)
        w64 = w64.reshape(shape)
        b64 = None if b64 is None else b64.reshape(shape)
    y = w64 * torch.tanh(alpha.double() * x64)
    return y if b64 is None else y + b64


@pytest.fixture
def reference():
    return dyt_reference
