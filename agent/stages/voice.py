"""Voice: sentences -> CSM stream -> speaker, and the record of what was actually said.

Each ``AgentSentence`` is synthesized by CSM in the context of the whole conversation (the
persona's voice clip, every earlier turn, the reply's own earlier sentences) and written to
the sink chunk by chunk as frames are decoded — at once where CSM runs faster than real time,
and where it runs slower, only once the audio held will last until the rest of the sentence is
made (``agent.speak.playback``), so a sentence never stutters. ``EndOfReply`` waits for playback to finish and
records the agent's turn: all of it, or — when the reply was cancelled — only the sentences
whose audio began playing, each cut to what was heard. Sentences of a cancelled reply that had
not started are dropped by the stage base (``Stage.dropped``); the one being spoken stops
between frames through the reply's cancel signal. Without CSM (or a speaker) sentences are
shown as text only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from agent.audio import AudioSink
from agent.config.personas import Persona
from agent.conversation.conversation import CSM_RATE, Conversation, Sentence
from agent.conversation.saving import ConversationSaver
from agent.events import AgentState, AgentText, AgentTurnDone, TurnLatency
from agent.frames import AgentSentence, EndOfReply, Frame, ReplayAudio, Reply
from agent.speak.playback import PlaybackPlanner
from agent.speak.synthesis import ReplySynthesizer, SpokenSentence, SynthesisOptions, played_prefix
from agent.stages.base import Stage, StageContext
from agent.stages.loading import Models
from csm_engine.errors import CSMError

if TYPE_CHECKING:  # torch-heavy: only for annotations
    from csm_engine.generator import Prompt
    from csm_engine.tokens import Segment

PromptHook = Callable[[list, "Prompt"], None]
KEPT_PROMPTS = 8


class VoiceStage(Stage):
    """See the module docstring. ``persona`` is handed over with ``use_persona``."""

    name = "voice"

    def __init__(self, ctx: StageContext, models: Models, conversation: Conversation, persona: Persona, *,
                 saver: ConversationSaver | None = None, max_audio_ms: int | None = None, seed: int | None = None,
                 on_prompt: PromptHook | None = None) -> None:
        super().__init__(ctx)
        self.models = models
        self.conversation = conversation
        self.persona = persona
        self.saver = saver
        self.max_audio_ms = max_audio_ms
        self.seed = seed
        self.on_prompt = on_prompt
        self.prompts: list[tuple[list, Prompt]] = []  # (context, prompt) of the last sentences
        self.planner = PlaybackPlanner()
        self.start_delays: list[float] = []  # seconds each sentence's audio was held before playing
        self._synth: ReplySynthesizer | None = None

    def use_persona(self, persona: Persona) -> None:
        """From the next sentence on, speak with ``persona``'s sampling settings."""
        self.persona = persona
        self._synth = None

    # ---- frames ----------------------------------------------------------------------------

    def process(self, frame: Frame) -> None:
        match frame:
            case AgentSentence(reply=reply, shown=shown, spoken=spoken):
                self.models.wait("csm")
                self._speak(reply, shown, spoken)
            case ReplayAudio(reply=reply, audio=audio, sample_rate=rate):
                self._play(reply, audio, rate)
            case EndOfReply(reply=reply):
                self._finish(reply)
            case _:
                raise TypeError(f"the voice stage does not take {type(frame).__name__}")

    def on_stop(self) -> None:
        reply = self.ctx.replies.current
        if reply is not None:
            self._finish(reply)  # stopping mid-reply: record what was said

    def after_failure(self, frame: Frame) -> None:
        """After a failure (the reply is cancelled): record what was said, and let the think stage go on."""
        reply = frame.reply if isinstance(frame, (AgentSentence, ReplayAudio, EndOfReply)) else None
        reply = reply or self.ctx.replies.current
        if reply is None:
            return
        try:
            self._finish(reply)
        finally:
            if not reply.done.is_set():
                self._close(reply)

    # ---- speaking ----------------------------------------------------------------------------

    def _speak(self, reply: Reply, shown: str, spoken: str) -> None:
        reply.shown.append(shown)
        self.ctx.emit(AgentText(reply.turn_id, shown))
        sink = self.models.sink
        if self.models.text_only or self.models.generator is None or sink is None:
            reply.spoken.append(SpokenSentence(spoken, np.zeros(0, np.float32), None))
            self.ctx.set_state(AgentState.SPEAKING)
            return
        synth = self._synthesizer()
        earlier = [seg for seg in (self._segment_of(synth, s) for s in reply.spoken) if seg is not None]
        result: list[SpokenSentence] = []
        seed = None if self.seed is None else self.seed * 1009 + reply.turn_id * 31 + len(reply.spoken)
        if not reply.wrote_audio:
            reply.underruns_at_start = (sink.underruns, sink.underrun_s)
        plan = self.planner.sentence(spoken, synth.budget_s(spoken))
        held: list[np.ndarray] = []  # chunks made but not yet released to the speaker
        stream = synth.stream(spoken, self.conversation.agent_speaker, earlier, cancel=reply.cancel, seed=seed,
                              result=result)
        try:
            for chunk in stream:
                if reply.cancelled:
                    break
                held.append(chunk)
                if plan.offer(len(chunk) / CSM_RATE, sink.pending_s):
                    self._release(reply, sink, held)
                if reply.cancelled:
                    sink.stop()  # the interrupt may have run between our check and the write
                    break
            else:
                plan.finish()  # a sentence shorter than its hold is released whole, now
                self._release(reply, sink, held)
        except CSMError as error:
            self.ctx.notice("warning", f"could not speak a sentence: {error}")
        finally:
            stream.close()
            sink.end_utterance()
            if plan.start_delay_s is not None:
                self.start_delays.append(plan.start_delay_s)
        reply.spoken.append(result[0] if result else SpokenSentence(spoken, np.zeros(0, np.float32), None))

    def _release(self, reply: Reply, sink: AudioSink, held: list[np.ndarray]) -> None:
        """Hand the held chunks to the speaker (the sentence's first release opens its utterance)."""
        if not held or reply.cancelled:
            return
        if not reply.wrote_audio:
            reply.wrote_audio = True
            reply.sink_start = sink.played_samples
            reply.first_audio_ms = reply.since_start_ms()
            self.ctx.set_state(AgentState.SPEAKING)
        sink.begin_utterance()
        for chunk in held:
            sink.write(chunk, CSM_RATE)
        held.clear()

    def _synthesizer(self) -> ReplySynthesizer:
        voice, generator = self.models.voice, self.models.generator
        if self._synth is None or self._synth.voice is not voice or self._synth.generator is not generator:
            p = self.persona
            options = SynthesisOptions(temperature=p.temperature, topk=p.topk,
                                       max_audio_ms=self.max_audio_ms or p.max_audio_length_ms, seed=self.seed)
            self._synth = ReplySynthesizer(generator, self.conversation, voice, options,
                                           on_prompt=self._record_prompt)
        return self._synth

    def _record_prompt(self, context: list, prompt: Prompt) -> None:
        self.prompts.append((context, prompt))
        del self.prompts[:-KEPT_PROMPTS]
        if self.on_prompt is not None:
            self.on_prompt(context, prompt)

    def _segment_of(self, synth: ReplySynthesizer, spoken: SpokenSentence) -> Segment | None:
        """An earlier sentence of this reply as context (the same tensor every time it is used)."""
        if len(spoken.audio) == 0:
            return None
        if spoken.segment is None:
            from csm_engine.tokens import Segment  # imports torch

            spoken.segment = Segment(self.conversation.agent_speaker, spoken.text,
                                     synth.remember(spoken.audio, spoken.codes))
        return spoken.segment

    def _play(self, reply: Reply, audio: np.ndarray, sample_rate: int) -> None:
        """Replay: play earlier audio until it ends or is cut off (nothing is recorded)."""
        sink = self.models.sink
        self.ctx.set_state(AgentState.SPEAKING)
        sink.write(audio, sample_rate)
        sink.flush()
        while not sink.wait_idle(timeout=0.05):
            if reply.cancelled or self.ctx.stopping.is_set():
                break

    # ---- finishing a reply -------------------------------------------------------------------

    def _finish(self, reply: Reply) -> None:
        """After the last sentence (or a cut): wait for playback, record the turn, save, listen again."""
        if reply.done.is_set():
            return
        if reply.replay:
            self._close(reply)
            return
        sink = self.models.sink
        if reply.wrote_audio and sink is not None and not reply.cancelled:
            sink.flush()
            while not sink.wait_idle(timeout=0.05):
                if reply.cancelled or self.ctx.stopping.is_set():
                    sink.stop()
                    break
        interrupted = reply.cancelled
        played = None  # None: every started sentence counts (text only)
        if sink is not None and not self.models.text_only:
            played = (sink.played_samples - reply.sink_start) * CSM_RATE // sink.sample_rate if reply.wrote_audio else 0
        sentences, shown, parts = self._said(reply, played if interrupted else None)
        audio = np.concatenate(parts) if parts and sum(len(p) for p in parts) else None
        underruns, underrun_s = 0, 0.0
        if sink is not None and reply.underruns_at_start is not None:
            underruns = sink.underruns - reply.underruns_at_start[0]
            underrun_s = sink.underrun_s - reply.underruns_at_start[1]
        latency = TurnLatency(0, reply.transcript_ms, reply.first_token_ms,
                              reply.first_audio_ms, reply.turn_end_ms, underruns, underrun_s)
        turn = self.conversation.add_agent_turn(sentences, audio, text=" ".join(shown), interrupted=interrupted,
                                                started_at=reply.started_at, ended_at=time.time(),
                                                timings=latency.as_record(), tools=reply.tools)
        self.ctx.emit(AgentTurnDone(turn.id, turn.text, interrupted))
        self.ctx.emit(replace(latency, turn_id=turn.id))
        if self.saver is not None:
            self.saver.save_quietly()
        self.conversation.release_old_audio()
        if self.ctx.progress.reply_recorded():  # --max-turns reached
            self.ctx.progress.end_of_input()
            if self.models.source is not None:
                self.models.source.stop()
        self._close(reply)

    def _close(self, reply: Reply) -> None:
        self.ctx.replies.end(reply)
        reply.done.set()
        if not self.ctx.stopping.is_set():
            self.ctx.set_state(AgentState.LISTENING)

    def _said(self, reply: Reply, played: int | None) -> tuple[list[Sentence], list[str], list[np.ndarray]]:
        """The sentences heard (all started ones unless cut off), their written text and audio.

        ``played``: samples (24 kHz) of the reply actually played before a cut; a sentence
        counts as said once its audio began playing, and keeps only the part that played.
        """
        sentences: list[Sentence] = []
        shown_said: list[str] = []
        parts: list[np.ndarray] = []
        offset = 0
        for spoken, shown in zip(reply.spoken, reply.shown):
            audio, codes = spoken.audio, spoken.codes
            if played is not None:
                if offset >= played:
                    break
                audio, codes = played_prefix(audio, codes, played - offset)
            offset += len(spoken.audio)
            if len(audio) and self._synth is not None:
                self._synth.remember(audio, codes)
            sentences.append(Sentence(spoken.text, len(audio), codes))
            shown_said.append(shown)
            parts.append(audio)
        return sentences, shown_said, parts
