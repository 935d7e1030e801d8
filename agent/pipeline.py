"""One conversation, live: listen -> transcribe -> think -> speak, with barge-in.

``Pipeline`` builds the stages (``agent.stages``) and wires them; it is the public API that the
TUI and the CLI use. Each stage runs on its own thread and passes typed frames
(``agent.frames``) to the next::

    capture (source -> echo cancellation) --AudioBlock--> turn (VAD + end-of-turn judge,
    barge-in) --SpeechSegment--> transcribe (Whisper) --UserInput--> think (LLM -> sentences)
    --AgentSentence/EndOfReply--> voice (CSM stream -> speaker sink)

The first sentence is spoken while the LLM is still writing the rest. An interruption
(``interrupt``: the user's voice or the interrupt key) cancels the reply in flight through its
one cancel signal: the LLM stops, CSM stops between frames, every stage drops that reply's
pending frames, and the sink goes silent within one block. A cancelled reply is recorded as
interrupted, holding only the audio actually played.

Models load on background threads (``LoadProgress`` events); nothing here runs model code on
the caller's thread. Without CSM weights the agent answers in text only (one ``Notice``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.audio import AudioSink, AudioSource, WavFileSource, write_wav
from agent.config.personas import Persona, load_persona
from agent.config.settings import MODES, AgentSettings
from agent.conversation.conversation import Conversation
from agent.conversation.saving import ConversationSaver, default_save_dir
from agent.echo.canceller import open_echo_canceller
from agent.echo.double_talk import DoubleTalk
from agent.echo.room import SimulatedRoom, open_room
from agent.errors import AgentError
from agent.events import AgentState, AudioSetup, Event
from agent.frames import Announcement, ReplayRequest, UserInput
from agent.listen.asr import Transcriber
from agent.listen.barge_in import BargeIn
from agent.listen.vad import SileroModel
from agent.llm.base import ChatLLM
from agent.stages.base import StageContext
from agent.stages.capture import CancelledEcho, CaptureStage, EchoRemover, NoEchoRemoval
from agent.stages.loading import ModelLoader, Models
from agent.stages.think import ThinkStage
from agent.stages.transcribe import TranscribeStage
from agent.stages.turn import TurnStage
from agent.stages.voice import PromptHook, VoiceStage

if TYPE_CHECKING:  # torch-heavy: only for annotations
    from agent.tools.services import AgentServices
    from csm_engine.generator import Generator
    from csm_engine.watermark import Watermarker

__all__ = ["Pipeline", "default_save_dir"]

log = logging.getLogger(__name__)

STAGE_JOIN_S = 10.0
LOAD_JOIN_S = 60.0


class Pipeline:
    """The voice agent: see the module docstring. ``emit`` is called from pipeline threads."""

    def __init__(
        self,
        settings: AgentSettings,
        emit: Callable[[Event], None],
        *,
        source: AudioSource | Literal[False] | None = None,  # None: --mic-file or the mic; False: no input
        sink: AudioSink | None = None,  # None: --speaker-file or the speaker
        generator: Generator | None = None,
        llm: ChatLLM | None = None,
        transcriber: Transcriber | None = None,
        vad_model: SileroModel | None = None,
        watermarker: Watermarker | None = None,
        on_prompt: PromptHook | None = None,
    ) -> None:
        self.settings = settings
        self.persona: Persona = load_persona(settings.persona)  # a broken persona file fails here, in one line
        self.conversation = Conversation(settings.persona or "default", self.persona.speaker_id)
        self.save_dir = Path(settings.save_dir).expanduser() if settings.save_dir else default_save_dir()
        self.fatal: AgentError | None = None
        paced = bool(settings.mic_file or settings.room) and not settings.realtime  # --fast: input waits
        if source is None and (settings.mic_file or settings.room):
            source = _file_or_room(settings)
        self.ctx = StageContext(emit, headless=settings.headless, max_turns=settings.max_turns, on_fatal=self._fail,
                                on_interrupt=self.interrupt)
        self.models = Models(source=source, sink=sink, generator=generator, llm=llm, transcriber=transcriber,
                             vad_model=vad_model, watermarker=watermarker)
        self.saver = ConversationSaver(self.conversation, self.save_dir, self.models.watermark, self.ctx.notice)
        self.loader = ModelLoader(self.ctx, self.models, settings, lambda: self.persona, paced=paced,
                                  on_loaded=self._loaded)
        self.voice = VoiceStage(self.ctx, self.models, self.conversation, self.persona, saver=self.saver,
                                max_audio_ms=settings.max_audio_ms, seed=settings.seed, on_prompt=on_prompt)
        self.think = ThinkStage(self.ctx, self.voice, self.models, self.conversation, self.persona, self.saver)
        self.barge_in = BargeIn(self.ctx.replies, pause=self._pause_speaker, resume=self._resume_speaker,
                                interrupt=self.interrupt)
        self.transcribe = TranscribeStage(self.ctx, self.think, self.models, self.barge_in)
        self.turn = TurnStage(self.ctx, self.transcribe, mode=settings.mode, partials=not settings.headless,
                              paced=paced, barge_in=self.barge_in)
        self.capture = CaptureStage(self.ctx, self.turn, paced=paced)
        self._stages = (self.capture, self.turn, self.transcribe, self.think, self.voice)
        self.services: AgentServices | None = None  # tools, memory, timers: opened by start()
        self._detach_echo: Callable[[], None] | None = None
        self._detach_room: Callable[[], None] | None = None
        self._started = self._stopped = False

    # ---- state the CLI and tests read ------------------------------------------------------------

    @property
    def state(self) -> AgentState:
        return self.ctx.state

    @property
    def finished(self) -> threading.Event:
        """Set once the input is over (or --max-turns reached) and every reply is spoken."""
        return self.ctx.progress.finished

    @property
    def input_over(self) -> threading.Event:
        return self.ctx.progress.input_over

    @property
    def sink(self) -> AudioSink | None:
        return self.models.sink

    @property
    def text_only(self) -> bool:
        return self.models.text_only

    @property
    def prompts(self) -> list:
        """(context, prompt) of the last sentences spoken (bounded)."""
        return self.voice.prompts

    # ---- public API ------------------------------------------------------------------------------

    def start(self) -> None:
        """Load models and open audio on background threads, then listen. Returns at once."""
        if self._started:
            return
        self._started = True
        self.ctx.set_state(AgentState.LOADING)
        self._open_services()
        self.ctx.spawn(self._load_then_listen, "startup")
        for stage in (self.turn, self.transcribe, self.think, self.voice):
            stage.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loading finished; raises the AgentError that makes the agent unusable."""
        done = self.models.loaded.wait(timeout)
        if self.fatal is not None:
            raise self.fatal
        return done

    def stop(self) -> None:
        """Cancel what is in flight, stop the threads, write the speaker file, save the conversation."""
        if self._stopped:
            return
        self._stopped = True
        self.ctx.stopping.set()
        self.interrupt()
        source = self.models.source
        if source:
            try:
                source.stop()
            except Exception:  # stopping anyway: the rest must still be saved
                log.warning("could not stop the audio source", exc_info=True)
        for stage in self._stages:
            stage.stop()
        self.models.release_waiters()  # stages waiting for a model wake up and see that we are stopping
        self.ctx.progress.wake()
        for stage in self._stages:
            stage.join(STAGE_JOIN_S)
        # Let model loads still running finish: native code (CTranslate2, llama.cpp) aborts the
        # process when the interpreter exits under it. A hub download is plain Python: not waited for.
        deadline = time.monotonic() + LOAD_JOIN_S
        stage_threads = {f"csm-chat-{stage.name}" for stage in self._stages}
        for thread in self.ctx.threads():
            ours = stage_threads | {"csm-chat-voice-download"}
            if thread.name not in ours and thread is not threading.current_thread():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._close_sink()
        if self.services is not None:
            if self.fatal is None:  # a failed run ends at once (its LLM may be what failed): no summary
                self.think.assist.remember_conversation(self.conversation)
            self.services.close()
        if self.settings.tts_url and self.models.generator is not None:
            self.models.generator.close()  # the csm-serve connection
        try:
            self.saver.save()
        except AgentError as error:
            self.ctx.notice("error", str(error))
        self.ctx.set_state(AgentState.STOPPED)

    def submit_text(self, text: str) -> None:
        """A typed message: answered exactly like a transcribed one."""
        text = text.strip()
        if not text:
            return
        now = time.time()
        self.ctx.progress.begin_input()
        self.think.put(UserInput(text, None, time.monotonic(), now, now, None, typed=True))

    def interrupt(self) -> None:
        """Barge-in: cancel the reply in flight (LLM, CSM, queued sentences) and silence the speaker."""
        if self.ctx.replies.cancel_current() is not None and self.models.sink is not None:
            self.models.sink.stop()

    def set_muted(self, muted: bool) -> None:
        self.capture.set_muted(muted)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise AgentError(f"unknown mode {mode!r}: use 'vad' (hands-free) or 'ptt' (push-to-talk)")
        self.settings = self.settings.with_changes(mode=mode)
        self.turn.set_mode(mode)

    def push_to_talk(self, pressed: bool) -> None:
        if pressed:
            self.turn.ptt.press()
        else:
            self.turn.ptt.release()

    def set_persona(self, name_or_path: str) -> None:
        """Switch who the agent is from the next reply on (voice loads in the background)."""
        persona = load_persona(name_or_path)
        self.conversation.set_persona(name_or_path, persona.speaker_id)
        self.persona = persona
        self.settings = self.settings.with_changes(persona=name_or_path)
        self.think.use_persona(persona)
        self.voice.use_persona(persona)
        if self.services is not None:
            self.services.use_persona(persona)
        if self.models.generator is not None and not self.models.text_only:
            self.ctx.spawn(lambda: self.loader.switch_persona(persona), "voice-load")

    def save(self, directory: str | Path | None = None) -> Path:
        """Save the conversation now (to ``directory``, or its own directory); returns where."""
        return self.saver.save(directory)

    def replay_last(self) -> None:
        """Play the last agent turn's audio again (not recorded as a new turn)."""
        self.ctx.progress.begin_input()
        self.think.put(ReplayRequest())

    def announce(self, text: str) -> None:
        """Say ``text`` unasked (a due timer), after the reply in flight if there is one."""
        self.ctx.progress.begin_input()
        self.think.put(Announcement(text))

    # ---- plumbing ----------------------------------------------------------------------------------

    def _open_services(self) -> None:
        from agent.tools.assist import ThinkAssist
        from agent.tools.services import AgentServices

        self.services = AgentServices(self.settings, self.persona, self.ctx.notice, self.announce)
        self.think.assist = ThinkAssist(self.ctx, self.services, self.think._send_sentence)

    def _load_then_listen(self) -> None:
        self.loader.start()
        m = self.models
        m.wait("audio")
        m.wait("vad")
        if self.settings.mic_file:
            m.loaded.wait()  # a file plays once everything is loaded, as a user would wait
            if self.services is not None:
                self.services.wait_for_servers(60)  # and once its MCP servers are up (or have failed)
        if self.fatal is not None or self.ctx.stopping.is_set():
            return
        self.turn.vad = m.vad
        if m.source:
            self.capture.source = m.source
            if isinstance(m.source, SimulatedRoom) and m.sink is not None:
                self._detach_room = m.sink.add_listener(m.source.hear)  # the speaker plays into the room
            self.capture.echo = self._echo_remover(m.source, m.sink)
        self.capture.start()

    def _echo_remover(self, source: AudioSource, sink: AudioSink | None) -> EchoRemover:
        """The agent's voice taken out of the mic: AEC where sound can travel from speaker to mic."""
        mode = self.settings.aec
        # auto: on for a microphone or a room in hands-free mode (a WAV file hears no speaker)
        if sink is None or mode == "off" or (mode == "auto" and (not source.hears_speaker
                                                                  or self.settings.mode == "ptt")):
            self.ctx.emit(AudioSetup(False, self.settings.room))
            return NoEchoRemoval()
        try:
            canceller = open_echo_canceller(mode if mode == "on" else "auto", source, sink,
                                            notice=lambda line: self.ctx.notice("warning", line))
        except AgentError as error:
            self._fail(error)
            return NoEchoRemoval()
        self.ctx.emit(AudioSetup(canceller.enabled, self.settings.room))
        if not canceller.enabled:
            remover: EchoRemover = CancelledEcho(canceller)
        else:  # who talks over the agent, and their words back from under its echo
            remover = DoubleTalk(canceller)
            self.transcribe.recover = remover.recover
        self._detach_echo = remover.close
        return remover

    def _pause_speaker(self) -> None:
        if self.models.sink is not None:
            self.models.sink.pause()

    def _resume_speaker(self) -> None:
        if self.models.sink is not None:
            self.models.sink.resume()

    def _loaded(self) -> None:
        if self.fatal is None:
            self.ctx.set_state(AgentState.LISTENING)
            if self.settings.save_dir is None and not self.settings.headless:
                self.ctx.notice("info", f"saving this conversation to {self.save_dir}")

    def _fail(self, error: AgentError) -> None:
        if self.fatal is None:
            self.fatal = error
        if not self.settings.headless:  # headless: the caller prints the fatal error, once
            self.ctx.notice("error", str(error))
        self.models.loaded.set()
        self.ctx.progress.finished.set()

    def _close_sink(self) -> None:
        for detach in (self._detach_echo, self._detach_room):
            if detach is not None:
                detach()
        sink = self.models.sink
        if sink is None:
            return
        try:
            sink.close()
        except Exception:  # closing anyway: the speaker file must still be written
            log.warning("could not close the audio sink", exc_info=True)
        target = self.models.own_sink_file
        if target is None:
            return
        audio = sink.audio()
        try:
            write_wav(target, self.models.watermark(audio, sink.sample_rate), sink.sample_rate)
        except OSError as error:
            self.ctx.notice("error", f"cannot write {target}: {error.strerror or error}")


def _file_or_room(settings: AgentSettings) -> AudioSource:
    """--mic-file played as if spoken live, or --room: a simulated room (with --mic-file's voice)."""
    # Trailing silence lets a turn that runs to the end of the file reach its end-of-turn pause.
    trailing_s = max(settings.end_silence_ms, settings.turn_max_silence_ms) / 1000 + 0.5
    if settings.room:
        return open_room(settings.room, settings.mic_file, realtime=settings.realtime, trailing_silence_s=trailing_s)
    return WavFileSource(settings.mic_file, speed=1.0 if settings.realtime else None, trailing_silence_s=trailing_s)
