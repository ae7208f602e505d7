"""Trial steps on the run's own model that leave no trace.

The learning-rate range test (lr_finder.py) and the batch-size probe (batch_finder.py) train the
very model the loop is about to train, then must hand it back as it was, so that training starts
exactly as it would have without them. Neither torch nor accelerate offers this as one step
(`torch.random.fork_rng` covers torch's generators only), hence this context manager.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


@contextmanager
def leaves_no_trace(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Train `model` freely inside; on leaving, whatever happened (an error, out of memory), it is as before.

    Put back: every trainable parameter and every buffer (BatchNorm running statistics and their
    counters), bit for bit and in the same tensors, so an optimiser built afterwards holds the same
    objects; gradients cleared; each module's train / eval mode; the Python, NumPy and torch random
    generators (the CPU's and `device`'s), so dropout masks and shuffles after the trial are those a
    run without it draws. Frozen parameters are not copied: no optimiser step touches a parameter
    without a gradient. Optimisers are the trial's own and die with it.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    tensors = trainable + list(model.named_buffers())
    saved = {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors}
    modes = [(module, module.training) for module in model.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # the run's own GPU only: forking every visible GPU's generator would start a context on each
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        with torch.no_grad():
            for name, tensor in tensors:
                tensor.copy_(saved[name])
        model.zero_grad(set_to_none=True)
        for module, mode in modes:
            module.training = mode
        random.setstate(python_state)
        np.random.set_state(numpy_state)
