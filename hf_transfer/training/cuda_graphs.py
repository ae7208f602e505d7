"""Whole training steps as CUDA graphs: one launch per step instead of a thousand.

With small batches (BERT-base, 32 short sentences) a step's GPU work takes a few milliseconds, but
launching its ~1,500 kernels from Python takes longer, so the GPU mostly waits. A CUDA graph records
the step once (forward, loss, backward, clipping, optimiser step) and replays it with one launch.
`torch.compile(mode="reduce-overhead")` does the same but compiles first (over a minute for BERT);
recording the eager step costs about as much as running it.

A graph replays fixed shapes and fixed memory, so each batch shape gets its own graph, recorded
after that shape has run eagerly a few times (warm-up: lazy initialisation must not be recorded).
Rare shapes (a short last batch) simply run eagerly. Every step, eager or replayed, is a real
training step on a real batch: nothing is run twice and nothing is skipped. Dropout stays random
(PyTorch advances the graph's random offsets on every replay), and the learning rate lives in a
tensor that the scheduler updates in place, so a replay sees the current one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
ShapeKey = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


def _shape_key(batch: Batch) -> ShapeKey:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(batch.items()))


class GraphedStep:
    """Calls `step(batch) -> loss` eagerly or as a replayed CUDA graph, per batch shape.

    `step` must do the whole update (including `zero_grad(set_to_none=True)`), read nothing from
    the CPU side that changes between steps, and never synchronise with the CPU (no `.item()`).
    The optimiser must be `capturable` with tensor learning rates.
    """

    def __init__(self, step: Callable[[Batch], torch.Tensor], optimizer: torch.optim.Optimizer,
                 warmup_steps: int = 2, max_graphs: int = 32):
        self.step, self.optimizer = step, optimizer
        self.warmup_steps, self.max_graphs = warmup_steps, max_graphs
        self.seen: Counter[ShapeKey] = Counter()
        self.graphs: dict[ShapeKey, tuple[torch.cuda.CUDAGraph, Batch, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: replays never overlap
        self.side_stream = torch.cuda.Stream()
        self.enabled = True

    def __call__(self, batch: Batch) -> torch.Tensor:
        key = _shape_key(batch)
        recorded = self.graphs.get(key)
        if recorded is not None:
            graph, static_batch, static_loss = recorded
            for name, tensor in batch.items():
                static_batch[name].copy_(tensor, non_blocking=True)
            graph.replay()
            return static_loss.clone()  # the next replay overwrites static_loss
        self.seen[key] += 1
        if not self.enabled or self.seen[key] <= self.warmup_steps or len(self.graphs) >= self.max_graphs:
            return self._eager_on_side_stream(batch)
        return self._record_and_replay(key, batch)

    def _eager_on_side_stream(self, batch: Batch) -> torch.Tensor:
        # warm-up runs on a side stream, as PyTorch's CUDA graph notes ask
        current = torch.cuda.current_stream()
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            loss = self.step(batch)
        current.wait_stream(self.side_stream)
        return loss

    def _record_and_replay(self, key: ShapeKey, batch: Batch) -> torch.Tensor:
        static_batch = {name: tensor.clone() for name, tensor in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                static_loss = self.step(static_batch)
        except Exception as error:  # recording ran nothing: train on eagerly, without graphs
            logger.warning("CUDA graph recording failed (%s); training continues without CUDA graphs", error)
            self.enabled = False
            torch.cuda.synchronize()
            return self._eager_on_side_stream(batch)
        self.graphs[key] = (graph, static_batch, static_loss)
        graph.replay()  # recording only recorded: this replay is the step for this batch
        return static_loss.clone()


def make_lr_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Learning rates as device tensors: a replayed optimiser step reads the scheduler's current value."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
