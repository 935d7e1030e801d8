"""BatchEngine: many utterances streamed at once, stepping together one frame at a time.

Frame-level continuous batching. One engine thread loops over ticks; a tick

1. admits waiting utterances while slots are free (``SlotTable``: a slot may already hold the
   first rows of the prompt: a session's conversation, a shared voice clip);
2. prefills the rows the joining utterances' slots lack, at most ``prefill_rows_per_tick``
   rows, so the running ones are never stalled for long;
3. steps every ready utterance by one frame in one batched call (``BatchStep``: one backbone
   row per utterance, the 31 decoder steps once for the batch; a CUDA graph per batch size);
4. decodes the new frames with one batched Mimi call and hands each utterance its audio.

An utterance joins at the next tick and leaves as soon as it ends or is cancelled; the rest
of the batch goes on. Every utterance has its own sampling settings and seed: with the same
seed it samples what ``Generator.stream`` samples (same draws, same sampling arithmetic).
Results go to each utterance's ``sink`` as events, in order (see ``Utterance``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from csm_engine.batch.codec import BatchDecoder
from csm_engine.batch.events import Admitted, AudioChunk, Failed, Finished, FrameSampled, StreamOptions, Utterance
from csm_engine.batch.queue import EngineBusy, UtteranceQueue
from csm_engine.batch.slots import BLOCK_ROWS, SlotTable, block_digests
from csm_engine.batch.step import BatchStep, SlotCaches, batch_buckets, model_caches
from csm_engine.cuda_graphs import cuda_graphs_available
from csm_engine.errors import CSMError
from csm_engine.generator import MIMI_CODEBOOK_SIZE, Generator, prompt_attention
from csm_engine.prompt import Prompt

DEFAULT_STREAM_OPTIONS = StreamOptions()  # frozen: safe to share as submit()'s default


@dataclass(frozen=True)
class EngineOptions:
    """Capacity and pacing of a BatchEngine."""

    max_streams: int = 4  # utterances that step together
    cache_slots: int | None = None  # backbone caches (>= max_streams; default 2x): the rest keep idle sessions
    max_queue: int = 64  # utterances waiting for a free stream
    prefill_rows_per_tick: int = 256  # prompt rows prefilled between two frames
    prefill_chunk: int = 32  # rows per prefill call (a multiple of 32)
    max_topk: int = 100
    max_sessions: int | None = None  # sessions that keep a slot (default: every spare slot)
    session_ttl_s: float = 3600.0
    cuda_graphs: bool | None = None  # None: on for CUDA models
    # Batch sizes that get their own step (a CUDA graph each); a tick runs the smallest that
    # holds every busy slot. None: powers of two up to max_streams.
    batch_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise CSMError(f"max_streams must be at least 1, got {self.max_streams}")
        if self.cache_slots is not None and self.cache_slots < self.max_streams:
            raise CSMError(f"cache_slots ({self.cache_slots}) must be at least max_streams ({self.max_streams})")
        if self.batch_sizes is not None and (not self.batch_sizes or max(self.batch_sizes) < self.max_streams):
            raise CSMError(f"batch_sizes {self.batch_sizes} must include one of at least "
                           f"max_streams ({self.max_streams})")
        if self.batch_sizes is not None and max(self.batch_sizes) > self.slots:
            raise CSMError(f"batch_sizes {self.batch_sizes} cannot exceed cache_slots ({self.slots})")
        if self.prefill_chunk < BLOCK_ROWS or self.prefill_chunk % BLOCK_ROWS:
            raise CSMError(f"prefill_chunk must be a multiple of {BLOCK_ROWS}, got {self.prefill_chunk}")

    @property
    def slots(self) -> int:
        return self.cache_slots or 2 * self.max_streams

    @classmethod
    def for_device(cls, device: str | torch.device, **overrides) -> EngineOptions:
        """Defaults for a device, then ``overrides`` (None values ignored).

        On a GPU many streams cost little more than one and a block of prompt rows costs its
        launches: 64 streams, 256-row prefill calls, 1024 rows between frames. On a CPU a 32-row
        block costs about as much as a few frames of CSM-1B: 4 streams, one block between frames.
        """
        cuda = torch.device(device).type == "cuda"
        values = dict(max_streams=64 if cuda else 4, prefill_rows_per_tick=1024 if cuda else 32,
                      prefill_chunk=256 if cuda else BLOCK_ROWS)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class EngineStats:
    """Counters for /health and benchmarks."""

    ticks: int = 0
    frames: int = 0  # frames sampled, all utterances
    prefill_rows: int = 0
    finished: int = 0
    failures: int = 0
    last_error: str | None = None
    started_at: float = field(default_factory=time.monotonic)


class BatchEngine(UtteranceQueue):
    """Streams many utterances of one Generator's model at once (see the module docstring).

    The engine takes over the generator's model: do not run ``generator.stream`` meanwhile. The
    generator still builds prompts (its tokenizer, codec and remembered codes).
    """

    def __init__(self, generator: Generator, options: EngineOptions = EngineOptions()):
        self.generator, self.options = generator, options
        self.model = generator.model
        self.device = generator.device
        self.caches = SlotCaches(self.model, options.slots)
        self.slots = SlotTable(options.slots, self.caches.swap, max_sessions=options.max_sessions,
                               session_ttl_s=options.session_ttl_s)
        self.decoder = BatchDecoder(generator.codec, options.max_streams)
        graphs = options.cuda_graphs
        if graphs is None:
            graphs = cuda_graphs_available(self.device) and os.environ.get("CSM_NO_CUDA_GRAPHS", "0") == "0"
        elif graphs and not cuda_graphs_available(self.device):
            raise CSMError(f"CUDA graphs need the model on a CUDA device (it is on {self.device})")
        self.cuda_graphs = graphs
        self.buckets = tuple(sorted(options.batch_sizes or batch_buckets(options.max_streams)))
        self._steps: dict[int, BatchStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self._noise = torch.Generator(device=self.device)
        self._noise.seed()
        super().__init__()
        self._active: list[Utterance] = []
        self.stats = EngineStats()
        # A fed-back frame's row: its codes, no text (column 32 masked out).
        self._text_pad = torch.zeros(1, dtype=torch.long)
        self._frame_mask = torch.ones(self.model.config.frame_width, dtype=torch.bool)
        self._frame_mask[-1] = False
        self._thread = threading.Thread(target=self._run, name="csm-batch-engine", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> BatchEngine:
        self._thread.start()
        return self

    def prepare(self) -> None:
        """Build every batch size's step now (capture its CUDA graph), largest first, and warm Mimi up.

        Call before serving: captures then cannot meet other threads' CUDA work.
        """
        with torch.inference_mode():
            for batch in sorted(self.buckets, reverse=True):
                self._step_for(batch)
            self.decoder.warm_up()

    def close(self) -> None:
        """Stop the engine; utterances not finished get a Failed event."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def __enter__(self) -> BatchEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._closing

    @property
    def active(self) -> int:
        """Utterances holding a stream (prefilling or stepping)."""
        return self.slots.n_busy

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, prompt: Prompt, options: StreamOptions = DEFAULT_STREAM_OPTIONS,
               sink: Callable[[object], None] | None = None) -> Utterance:
        """Queue an utterance; its events go to ``sink`` (default: the utterance's own queue, see
        ``Utterance.events``)."""
        options.check(prompt, self.options.max_topk, self.caches.max_seq_len)
        digests = block_digests(prompt.tokens, prompt.mask, prompt.tokens.shape[0])
        utterance = Utterance(prompt, options, digests, sink, wake=self._notify, device=self.device)
        limit = self.options.max_streams + self.options.max_queue
        return self._enqueue(utterance, lambda waiting: None if waiting + self.slots.n_busy < limit else
                             f"all {self.options.max_streams} streams are busy and {waiting} requests are waiting; "
                             "retry later")

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._pending and not self._active:
                    self._wake.wait()
                if self._closing:
                    break
            try:
                with torch.inference_mode():
                    self._tick()
            except Exception as error:  # a failed tick fails its utterances, not the server
                self._fail_all(error)
        self._fail_all(CSMError("the engine is shutting down"), pending=True)

    def _tick(self) -> None:
        self.stats.ticks += 1
        with self._wake:  # a request given up while it waited leaves the queue now, not when a stream frees
            gone = [u for u in self._pending if u.cancelled]
            for u in gone:
                self._pending.remove(u)
        for u in gone:
            u.emit(Finished(0, "cancelled"))
        self._admit()
        for u in [u for u in self._active if u.cancelled]:
            self._finish(u, "cancelled")
        self._prefill()
        ready = [u for u in self._active if u.state == "ready"]
        if ready:
            self._step(ready)

    def _admit(self) -> None:
        while True:
            with self._wake:
                if not self._pending or self.slots.n_busy >= self.options.max_streams:
                    return
                u = self._pending.popleft()
            n = u.prompt.tokens.shape[0]
            u.lease = self.slots.acquire(u, u.digests, max_reuse_rows=n - 1, session=u.options.session)
            u.written = u.lease.reused_rows
            u.decoder_row = self.decoder.open()
            u.state = "prefill"
            self._active.append(u)
            self.stats.prefill_rows += n - u.written
            u.emit(Admitted(prompt_rows=n, reused_rows=u.written, context_kept=u.prompt.context_kept))
            self._mark_ready_if_prefilled(u)

    def _prefill(self) -> None:
        budget = self.options.prefill_rows_per_tick
        chunk = self.options.prefill_chunk
        for u in self._active:
            if budget <= 0:
                return
            if u.state != "prefill":
                continue
            last = u.prompt.tokens.shape[0] - 1  # the last prompt row starts the first frame (in the step)
            while budget > 0 and u.written < last:
                a, b = u.written, min(u.written + chunk, last)
                tokens = u.prompt.tokens[a:b][None].to(self.device)
                mask = u.prompt.mask[a:b][None].to(self.device)
                own_decoder = [layer.attn.kv_cache for layer in self.model.decoder.layers]
                with model_caches(self.model, self.caches.slot(u.lease.slot.index), own_decoder), \
                        prompt_attention(self.device, b - a):
                    self.model.backbone_hidden(tokens, mask, a)
                u.written = u.lease.slot.rows = b
                budget -= b - a
            self._mark_ready_if_prefilled(u)

    def _mark_ready_if_prefilled(self, u: Utterance) -> None:
        last = u.prompt.tokens.shape[0] - 1
        if u.written >= last:
            u.written = u.lease.slot.rows = last
            u.row = (u.prompt.tokens[last], u.prompt.mask[last])
            u.state = "ready"

    def _step_for(self, batch: int) -> BatchStep:
        step = self._steps.get(batch)
        if step is None:
            step = BatchStep(self.model, self.caches, batch, MIMI_CODEBOOK_SIZE, self.options.max_topk,
                             graph=self.cuda_graphs, pool=self._pool)
            self._steps[batch] = step
        return step

    def _step(self, ready: list[Utterance]) -> None:
        batch = next(b for b in self.buckets if b >= self.slots.n_busy)
        step = self._step_for(batch)
        width = self.model.config.frame_width
        tokens = torch.zeros(batch, 1, width, dtype=torch.long)
        mask = torch.zeros(batch, 1, width, dtype=torch.bool)
        pos = torch.full((batch, 1), self.caches.pad_position, dtype=torch.long)
        temperature = torch.ones(batch)
        topk = torch.ones(batch, dtype=torch.long)
        greedy = torch.ones(batch, dtype=torch.bool)
        for u in ready:
            i = u.lease.slot.index
            tokens[i, 0], mask[i, 0] = u.row
            pos[i, 0] = u.written
            if not u.greedy:
                temperature[i], topk[i], greedy[i] = u.options.temperature, u.options.topk, False
        for buffer, value in ((step.tokens, tokens), (step.mask, mask), (step.pos, pos),
                              (step.temperature, temperature), (step.topk, topk), (step.greedy, greedy)):
            buffer.copy_(value, non_blocking=True)
        if not bool(greedy.all()):
            step.noise.exponential_(1, generator=self._noise)
            for u in ready:
                if u.generator is not None:  # a seeded utterance draws its own (as Generator does)
                    step.noise[u.lease.slot.index].exponential_(1, generator=u.generator)
        codes = step().cpu()
        frames = {u: codes[u.lease.slot.index].clone() for u in ready}
        pcm, rms = self.decoder.decode({u.decoder_row: frame for u, frame in frames.items()})
        self.stats.frames += len(ready)
        for u in ready:  # the row fed in this step is in the cache now (before any slot moves)
            u.written += 1
            u.lease.slot.rows = u.written
        for u, frame in frames.items():
            self._deliver(u, frame, pcm[u.decoder_row], rms[u.decoder_row])

    def _deliver(self, u: Utterance, frame: torch.Tensor, pcm: torch.Tensor, rms: float) -> None:
        index = u.frames
        u.frames += 1
        is_end = not bool(frame.any())
        if not is_end:
            u.sampled.append(frame)
            if u.options.frame_events:
                u.emit(FrameSampled(index, frame))
        going = u.assembler.add(pcm, end=is_end, rms=rms)
        if going:
            chunk = u.assembler.take()
            if chunk is not None:
                u.emit(AudioChunk(chunk))
        if is_end:
            self._finish(u, "end")
        elif not going:
            self._finish(u, "silence")
        elif u.frames >= u.prompt.max_frames:
            self._finish(u, "max_frames")
        elif u.cancelled:
            self._finish(u, "cancelled")
        else:
            u.row = (torch.cat([frame, self._text_pad]), self._frame_mask)

    def _finish(self, u: Utterance, reason: str) -> None:
        if reason != "cancelled":
            rest = u.assembler.take(final=True)
            if rest is not None:
                u.emit(AudioChunk(rest))
        self._release(u, keep=True)
        self.stats.finished += 1
        u.emit(Finished(u.frames, reason, u.codes()))

    def _release(self, u: Utterance, keep: bool) -> None:
        """Give back u's slot (recording the rows its cache holds when ``keep``) and its decoder row."""
        digests: list[bytes] = []
        if keep:
            rows_t, rows_m = u.cache_rows(self._frame_mask)
            n_prompt_blocks = len(u.digests)
            digests = block_digests(rows_t, rows_m, u.written, u.digests, min(n_prompt_blocks * BLOCK_ROWS, u.written))
        self.slots.release(u.lease.slot, digests, session=u.options.session if keep else None)
        self.decoder.close(u.decoder_row)
        self._active.remove(u)
        u.state = "done"

    def _fail_all(self, error: BaseException, pending: bool = False) -> None:
        message = " ".join(str(error).split()) or type(error).__name__
        self.stats.failures += 1
        self.stats.last_error = message
        for u in list(self._active):
            with contextlib.suppress(Exception):
                self._release(u, keep=False)
            u.emit(Failed(message))
        self.slots.forget()  # a step that failed half-way may have left any slot's cache torn
        if pending:
            with self._wake:
                waiting, self._pending = list(self._pending), deque()
            for u in waiting:
                u.emit(Failed(message))


__all__ = ["BatchEngine", "EngineBusy", "EngineOptions", "EngineStats"]
