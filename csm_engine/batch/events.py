"""An utterance in the batch engine: its settings, its progress, and the events it sends out.

Events, in order: ``Admitted`` once it holds a stream (its prompt rows, the rows a slot already
held), then ``FrameSampled`` and ``AudioChunk`` as its frames decode, then ``Finished`` — or
``Failed`` at any point. They go to the utterance's sink, a callable the engine thread calls
(a server hands them to its event loop); by default a queue that ``events()`` and ``chunks()``
read from, blocking.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from csm_engine.chunking import ChunkAssembler, SilenceGuard
from csm_engine.errors import CSMError


@dataclass(frozen=True)
class StreamOptions:
    """How one utterance is sampled and chunked; ``session`` names the conversation whose cache it extends."""

    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None
    chunk_frames: int = 2
    silence: SilenceGuard | None = SilenceGuard()  # None: no silence guard (Generator's runaway_guard=False)
    session: str | None = None
    frame_events: bool = True  # send a FrameSampled per frame (Finished carries all codes anyway)

    def check(self, prompt, max_topk: int, window: int) -> None:
        """Refuse in one line what no engine serves: topk or chunk size out of range, or a prompt that
        leaves no room for its ``max_frames`` in a ``window``-position context."""
        if not 1 <= self.topk <= max_topk:
            raise CSMError(f"topk must be between 1 and {max_topk}, got {self.topk}")
        if self.chunk_frames < 1:
            raise CSMError("chunk_frames must be >= 1")
        if prompt.tokens.shape[0] + prompt.max_frames > window:
            raise CSMError(f"prompt of {prompt.tokens.shape[0]} rows + {prompt.max_frames} frames exceeds the "
                           f"{window}-position window; shorten the context")


@dataclass(frozen=True)
class Admitted:
    prompt_rows: int  # rows of context + text
    reused_rows: int  # of them, rows the slot's cache already held (not prefilled again)
    context_kept: int  # context segments that fit the window

    @property
    def prefill_rows(self) -> int:
        return self.prompt_rows - self.reused_rows


@dataclass(frozen=True)
class FrameSampled:
    index: int
    codes: Tensor  # (32,) long, CPU


@dataclass(frozen=True)
class AudioChunk:
    pcm: np.ndarray  # float32, 24 kHz mono


@dataclass(frozen=True)
class Finished:
    frames: int  # frames sampled, the end frame included
    reason: str  # "end" | "silence" | "max_frames" | "cancelled"
    codes: Tensor | None = field(default=None, compare=False)  # (32, n) the frames sampled, the end frame excluded


@dataclass(frozen=True)
class Failed:
    message: str


TERMINAL = (Finished, Failed)


class Utterance:
    """One utterance submitted to a ``BatchEngine``. The engine thread alone changes its progress fields."""

    def __init__(self, prompt, options: StreamOptions, digests: Sequence[bytes],
                 sink: Callable[[object], None] | None, *, wake: Callable[[], None], device: torch.device):
        self.prompt, self.options, self.digests = prompt, options, list(digests)
        self._queue: queue.SimpleQueue | None = None
        if sink is None:
            self._queue = queue.SimpleQueue()
            sink = self._queue.put
        self._sink = sink
        self._wake = wake
        self._cancel = threading.Event()
        self.done = threading.Event()  # set once Finished or Failed went out
        self.greedy = options.temperature <= 0 or options.topk == 1
        self.generator: torch.Generator | None = None
        if options.seed is not None and not self.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(options.seed)
        self.assembler = ChunkAssembler(options.chunk_frames, options.silence)
        # progress (engine thread)
        self.state = "queued"  # queued -> prefill -> ready -> done
        self.lease = None  # slots.Lease
        self.decoder_row = -1
        self.written = 0  # rows of this utterance in its slot's cache
        self.frames = 0  # frames sampled so far
        self.sampled: list[Tensor] = []  # frames sampled but the end frame; those fed back follow the prompt's rows
        self.row: tuple[Tensor, Tensor] | None = None  # the next row to feed: tokens, mask (33,)

    # -- control ----------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop at the next frame and free the stream (safe from any thread, any number of times)."""
        self._cancel.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def codes(self) -> Tensor | None:
        """The frames sampled so far (32, n), the end frame excluded; None before the first."""
        return torch.stack(self.sampled, dim=1) if self.sampled else None

    def emit(self, event: object) -> None:
        self._sink(event)
        if isinstance(event, TERMINAL):
            self.done.set()

    def cache_rows(self, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The rows this utterance put in its slot: the prompt's, then the fed frames' (tokens, mask)."""
        fed = self.sampled[: max(0, self.written - self.prompt.tokens.shape[0])]
        if not fed:
            return self.prompt.tokens, self.prompt.mask
        frames = torch.stack(fed)
        tokens = torch.cat([frames, frames.new_zeros(len(fed), 1)], dim=1)
        mask = frame_mask.expand(len(fed), -1)
        return torch.cat([self.prompt.tokens, tokens]), torch.cat([self.prompt.mask, mask])

    # -- reading the default queue ------------------------------------------------------------

    def events(self, timeout: float | None = None) -> Iterator[object]:
        """Every event until Finished/Failed (only without a sink of your own); ``timeout`` per event, seconds."""
        if self._queue is None:
            raise RuntimeError("this utterance sends its events to its own sink")
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                self.cancel()
                raise CSMError(f"no word from the engine in {timeout} s; the utterance was cancelled") from None
            yield event
            if isinstance(event, TERMINAL):
                return

    def chunks(self, timeout: float | None = None) -> Iterator[np.ndarray]:
        """The audio chunks; raises CSMError if the engine failed the utterance. Stopping early cancels it."""
        try:
            for event in self.events(timeout):
                if isinstance(event, AudioChunk):
                    yield event.pcm
                elif isinstance(event, Failed):
                    raise CSMError(f"speech generation failed: {event.message}")
        finally:
            if not self.done.is_set():
                self.cancel()


__all__ = ["Admitted", "AudioChunk", "Failed", "Finished", "FrameSampled", "StreamOptions", "TERMINAL", "Utterance"]
