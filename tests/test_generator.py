"""Generator behaviour: streaming, stopping, trimming, bad input (tiny random checkpoint)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from csm_engine.config import SAMPLES_PER_FRAME
from csm_engine.errors import CSMError
from csm_engine.generator import Generator, SilenceGuard, load_generator
from csm_engine.model import CSMModel
from csm_engine.prompt import text_frame_budget, trim_context
from csm_engine.tokens import Segment


@pytest.fixture(scope="module")
def gen(tiny_checkpoint) -> Generator:
    return load_generator(str(tiny_checkpoint))


def _fixed(n_frames: int) -> dict:
    """Options for an exact frame count: no runaway guard, no silence trimming."""
    return dict(max_audio_length_ms=80 * n_frames, runaway_guard=False, silence=None, seed=7)


def test_stream_equals_one_shot_mimi_decode_of_its_frames(gen):
    frames: list[torch.Tensor] = []
    pcm = np.concatenate(list(gen.stream("Hello there.", 0, on_frame=lambda i, f: frames.append(f.clone()),
                                         **_fixed(6))))
    assert len(frames) == 6
    one_shot = gen.codec.decode(torch.stack(frames, dim=1))
    assert pcm.shape == (6 * SAMPLES_PER_FRAME,)
    np.testing.assert_allclose(pcm, one_shot.numpy(), atol=1e-5)


def test_stream_first_chunk_before_last_frame(gen):
    sampled: list[int] = []
    frames_when_chunk_arrived: list[int] = []
    for _chunk in gen.stream("Hello there.", 0, chunk_frames=1, on_frame=lambda i, f: sampled.append(i), **_fixed(8)):
        frames_when_chunk_arrived.append(len(sampled))
    assert frames_when_chunk_arrived[0] <= 2 < 8
    assert sampled == list(range(8))


def test_generate_is_deterministic_for_a_seed_and_joins_stream(gen):
    a = gen.generate("Same seed, same sound.", 1, **_fixed(4))
    b = torch.from_numpy(np.concatenate(list(gen.stream("Same seed, same sound.", 1, **_fixed(4)))))
    torch.testing.assert_close(a, b)
    c = gen.generate("Same seed, same sound.", 1, **{**_fixed(4), "seed": 8})
    assert not torch.equal(a, c)


def test_generation_stops_on_the_all_zero_frame(tiny_checkpoint):
    # With all-zero heads every logit ties and greedy sampling picks code 0 in every codebook:
    # the very first frame is the end frame.
    g = load_generator(str(tiny_checkpoint))
    with torch.no_grad():
        g.model.codebook0_head.weight.zero_()
        g.model.audio_head.zero_()
    pcm = g.generate("Stop at once.", 0, max_audio_length_ms=2000, temperature=0, topk=1)
    # Only the end frame is decoded (to flush the codec tail) and it fades to silence.
    assert pcm.shape == (SAMPLES_PER_FRAME,)
    assert abs(float(pcm[-1])) < 1e-3


def test_cancel_stops_between_frames(gen):
    cancel = threading.Event()
    seen: list[int] = []

    def on_frame(i, _f):
        seen.append(i)
        if i == 2:
            cancel.set()

    list(gen.stream("Stop me.", 0, cancel=cancel, on_frame=on_frame, **_fixed(20)))
    assert seen == [0, 1, 2]


def test_context_is_trimmed_from_the_oldest_segment(gen):
    speech = gen.generate("context", 0, **_fixed(20))
    context = [Segment(i % 2, f"turn number {i}", speech) for i in range(200)]
    prompt = gen.build_prompt("And now?", 1, context, max_audio_length_ms=4000)
    assert 0 < prompt.context_kept < 200
    assert prompt.tokens.shape[0] + prompt.max_frames <= gen.config.max_seq_len
    # The kept segments are the newest ones: the prompt ends with the last context segment's rows.
    last_tokens, _ = gen.segment_frames(context[-1])
    n_new = prompt.tokens.shape[0] - sum(gen.segment_frames(s)[0].shape[0] for s in context[-prompt.context_kept:])
    assert torch.equal(prompt.tokens[-n_new - last_tokens.shape[0]: -n_new], last_tokens)


def test_trim_context_rule():
    assert trim_context([5, 5, 5], 15) == 0
    assert trim_context([5, 5, 5], 14) == 1
    assert trim_context([5, 5, 5], 4) == 3
    assert trim_context([], 10) == 0


def test_frame_budget_bounds_runaway_but_not_speech():
    text = "one two three four five six seven eight nine ten"
    # 10 words at a slow 2 words/s need 5 s = 63 frames; the guard allows more, but not minutes.
    assert 63 < text_frame_budget(text) < 200


def test_silence_guard_threshold():
    guard = SilenceGuard()
    assert guard.is_silent(torch.zeros(SAMPLES_PER_FRAME))
    assert not guard.is_silent(0.1 * torch.randn(SAMPLES_PER_FRAME))


@pytest.mark.parametrize("text", ["", "   \n "])
def test_empty_text_is_a_one_line_error(gen, text):
    with pytest.raises(CSMError, match="empty") as e:
        gen.generate(text, 0)
    assert "\n" not in str(e.value)


def test_text_too_long_for_the_window_is_a_one_line_error(gen):
    with pytest.raises(CSMError, match="too long") as e:
        gen.generate("word " * 3000, 0, max_audio_length_ms=2000)
    assert "\n" not in str(e.value)


def test_stereo_context_audio_is_rejected_with_a_clear_error(gen):
    with pytest.raises(CSMError, match="mono"):
        gen.generate("Hi.", 0, [Segment(0, "stereo", torch.zeros(2, 24000))], max_audio_length_ms=160)


def test_model_requires_caches(tiny_checkpoint):
    from csm_engine.config import get_flavor

    m = CSMModel(get_flavor("tiny"))
    with pytest.raises(RuntimeError, match="setup_caches"):
        m.generate_frame(torch.zeros(1, 3, 33, dtype=torch.long), torch.ones(1, 3, 33, dtype=torch.bool),
                         torch.arange(3))
