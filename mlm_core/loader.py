"""The training loader: each optimizer step's packed micro-batches, prepared ahead in a thread.

Optimizer step ``s`` consumes micro-batches ``s*k .. s*k+k-1`` of the ``TokenBatchPlan``
(``k = grad_accum``); with ``world`` data-parallel processes, rank ``r`` takes the
contiguous block ``r*k/world .. (r+1)*k/world - 1`` of them. The set of micro-batches of a
step (and so the gradient) is the same for any number of processes, and a step's batches
are a pure function of (seed, step): a resumed run reads exactly what the uninterrupted
run would have read.

Collation (masking and packing) is numpy work; a background thread does it while the
model computes (torch releases the GIL in its kernels).
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
    if grad_accum % world:
        raise ValueError(
            f"grad_accum ({grad_accum}) must be a multiple of the number of processes ({world}); "
            f"pass --grad-accum {world * max(1, round(grad_accum / world))}"
        )
    per = grad_accum // world
    step = start_step
    while stop_step is None or step < stop_step:
        first = step * grad_accum + rank * per
        micro = []
        if rate_schedule is not None and not rate_schedule.constant:
            spec = dataclasses.replace(spec, rate=rate_schedule.rate_for_step(step, stop_step))
        for m in range(first, first + per):
            epoch, idx = plan.indices(m)
            keys = [(plan.seed, int(i)) if static_masking else (plan.seed, int(i), epoch) for i in idx]
            micro.append(collate_packed(corpus, idx, tokenizer, spec, keys, max_length))
        last_epoch, b = plan.locate((step + 1) * grad_accum - 1)
        yield StepBatches(step, last_epoch + (b + 1) / plan.batches_in_epoch(last_epoch), micro)
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
