"""Model loading: audio devices, VAD, Whisper, the LLM, CSM and its voice, the watermark.

Everything loads on background threads (the small models side by side, CSM last: it is the
biggest and only matters once there is a speaker to feed) and reports ``LoadProgress`` events.
``Models`` holds what was loaded plus one ready-signal per part; a stage waits for the part it
needs and nothing else. A part that cannot load says so in one notice and the agent goes on
without it where it can (no speaker: text only; no CSM weights: text only).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

from agent.audio import AudioSink, AudioSource, MemorySink, open_microphone, open_speaker
from agent.config.personas import Persona
from agent.config.settings import AgentSettings
from agent.conversation.conversation import CSM_RATE
from agent.errors import AgentError
from agent.events import LoadProgress
from agent.listen.asr import Transcriber, make_transcriber
from agent.listen.end_of_turn import build_turn_judge
from agent.listen.text_turn import TextTurn
from agent.listen.vad import SileroModel, VadSettings, VoiceActivityDetector, load_silero_model
from agent.llm.base import ChatLLM, make_llm
from agent.llm.local import LocalLLM
from agent.stages.base import StageContext
from csm_engine.errors import CSMError

if TYPE_CHECKING:  # torch-heavy: imported only when CSM loads
    from agent.speak.remote_voice import RemoteCSM
    from csm_engine.speech import LocalSpeechGenerator, SpeechGenerator
    from csm_engine.tokens import Segment
    from csm_engine.watermark import Watermarker

PARTS = ("audio", "vad", "asr", "llm", "csm")
T = TypeVar("T")


class Models:
    """The loaded parts of one run, each with a ready signal (set also when it failed to load)."""

    def __init__(self, *, source: AudioSource | Literal[False] | None = None, sink: AudioSink | None = None,
                 generator: SpeechGenerator | None = None, llm: ChatLLM | None = None,
                 transcriber: Transcriber | None = None, vad_model: SileroModel | None = None,
                 watermarker: Watermarker | None = None) -> None:
        self.source = source  # False: told not to listen (typed messages only)
        self.sink = sink
        self.own_sink_file: Path | None = None  # --speaker-file: written from the sink at the end
        self.generator = generator
        self.llm = llm
        self.transcriber = transcriber
        self.vad_model = vad_model
        self.vad: VoiceActivityDetector | None = None
        self.text_turn: TextTurn | None = None  # the transcript's end-of-turn evidence (smart turn mode)
        self.chat_context: Callable[[], list[dict]] = list  # the conversation as a reply's prompt begins (think)
        self.watermarker = watermarker
        self.voice: Segment | None = None  # the persona's voice clip, pinned first in CSM's context
        self.adapter: str | None = None  # the csm-finetune adapter merged into the loaded generator
        self.text_only = False
        self.device = "cpu"
        self.ready = {name: threading.Event() for name in PARTS}
        self.loaded = threading.Event()

    def wait(self, part: str) -> None:
        self.ready[part].wait()

    def mark_ready(self, *parts: str) -> Models:
        """Declare parts ready (what a caller passed in needs no loading; tests use this)."""
        for part in parts or PARTS:
            self.ready[part].set()
        return self

    def release_waiters(self) -> None:
        """Wake every stage waiting for a part (the run is stopping)."""
        for ready in self.ready.values():
            ready.set()

    def watermark(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        if self.watermarker is None or len(audio) == 0:
            return audio
        return self.watermarker.apply_numpy(audio, sample_rate)


class ModelLoader:
    """Loads every part of ``models`` that the caller did not pass in; see the module docstring."""

    def __init__(self, ctx: StageContext, models: Models, settings: AgentSettings,
                 persona: Callable[[], Persona], *, paced: bool,
                 on_loaded: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.models = models
        self.settings = settings
        self.persona = persona  # the current persona (it may be switched while loading)
        self.paced = paced  # the mic file waits for the agent: the capture stage starts it
        self.on_loaded = on_loaded

    def start(self) -> threading.Thread:
        return self.ctx.spawn(self._load_all, "load")

    def _load_all(self) -> None:
        from csm_engine.device import resolve_device  # imports torch

        try:
            self.models.device = resolve_device(self.settings.device)
        except CSMError as error:
            raise AgentError(str(error)) from None
        small = [self.ctx.spawn(load, f"{name}-load") for name, load in
                 (("audio", self._load_audio), ("vad", self._load_vad), ("asr", self._load_asr),
                  ("llm", self._load_llm))]
        for thread in small:
            thread.join()
        self._load_csm()
        self._load_watermark()
        self.models.loaded.set()
        if self.on_loaded is not None:
            self.on_loaded()

    def _stage(self, name: str, load: Callable[[], T]) -> T:
        self.ctx.emit(LoadProgress(name, False))
        try:
            return load()
        finally:
            self.ctx.emit(LoadProgress(name, True))

    def _open_device(self, opener: Callable[[int | str | None], T], device: int | str | None,
                     without_it: str) -> T | None:
        """Open a sound device; None (with a warning saying what still works) when there is none.

        Headless runs have no one to read the warning: the AgentError goes up instead.
        """
        try:
            return opener(device)
        except AgentError as error:
            if self.settings.headless:
                raise
            self.ctx.notice("warning", f"{error}; {without_it}")
            return None

    def _load_audio(self) -> None:
        m, s = self.models, self.settings
        try:
            if m.sink is None:
                if s.speaker_file:
                    m.sink = MemorySink(CSM_RATE, speed=1.0 if s.realtime else None)
                    m.own_sink_file = Path(s.speaker_file).expanduser()
                else:
                    m.sink = self._open_device(open_speaker, s.output_device, "replies are shown as text only")
            if m.sink is not None:
                m.sink.start()
            if m.source is False:
                m.source = None
            elif m.source is None:
                m.source = self._open_device(open_microphone, s.input_device, "type your messages instead")
            if m.source is not None and not self.paced and not s.mic_file:
                m.source.start()
        finally:
            m.ready["audio"].set()

    def _load_vad(self) -> None:
        try:
            model = self.models.vad_model or self._stage("vad", load_silero_model)
            judge, notice = self._stage("turn", lambda: build_turn_judge(self.settings.turn_settings()))
            if notice:
                self.ctx.notice("warning", notice)
            m = self.models
            judge.use_text(TextTurn(lambda: m.transcriber, lambda: m.llm, lambda: m.chat_context()))
            self.models.text_turn = judge.text
            self.models.vad = VoiceActivityDetector(VadSettings(end_silence_ms=self.settings.end_silence_ms),
                                                    model=model, end_of_turn=judge)
        finally:
            self.models.ready["vad"].set()

    def _load_asr(self) -> None:
        try:
            if self.models.transcriber is None:
                s = self.settings
                device = "cuda" if str(self.models.device).startswith("cuda") else "cpu"
                self.models.transcriber = self._stage("whisper", lambda: make_transcriber(s.asr, s.asr_model, device))
        finally:
            self.models.ready["asr"].set()

    def _load_llm(self) -> None:
        try:
            if self.models.llm is None:
                self.models.llm = self._stage("llm", self._make_llm)
        finally:
            self.models.ready["llm"].set()

    def _make_llm(self) -> ChatLLM:
        s, sampling = self.settings, self.persona().llm
        if s.llm_url:
            return make_llm(s.llm_model, s.llm_url, sampling=sampling)
        return LocalLLM(s.llm_model, seed=s.seed, sampling=sampling)

    def _load_csm(self) -> None:
        m = self.models
        try:
            if m.sink is None and m.generator is None:
                m.text_only = True  # nothing to play it on: skip the biggest model
                return
            if m.generator is None:
                persona = self.persona()
                make = self._connect_remote if self.settings.tts_url else lambda: self._make_generator(persona)
                try:
                    m.generator = self._stage("csm", make)
                except (CSMError, AgentError) as error:
                    m.text_only = True
                    self.ctx.notice("warning", f"speech is off, replies are text only: {error}")
                    return
            self.load_voice(self.persona())
        finally:
            m.ready["csm"].set()

    def adapter_for(self, persona: Persona) -> str | None:
        """The adapter CSM speaks with for ``persona``: --adapter / config first, else the persona's."""
        return self.settings.adapter or persona.adapter_path()

    def _make_generator(self, persona: Persona) -> LocalSpeechGenerator:
        from csm_engine.speech import load_speech_generator  # imports torch (and MLX with --engine mlx)

        s = self.settings
        adapter = self.adapter_for(persona)
        generator = load_speech_generator(s.engine, s.csm_model, mimi_path=s.mimi_path,
                                          tokenizer_path=s.tokenizer_path, device=self.models.device,
                                          dtype=s.csm_dtype, adapter=adapter)
        # On CUDA: capture the frame's graph now rather than in the first reply.
        generator.prepare(persona.temperature, persona.topk)
        self.models.adapter = adapter
        return generator

    def _connect_remote(self) -> RemoteCSM:
        """--tts-url: a csm-serve speaks for the agent (AgentError when it cannot be reached)."""
        from agent.speak.remote_voice import RemoteCSM  # imports torch (prompts are built here)
        from csm_engine.serve.wire import API_KEY_ENV

        remote = RemoteCSM(self.settings.tts_url, api_key=os.environ.get(API_KEY_ENV) or None)
        if self.persona().topk > remote.max_topk:
            raise AgentError(f"persona {self.persona().name}: topk {self.persona().topk} is above the limit of "
                             f"csm-serve at {remote.url} ({remote.max_topk}); lower topk in the persona")
        return remote

    def switch_persona(self, persona: Persona) -> None:
        """Load what ``persona`` speaks with: its voice clip, and CSM again if its adapter differs.

        Adapters are merged into the weights at load time, so another adapter is another model;
        until it is loaded the current one keeps speaking.
        """
        m = self.models
        if (m.generator is not None and self.adapter_for(persona) != m.adapter and not m.text_only
                and not self.settings.tts_url):
            try:
                generator = self._stage("csm", lambda: self._make_generator(persona))
            except CSMError as error:
                self.ctx.notice("warning", f"persona {persona.name}: its adapter could not be loaded, "
                                           f"speaking without it: {error}")
            else:
                if self.persona() is persona:
                    m.generator = generator
        self.load_voice(persona)

    def load_voice(self, persona: Persona) -> None:
        """The persona's voice clip as the pinned first context segment (none: a warning).

        A hub clip not yet in the local cache is downloaded on a thread of its own: speech
        starts without it rather than waiting (offline, the hub client retries for ~30 s).
        """
        from csm_engine.voices import load_voice_segment  # imports torch

        segment = None
        if persona.voice is not None:
            try:
                prompt = persona.voice.resolve(persona.speaker_id)
                try:
                    segment = self._stage("voice", lambda: load_voice_segment(prompt, download=False))
                except CSMError:
                    if not prompt.is_hub_ref:
                        raise
                    self.ctx.spawn(lambda: self._download_voice(persona), "voice-download")
            except CSMError as error:
                self._voice_unavailable(persona, error)
        self._use_voice(persona, segment)

    def _download_voice(self, persona: Persona) -> None:
        from csm_engine.voices import load_voice_segment  # imports torch

        try:
            prompt = persona.voice.resolve(persona.speaker_id)
            segment = self._stage("voice", lambda: load_voice_segment(prompt, download=True))
        except CSMError as error:
            self._voice_unavailable(persona, error)
            return
        self._use_voice(persona, segment)

    def _voice_unavailable(self, persona: Persona, error: CSMError) -> None:
        self.ctx.notice("warning", f"persona {persona.name}: voice clip unavailable, the voice may drift: {error}")

    def _use_voice(self, persona: Persona, segment: Segment | None) -> None:
        if self.persona() is persona:  # not switched away meanwhile
            self.models.voice = segment

    def _load_watermark(self) -> None:
        m = self.models
        if not self.settings.watermark or m.watermarker is not None or m.text_only:
            return
        try:
            from csm_engine.watermark import load_watermarker  # imports torch and silentcipher
        except ImportError:
            self.ctx.notice("warning", "saved agent audio is not watermarked: csm_engine.watermark is unavailable")
            return
        try:
            device = "cuda" if str(m.device).startswith("cuda") else "cpu"
            m.watermarker = self._stage("watermark", lambda: load_watermarker(device=device))
        except CSMError as error:
            self.ctx.notice("warning", f"saved agent audio is NOT watermarked ({error}); pass --no-watermark "
                                       "to silence this")
