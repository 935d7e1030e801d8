"""What a speaker played, placed on a 16 kHz sample timeline by *when* it played.

The echo canceller and the simulated room both need the far-end signal (the agent's voice as
handed to the device) lined up with the microphone in time. Sinks report each block with its
play time (``time.monotonic()`` seconds, or a room's own clock), but they do not report silence
the same way: ``SpeakerSink`` hands the device zeros when idle, ``MemorySink`` hands nothing at
all. So blocks are placed by time, not counted: index = round(play_time * 16000). A block that
starts within ``snap_s`` of where the previous one ended continues it sample-exactly (thread
wake-up jitter would otherwise cut clicks into the signal); a later one starts a new run, and
the gap between runs reads as silence.

A device that plays what it is handed (a simulated room) places blocks with ``lead``: it cannot
play a sample before it has it, so a block continues the run only if it came before the run
ran out, and a block that came later (an underrun) starts a new run ``lead`` samples after it
came, as a sound card's buffer would; the previous run's last ~1 ms, which the resampler holds
back until the next block, is dropped then (it would come after its time). Snapping back by
``snap_s`` would place a late block up to 30 ms before it was handed over, where a reader that
keeps pace with the clock (the echo canceller) may already have read silence. A listener that
is told where such a device placed each block takes it with ``lead=0``: exactly there.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

from agent.audio import PIPELINE_RATE, StreamResampler

SNAP_S = 0.03  # play-time jitter tolerated inside one continuous run (seconds)


def time_to_index(time_s: float, sample_rate: int = PIPELINE_RATE) -> int:
    """Absolute timeline index (samples at ``sample_rate``) of a clock time in seconds."""
    return int(round(time_s * sample_rate))


class PlayedTimeline:
    """Thread-safe store of played audio on an absolute sample timeline (default 16 kHz).

    ``add(samples, rate, play_time)`` takes blocks at any rate (resampled per continuous run);
    ``read(start, n)`` returns samples ``[start, start + n)`` with zeros where nothing played.
    """

    def __init__(self, sample_rate: int = PIPELINE_RATE, *, snap_s: float = SNAP_S) -> None:
        self.sample_rate = int(sample_rate)
        self._snap = int(round(snap_s * self.sample_rate))
        self._starts: list[int] = []  # start index of each stored piece, ascending
        self._pieces: list[np.ndarray] = []
        self._end: int | None = None  # one past the last stored sample
        self._resampler: StreamResampler | None = None
        self._lock = threading.Lock()

    @property
    def end(self) -> int | None:
        """One past the last sample placed so far (None before the first block)."""
        return self._end

    def add(self, samples: np.ndarray, sample_rate: int, play_time: float, lead: int | None = None) -> int:
        """Place a block that started playing at ``play_time`` seconds; returns its start index.
        ``lead`` (samples): place it causally instead, as a device with that much buffer plays it
        (see the module doc): never before ``play_time``."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        wanted = time_to_index(play_time, self.sample_rate)
        with self._lock:
            if lead is None:
                contiguous = self._end is not None and wanted <= self._end + self._snap
            else:
                contiguous = self._end is not None and wanted <= self._end
                wanted += int(lead)
            if not contiguous or self._resampler is None or self._resampler.src_rate != sample_rate:
                if self._resampler is not None:
                    tail = self._resampler.flush()  # the end of the previous run (the resampler's look-ahead)
                    if lead is None:  # a device has played out by now what it never had: drop it
                        self._store(tail)
                self._resampler = StreamResampler(int(sample_rate), self.sample_rate)
                if not contiguous:
                    self._end = wanted
            start = self._end
            self._store(self._resampler.process(samples))
            return start

    def read(self, start: int, n: int) -> np.ndarray:
        """Samples ``[start, start + n)`` of the timeline; zeros where nothing was played."""
        out = np.zeros(n, np.float32)
        stop = start + n
        with self._lock:
            first = max(0, bisect.bisect_right(self._starts, start) - 1)
            for i in range(first, len(self._starts)):
                piece_start = self._starts[i]
                if piece_start >= stop:
                    break
                piece = self._pieces[i]
                lo, hi = max(start, piece_start), min(stop, piece_start + len(piece))
                if lo < hi:
                    out[lo - start : hi - start] = piece[lo - piece_start : hi - piece_start]
        return out

    def discard_before(self, index: int) -> None:
        """Forget pieces that end before ``index`` (bounds memory on long runs)."""
        with self._lock:
            keep = 0
            while keep < len(self._starts) and self._starts[keep] + len(self._pieces[keep]) <= index:
                keep += 1
            if keep:
                del self._starts[:keep], self._pieces[:keep]

    def _store(self, samples: np.ndarray) -> None:
        if len(samples) == 0:
            return
        self._starts.append(self._end)
        self._pieces.append(samples)
        self._end += len(samples)
