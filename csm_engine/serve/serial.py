"""csm-serve on any in-process speech generator: one utterance at a time, no batching.

The batch engine (``csm_engine.batch``) steps many utterances of the torch model at once. An
engine without a batched step (MLX) serves through ``SerialEngine`` instead: requests wait in a
queue and each runs through the generator's own frame loop (``LocalSpeechGenerator.frames``),
so it gets what that loop does — the conversation cache (a request whose prompt starts with the
rows the last one left in the cache prefills only the rest, whatever its session), seeds,
cancel between frames — and the same events, chunking and silence guard as the batch engine.
The server above sees the batch engine's surface: ``submit`` / events, ``options``, ``stats``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from csm_engine.batch.engine import DEFAULT_STREAM_OPTIONS, EngineStats
from csm_engine.batch.events import Admitted, AudioChunk, Failed, Finished, FrameSampled, StreamOptions, Utterance
from csm_engine.batch.queue import UtteranceQueue
from csm_engine.prompt import Prompt


@dataclass(frozen=True)
class SerialOptions:
    """What /health and the request checks read of an engine's capacity (``EngineOptions``' names)."""

    max_queue: int = 256
    max_topk: int = 100
    max_streams: int = 1
    slots: int = 1  # one conversation cache


class NoSessions:
    """Sessions are not kept apart: the one conversation cache serves whichever prompt matches it."""

    @staticmethod
    def sessions() -> list:
        return []


class SerialEngine(UtteranceQueue):
    """Streams utterances of one ``LocalSpeechGenerator``, one after another, on its own thread."""

    cuda_graphs = False

    def __init__(self, generator, options: SerialOptions | None = None):
        super().__init__()
        self.generator, self.options = generator, options or SerialOptions()
        self.device = getattr(generator, "engine", "torch")  # what /health shows: the engine's name
        self.slots = NoSessions()
        self.stats = EngineStats()
        self._current: Utterance | None = None
        self._thread = threading.Thread(target=self._run, name="csm-serial-engine", daemon=True)

    # -- lifecycle (BatchEngine's) ----------------------------------------------------------

    def start(self) -> SerialEngine:
        self._thread.start()
        return self

    def prepare(self) -> None:
        self.generator.prepare()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            if self._current is not None:
                self._current.cancel()
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._closing

    @property
    def active(self) -> int:
        return int(self._current is not None)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- requests ---------------------------------------------------------------------------

    def submit(self, prompt: Prompt, options: StreamOptions = DEFAULT_STREAM_OPTIONS,
               sink: Callable[[object], None] | None = None) -> Utterance:
        options.check(prompt, self.options.max_topk, self.generator.config.max_seq_len)
        utterance = Utterance(prompt, options, [], sink, wake=self._notify, device=torch.device("cpu"))
        return self._enqueue(utterance, lambda waiting: None if waiting < self.options.max_queue else
                             f"one utterance is being generated and {waiting} requests are waiting; retry later")

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._pending:
                    self._wake.wait()
                if self._closing:
                    break
                u = self._current = self._pending.popleft()
            try:
                if u.cancelled:
                    u.emit(Finished(0, "cancelled"))
                else:
                    self._speak(u)
            except Exception as error:  # a failed utterance fails alone, not the server
                message = " ".join(str(error).split()) or type(error).__name__
                self.stats.failures += 1
                self.stats.last_error = message
                with contextlib.suppress(Exception):
                    self.generator.forget_cache()  # a loop that failed half-way may have left the cache torn
                u.emit(Failed(message))
            finally:
                with self._wake:
                    self._current = None
        with self._wake:
            waiting, self._pending = list(self._pending), deque()
        for u in waiting:
            u.emit(Failed("the engine is shutting down"))

    def _speak(self, u: Utterance) -> None:
        """The generator's frame loop for one utterance, its frames decoded and chunked as they come."""
        gen, opts, prompt = self.generator, u.options, u.prompt
        n = prompt.tokens.shape[0]
        reason = "max_frames"
        with gen._lock, gen.codec.streaming() as decoder, \
                contextlib.closing(gen.frames(prompt, temperature=opts.temperature, topk=opts.topk,
                                              seed=opts.seed)) as frames:
            for index, frame in enumerate(frames):
                if index == 0:  # the prompt is in the cache now: how much of it was there already
                    self.stats.prefill_rows += gen.last_prefill_rows
                    u.emit(Admitted(prompt_rows=n, reused_rows=n - gen.last_prefill_rows,
                                    context_kept=prompt.context_kept))
                u.frames += 1
                self.stats.frames += 1
                is_end = not bool(frame.any())
                if not is_end:
                    u.sampled.append(frame.clone())
                    if opts.frame_events:
                        u.emit(FrameSampled(index, frame.clone()))
                going = u.assembler.add(decoder.decode_frame(frame).cpu(), end=is_end)
                chunk = u.assembler.take() if going else None
                if chunk is not None:
                    u.emit(AudioChunk(chunk))
                if not going:
                    reason = "end" if is_end else "silence"
                    break
                if u.cancelled:  # between frames, as Generator.frames' cancel
                    reason = "cancelled"
                    break
        if reason != "cancelled":
            rest = u.assembler.take(final=True)
            if rest is not None:
                u.emit(AudioChunk(rest))
        self.stats.finished += 1
        u.emit(Finished(u.frames, reason, u.codes()))


__all__ = ["SerialEngine", "SerialOptions"]
