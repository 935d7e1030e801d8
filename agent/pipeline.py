"""One conversation, live: listen -> transcribe -> think -> speak, with barge-in.

Stages run on their own threads and talk through queues; each owns its part:

    capture (source + VAD/push-to-talk) --speech--> asr (Whisper) --user input--> think (LLM,
    sentence splitter, normalize_for_speech) --sentences--> voice (CSM stream -> speaker sink)

The first sentence is spoken while the LLM is still writing the rest. Every agent reply has
one cancellation signal (``Reply.cancel``, a threading.Event) that every stage honours: the
LLM stops streaming, CSM stops between frames, queued sentences are dropped and the sink
goes silent within one block. A cancelled reply is recorded as interrupted, holding only the
audio actually played and the sentences actually started.

Models load on background threads (``LoadProgress`` events); nothing here runs model code on
the caller's thread. Without CSM weights the agent answers in text only (one ``Notice``).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agent.conversation import CSM_RATE, Conversation, Sentence
from agent.errors import AgentError
from agent.events import (
    AgentState,
    AgentText,
    AgentTurnDone,
    Event,
    LoadProgress,
    MicLevel,
    Notice,
    PartialTranscript,
    StateChanged,
    TurnLatency,
    UserTurn,
)
from agent.settings import AgentSettings

MIC_LEVEL_INTERVAL_S = 0.05  # ~20 level events per second
PARTIAL_INTERVAL_S = 1.0  # partial transcripts while the user speaks (TUI only)
MIN_TURN_S = 0.25  # shorter "turns" (clicks) are not sent to Whisper
_END = object()  # queue sentinel: no more items
STAGES = ("capture", "asr", "think", "voice")


def default_save_dir() -> Path:
    """Where conversations go without --save: the user's data dir, one folder per start time."""
    import platformdirs

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(platformdirs.user_data_dir("csm-chat")) / "conversations" / stamp


@dataclass
class UserInput:
    """A finished user turn on its way to the LLM."""

    text: str
    audio: np.ndarray | None  # 16 kHz, None when typed
    t0: float  # monotonic time the turn ended (speech end detected, or message submitted)
    started_at: float
    ended_at: float
    transcript_ms: float | None = None
    typed: bool = False


@dataclass
class _Speech:
    audio: np.ndarray
    t0: float
    started_at: float
    ended_at: float


@dataclass
class _Partial:
    audio: np.ndarray


@dataclass
class _Replay:
    pass


class _ReplayReply:
    """Marks the 'reply' of a replay of the last turn (no new turn is recorded for it)."""


@dataclass
class Reply:
    """One agent reply in flight: its cancel signal, the sentences started, the audio made."""

    turn_id: int
    t0: float
    transcript_ms: float | None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.time)
    first_token_ms: float | None = None
    first_audio_ms: float | None = None
    shown: list[str] = field(default_factory=list)  # the LLM's sentences, as written
    spoken: list[Any] = field(default_factory=list)  # SpokenSentence per started sentence (None: text only)
    sink_start: int = 0  # sink.played_samples when the reply's first chunk was queued
    wrote_audio: bool = False


class Pipeline:
    """The voice agent: see the module docstring. ``emit`` is called from pipeline threads."""

    def __init__(
        self,
        settings: AgentSettings,
        emit: Callable[[Event], None],
        *,
        source: Any = None,  # an AudioSource; None: --mic-file or the microphone; False: no audio input
        sink: Any = None,  # an AudioSink; None: --speaker-file or the speaker
        generator: Any = None,
        llm: Any = None,
        transcriber: Any = None,
        vad_model: Any = None,
        watermarker: Any = None,
        on_prompt: Callable[[list, Any], None] | None = None,
    ) -> None:
        from agent.personas import load_persona

        self.settings = settings
        self._emit_cb = emit
        self.persona = load_persona(settings.persona)  # a broken persona file fails here, in one line
        self.conversation = Conversation(settings.persona or "default", self.persona.speaker_id)
        self.save_dir = Path(settings.save_dir).expanduser() if settings.save_dir else default_save_dir()
        self._source, self._sink = source, sink
        self._own_sink_file: Path | None = None
        self._generator, self._llm, self._transcriber = generator, llm, transcriber
        self._vad_model, self._watermarker = vad_model, watermarker
        self._on_prompt = on_prompt
        self._voice_segment = None
        self._synth = None
        self.text_only = False
        self.state = AgentState.LOADING
        self.fatal: AgentError | None = None
        self.prompts: list[tuple[list, Any]] = []  # (context, prompt) of the last sentences (bounded)
        self.agent_replies = 0
        self.device = "cpu"
        self._mode = settings.mode
        self._muted = False
        self._ptt = None
        self._vad = None
        self._lock = threading.RLock()
        self._pending = 0  # user inputs not yet fully answered
        self._idle = threading.Condition(self._lock)
        self._current: Reply | None = None
        self._stopping = threading.Event()
        self._loaded = threading.Event()
        self._ready = {name: threading.Event() for name in ("audio", "vad", "asr", "llm", "csm")}
        self.input_over = threading.Event()
        self.finished = threading.Event()  # input over (or --max-turns reached) and every reply spoken
        self._speech_q: queue.Queue = queue.Queue()
        self._input_q: queue.Queue = queue.Queue()
        self._sentence_q: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = False
        self._paced = bool(settings.mic_file) and not settings.realtime  # --fast: the file waits for the agent
        if settings.mic_file and source is None:
            from agent.audio import WavFileSource

            # Trailing silence lets a turn that runs to the end of the file reach its end-of-turn pause.
            self._source = WavFileSource(settings.mic_file, speed=1.0 if settings.realtime else None,
                                         trailing_silence_s=settings.end_silence_ms / 1000 + 0.5)

    # ---- public API --------------------------------------------------------------------------

    def start(self) -> None:
        """Load models and open audio on background threads, then listen. Returns at once."""
        if self._started:
            return
        self._started = True
        self._set_state(AgentState.LOADING)
        self._spawn(self._load_all, "load")
        self._spawn(self._capture_loop, "capture")
        self._spawn(self._asr_loop, "asr")
        self._spawn(self._think_loop, "think")
        self._spawn(self._voice_loop, "voice")

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loading finished; raises the AgentError that makes the agent unusable."""
        done = self._loaded.wait(timeout)
        if self.fatal is not None:
            raise self.fatal
        return done

    def stop(self) -> None:
        """Cancel what is in flight, stop the threads, write the speaker file, save the conversation."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self.interrupt()
        if self._source is not None:
            try:
                self._source.stop()
            except Exception:
                pass
        for q in (self._speech_q, self._input_q, self._sentence_q):
            q.put(_END)
        for ready in self._ready.values():
            ready.set()  # stages waiting for a model wake up and see that we are stopping
        with self._lock:
            self._idle.notify_all()
        # Model loads cannot be cut short; their (daemon) threads are left to finish on their own.
        stages = {f"csm-chat-{name}" for name in STAGES}
        for thread in self._threads:
            if thread.name in stages and thread is not threading.current_thread():
                thread.join(timeout=10.0)
        # Let model loads still running finish: native code (CTranslate2, llama.cpp) aborts the
        # process when the interpreter exits under it. A hub download is plain Python: not waited for.
        deadline = time.monotonic() + 60.0
        for thread in self._threads:
            if thread.name != "csm-chat-voice-download" and thread is not threading.current_thread():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._close_sink()
        try:
            self._save_now()
        except AgentError as error:
            self._notice("error", str(error))
        self._set_state(AgentState.STOPPED)

    def submit_text(self, text: str) -> None:
        """A typed message: answered exactly like a transcribed one."""
        text = text.strip()
        if not text:
            return
        now = time.time()
        self._begin_input()
        self._input_q.put(UserInput(text, None, time.monotonic(), now, now, None, typed=True))

    def interrupt(self) -> None:
        """Barge-in: silence playback within one block, cancel generation and the LLM."""
        with self._lock:
            reply = self._current
        if reply is not None and not reply.cancel.is_set():
            reply.cancel.set()
            if self._sink is not None:
                self._sink.stop()
        # Drop sentences not yet started (the voice thread also checks cancel).

    def set_muted(self, muted: bool) -> None:
        self._muted = bool(muted)

    def set_mode(self, mode: str) -> None:
        if mode not in ("vad", "ptt"):
            raise AgentError(f"unknown mode {mode!r}: use 'vad' (hands-free) or 'ptt' (push-to-talk)")
        self._mode = mode
        self.settings.mode = mode

    def push_to_talk(self, pressed: bool) -> None:
        if self._ptt is None:
            from agent.vad import PushToTalk

            self._ptt = PushToTalk()
        if pressed:
            self._ptt.press()
        else:
            self._ptt.release()

    def set_persona(self, name_or_path: str) -> None:
        """Switch who the agent is from the next reply on (voice loads in the background)."""
        from agent.personas import load_persona

        persona = load_persona(name_or_path)
        with self._lock:
            self.persona = persona
            self.conversation.persona = name_or_path
            self.conversation.agent_speaker = persona.speaker_id
            if persona.speaker_id == self.conversation.user_speaker:
                self.conversation.user_speaker = 1 if persona.speaker_id != 1 else 0
            self.settings.persona = name_or_path
        if self._generator is not None and not self.text_only:
            self._spawn(self._load_voice, "voice-load")

    def save(self, directory: str | Path | None = None) -> Path:
        """Save the conversation now (to ``directory``, or its own directory); returns where."""
        return self._save_now(directory)

    def replay_last(self) -> None:
        """Play the last agent turn's audio again (not recorded as a new turn)."""
        self._begin_input()
        self._input_q.put(_Replay())

    @property
    def sink(self) -> Any:
        return self._sink

    # ---- plumbing -----------------------------------------------------------------------------

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        def run() -> None:
            try:
                target()
            except AgentError as error:
                self._fail(error)
            except Exception as error:  # a bug: say it in one line, keep the app alive
                self._notice("error", f"internal error in the {name} stage: {type(error).__name__}: {error}")
                import traceback

                traceback.print_exc()

        thread = threading.Thread(target=run, name=f"csm-chat-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _emit(self, event: Event) -> None:
        try:
            self._emit_cb(event)
        except Exception:  # a consumer's bug must not kill a stage
            pass

    def _notice(self, level: str, message: str) -> None:
        self._emit(Notice(level, " ".join(str(message).split())))

    def _open_device(self, opener: Callable[[Any], Any], device: Any, without_it: str) -> Any:
        """Open a sound device; None (with a warning saying what still works) when there is none.

        Headless runs have no one to read the warning: the AgentError goes up instead.
        """
        try:
            return opener(device)
        except AgentError as error:
            if self.settings.headless:
                raise
            self._notice("warning", f"{error}; {without_it}")
            return None

    def _set_state(self, state: AgentState) -> None:
        if state != self.state:
            self.state = state
            self._emit(StateChanged(state))

    def _fail(self, error: AgentError) -> None:
        if self.fatal is None:
            self.fatal = error
        if not self.settings.headless:  # headless: the caller prints the fatal error, once
            self._notice("error", str(error))
        self._loaded.set()
        self.finished.set()

    def _begin_input(self) -> None:
        with self._lock:
            self._pending += 1

    def _end_input(self) -> None:
        with self._lock:
            self._pending = max(0, self._pending - 1)
            self._idle.notify_all()
        self._check_finished()

    def _check_finished(self) -> None:
        with self._lock:
            if self._pending == 0 and self.input_over.is_set():
                self.finished.set()

    def _wait_idle(self) -> bool:
        """Block until no user input is in flight (paced mic files); False when stopping."""
        with self._lock:
            while self._pending > 0 and not self._stopping.is_set():
                self._idle.wait(0.2)
        return not self._stopping.is_set()

    # ---- loading -----------------------------------------------------------------------------

    def _load_all(self) -> None:
        from csm_engine.cli import resolve_device
        from csm_engine.errors import CSMError

        try:
            self.device = resolve_device(self.settings.device)
        except CSMError as error:
            raise AgentError(str(error)) from None
        loaders = [self._spawn(self._load_audio, "audio-load")]
        loaders.append(self._spawn(self._load_vad, "vad-load"))
        loaders.append(self._spawn(self._load_asr, "asr-load"))
        loaders.append(self._spawn(self._load_llm, "llm-load"))
        for thread in loaders:
            thread.join()
        # CSM last: it is the biggest, and it only matters once there is a speaker to feed.
        self._load_csm()
        self._load_watermark()
        self._loaded.set()
        if self.fatal is None:
            self._set_state(AgentState.LISTENING)
            if self.settings.save_dir is None and not self.settings.headless:
                self._notice("info", f"saving this conversation to {self.save_dir}")

    def _stage(self, name: str, load: Callable[[], Any]) -> Any:
        self._emit(LoadProgress(name, False))
        try:
            return load()
        finally:
            self._emit(LoadProgress(name, True))

    def _load_audio(self) -> None:
        try:
            if self._sink is None:
                if self.settings.speaker_file:
                    from agent.audio import MemorySink

                    self._sink = MemorySink(CSM_RATE, speed=1.0 if self.settings.realtime else None)
                    self._own_sink_file = Path(self.settings.speaker_file).expanduser()
                else:
                    from agent.audio import open_speaker

                    self._sink = self._open_device(open_speaker, self.settings.output_device,
                                                   "replies are shown as text only")
            if self._sink is not None:
                self._sink.start()
            if self._source is False:  # told not to listen: typed messages only
                self._source = None
            elif self._source is None:
                from agent.audio import open_microphone

                self._source = self._open_device(open_microphone, self.settings.input_device,
                                                 "type your messages instead")
            if self._source is not None and not self._paced:
                self._source.start()
        finally:
            self._ready["audio"].set()

    def _load_vad(self) -> None:
        try:
            from agent.vad import PushToTalk, VadSettings, VoiceActivityDetector, load_silero_model

            if self._ptt is None:
                self._ptt = PushToTalk()
            model = self._vad_model
            if model is None:
                model = self._stage("vad", load_silero_model)
            self._vad = VoiceActivityDetector(VadSettings(end_silence_ms=self.settings.end_silence_ms), model=model)
        finally:
            self._ready["vad"].set()

    def _load_asr(self) -> None:
        try:
            if self._transcriber is None:
                from agent.asr import make_transcriber

                device = "cuda" if str(self.device).startswith("cuda") else "cpu"
                self._transcriber = self._stage(
                    "whisper", lambda: make_transcriber(self.settings.asr, self.settings.asr_model, device)
                )
        finally:
            self._ready["asr"].set()

    def _load_llm(self) -> None:
        try:
            if self._llm is None:
                self._llm = self._stage("llm", self._make_llm)
        finally:
            self._ready["llm"].set()

    def _make_llm(self) -> Any:
        from agent.llm import LocalLLM, make_llm

        s = self.settings
        if s.llm_url:
            return make_llm(s.llm_model, s.llm_url, sampling=self.persona.llm)
        return LocalLLM(s.llm_model, seed=s.seed, sampling=self.persona.llm)

    def _load_csm(self) -> None:
        try:
            if self._sink is None and self._generator is None:
                self.text_only = True  # nothing to play it on: skip the biggest model
                return
            if self._generator is None:
                from csm_engine.errors import CSMError

                s = self.settings
                try:
                    from csm_engine.generator import load_generator

                    def load():
                        generator = load_generator(s.csm_model, mimi_path=s.mimi_path, tokenizer_path=s.tokenizer_path,
                                                   device=self.device, dtype=s.csm_dtype)
                        # On CUDA: capture the frame's graph now rather than in the first reply.
                        generator.prepare(self.persona.temperature, self.persona.topk)
                        return generator

                    self._generator = self._stage("csm", load)
                except CSMError as error:
                    self.text_only = True
                    self._notice("warning", f"speech is off, replies are text only: {error}")
                    return
            self._load_voice()
        finally:
            self._ready["csm"].set()

    def _load_voice(self) -> None:
        """The persona's voice clip as the pinned first context segment (none: a warning).

        A hub clip not yet in the local cache is downloaded on a thread of its own: speech
        starts without it rather than waiting (offline, the hub client retries for ~30 s).
        """
        from csm_engine.errors import CSMError
        from csm_engine.voices import load_voice_segment

        persona = self.persona
        segment = None
        if persona.voice is not None:
            try:
                prompt = persona.voice.resolve(persona.speaker_id)
                try:
                    segment = self._stage("voice", lambda: load_voice_segment(prompt, download=False))
                except CSMError:
                    if not prompt.is_hub_ref:
                        raise
                    self._spawn(lambda: self._download_voice(persona), "voice-download")
            except CSMError as error:
                self._notice("warning", f"persona {persona.name}: voice clip unavailable, the voice may drift: "
                                        f"{error}")
        self._use_voice(persona, segment)

    def _download_voice(self, persona: Any) -> None:
        from csm_engine.errors import CSMError
        from csm_engine.voices import load_voice_segment

        try:
            prompt = persona.voice.resolve(persona.speaker_id)
            segment = self._stage("voice", lambda: load_voice_segment(prompt, download=True))
        except CSMError as error:
            self._notice("warning", f"persona {persona.name}: voice clip unavailable, the voice may drift: {error}")
            return
        self._use_voice(persona, segment)

    def _use_voice(self, persona: Any, segment: Any) -> None:
        with self._lock:
            if self.persona is persona:  # not switched away meanwhile
                self._voice_segment = segment
                self._synth = None  # rebuilt with the new voice at the next sentence

    def _load_watermark(self) -> None:
        if not self.settings.watermark or self._watermarker is not None or self.text_only:
            return
        try:
            from csm_engine.errors import CSMError
            from csm_engine.watermark import load_watermarker
        except ImportError:
            self._notice("warning", "saved agent audio is not watermarked: csm_engine.watermark is unavailable")
            return
        try:
            device = "cuda" if str(self.device).startswith("cuda") else "cpu"
            self._watermarker = self._stage("watermark", lambda: load_watermarker(device=device))
        except CSMError as error:
            self._notice("warning", f"saved agent audio is NOT watermarked ({error}); pass --no-watermark "
                                    "to silence this")

    def _watermark(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        if self._watermarker is None or len(audio) == 0:
            return audio
        return self._watermarker.apply_numpy(audio, sample_rate)

    # ---- capture: source -> VAD -> speech -------------------------------------------------------

    def _detector(self) -> Any:
        return self._ptt if self._mode == "ptt" else self._vad

    def _capture_loop(self) -> None:
        self._ready["audio"].wait()
        self._ready["vad"].wait()
        if self._source is None or self._vad is None:
            return  # no microphone: typed messages only
        if self._paced or self.settings.mic_file:
            self._loaded.wait()  # a file plays once everything is loaded, as a user would wait
            if self.fatal is not None:
                return
            self._source.start()
        last_level = 0.0
        last_partial = 0.0
        detector = self._detector()
        speech_started_at = time.time()
        while not self._stopping.is_set():
            if self._paced and not self._wait_idle():
                break
            try:
                block = self._source.read(timeout=0.2)
            except TimeoutError:
                continue
            if block is None:
                break
            now = time.monotonic()
            if now - last_level >= MIC_LEVEL_INTERVAL_S:
                from agent.audio import rms_dbfs

                self._emit(MicLevel(rms_dbfs(block)))
                last_level = now
            if self._muted:
                block = np.zeros_like(block)
            if self._detector() is not detector:  # mode switched: start the new detector clean
                detector.reset()
                detector = self._detector()
                detector.reset()
            for event in detector.feed(block):
                if event.kind == "speech_start":
                    speech_started_at = time.time()
                    self._on_speech_start()
                else:
                    self._on_speech_end(event, speech_started_at)
            if (detector.speaking and not self.settings.headless and now - last_partial >= PARTIAL_INTERVAL_S
                    and self._speech_q.empty()):
                last_partial = now
                self._speech_q.put(_Partial(detector.current_audio()))
        for event in detector.flush():
            if event.kind == "speech_end":
                self._on_speech_end(event, speech_started_at)
        self.input_over.set()
        self._check_finished()

    def _on_speech_start(self) -> None:
        with self._lock:
            reply = self._current
        if reply is not None and not reply.cancel.is_set():
            self.interrupt()  # the user talks over the agent: barge-in
        self._set_state(AgentState.HEARING)

    def _on_speech_end(self, event: Any, started_at: float) -> None:
        audio = event.audio if event.audio is not None else np.zeros(0, np.float32)
        max_turns = self.settings.max_turns
        if len(audio) < MIN_TURN_S * 16_000 or (max_turns is not None and self.agent_replies >= max_turns):
            self._set_state(AgentState.LISTENING if self._current is None else self.state)
            return
        self._begin_input()
        self._set_state(AgentState.TRANSCRIBING)
        self._speech_q.put(_Speech(audio, time.monotonic(), started_at, time.time()))

    # ---- ASR: speech -> text -----------------------------------------------------------------------

    def _asr_loop(self) -> None:
        while True:
            item = self._speech_q.get()
            if item is _END or self._stopping.is_set():
                return
            self._ready["asr"].wait()
            if self._transcriber is None:
                if isinstance(item, _Speech):
                    self._end_input()
                continue
            if isinstance(item, _Partial):
                if self._speech_q.empty() and len(item.audio) >= 16_000 // 2:
                    text = self._transcriber.transcribe(item.audio).text
                    if text:
                        self._emit(PartialTranscript(text))
                continue
            transcript = self._transcriber.transcribe(item.audio)
            transcript_ms = (time.monotonic() - item.t0) * 1000
            if transcript.is_empty:
                self._end_input()
                if self._current is None:
                    self._set_state(AgentState.LISTENING)
                continue
            self._input_q.put(UserInput(transcript.text, item.audio, item.t0, item.started_at, item.ended_at,
                                        transcript_ms))

    # ---- think: user input -> LLM -> sentences ---------------------------------------------------------

    def _think_loop(self) -> None:
        while True:
            item = self._input_q.get()
            if item is _END or self._stopping.is_set():
                return
            try:
                if isinstance(item, _Replay):
                    self._replay_last_turn()
                else:
                    self._answer(item)
            finally:
                self._end_input()

    def _answer(self, user: UserInput) -> None:
        self._ready["llm"].wait()
        if self._stopping.is_set():
            return
        turn = self.conversation.add_user_turn(user.text, user.audio, 16_000, started_at=user.started_at,
                                               ended_at=user.ended_at, typed=user.typed)
        self._emit(UserTurn(turn.id, turn.text))
        self._save_quietly()
        if self._llm is None:
            self._set_state(AgentState.LISTENING)
            return
        reply = Reply(turn.id + 1, user.t0, user.transcript_ms)
        with self._lock:
            self._current = reply
        self._set_state(AgentState.THINKING)
        from agent.llm import SentenceSplitter

        splitter = SentenceSplitter()
        messages = self.conversation.llm_messages(self.persona.system_prompt)
        try:
            for delta in self._llm.stream_reply(messages, reply.cancel, sampling=self.persona.llm):
                if reply.first_token_ms is None:
                    reply.first_token_ms = (time.monotonic() - reply.t0) * 1000
                if reply.cancel.is_set():
                    break
                for sentence in splitter.feed(delta):
                    self._queue_sentence(reply, sentence)
            if not reply.cancel.is_set():
                for sentence in splitter.flush():
                    self._queue_sentence(reply, sentence)
        except AgentError as error:
            self._notice("error", str(error))
        self._sentence_q.put((reply, _END))
        # One reply at a time: the next user turn waits until this one is spoken (or cut off).
        while not reply.done.wait(0.2):
            if self._stopping.is_set() and not any(t.name == "csm-chat-voice" and t.is_alive() for t in self._threads):
                break

    def _queue_sentence(self, reply: Reply, sentence: str) -> None:
        from agent.speech_text import normalize_for_speech

        spoken = normalize_for_speech(sentence)
        if spoken.strip():
            self._sentence_q.put((reply, (sentence, spoken)))

    # ---- voice: sentences -> CSM -> sink ------------------------------------------------------------

    def _synthesizer(self) -> Any:
        from agent.synthesis import ReplySynthesizer, SynthesisOptions

        with self._lock:
            if self._synth is None or self._synth.voice is not self._voice_segment:
                p = self.persona
                options = SynthesisOptions(
                    temperature=p.temperature, topk=p.topk,
                    max_audio_ms=self.settings.max_audio_ms or p.max_audio_length_ms, seed=self.settings.seed)
                self._synth = ReplySynthesizer(self._generator, self.conversation, self._voice_segment, options,
                                               on_prompt=self._record_prompt)
            return self._synth

    def _record_prompt(self, context: list, prompt: Any) -> None:
        self.prompts.append((context, prompt))
        del self.prompts[:-8]
        if self._on_prompt is not None:
            self._on_prompt(context, prompt)

    def _voice_loop(self) -> None:
        while True:
            item = self._sentence_q.get()
            if item is _END:
                with self._lock:
                    reply = self._current
                if reply is not None and not reply.done.is_set() and not isinstance(reply, _ReplayReply):
                    self._finish_reply(reply)  # stopping mid-reply: record what was said
                return
            reply, payload = item
            if payload is _END:
                self._finish_reply(reply)
                continue
            if reply.cancel.is_set() or self._stopping.is_set():
                continue  # cut off: sentences not yet started are dropped
            self._ready["csm"].wait()
            shown, spoken = payload
            self._speak_sentence(reply, shown, spoken)

    def _speak_sentence(self, reply: Reply, shown: str, spoken: str) -> None:
        from agent.synthesis import SpokenSentence
        from csm_engine.errors import CSMError

        reply.shown.append(shown)
        self._emit(AgentText(reply.turn_id, shown))
        if self.text_only or self._generator is None or self._sink is None:
            reply.spoken.append(SpokenSentence(spoken, np.zeros(0, np.float32), None))
            self._set_state(AgentState.SPEAKING)
            return
        synth = self._synthesizer()
        earlier = [seg for seg in (self._sentence_segment(synth, s) for s in reply.spoken) if seg is not None]
        result: list = []
        seed = None if self.settings.seed is None else self.settings.seed * 1009 + reply.turn_id * 31 + len(reply.spoken)
        stream = synth.stream(spoken, self.conversation.agent_speaker, earlier, cancel=reply.cancel, seed=seed,
                              result=result)
        try:
            for chunk in stream:
                if reply.cancel.is_set():
                    break
                if not reply.wrote_audio:
                    reply.wrote_audio = True
                    reply.sink_start = self._sink.played_samples
                    reply.first_audio_ms = (time.monotonic() - reply.t0) * 1000
                    self._set_state(AgentState.SPEAKING)
                self._sink.write(chunk, CSM_RATE)
                if reply.cancel.is_set():
                    self._sink.stop()  # interrupt() may have run between our check and the write
                    break
        except CSMError as error:
            self._notice("warning", f"could not speak a sentence: {error}")
        finally:
            stream.close()
        reply.spoken.append(result[0] if result else SpokenSentence(spoken, np.zeros(0, np.float32), None))

    def _sentence_segment(self, synth: Any, spoken: Any) -> Any:
        """An earlier sentence of this reply as context (same tensor every time it is used)."""
        if len(spoken.audio) == 0:
            return None
        from csm_engine.tokens import Segment

        if getattr(spoken, "segment", None) is None:
            spoken.segment = Segment(self.conversation.agent_speaker, spoken.text,
                                     synth.remember(spoken.audio, spoken.codes))
        return spoken.segment

    def _finish_reply(self, reply: Reply) -> None:
        """After the last sentence (or a cut): wait for playback, record the turn, save, go back to listening."""
        if reply.done.is_set():
            return
        sink = self._sink
        if reply.wrote_audio and sink is not None and not reply.cancel.is_set():
            sink.flush()
            while not sink.wait_idle(timeout=0.05):
                if reply.cancel.is_set() or self._stopping.is_set():
                    sink.stop()
                    break
        interrupted = reply.cancel.is_set()
        played = None  # None: every started sentence counts (text only)
        if sink is not None and not self.text_only:
            played = (sink.played_samples - reply.sink_start) * CSM_RATE // sink.sample_rate if reply.wrote_audio else 0
        sentences, shown, parts = self._said(reply, played if interrupted else None)
        audio = np.concatenate(parts) if parts and sum(len(p) for p in parts) else None
        turn = self.conversation.add_agent_turn(sentences, audio, text=" ".join(shown), interrupted=interrupted,
                                                started_at=reply.started_at, ended_at=time.time())
        self.agent_replies += 1
        self._emit(AgentTurnDone(turn.id, turn.text, interrupted))
        self._emit(TurnLatency(turn.id, reply.transcript_ms, reply.first_token_ms, reply.first_audio_ms))
        self._save_quietly()
        self.conversation.release_old_audio()
        with self._lock:
            if self._current is reply:
                self._current = None
        reply.done.set()
        if self.settings.max_turns is not None and self.agent_replies >= self.settings.max_turns:
            self.input_over.set()
            if self._source is not None:
                self._source.stop()
        if not self._stopping.is_set():
            self._set_state(AgentState.LISTENING)

    def _said(self, reply: Reply, played: int | None) -> tuple[list[Sentence], list[str], list[np.ndarray]]:
        """The sentences heard (all started ones unless cut off), their written text and audio.

        ``played``: samples (24 kHz) of the reply actually played before a cut; a sentence
        counts as said once its audio began playing, and keeps only the part that played.
        """
        from agent.synthesis import played_prefix

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

    # ---- replay of the last turn ---------------------------------------------------------------------

    def _replay_last_turn(self) -> None:
        turn = self.conversation.last_agent_turn()
        if turn is None:
            self._notice("info", "nothing to replay yet")
            return
        audio = turn.audio
        if audio is None and turn.audio_file and self.conversation.directory is not None:
            from agent.audio import read_wav

            audio, _ = read_wav(self.conversation.directory / turn.audio_file)
        if audio is None or len(audio) == 0 or self._sink is None:
            self._notice("info", "the last reply has no audio to replay (it was text only)")
            return
        reply = _ReplayReply()
        reply.cancel = threading.Event()
        with self._lock:
            self._current = reply
        self._set_state(AgentState.SPEAKING)
        self._sink.write(audio, turn.sample_rate)
        self._sink.flush()
        while not self._sink.wait_idle(timeout=0.05):
            if reply.cancel.is_set() or self._stopping.is_set():
                break
        with self._lock:
            self._current = None
        self._set_state(AgentState.LISTENING)

    # ---- saving ---------------------------------------------------------------------------------------

    def _save_now(self, directory: str | Path | None = None) -> Path:
        if not self.conversation.turns and directory is None:
            return self.save_dir
        target = directory if directory is not None else self.save_dir
        return self.conversation.save(target, watermark=self._watermark)

    def _save_quietly(self) -> None:
        try:
            self._save_now()
        except AgentError as error:
            self._notice("error", str(error))

    def _close_sink(self) -> None:
        sink = self._sink
        if sink is None:
            return
        if self._own_sink_file is not None:
            try:
                sink.close()
            except Exception:
                pass
            from agent.audio import write_wav

            audio = sink.audio()
            try:
                self._own_sink_file.parent.mkdir(parents=True, exist_ok=True)
                write_wav(self._own_sink_file, self._watermark(audio, sink.sample_rate), sink.sample_rate)
            except OSError as error:
                self._notice("error", f"cannot write {self._own_sink_file}: {error.strerror or error}")
        else:
            try:
                sink.close()
            except Exception:
                pass
