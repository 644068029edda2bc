"""The training loader: each optimizer step's packed micro-batches, prepared ahead in a thread.

Optimizer step ``s`` consumes micro-batches ``s*k .. s*k+k-1`` of the ``TokenBatchPlan``
(``k = grad_accum``); with ``world`` data-parallel processes, rank ``r`` takes the
contiguous block ``r*k/world .. (r+1)*k/world - 1`` of them. The set of micro-batches of a
step (and so the gradient) is the same for any number of processes, and a step's batches
are a pure function of (seed, step): a resumed run reads exactly what the uninterrupted
run would have read.

Collation (masking and packing) is numpy work; a background thread does it while the
model computes (torch releases the GIL in its kernels). A GPU trains a small model faster
than one thread can collate, so ``WorkerLoader`` spreads the steps over worker processes
(torch's ``DataLoader``); a step's batches being a pure function of the step, the batches
and their order are the same either way.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import dataclasses

from .data import EncodedCorpus
from .mask_schedule import RateSchedule
from .masking import MaskSpec
from .packing import PackedBatch, TokenBatchPlan, collate_packed
from .tokenizer import WordPieceTokenizer


@dataclass
class StepBatches:
    step: int  # 0-based optimizer step
    epoch: float  # position in epochs at the end of the step (for logging)
    micro: list[PackedBatch]  # this rank's share


@dataclass(frozen=True)
class StepSource:
    """What a step's batches are made from: step ``s`` -> ``self(s)``, a pure function."""

    plan: TokenBatchPlan
    corpus: EncodedCorpus
    tokenizer: WordPieceTokenizer
    spec: MaskSpec
    max_length: int
    grad_accum: int
    stop_step: int | None
    static_masking: bool
    rank: int = 0
    world: int = 1
    rate_schedule: RateSchedule | None = None

    def __post_init__(self) -> None:
        if self.grad_accum % self.world:
            raise ValueError(
                f"grad_accum ({self.grad_accum}) must be a multiple of the number of processes ({self.world}); "
                f"pass --grad-accum {self.world * max(1, round(self.grad_accum / self.world))}"
            )

    def __call__(self, step: int) -> StepBatches:
        per = self.grad_accum // self.world
        first = step * self.grad_accum + self.rank * per
        spec, plan = self.spec, self.plan
        if self.rate_schedule is not None and not self.rate_schedule.constant:
            spec = dataclasses.replace(spec, rate=self.rate_schedule.rate_for_step(step, self.stop_step))
        micro = []
        for m in range(first, first + per):
            epoch, idx = plan.indices(m)
            keys = [(plan.seed, int(i)) if self.static_masking else (plan.seed, int(i), epoch) for i in idx]
            micro.append(collate_packed(self.corpus, idx, self.tokenizer, spec, keys, self.max_length))
        last_epoch, b = plan.locate((step + 1) * self.grad_accum - 1)
        return StepBatches(step, last_epoch + (b + 1) / plan.batches_in_epoch(last_epoch), micro)


def step_batches(
    plan: TokenBatchPlan,
    corpus: EncodedCorpus,
    tokenizer: WordPieceTokenizer,
    spec: MaskSpec,
    *,
    max_length: int,
    grad_accum: int,
    start_step: int,
    stop_step: int | None,
    static_masking: bool,
    rank: int = 0,
    world: int = 1,
    rate_schedule: RateSchedule | None = None,
) -> Iterator[StepBatches]:
    """This rank's micro-batches for steps ``start_step .. stop_step - 1`` (forever if None).

    With a ``rate_schedule`` the mask rate of step s is the schedule's rate at s / stop_step,
    a pure function of the step, so resumed runs mask as the uninterrupted run did."""
    source = StepSource(plan, corpus, tokenizer, spec, max_length, grad_accum, stop_step, static_masking, rank, world,
                        rate_schedule)
    yield from iter_steps(source, start_step, stop_step)


def iter_steps(source: StepSource, start: int, stop: int | None) -> Iterator[StepBatches]:
    step = start
    while stop is None or step < stop:
        yield source(step)
        step += 1


class Prefetcher:
    """Iterate ``source`` in a daemon thread, up to ``depth`` items ahead of the consumer.

    An exception in the producer is re-raised in the consumer; ``close()`` stops the thread.
    ``depth=0`` iterates in the caller's thread (no concurrency, for debugging).
    """

    _END = object()

    def __init__(self, source: Iterator, depth: int = 2) -> None:
        self._source, self._depth = source, depth
        if depth <= 0:
            return
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="melos-loader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        """Queue ``item``, waiting for room; False if ``close()`` came first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        if self._depth <= 0:
            yield from self._source
            return
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        if self._depth > 0:
            self._stop.set()
            self._thread.join(timeout=5)


class _Steps:
    """Map-style dataset over steps ``start, start + 1, ...`` (``DataLoader`` hands workers indices)."""

    def __init__(self, source: StepSource, start: int, stop: int | None) -> None:
        self.source, self.start = source, start
        self.length = (stop - start) if stop is not None else 2**62

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> StepBatches:
        return self.source(self.start + i)


def _as_is(item):
    return item


class WorkerLoader:
    """``source``'s steps from ``start`` to ``stop``, collated in ``workers`` processes, in order;
    ``depth`` steps ahead per worker. Same interface as ``Prefetcher``: iterate, then ``close()``."""

    def __init__(self, source: StepSource, start: int, stop: int | None, workers: int, depth: int = 2) -> None:
        import torch
        import torch.utils.data as tud

        self._loader = tud.DataLoader(
            _Steps(source, start, stop), batch_size=None, shuffle=False, num_workers=workers,
            collate_fn=_as_is, prefetch_factor=max(1, depth), persistent_workers=False,
            # its own generator: seeding the workers must not draw from the global RNG (dropout)
            generator=torch.Generator().manual_seed(0),
        )
        self._it = None

    def __iter__(self):
        self._it = iter(self._loader)
        yield from self._it

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
