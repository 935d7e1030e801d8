"""Think: a user input -> the LLM's reply, cut into speakable sentences as it streams.

For each ``UserInput`` the stage records the user's turn (and saves), starts a ``Reply`` (the
one cancel signal of that reply), streams the LLM, splits its deltas into sentences
(``SentenceSplitter``), normalizes each for speech and sends ``AgentSentence`` frames to the
voice stage as soon as each sentence ends, then ``EndOfReply``. One reply at a time: the next
input waits until this reply has been spoken or cut off. A ``ReplayRequest`` plays the last
agent turn's audio again, as a reply that records nothing. An ``EarlyInput`` (the user's words
at a pause the judge is not sure ends the turn) starts the reply ahead, unspoken
(``agent.stages.early_reply``); the real input uses it when its prompt is the same.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agent.audio import read_wav
from agent.config.personas import Persona
from agent.conversation.conversation import Conversation
from agent.conversation.saving import ConversationSaver
from agent.errors import AgentError
from agent.events import AgentState, UserTurn
from agent.frames import (
    AgentSentence,
    Announcement,
    EarlyInput,
    EndOfReply,
    Frame,
    ReplayAudio,
    ReplayRequest,
    Reply,
    UserInput,
)
from agent.speak.sentences import SentenceSplitter
from agent.speak.speech_text import normalize_for_speech
from agent.stages.base import FrameSink, Stage, StageContext
from agent.stages.early_reply import EarlyReply, EarlyServed, prompt_with
from agent.stages.loading import Models

if TYPE_CHECKING:
    from agent.tools.assist import ThinkAssist


class ThinkStage(Stage):
    """See the module docstring. ``persona`` is handed over with ``use_persona``."""

    name = "think"

    def __init__(self, ctx: StageContext, downstream: FrameSink, models: Models, conversation: Conversation,
                 persona: Persona, saver: ConversationSaver | None = None) -> None:
        super().__init__(ctx, downstream)
        self.models = models
        self.conversation = conversation
        self.persona = persona
        self.saver = saver
        self.assist: ThinkAssist | None = None  # tools and memory (agent.tools.assist), set by the pipeline
        # what the end-of-turn text evidence is scored after: the replies' prompt, so llama.cpp reuses it
        models.chat_context = lambda: self.conversation.llm_messages(self.persona.system_prompt)

    def use_persona(self, persona: Persona) -> None:
        """From the next reply on, answer as ``persona`` (its system prompt and LLM sampling)."""
        self.persona = persona

    def process(self, frame: Frame) -> None:
        if isinstance(frame, EarlyInput):  # not a user input of its own: nothing to count as answered
            self._start_early(frame.text)
            return
        try:
            match frame:
                case UserInput() as user:
                    self._answer(user)
                case ReplayRequest():
                    self._replay_last_turn()
                case Announcement(text=text):
                    self._announce(text)
                case _:
                    raise TypeError(f"the think stage does not take {type(frame).__name__}")
        finally:
            self.ctx.progress.end_input()

    def after_failure(self, frame: Frame) -> None:
        """After a failure mid-reply (it is cancelled): close it, so the voice stage records what was said."""
        reply = self.ctx.replies.current
        if reply is not None and not reply.done.is_set():
            self._finish(reply)

    def _answer(self, user: UserInput) -> None:
        self.models.wait("llm")
        if self.ctx.stopping.is_set():
            return
        turn = self.conversation.add_user_turn(user.text, user.audio, 16_000, started_at=user.started_at,
                                               ended_at=user.ended_at, typed=user.typed)
        self.ctx.emit(UserTurn(turn.id, turn.text))
        if self.saver is not None:
            self.saver.save_quietly()
        llm = self.models.llm
        if llm is None:
            self.ctx.set_state(AgentState.LISTENING)
            return
        persona = self.persona
        reply = Reply(turn.id + 1, user.t0, user.transcript_ms, user.turn_end_ms)
        self.ctx.replies.begin(reply)
        self.ctx.set_state(AgentState.THINKING)
        splitter = SentenceSplitter()
        early = self.models.text_turn.take_early() if self.models.text_turn is not None else None
        answering = EarlyServed(llm, early) if early is not None else llm  # the early start, if it fits
        if self.assist is not None:
            messages = self.assist.messages(self.conversation, persona, user.text)
            deltas = self.assist.deltas(answering, messages, reply, persona, user.text)
        else:
            messages = self.conversation.llm_messages(persona.system_prompt)
            deltas = answering.stream_reply(messages, reply.cancel, sampling=persona.llm)
        try:
            for delta in deltas:
                if reply.first_token_ms is None:
                    reply.first_token_ms = reply.since_start_ms()
                if reply.cancelled:
                    break
                for sentence in splitter.feed(delta):
                    self._send_sentence(reply, sentence)
            if not reply.cancelled:
                for sentence in splitter.flush():
                    self._send_sentence(reply, sentence)
        except AgentError as error:  # the LLM failed mid-reply: the turn ends with what was said
            self.ctx.turn_failed(str(error), error)
        self._finish(reply)
        if self.assist is not None:
            self.assist.after_reply(self.conversation, llm)

    def _start_early(self, text: str) -> None:
        """Start the reply to ``text`` (the user's words at a pause) before the turn is judged over,
        when nothing else is being answered and the real reply's prompt can be built now
        (``agent.stages.early_reply``): not with tools, nor when memory changes with the reply."""
        llm, text_turn = self.models.llm, self.models.text_turn
        if llm is None or text_turn is None or self.ctx.replies.current is not None:
            return
        persona = self.persona
        if self.assist is not None:
            if not self.assist.early_start_fits(text):
                return
            messages = self.assist.messages(self.conversation, persona, text)
        else:
            messages = self.conversation.llm_messages(persona.system_prompt)
        text_turn.started_early(EarlyReply.start(llm, prompt_with(messages, text), persona.llm), text)

    def _announce(self, text: str) -> None:
        """Say ``text`` unasked (a timer that is due), as a reply of its own."""
        reply = Reply(self.conversation.next_id(), time.monotonic())
        self.ctx.replies.begin(reply)
        self._send_sentence(reply, text)
        self._finish(reply)

    def _send_sentence(self, reply: Reply, sentence: str) -> None:
        spoken = normalize_for_speech(sentence)
        if spoken.strip():
            self.push(AgentSentence(reply, sentence, spoken))

    def _finish(self, reply: Reply) -> None:
        """Close the reply downstream, then wait until it is spoken or cut off (one reply at a time)."""
        self.push(EndOfReply(reply))
        downstream_alive = isinstance(self.downstream, Stage) and self.downstream.alive
        while not reply.done.wait(0.2):
            if self.ctx.stopping.is_set() and not (downstream_alive and self.downstream.alive):
                break

    def _replay_last_turn(self) -> None:
        turn = self.conversation.last_agent_turn()
        if turn is None:
            self.ctx.notice("info", "nothing to replay yet")
            return
        audio = turn.audio
        if audio is None and turn.audio_file and self.conversation.directory is not None:
            audio, _ = read_wav(self.conversation.directory / turn.audio_file)
        if audio is None or len(audio) == 0 or self.models.sink is None:
            self.ctx.notice("info", "the last reply has no audio to replay (it was text only)")
            return
        reply = Reply(turn.id, 0.0, replay=True)
        self.ctx.replies.begin(reply)
        self.push(ReplayAudio(reply, audio, turn.sample_rate))
        self._finish(reply)
