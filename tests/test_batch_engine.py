"""Frame-level continuous batching: each stream of a batch is what the same request gives alone.

CPU float32, tiny random model. Two references: the Generator (the single-stream path), and the
same request run alone through the engine. A float32 matmul's rounding depends on how many rows
it multiplies (MKL picks other kernels), so a batch of 4 and a single row differ in the last bits;
that can flip a sampled choice that sits on a tie, never a greedy one in practice. So: greedy
streams equal the Generator's frames; seeded sampled streams equal the same request alone in the
engine at the same batch size (``batch_sizes=(4,)``: only the other rows differ), bit for bit,
streams joining mid-way included; and the batch's logits equal the Generator's path to float32
rounding (``test_batch_logits_match_the_single_stream_path``, which also runs on CUDA in bf16).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from _engine_helpers import random_tiny_model, tiny_generator

from csm_engine.batch.engine import BatchEngine, EngineBusy, EngineOptions
from csm_engine.batch.events import Admitted, AudioChunk, Finished, FrameSampled, StreamOptions
from csm_engine.batch.step import SlotCaches, backbone_rows, model_caches
from csm_engine.codec import MimiCodec
from csm_engine.errors import CSMError
from csm_engine.linears import fuse_linears
from csm_engine.quantize import apply_precision
from csm_engine.tokens import Segment

FIXED = dict(silence=None)  # exact frame counts: no silence guard (runaway_guard=False in the Generator)
TEXTS = ["hello there how are you ?", "fine thanks", "what about the weather today ?", "it is sunny ."]


@pytest.fixture(scope="module")
def codec():
    return MimiCodec.load(None)


@pytest.fixture(scope="module")
def alone(codec):
    return tiny_generator(seed=3, codec=codec)


@pytest.fixture(scope="module")
def engine(codec):
    eng = BatchEngine(tiny_generator(seed=3, codec=codec), EngineOptions(max_streams=4, batch_sizes=(4,)))
    with eng:
        yield eng


def _prompt(gen, i: int, frames: int, context=()):
    return gen.build_prompt(TEXTS[i % len(TEXTS)], i % 2, list(context), 80 * frames, runaway_guard=False)


def _collect(utterance) -> dict:
    events = list(utterance.events(timeout=120))
    chunks = [e.pcm for e in events if isinstance(e, AudioChunk)]
    return {
        "admitted": events[0],
        "frames": torch.stack([e.codes for e in events if isinstance(e, FrameSampled)]),
        "audio": np.concatenate(chunks) if chunks else np.zeros(0, np.float32),
        "finished": events[-1],
    }


def _generator_frames(gen, i: int, frames: int, options: StreamOptions, context=()) -> torch.Tensor:
    """The frames the Generator samples for the same request (its frame loop; no decoding needed)."""
    gen.forget_cache()
    prompt = _prompt(gen, i, frames, context)
    return torch.stack([f for f in gen.frames(prompt, temperature=options.temperature, topk=options.topk,
                                              seed=options.seed) if f.any()])


# ---- faithfulness --------------------------------------------------------------------------


def test_greedy_streams_of_a_batch_match_the_generator_alone(engine, alone):
    greedy = StreamOptions(temperature=0.0, topk=1, **FIXED)
    utterances = [engine.submit(_prompt(alone, i, 10), greedy) for i in range(3)]
    results = [_collect(u) for u in utterances]
    for i, result in enumerate(results):
        assert torch.equal(result["frames"], _generator_frames(alone, i, 10, greedy)), f"stream {i}"
        assert result["finished"] == Finished(10, "max_frames")
        assert result["audio"].shape == (10 * 1920,)


SAMPLED = [StreamOptions(temperature=0.9, topk=50, seed=11, **FIXED),
           StreamOptions(temperature=0.0, topk=1, **FIXED),
           StreamOptions(temperature=0.7, topk=20, seed=5, chunk_frames=3, **FIXED),
           StreamOptions(temperature=1.2, topk=100, seed=5, **FIXED)]


def test_seeded_streams_joining_midway_match_the_same_request_alone(engine, alone):
    n_frames = [9, 5, 6, 4]
    prompts = [_prompt(alone, i, n) for i, n in enumerate(n_frames)]
    solo = [_collect(engine.submit(p, o)) for p, o in zip(prompts, SAMPLED)]

    # Stream 0 starts alone; 1 joins after its 2nd frame, 2 and 3 after its 4th.
    first = engine.submit(prompts[0], SAMPLED[0])
    events, joined = [], []
    for event in first.events(timeout=120):
        events.append(event)
        if isinstance(event, FrameSampled) and event.index in (1, 3):
            joined += [engine.submit(prompts[i], SAMPLED[i]) for i in ((1,) if event.index == 1 else (2, 3))]
    batched = [{"frames": torch.stack([e.codes for e in events if isinstance(e, FrameSampled)]),
                "audio": np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])}]
    batched += [_collect(u) for u in joined]
    for i, (a, b) in enumerate(zip(solo, batched)):
        assert torch.equal(a["frames"], b["frames"]), f"stream {i}"
        np.testing.assert_allclose(a["audio"], b["audio"], atol=1e-5)
    assert [len(b["frames"]) for b in batched] == n_frames
    # Seeds matter (the same seed with other settings samples other frames).
    assert not torch.equal(solo[2]["frames"][:4], solo[3]["frames"])


def _probe(model, slots: SlotCaches | None, prompts, forced: torch.Tensor) -> torch.Tensor:
    """Logits (B, frames, 32, vocab) of teacher-forced frames ``forced`` (B, frames, 32), batched or alone.

    ``slots`` None: each prompt alone on the model's own cache at int positions (the Generator's
    path); else all prompts at once in slots 0..B-1 (the engine's path). Both prefill the prompt
    but its last row in blocks of 32, as both do.
    """
    device = forced.device
    logits = torch.zeros(*forced.shape, 2051, device=device)

    def forcing(b: slice, f: int):
        def choose(lg, i):
            logits[b, f, i] = lg.float()
            return forced[b, f, i:i + 1]
        return choose

    with torch.inference_mode():
        for b, prompt in enumerate(prompts):
            caches = None if slots is None else slots.slot(b)
            own = [layer.attn.kv_cache for layer in model.backbone.layers]
            with model_caches(model, caches or own, [layer.attn.kv_cache for layer in model.decoder.layers]):
                n = prompt.tokens.shape[0]
                for a in range(0, n - 1, 32):
                    e = min(a + 32, n - 1)
                    model.backbone_hidden(prompt.tokens[a:e][None].to(device), prompt.mask[a:e][None].to(device), a)
                if slots is None:
                    rows_t, rows_m, pos = prompt.tokens[n - 1], prompt.mask[n - 1], n - 1
                    for f in range(forced.shape[1]):
                        h = model.backbone_hidden(rows_t[None, None].to(device), rows_m[None, None].to(device), pos)
                        model.sample_codebooks(h[:, -1], forcing(slice(b, b + 1), f))
                        rows_t = torch.cat([forced[b, f].cpu(), torch.zeros(1, dtype=torch.long)])
                        rows_m = torch.ones(33, dtype=torch.bool)
                        rows_m[-1] = False
                        pos += 1
        if slots is not None:
            batch = len(prompts)
            tokens = torch.stack([p.tokens[-1] for p in prompts])[:, None].to(device)
            mask = torch.stack([p.mask[-1] for p in prompts])[:, None].to(device)
            pos = torch.tensor([[p.tokens.shape[0] - 1] for p in prompts], device=device)
            frame_mask = torch.ones(33, dtype=torch.bool, device=device)
            frame_mask[-1] = False
            for f in range(forced.shape[1]):
                with model_caches(model, slots.rows(batch), slots.decoder_rows(batch)):
                    h = backbone_rows(model, tokens, mask, pos)[:, -1]
                    model.sample_codebooks(h, forcing(slice(0, batch), f))
                tokens = torch.cat([forced[:, f], forced.new_zeros(batch, 1)], dim=1)[:, None]
                mask = frame_mask.expand(batch, 1, 33)
                pos = pos + 1
    return logits


def _relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / a.std())


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.float32),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_batch_logits_match_the_single_stream_path(device, dtype, alone):
    """Tolerance: batching may not add error beyond the precision's own rounding.

    float32: within 1e-5 relative RMS (float32 rounding of a different summation order, ~1e-7
    per op, accumulated over the layers). bf16: the batched logits must be as close to the
    float32 logits as the single-stream bf16 logits are (x1.25, + 1e-3), and within twice that
    error of the single-stream bf16 logits: both are roundings of the same sums, and a batch
    may round differently but not worse.
    """
    torch.manual_seed(0)
    prompts = [_prompt(alone, i, 8, context=[Segment(1, "hello", None)] * i) for i in range(4)]
    forced = torch.randint(1, 2048, (4, 6, 32), device=device)

    def logits_of(precision: torch.dtype, batched: bool) -> torch.Tensor:
        model = random_tiny_model(seed=3).to(device)
        apply_precision(model, "bfloat16" if precision == torch.bfloat16 else "float32")
        if device == "cuda":
            fuse_linears(model)  # as the Generator and the engine run it there
        model.setup_caches(1)
        slots = SlotCaches(model, 4) if batched else None
        return _probe(model, slots, prompts, forced)

    alone_logits, batch_logits = logits_of(dtype, False), logits_of(dtype, True)
    if dtype == torch.float32:
        assert _relative_rms(alone_logits, batch_logits) < 1e-5
    else:
        reference = logits_of(torch.float32, False)
        alone_error = _relative_rms(reference, alone_logits)
        batch_error = _relative_rms(reference, batch_logits)
        print(f"bf16 relative RMS vs float32: alone {alone_error:.2e}, batched {batch_error:.2e}; "
              f"batched vs alone {_relative_rms(alone_logits, batch_logits):.2e}")
        assert batch_error <= 1.25 * alone_error + 1e-3
        assert _relative_rms(alone_logits, batch_logits) <= 2 * alone_error + 1e-3


# ---- sessions, cancellation, limits --------------------------------------------------------


def _voice(gen) -> Segment:
    codes = torch.randint(1, 2048, (32, 70), generator=torch.Generator().manual_seed(1))
    audio = torch.linspace(-0.5, 0.5, 70 * 1920)
    gen.remember_codes(audio, codes)
    return Segment(0, "hello there how are you", audio)


def test_a_shared_voice_prefix_is_prefilled_once(engine, alone):
    voice = _voice(alone)
    greedy = StreamOptions(temperature=0.0, topk=1, **FIXED)
    first = _collect(engine.submit(_prompt(alone, 0, 4, [voice]), greedy))
    second_prompt = _prompt(alone, 2, 4, [voice])
    second = _collect(engine.submit(second_prompt, greedy))
    voice_rows = 6 + 71  # "[0]hello there how are you" + 70 frames + the end frame
    assert first["admitted"].reused_rows == 0 or first["admitted"].reused_rows % 32 == 0
    assert second["admitted"].reused_rows == voice_rows // 32 * 32
    assert torch.equal(second["frames"], _generator_frames(alone, 2, 4, greedy, [voice]))


def test_a_session_keeps_its_conversation_cache(engine, alone):
    greedy = StreamOptions(temperature=0.0, topk=1, session="conversation-1", **FIXED)
    turn1_prompt = _prompt(alone, 0, 24)
    turn1 = _collect(engine.submit(turn1_prompt, greedy))
    # Other requests meanwhile (as many as the engine has streams) do not take the session's slot.
    others = [engine.submit(_prompt(alone, i + 1, 2), StreamOptions(temperature=0.0, topk=1, **FIXED))
              for i in range(4)]
    assert all(isinstance(_collect(u)["finished"], Finished) for u in others)
    reply = Segment(0, TEXTS[0], torch.full((24 * 1920,), 0.25))
    alone.remember_codes(reply.audio, turn1["frames"].T.contiguous())
    turn2 = _collect(engine.submit(_prompt(alone, 1, 3, [reply]), greedy))
    held = turn1_prompt.tokens.shape[0] + 23  # the prompt and the frames fed back
    assert turn2["admitted"].reused_rows == held // 32 * 32 > 0
    assert torch.equal(turn2["frames"], _generator_frames(alone, 1, 3, StreamOptions(temperature=0.0, topk=1), [reply]))


def test_cancel_frees_the_stream_at_once(engine, alone):
    utterance = engine.submit(_prompt(alone, 0, 200), StreamOptions(**FIXED))
    for event in utterance.events(timeout=60):
        if isinstance(event, FrameSampled) and event.index == 2:
            utterance.cancel()
        last = event
    assert isinstance(last, Finished) and last.reason == "cancelled" and last.frames < 10
    assert engine.active == 0


def test_stopping_to_read_chunks_cancels_the_utterance(engine, alone):
    utterance = engine.submit(_prompt(alone, 1, 200), StreamOptions(chunk_frames=1, **FIXED))
    for _chunk in utterance.chunks(timeout=60):
        break
    assert utterance.done.wait(10) and engine.active == 0


def test_full_queue_is_engine_busy(codec):
    eng = BatchEngine(tiny_generator(seed=3, codec=codec), EngineOptions(max_streams=1, max_queue=1))
    prompt = _prompt(eng.generator, 0, 50)
    eng.submit(prompt)
    eng.submit(prompt)  # not started: one waits for the stream, one in the queue
    with pytest.raises(EngineBusy, match="retry later"):
        eng.submit(prompt)
    eng.close()


@pytest.mark.parametrize("options,message", [
    (StreamOptions(topk=0), "topk must be between 1 and 100"),
    (StreamOptions(topk=101), "topk must be between 1 and 100"),
    (StreamOptions(chunk_frames=0), "chunk_frames must be >= 1"),
])
def test_bad_stream_options_are_one_line_errors(engine, alone, options, message):
    with pytest.raises(CSMError, match=message):
        engine.submit(_prompt(alone, 0, 3), options)


def test_engine_options_are_checked():
    with pytest.raises(CSMError, match="cache_slots"):
        EngineOptions(max_streams=4, cache_slots=2)
    with pytest.raises(CSMError, match="batch_sizes"):
        EngineOptions(max_streams=4, batch_sizes=(1, 2))


def test_silence_guard_and_chunking_as_in_generator_stream(engine, alone):
    """With the default silence guard the stream is cut and chunked exactly as Generator.stream does."""
    options = StreamOptions(temperature=0.0, topk=1, chunk_frames=3)
    result = _collect(engine.submit(alone.build_prompt(TEXTS[2], 1, [], 80 * 8), options))
    alone.forget_cache()
    chunks = list(alone.stream(TEXTS[2], 1, [], max_audio_length_ms=80 * 8, temperature=0.0, topk=1, chunk_frames=3))
    assert result["audio"].shape == np.concatenate(chunks).shape
    np.testing.assert_allclose(result["audio"], np.concatenate(chunks), atol=1e-4)
    assert result["finished"].reason in ("silence", "max_frames", "end")


def test_many_threads_submitting_at_once(engine, alone):
    results: dict[int, dict] = {}

    def run(i):
        results[i] = _collect(engine.submit(_prompt(alone, i, 3), StreamOptions(temperature=0.0, topk=1, **FIXED)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(6))
    assert all(r["finished"] == Finished(3, "max_frames") for r in results.values())
    assert all(isinstance(r["admitted"], Admitted) for r in results.values())
    assert engine.active == 0 and engine.queued == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphed_engine_streams_what_the_eager_step_streams():
    """On CUDA the step replays as a graph per batch size: the same frames as running it eagerly,
    for greedy and seeded streams joining mid-way (float32, fixed batch size: the GPU's own kernels)."""
    codec = MimiCodec.load(None, device="cuda")
    results = {}
    for graphs in (False, True):
        gen = tiny_generator(seed=3, codec=codec, device="cuda")
        eng = BatchEngine(gen, EngineOptions(max_streams=4, batch_sizes=(4,), cuda_graphs=graphs))
        eng.prepare()
        with eng:
            prompts = [_prompt(gen, i, n) for i, n in enumerate([9, 5, 6, 4])]
            first = eng.submit(prompts[0], SAMPLED[0])
            events, joined = [], []
            for event in first.events(timeout=120):
                events.append(event)
                if isinstance(event, FrameSampled) and event.index in (1, 3):
                    joined += [eng.submit(prompts[i], SAMPLED[i]) for i in ((1,) if event.index == 1 else (2, 3))]
            frames = [torch.stack([e.codes for e in events if isinstance(e, FrameSampled)])]
            frames += [_collect(u)["frames"] for u in joined]
        assert eng.cuda_graphs == graphs
        results[graphs] = frames
    for i, (eager, graphed) in enumerate(zip(results[False], results[True])):
        assert torch.equal(eager, graphed), f"stream {i}"
