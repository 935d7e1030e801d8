"""A failing stage never hangs the agent (issue #23): the turn ends, what was said is saved.

Headless, the run ends as failed at once (non-zero exit from the CLI) with a valid saved
conversation; in the app, the failure is one notice and the next turn is answered. Each stage
is broken through a real code path where one exists: capture reads a block its source cannot
convert, the VAD model file is a foreign ONNX model (it loads, and fails on the first window),
the LLM server is killed in the middle of a reply, CSM's checkpoint has a corrupt tokenizer
(a token id past the model's embeddings). Whisper has no input that makes it raise
mid-run, so for transcribe the real transcriber is subclassed to raise once.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _serve_helpers import LlamaServer
from _stage_helpers import EventLog
from textual.widgets import Input

from agent.audio import MemorySink, QueueSource, load_audio
from agent.config.settings import AgentSettings
from agent.conversation.conversation import Conversation
from agent.errors import AgentError
from agent.events import AgentState, AgentTurnDone, UserTurn
from agent.listen.asr import FasterWhisperTranscriber
from agent.pipeline import Pipeline
from agent.tui.app import CsmChatApp
from agent.tui.widgets import StateIndicator

pytestmark = pytest.mark.e2e
TIMEOUT_S = 240.0
QUESTION = "what is the capital of france"
LONG_PERSONA = ('name = "Teller"\nspeaker_id = 0\nmax_audio_length_ms = 480\n'
                'system_prompt = "You tell long stories."\n[llm]\nmax_tokens = 400\ntemperature = 0.0\n')


def _settings(tmp_path: Path, persona: Path | str, **changes) -> AgentSettings:
    values = dict(csm_model="unused", persona=str(persona), save_dir=str(tmp_path / "saved"), headless=True,
                  watermark=False, seed=7, device="cpu", turn="silence")
    values.update(changes)
    return AgentSettings(**values)


def _spoken(espeak_wav, text: str = QUESTION) -> np.ndarray:
    return load_audio(espeak_wav(text), 16_000)


def _speak_into(source: QueueSource, audio: np.ndarray) -> None:
    silence = np.zeros(16_000, np.float32)
    source.push(np.concatenate([silence[:8000], audio, silence, silence]))


def _until_it_fails(pipeline: Pipeline, timeout: float = TIMEOUT_S) -> float:
    """Wait for the run's first stage failure, stop the pipeline as the CLI does; seconds from failure to stopped."""
    deadline = time.monotonic() + timeout
    while not pipeline.ctx.failures:
        assert time.monotonic() < deadline, "no stage failed"
        assert not pipeline.finished.is_set() or pipeline.ctx.failures, "the run ended without a failure"
        time.sleep(0.01)
    failed = time.monotonic()
    assert pipeline.finished.wait(5), "the run did not end after the failure"
    pipeline.stop()
    return time.monotonic() - failed


def _saved(pipeline: Pipeline) -> Conversation:
    json.loads((pipeline.save_dir / "conversation.json").read_text(encoding="utf-8"))  # whole, valid JSON
    return Conversation.load(pipeline.save_dir)


def _check_headless_failure(pipeline: Pipeline, stage: str, seconds: float) -> Conversation:
    assert pipeline.fatal is not None
    if stage != "think":  # the LLM's own error says what happened
        assert f"the {stage} stage failed" in str(pipeline.fatal), pipeline.fatal
    assert len(pipeline.ctx.failures) == 1, pipeline.ctx.failures
    print(f"the {stage} stage failed; {seconds:.2f} s later the pipeline had stopped and saved")
    # Well under a second on a quiet machine; the margin is for 2 cores shared with other test runs.
    assert seconds < 2.0, f"{seconds:.2f} s from the failure to a stopped, saved pipeline"
    return _saved(pipeline)


def _answered_first(tmp_path, persona, *, tiny_generator, llm, transcriber, vad_model=None
                    ) -> tuple[Pipeline, QueueSource, EventLog]:
    """A headless pipeline on a microphone fed by the test, after one typed question was answered."""
    source, events = QueueSource(16_000), EventLog()
    pipeline = Pipeline(_settings(tmp_path, persona), events, source=source, sink=MemorySink(24_000, speed=None),
                        generator=tiny_generator, llm=llm, transcriber=transcriber, vad_model=vad_model)
    pipeline.start()
    pipeline.wait_ready(TIMEOUT_S)
    pipeline.submit_text(QUESTION)
    events.wait_for(lambda: events.of(AgentTurnDone), "the answer to the typed question", TIMEOUT_S)
    return pipeline, source, events


def _check_first_exchange_saved(pipeline: Pipeline, seconds: float, stage: str) -> None:
    saved = _check_headless_failure(pipeline, stage, seconds)
    assert [t.role for t in saved.turns] == ["user", "agent"] and saved.turns[1].text
    assert not saved.turns[1].interrupted


# ---- one failure per stage, headless ------------------------------------------------------------


def test_capture_failure_ends_the_run_with_the_conversation_saved(tmp_path, chat_persona, tiny_generator,
                                                                 smollm2_llm, faster_whisper_tiny):
    pipeline, source, _ = _answered_first(tmp_path, chat_persona, tiny_generator=tiny_generator, llm=smollm2_llm,
                                          transcriber=faster_whisper_tiny)
    source.push(np.zeros((4, 4, 4), np.float32))  # a block no microphone gives: the source cannot convert it
    _check_first_exchange_saved(pipeline, _until_it_fails(pipeline), "capture")


def test_turn_failure_ends_the_run_with_the_conversation_saved(tmp_path, chat_persona, espeak_wav, tiny_generator,
                                                              smollm2_llm, faster_whisper_tiny):
    from agent.embedded import smart_turn_onnx
    from agent.listen.silero import SileroModel

    # A foreign ONNX file where the VAD model should be: it loads, and fails on the first window it hears.
    vad = SileroModel(smart_turn_onnx(), "onnx")
    pipeline, source, _ = _answered_first(tmp_path, chat_persona, tiny_generator=tiny_generator, llm=smollm2_llm,
                                          transcriber=faster_whisper_tiny, vad_model=vad)
    _speak_into(source, _spoken(espeak_wav))
    _check_first_exchange_saved(pipeline, _until_it_fails(pipeline), "turn")


class _TranscriberThatFailsOnce(FasterWhisperTranscriber):
    """The real Whisper, but its first transcription raises (as a broken CTranslate2 build would)."""

    failed = False

    def transcribe(self, audio):
        if not self.failed:
            self.failed = True
            raise RuntimeError("CTranslate2: out of memory")
        return super().transcribe(audio)


def test_transcribe_failure_ends_the_run_with_the_conversation_saved(tmp_path, chat_persona, espeak_wav,
                                                                    tiny_generator, smollm2_llm):
    pipeline, source, _ = _answered_first(tmp_path, chat_persona, tiny_generator=tiny_generator, llm=smollm2_llm,
                                          transcriber=_TranscriberThatFailsOnce())
    _speak_into(source, _spoken(espeak_wav))
    _check_first_exchange_saved(pipeline, _until_it_fails(pipeline), "transcribe")


def test_think_failure_llm_server_killed_mid_reply_keeps_what_was_said(tmp_path, tiny_generator, faster_whisper_tiny):
    persona = tmp_path / "teller.toml"
    persona.write_text(LONG_PERSONA, encoding="utf-8")
    server = LlamaServer().start()
    try:
        events = EventLog()
        pipeline = Pipeline(_settings(tmp_path, persona, llm_url=server.url), events, source=False,
                            sink=MemorySink(24_000, speed=None), generator=tiny_generator,
                            transcriber=faster_whisper_tiny)
        pipeline.start()
        pipeline.wait_ready(TIMEOUT_S)
        pipeline.submit_text("Tell me a long story about a cat who travels around the world.")
        events.wait_for(lambda: pipeline.sink.played_samples > 0, "the first sentence to play", TIMEOUT_S)
        server.kill()  # the LLM server dies in the middle of the reply
        seconds = _until_it_fails(pipeline)
    finally:
        server.kill()
    assert "stopped in the middle of the reply" in str(pipeline.fatal)
    saved = _check_headless_failure(pipeline, "think", seconds)
    assert [t.role for t in saved.turns] == ["user", "agent"]
    agent = saved.turns[1]
    assert agent.interrupted and agent.text  # what was said before the server died


@pytest.fixture(scope="module")
def corrupt_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with a corrupt tokenizer.json: "." has an id past the model's 512 text
    embeddings. It loads; the first sentence the agent says (prompts end with ".") fails inside CSM."""
    from csm_engine.weights import TOKENIZER_FILE

    out = tmp_path_factory.mktemp("corrupt_checkpoint")
    for item in Path(tiny_checkpoint).iterdir():
        if item.name != TOKENIZER_FILE:
            (out / item.name).symlink_to(item)
    tokenizer = json.loads((Path(tiny_checkpoint) / TOKENIZER_FILE).read_text(encoding="utf-8"))
    tokenizer["model"]["vocab"]["."] = 4000
    (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer), encoding="utf-8")
    return out


def test_voice_failure_exits_non_zero_with_the_conversation_saved_and_the_traceback_logged(
        tmp_path, corrupt_checkpoint, chat_persona, spoken_turns_wav):
    log_file = tmp_path / "csm-chat.log"
    args = [str(Path(sys.executable).with_name("csm-chat")), "--headless", "--csm-model", str(corrupt_checkpoint),
            "--persona", str(chat_persona), "--mic-file", str(spoken_turns_wav([QUESTION])), "--fast",
            "--speaker-file", str(tmp_path / "agent.wav"), "--save", str(tmp_path / "saved"), "--no-watermark",
            "--seed", "5", "--device", "cpu", "--turn", "silence", "--log-file", str(log_file)]
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    exited = datetime.datetime.now()
    assert result.returncode == 2, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if "voice stage failed" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("csm-chat: "), result.stderr[-3000:]
    saved = Conversation.load(tmp_path / "saved")
    assert [t.role for t in saved.turns] == ["user", "agent"] and "capital" in saved.turns[0].text.lower()
    logged = log_file.read_text(encoding="utf-8")
    assert "the voice stage failed" in logged and "Traceback (most recent call last)" in logged
    failed_line = next(line for line in logged.splitlines() if "the voice stage failed" in line)
    failed = datetime.datetime.strptime(failed_line[:23], "%Y-%m-%d %H:%M:%S,%f")
    seconds = (exited - failed).total_seconds()
    print(f"csm-chat exited {seconds:.2f} s after the voice stage failed")
    # Saved within ~0.1 s (the in-process tests), then ``agent.cli.entry`` exits without the interpreter's
    # teardown of torch, ONNX Runtime and llama.cpp (1.5-3.5 s here before it did). The issue asks for a second.
    assert seconds < 1.0, f"csm-chat exited {seconds:.2f} s after the failure"


# ---- in the app: one notice, and the next turn is answered ---------------------------------------


def test_app_shows_the_failure_and_answers_the_next_turn(tmp_path, tiny_generator, faster_whisper_tiny):
    asyncio.run(_app_failure_then_next_turn(tmp_path, tiny_generator, faster_whisper_tiny))


async def _app_failure_then_next_turn(tmp_path, tiny_generator, faster_whisper_tiny) -> None:
    persona = tmp_path / "teller.toml"
    persona.write_text(LONG_PERSONA, encoding="utf-8")
    server = LlamaServer().start()
    events = EventLog()

    def pipeline(settings, emit):
        def both(event):
            events(event)
            emit(event)
        return Pipeline(settings, both, source=False, sink=MemorySink(24_000, speed=None), generator=tiny_generator,
                        transcriber=faster_whisper_tiny)

    app = CsmChatApp(_settings(tmp_path, persona, llm_url=server.url, headless=False), pipeline_factory=pipeline,
                     personas=lambda: [])
    try:
        async with app.run_test(size=(120, 36)) as pilot:
            await _until(pilot, lambda: app.query_one(StateIndicator).state == AgentState.LISTENING, "loading")
            await _type(pilot, app, "Tell me a long story about a cat who travels around the world.")
            await _until(pilot, lambda: app.pipeline.sink.played_samples > 0, "the first sentence to play")
            server.kill()
            await _until(pilot, lambda: events.of(AgentTurnDone), "the end of the cut turn")
            await _until(pilot, lambda: _errors(app), "the failure's notice")
            errors = _errors(app)
            assert len(errors) == 1 and "stopped in the middle of the reply" in errors[0].message
            assert events.of(AgentTurnDone)[0].interrupted
            server.start()  # the server is back: the conversation goes on
            await _type(pilot, app, "What is the capital of France?")
            await _until(pilot, lambda: len(events.of(AgentTurnDone)) == 2, "the next reply")
            assert not events.of(AgentTurnDone)[1].interrupted and events.of(AgentTurnDone)[1].text
            await pilot.pause(0.2)
            assert len(events.of(UserTurn)) == 2 and len(_errors(app)) == 1
    finally:
        server.kill()


def test_app_shows_a_transcribe_failure_and_answers_the_next_spoken_turn(tmp_path, chat_persona, espeak_wav,
                                                                         tiny_generator, smollm2_llm):
    asyncio.run(_app_transcribe_failure(tmp_path, chat_persona, espeak_wav, tiny_generator, smollm2_llm))


async def _app_transcribe_failure(tmp_path, chat_persona, espeak_wav, tiny_generator, smollm2_llm) -> None:
    source, events = QueueSource(16_000), EventLog()

    def pipeline(settings, emit):
        def both(event):
            events(event)
            emit(event)
        return Pipeline(settings, both, source=source, sink=MemorySink(24_000, speed=None), generator=tiny_generator,
                        llm=smollm2_llm, transcriber=_TranscriberThatFailsOnce())

    app = CsmChatApp(_settings(tmp_path, chat_persona, headless=False), pipeline_factory=pipeline, personas=lambda: [])
    async with app.run_test(size=(120, 36)) as pilot:
        await _until(pilot, lambda: app.query_one(StateIndicator).state == AgentState.LISTENING, "loading")
        _speak_into(source, _spoken(espeak_wav))  # Whisper fails on this turn
        await _until(pilot, lambda: _errors(app), "the failure's notice")
        await pilot.pause(0.5)
        errors = _errors(app)
        assert len(errors) == 1, [n.message for n in app.notices]
        assert "the transcribe stage failed: RuntimeError: CTranslate2: out of memory" in errors[0].message
        # The failed transcription may be the turn's or a partial one's (then the turn is still answered).
        await _until(pilot, lambda: app.pipeline.ctx.replies.current is None and not app.pipeline.ctx.progress.busy
                     and app.query_one(StateIndicator).state == AgentState.LISTENING, "listening again")
        _speak_into(source, _spoken(espeak_wav, "tell me about the weather today"))
        await _until(pilot, lambda: any("weather" in u.text.lower() for u in events.of(UserTurn))
                     and len(events.of(AgentTurnDone)) == len(events.of(UserTurn)), "the answer to the next turn")
        assert events.of(AgentTurnDone)[-1].text and not events.of(AgentTurnDone)[-1].interrupted
        assert len(_errors(app)) == 1


def _errors(app) -> list:
    return [n for n in app.notices if n.level == "error"]


async def _type(pilot, app, text: str) -> None:
    app.query_one("#message", Input).value = text
    await pilot.press("enter")


async def _until(pilot, condition, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)


# ---- logging (issue #22) --------------------------------------------------------------------------


def test_verbose_prints_debug_lines_and_the_log_file_is_named_in_help(tmp_path, monkeypatch):
    csm_chat = str(Path(sys.executable).with_name("csm-chat"))
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state")}
    quiet = subprocess.run([csm_chat, "--list-personas"], capture_output=True, text=True, timeout=60, env=env)
    loud = subprocess.run([csm_chat, "-v", "--list-personas"], capture_output=True, text=True, timeout=60, env=env)
    assert quiet.returncode == loud.returncode == 0, loud.stderr
    assert "DEBUG" not in quiet.stderr
    assert "DEBUG agent.cli: csm-chat -v --list-personas" in loud.stderr
    default_log = tmp_path / "state" / "csm-chat" / "log" / "csm-chat.log"
    assert default_log.is_file()  # the default log exists once csm-chat ran, ready to attach
    from agent.cli import build_parser

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    shown = " ".join(build_parser().format_help().split()).replace("- ", "-")  # argparse wraps at hyphens too
    assert str(default_log) in shown


def _broken_pipeline(settings, emit):
    raise AgentError("no pipeline in this test")


def test_app_shows_a_warning_logged_from_a_worker_thread():
    asyncio.run(_app_shows_a_logged_warning())


async def _app_shows_a_logged_warning() -> None:
    app = CsmChatApp(AgentSettings(), pipeline_factory=_broken_pipeline, personas=lambda: [])
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        worker = threading.Thread(target=lambda: logging.getLogger("agent.memory.store").warning(
            "the memory store is nearly full"))
        worker.start()
        worker.join()
        await _until(pilot, lambda: app.notices, "the warning as a notice", 10)
        assert [(n.level, n.message) for n in app.notices] == [("warning", "the memory store is nearly full")]
        assert any("nearly full" in str(n.message) for n in app._notifications)
    logging.getLogger("agent.memory.store").warning("after the app")  # its handler is gone with it
    assert len(app.notices) == 1
