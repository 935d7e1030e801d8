"""Every csm-chat option in one dataclass, with defaults from the user's config file.

Precedence: built-in defaults < ``config.toml`` in the user's config dir (or ``--config``) <
command-line flags (``agent.config.file.load_settings``). Settings are frozen: a change at run
time is a new instance (``with_changes``) handed to the part that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from agent.echo.canceller import check_aec_mode
from agent.echo.room_spec import load_room
from agent.errors import AgentError
from agent.listen.end_of_turn import TurnSettings

DEFAULT_CSM_MODEL = "sesame/csm-1b"
ASR_ENGINES = ("faster-whisper", "openai-whisper")
ENGINES = ("auto", "torch", "mlx")  # csm_engine.speech.ENGINES (not imported: it would load numpy first)
MODES = ("vad", "ptt")


@dataclass(frozen=True)
class AgentSettings:
    """Options of one csm-chat run (paths as strings; None = the embedded or automatic default)."""

    # models
    csm_model: str = DEFAULT_CSM_MODEL  # checkpoint dir (make-checkpoint layout) or hub repo id
    mimi_path: str | None = None
    tokenizer_path: str | None = None
    csm_dtype: str | None = None  # a csm_engine.precision.PRECISIONS name; None = engine default
    adapter: str | None = None  # csm-finetune output merged into CSM; None = the persona's (if any)
    llm_model: str | None = None  # GGUF path; None = embedded SmolLM2-135M-Instruct
    llm_url: str | None = None  # OpenAI-compatible server instead of the in-process model
    tts_url: str | None = None  # a csm-serve that speaks for the agent instead of the in-process CSM
    asr: str = "faster-whisper"
    asr_model: str | None = None  # None = embedded tiny.en (faster-whisper) / base.en (openai-whisper)
    device: str = "auto"  # torch device for CSM (and Whisper on CUDA): auto | cpu | cuda[:N] | mps
    engine: str = "auto"  # what runs CSM: torch | mlx | auto (MLX on Apple Silicon, torch elsewhere)
    # who the agent is
    persona: str = "default"  # name of a persona file or a path to one
    seed: int | None = None
    max_audio_ms: int | None = None  # cap on one agent sentence's audio (overrides the persona's)
    # audio
    input_device: int | str | None = None
    output_device: int | str | None = None
    mic_file: str | None = None  # WAV played into the agent as if spoken live
    speaker_file: str | None = None  # WAV that receives everything the agent says
    realtime: bool = True  # play mic_file in real time (False: as fast as the pipeline takes it)
    mode: str = "vad"  # "vad" (hands-free) | "ptt" (push-to-talk)
    end_silence_ms: int = 600  # pause that ends a user turn (VAD; with turn = "silence" or no model)
    turn: str = "smart"  # end of a hands-free turn: "smart" (text + audio models) | "audio" | "silence" (fixed pause)
    turn_threshold: float = 0.5  # P(done) from the end-of-turn model that ends a turn
    turn_max_silence_ms: int = 2000  # smart: a pause this long ends the turn whatever the model says
    room: str | None = None  # a simulated room (preset name or .toml) between speaker and mic
    aec: str = "auto"  # echo cancellation: auto | on | off
    # session
    save_dir: str | None = None  # conversation directory, saved after every turn
    headless: bool = False
    max_turns: int | None = None  # stop after this many agent replies
    watermark: bool = True  # watermark agent audio written to disk (CSM's public key)
    # tools and memory (agent.tools, agent.memory)
    tools: bool = False  # the built-in tools for personas that do not choose (off unless turned on)
    tool_mode: str = "auto"  # auto | native | constrained (agent.llm.tool_calling)
    memory: str = "on"  # on | off: remember facts and conversation summaries across conversations
    mcp: dict | None = None  # [mcp.NAME] tables: MCP servers a persona may use (agent.tools.config)
    config_path: str | None = None  # where the defaults came from (for messages)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise AgentError (one line, with the fix) for an option value that cannot work."""
        if self.asr not in ASR_ENGINES:
            raise AgentError(f"unknown ASR engine {self.asr!r}: use one of {', '.join(ASR_ENGINES)}")
        if self.mode not in MODES:
            raise AgentError(f"unknown mode {self.mode!r}: use 'vad' (hands-free) or 'ptt' (push-to-talk)")
        if self.max_turns is not None and self.max_turns < 1:
            raise AgentError(f"--max-turns must be at least 1, got {self.max_turns}")
        if self.max_audio_ms is not None and self.max_audio_ms < 80:
            raise AgentError(f"max audio length must be at least 80 ms (one frame), got {self.max_audio_ms}")
        if self.tts_url is not None and not self.tts_url.strip().startswith(("http://", "https://")):
            raise AgentError(f"--tts-url must start with http:// or https://, got {self.tts_url!r}")
        if self.engine not in ENGINES:
            raise AgentError(f"unknown engine {self.engine!r}: use torch, mlx or auto (MLX on Apple Silicon, "
                             "torch elsewhere)")
        if self.end_silence_ms < 32:
            raise AgentError(f"end_silence_ms must be at least 32, got {self.end_silence_ms}")
        if self.aec != "auto":
            check_aec_mode(self.aec)
        if self.room is not None:
            load_room(self.room)  # a bad room file fails here, in one line, before anything loads
        self.turn_settings()  # validates turn, turn_threshold, turn_max_silence_ms
        from agent.llm.tool_calling import TOOL_MODES
        from agent.tools.config import parse_mcp_servers

        if self.tool_mode not in TOOL_MODES:
            raise AgentError(f"unknown tool mode {self.tool_mode!r}: use one of {', '.join(TOOL_MODES)}")
        if self.memory not in ("on", "off"):
            raise AgentError(f"--memory must be on or off, got {self.memory!r}")
        parse_mcp_servers(self.mcp, self.config_path or "settings")  # a bad [mcp.NAME] table fails here

    def turn_settings(self) -> TurnSettings:
        """The end-of-turn rule these options ask for (AgentError when they cannot work)."""
        return TurnSettings(mode=self.turn, threshold=self.turn_threshold,
                            max_silence_ms=self.turn_max_silence_ms, end_silence_ms=self.end_silence_ms)

    def with_changes(self, **changes: Any) -> AgentSettings:
        """A copy with some options replaced (validated)."""
        return replace(self, **changes)
