"""Each agent stage on its own: frames in, frames out, the real stage code, only its model scripted.

Capture runs the real Silero VAD on espeak-ng speech; voice runs the tiny random CSM into a
real-time in-memory speaker; transcribe and think get a scripted transcriber / LLM.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from _stage_helpers import Collector, RecordingGenerator, ScriptedLLM, ScriptedTranscriber, context, run_stage

from agent.audio import MemorySink, QueueSource, load_audio
from agent.config.personas import load_persona
from agent.conversation.conversation import Conversation
from agent.events import AgentTurnDone, MicLevel, PartialTranscript, UserTurn
from agent.frames import (
    AgentSentence,
    AudioBlock,
    EndOfAudio,
    EndOfReply,
    PartialAudio,
    ReplayRequest,
    Reply,
    SpeechSegment,
    Stop,
    TentativeSpeech,
    UserInput,
)
from agent.listen.barge_in import BargeIn
from agent.listen.vad import VadSettings, VoiceActivityDetector, load_silero_model
from agent.stages.capture import CaptureStage
from agent.stages.loading import Models
from agent.stages.think import ThinkStage
from agent.stages.transcribe import TranscribeStage
from agent.stages.turn import TurnStage
from agent.stages.voice import VoiceStage

SILENCE_S = 1.0


def _user_input(text: str) -> UserInput:
    now = time.time()
    return UserInput(text, None, time.monotonic(), now, now, typed=True)


# ---- the frame tiers -----------------------------------------------------------------------------


def test_a_cancelled_replys_data_frames_are_dropped_but_its_end_still_arrives():
    ctx, _ = context()
    seen: list = []

    class Recorder(VoiceStage):
        def process(self, frame):
            seen.append(frame)

    reply = Reply(2, time.monotonic())
    stage = Recorder(ctx, Models(), Conversation(), load_persona("default"))
    reply.cancel.set()
    run_stage(stage, [AgentSentence(reply, "One.", "One."), EndOfReply(reply)])
    assert seen == [EndOfReply(reply)]


# ---- capture ---------------------------------------------------------------------------------------


def _capture(ctx, samples: np.ndarray) -> tuple[CaptureStage, Collector]:
    out = Collector()
    stage = CaptureStage(ctx, out)
    source = QueueSource(16_000)
    source.push(samples)
    source.end()
    stage.source = source
    return stage, out


def test_capture_sends_every_block_stamped_then_the_end_of_audio():
    ctx, log = context()
    samples = np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32)
    stage, out = _capture(ctx, samples)
    before = time.monotonic()
    stage.run()  # on this thread: it returns at the end of the source
    blocks = out.of(AudioBlock)
    assert len(blocks) == -(-16_000 // 512) and isinstance(out.frames[-1], EndOfAudio)
    assert np.array_equal(np.concatenate([b.audio for b in blocks])[:16_000], samples)
    assert all(before <= a.captured_at <= b.captured_at for a, b in zip(blocks, blocks[1:]))
    assert log.of(MicLevel) and -25 < log.of(MicLevel)[0].rms_dbfs < -15


def test_capture_sends_silence_while_muted():
    ctx, _ = context()
    stage, out = _capture(ctx, np.full(4096, 0.5, np.float32))
    stage.set_muted(True)
    stage.run()
    assert not any(b.audio.any() for b in out.of(AudioBlock))


# ---- turn ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def silero():
    return load_silero_model()


class SpeakerControls:
    """Records what the barge-in rule did to the speaker and the reply."""

    def __init__(self, ctx) -> None:
        self.calls: list[str] = []
        self.ctx = ctx

    def barge_in(self) -> BargeIn:
        return BargeIn(self.ctx.replies, pause=lambda: self.calls.append("pause"),
                       resume=lambda: self.calls.append("resume"), interrupt=self._interrupt)

    def _interrupt(self) -> None:
        self.calls.append("interrupt")
        self.ctx.replies.cancel_current()


def _turns(ctx, silero, samples: np.ndarray, barge_in: BargeIn | None = None, judge=None, *, agent_audible=False,
           person_from: int | None = None, stage_out: list | None = None) -> Collector:
    """Run the turn stage over ``samples`` (16 kHz) as 32 ms blocks heard in real time; the blocks
    say the agent's voice is in the mic (``agent_audible``) and the double-talk detector heard a
    person from sample ``person_from`` on."""
    out = Collector()
    stage = TurnStage(ctx, out, partials=False, barge_in=barge_in)
    stage.vad = VoiceActivityDetector(VadSettings(end_silence_ms=500), model=silero, end_of_turn=judge)
    t0 = time.monotonic()
    blocks = [AudioBlock(samples[i:i + 512], t0 + (i + 512) / 16_000,
                         user_over_echo=person_from is not None and i >= person_from, agent_audible=agent_audible)
              for i in range(0, len(samples) - 511, 512)]
    run_stage(stage, [*blocks, EndOfAudio()])
    if stage_out is not None:
        stage_out.append(stage)
    return out


def _spoken(espeak_wav, *texts: str) -> list[np.ndarray]:
    return [load_audio(espeak_wav(text)) for text in texts]


def test_turn_sends_one_segment_per_utterance_with_its_end_of_speech(espeak_wav, silero):
    ctx, _ = context()
    silence = np.zeros(int(SILENCE_S * 16_000), np.float32)
    first, second = _spoken(espeak_wav, "what is the capital of france", "thank you very much")
    out = _turns(ctx, silero, np.concatenate([silence, first, silence, second, silence]))
    segments = out.of(SpeechSegment)
    assert len(segments) == 2
    for segment, spoken in zip(segments, (first, second)):
        assert 0.7 * len(spoken) < len(segment.audio) < len(spoken) + 16_000
        assert 450 <= segment.turn_end_ms <= 750  # the 500 ms pause rule, from when the speech stopped
    tentative = out.of(TentativeSpeech)
    assert [t.span for t in tentative] == [s.span for s in segments]  # transcription could start early
    assert ctx.progress.input_over.is_set()
    start, end = segments[0].span  # the samples of the capture stream the audio is
    assert end - start == len(segments[0].audio) and start <= len(silence) < end


def test_spans_count_the_capture_stream_across_a_mode_switch(espeak_wav, silero):
    """A span names the same samples the double-talk detector counts, even when the detector in use
    started later (push-to-talk first, then hands-free)."""
    ctx, _ = context()
    out = Collector()
    stage = TurnStage(ctx, out, mode="ptt", partials=False)
    stage.vad = VoiceActivityDetector(VadSettings(end_silence_ms=500), model=silero)
    silence = np.zeros(int(SILENCE_S * 16_000), np.float32)
    (spoken,) = _spoken(espeak_wav, "thank you very much")
    before = np.zeros(32_000, np.float32)
    def blocks(samples):
        return [AudioBlock(samples[i:i + 512], time.monotonic()) for i in range(0, len(samples), 512)]
    for block in blocks(before):
        stage.process(block)
    stage.set_mode("vad")
    for block in blocks(np.concatenate([silence, spoken, silence])):
        stage.process(block)
    (segment,) = out.of(SpeechSegment)
    start, end = segment.span
    assert end - start == len(segment.audio) and start <= len(before) + len(silence) < end


def test_turn_pauses_then_interrupts_a_reply_the_user_talks_over(espeak_wav, silero):
    ctx, _ = context()
    controls = SpeakerControls(ctx)
    ctx.replies.begin(Reply(2, time.monotonic()))  # the agent is speaking
    silence = np.zeros(int(SILENCE_S * 16_000), np.float32)
    (phrase,) = _spoken(espeak_wav, "stop, wait a moment, I have a question")
    out = _turns(ctx, silero, np.concatenate([silence, phrase, silence]), controls.barge_in())
    assert controls.calls == ["pause", "interrupt"]  # silent at once, cut once it was a real turn
    (segment,) = out.of(SpeechSegment)
    assert not segment.over_reply  # already decided: it goes on to be answered
    assert segment.over_agent_from is not None  # but its audio has the agent's voice under it


def test_while_the_agent_is_audible_only_the_double_talk_detector_says_a_person_is_there(espeak_wav, silero):
    """Speech the VAD hears while the agent's voice is in the mic is what the echo canceller left
    of it unless the double-talk detector hears a person: no pause, no turn; with the detector's
    word for it, the reply pauses at once and is interrupted, and the turn reaches back to it."""
    silence = np.zeros(int(SILENCE_S * 16_000), np.float32)
    (phrase,) = _spoken(espeak_wav, "stop, wait a moment, I have a question")
    samples = np.concatenate([silence, phrase, silence])
    ctx, _ = context()
    controls = SpeakerControls(ctx)
    ctx.replies.begin(Reply(2, time.monotonic()))
    stages: list = []
    out = _turns(ctx, silero, samples, controls.barge_in(), agent_audible=True, stage_out=stages)
    assert controls.calls == [] and out.of(SpeechSegment) == [] and stages[0].echo_turns == 1

    ctx, _ = context()
    controls = SpeakerControls(ctx)
    ctx.replies.begin(Reply(2, time.monotonic()))
    heard_at = len(silence) + 2_048  # the detector needs a few blocks
    out = _turns(ctx, silero, samples, controls.barge_in(), agent_audible=True, person_from=heard_at)
    assert controls.calls == ["pause", "interrupt"]
    (segment,) = out.of(SpeechSegment)
    assert segment.over_agent_from is not None and segment.over_agent_from <= len(silence) < segment.span[1]


def test_a_short_utterance_over_a_reply_waits_for_its_words(espeak_wav, silero):
    ctx, _ = context()
    controls = SpeakerControls(ctx)
    ctx.replies.begin(Reply(2, time.monotonic()))
    barge_in = controls.barge_in()
    silence = np.zeros(int(SILENCE_S * 16_000), np.float32)
    (mm,) = _spoken(espeak_wav, "mm hmm")
    out = _turns(ctx, silero, np.concatenate([silence, mm, silence]), barge_in)
    assert controls.calls == ["pause"]
    (segment,) = out.of(SpeechSegment)
    assert segment.over_reply
    # The transcribe stage asks the rule: a backchannel resumes the reply and is not answered.
    transcribe_out = Collector()
    stage = TranscribeStage(ctx, transcribe_out, Models(transcriber=ScriptedTranscriber(["Mm-hmm."])).mark_ready(),
                            barge_in)
    run_stage(stage, [segment])
    assert controls.calls == ["pause", "resume"] and transcribe_out.frames == []
    assert not ctx.replies.current.cancelled


# ---- transcribe ----------------------------------------------------------------------------------


def test_transcribe_turns_speech_into_input_and_drops_empty_transcripts():
    ctx, log = context()
    out = Collector()
    transcriber = ScriptedTranscriber(["Partial words", "Hello there.", ""])
    stage = TranscribeStage(ctx, out, Models(transcriber=transcriber).mark_ready())
    speech = np.full(16_000, 0.1, np.float32)
    stage.start()
    stage.put(PartialAudio(speech))  # shown while the user still speaks
    deadline = time.monotonic() + 10
    while not log.of(PartialTranscript):
        assert time.monotonic() < deadline, "no partial transcript"
        time.sleep(0.01)
    for _ in range(2):
        ctx.progress.begin_input()
    run_stage(stage, [SpeechSegment(speech, time.monotonic(), 0.0, 1.0),
                      SpeechSegment(speech, time.monotonic(), 1.0, 2.0)])
    (user,) = out.of(UserInput)
    assert user.text == "Hello there." and user.transcript_ms is not None and user.audio is speech
    assert [e.text for e in log.of(PartialTranscript)] == ["Partial words"]
    ctx.progress.end_of_input()
    assert not ctx.progress.finished.is_set()  # the answered input is still in flight ...
    ctx.progress.end_input()
    assert ctx.progress.finished.is_set()  # ... the empty one was ended by the stage


class HeardTranscriber(ScriptedTranscriber):
    """A scripted transcriber that keeps the audio it was given."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__(texts)
        self.audio: list[np.ndarray] = []

    def _segments(self, audio: np.ndarray):
        self.audio.append(audio.copy())
        return super()._segments(audio)


def test_a_turn_over_a_reply_is_heard_from_under_the_echo():
    ctx, _ = context()
    out = Collector()
    transcriber = HeardTranscriber(["Stop, tell me about Paris.", "Hello there."])
    stage = TranscribeStage(ctx, out, Models(transcriber=transcriber).mark_ready())
    cleaned = np.full(8_000, 0.01, np.float32)  # what the echo canceller left of the voice
    voice = np.full(10_000, 0.1, np.float32)  # from where the double-talk detector heard it begin
    asked: list[tuple[int, int]] = []
    stage.recover = lambda start, end: asked.append((start, end)) or voice
    for _ in range(2):
        ctx.progress.begin_input()
    run_stage(stage, [SpeechSegment(cleaned, time.monotonic(), 0.0, 1.0, span=(4_000, 12_000), over_reply=True,
                                   over_agent_from=2_000),
                      SpeechSegment(cleaned, time.monotonic(), 2.0, 3.0, span=(20_000, 28_000))])
    over, after = out.of(UserInput)
    assert asked == [(2_000, 12_000)]  # only the turn spoken over the reply is recovered
    assert np.array_equal(transcriber.audio[0], voice) and np.array_equal(over.audio, voice)
    assert np.array_equal(transcriber.audio[1], cleaned) and after.audio is cleaned
    assert stage.recovered == 1


# ---- think ---------------------------------------------------------------------------------------


def _think(ctx, llm, persona="default"):
    out = Collector()
    conversation = Conversation()
    stage = ThinkStage(ctx, out, Models(llm=llm).mark_ready(), conversation, load_persona(persona))
    return stage, out, conversation


def test_think_splits_streamed_tokens_into_sentences():
    ctx, log = context()
    llm = ScriptedLLM(["Hello th", "ere. How are", " you, Dr. Smith? I am", " 3.5 times", " better"])
    stage, out, conversation = _think(ctx, llm)
    ctx.progress.begin_input()
    run_stage(stage, [_user_input("Hi!")])
    sentences = out.of(AgentSentence)
    assert [s.shown for s in sentences] == ["Hello there.", "How are you, Dr. Smith?", "I am 3.5 times better"]
    assert "three point five" in sentences[2].spoken  # normalized for speech
    assert out.frames[-1] == EndOfReply(sentences[0].reply)
    assert all(s.reply is sentences[0].reply for s in sentences)
    assert [e.text for e in log.of(UserTurn)] == ["Hi!"] and conversation.turns[0].text == "Hi!"
    assert llm.messages[0][-1] == {"role": "user", "content": "Hi!"}
    assert ctx.progress.finished.is_set() is False and ctx.replies.current is sentences[0].reply


def test_think_stops_the_llm_at_cancel_and_still_ends_the_reply():
    ctx, _ = context()
    llm = ScriptedLLM(["First sentence. Sec", "ond sentence. ", "Third sentence."], hold_after=1)
    stage, out, _ = _think(ctx, llm)
    stage.start()
    stage.put(_user_input("Talk to me."))
    out.wait_for(lambda: len(out.of(AgentSentence)) == 1, "the first sentence")
    ctx.replies.cancel_current()
    out.wait_for(lambda: out.of(EndOfReply), "the end of the cancelled reply")
    run_stage(stage, [])
    assert [s.shown for s in out.of(AgentSentence)] == ["First sentence."]
    assert llm.saw_cancel and llm.sent == 1  # it stopped without streaming the rest
    assert out.of(EndOfReply)[0].reply.cancelled


def test_think_replay_with_nothing_said_yet_is_a_notice():
    ctx, log = context()
    stage, out, _ = _think(ctx, ScriptedLLM([]))
    ctx.progress.begin_input()
    run_stage(stage, [ReplayRequest()])
    assert out.frames == [] and "nothing to replay" in log.items[-1].message
    ctx.progress.end_of_input()
    assert ctx.progress.finished.is_set()


# ---- voice ---------------------------------------------------------------------------------------


def speaking_engine(engine: str, tiny_generator, tiny_checkpoint):
    """The tiny checkpoint on the torch engine, or on MLX (its codec and tokenizer shared)."""
    if engine == "torch":
        return tiny_generator
    pytest.importorskip("mlx.core", reason="MLX is not importable here: pip install 'mlx[cpu]' (Linux) or mlx (macOS)")
    from csm_engine.mlx.convert import load_mlx_model
    from csm_engine.mlx.generator import MLXGenerator

    return MLXGenerator(load_mlx_model(str(tiny_checkpoint)), tiny_generator.codec, tiny_generator.tokenizer)


@pytest.mark.parametrize("engine", ["torch", "mlx"])
def test_voice_drops_unstarted_sentences_when_cancelled_and_keeps_only_what_played(engine, tiny_generator,
                                                                                   tiny_checkpoint, chat_persona):
    ctx, log = context()
    sink = MemorySink(24_000, speed=1.0)  # a real-time speaker: playback lags generation
    generator = RecordingGenerator(speaking_engine(engine, tiny_generator, tiny_checkpoint))
    conversation = Conversation("tester", 0)
    conversation.add_user_turn("Tell me three things.", None)
    models = Models(generator=generator, sink=sink).mark_ready()
    stage = VoiceStage(ctx, models, conversation, load_persona(str(chat_persona)), max_audio_ms=2000, seed=3)
    reply = Reply(2, time.monotonic())
    ctx.replies.begin(reply)
    texts = ["The first thing.", "The second thing.", "The third thing."]
    stage.start()
    stage.put(AgentSentence(reply, texts[0], texts[0]))
    deadline = time.monotonic() + 60
    while sink.played_samples < 0.3 * 24_000:
        assert time.monotonic() < deadline, "the reply never played"
        time.sleep(0.01)
    for text in texts[1:]:
        stage.put(AgentSentence(reply, text, text))
    ctx.replies.cancel_current()  # what Pipeline.interrupt does: cancel, then silence the sink
    sink.stop()
    played = sink.played_samples
    stage.put(EndOfReply(reply))
    assert reply.done.wait(30)
    run_stage(stage, [])
    assert texts[2] not in generator.texts  # never started
    (done,) = log.of(AgentTurnDone)
    assert done.interrupted
    turn = conversation.turns[-1]
    assert turn.role == "agent" and turn.interrupted and turn.text.startswith(texts[0])
    assert 0 < len(turn.audio) <= played + sink.block_samples
    assert sum(s.samples for s in turn.sentences) == len(turn.audio)
    sink.close()


def _text_only_voice():
    """A voice stage without CSM (text only), with reply 1 in flight."""
    ctx, log = context()
    conversation = Conversation()
    stage = VoiceStage(ctx, Models().mark_ready(), conversation, load_persona("default"))
    stage.models.text_only = True
    reply = Reply(1, time.monotonic())
    ctx.replies.begin(reply)
    return ctx, log, conversation, stage, reply


def test_voice_text_only_records_every_sentence_without_audio():
    ctx, log, conversation, stage, reply = _text_only_voice()
    run_stage(stage, [AgentSentence(reply, "One.", "One."), AgentSentence(reply, "Two.", "Two."),
                      EndOfReply(reply)])
    assert reply.done.is_set() and ctx.replies.current is None
    (turn,) = conversation.turns
    assert turn.text == "One. Two." and turn.audio is None and not turn.interrupted
    assert log.of(AgentTurnDone)[0].text == "One. Two."


def test_voice_records_the_reply_in_flight_when_stopped():
    _, _, conversation, stage, reply = _text_only_voice()
    run_stage(stage, [AgentSentence(reply, "Cut short.", "Cut short."), Stop()])
    assert reply.done.is_set() and conversation.turns[0].text == "Cut short."
