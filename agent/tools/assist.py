"""What the think stage asks of tools and memory for one reply (kept out of the stage itself).

``ThinkAssist.messages`` builds the LLM's prompt: the persona's system prompt (plus the tool rules
when tools are on), the memories relevant to what the user just said, the summary of folded
turns, then the recent turns. ``ThinkAssist.deltas`` streams the reply: with tools, calls and
results are shown (``ToolUse`` events) and kept on the reply (saved in ``conversation.json``),
a tool still running after ~1 s makes the agent say a short filler, and a tool that needs the
user's yes ends the reply with the question; the next "yes" runs it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.events import ToolUse
from agent.tools.registry import Tool, ToolCall, ToolResult
from agent.tools.turn import ToolEvents, stream_with_tools, system_prompt_with_tools

if TYPE_CHECKING:
    from agent.config.personas import Persona
    from agent.conversation.conversation import Conversation
    from agent.frames import Reply
    from agent.llm.base import ChatLLM
    from agent.stages.base import StageContext
    from agent.tools.services import AgentServices

FILLER = "One moment."
# "Remember that ..." in the user's own words is stored as said, whatever the LLM makes of it (a
# small model may not call the remember tool, or may garble the fact).
REMEMBER = re.compile(r"^\W*(?:please\s+|can you\s+|could you\s+)*remember\s+(?:that\s+)?(.{3,}?)[.!?]*$",
                      re.IGNORECASE)
YES = re.compile(r"^\W*(yes|yeah|yep|sure|ok|okay|go ahead|do it|please do|confirm(ed)?)\b", re.IGNORECASE)


@dataclass
class PendingCall:
    """A call waiting for the user's yes, and the messages up to it."""

    call: ToolCall
    messages: list[dict[str, Any]]


class ThinkAssist:
    """See the module docstring. ``say(reply, text)`` speaks a sentence of the reply at once."""

    def __init__(self, ctx: StageContext, services: AgentServices, say: Callable[[Reply, str], None]) -> None:
        self.ctx = ctx
        self.services = services
        self.say = say
        self.pending: PendingCall | None = None
        self.last_messages: list[dict[str, Any]] = []  # what the LLM was given last (for tests and debugging)

    def messages(self, conversation: Conversation, persona: Persona, user_text: str) -> list[dict[str, Any]]:
        system = persona.system_prompt
        if self.services.tools_on:
            system = system_prompt_with_tools(system)
        messages = conversation.llm_messages(system)
        memory = self.services.memory
        if memory is not None:
            from agent.memory.tools import memory_note

            note = memory_note(memory, user_text)
            if note:
                messages.insert(1, {"role": "system", "content": note})
        return messages

    def early_start_fits(self, user_text: str) -> bool:
        """Whether a reply may start on ``user_text`` before the turn is over: not with tools (the
        tool loop must see the final words), nor for "remember ..." (memory changes before the reply)."""
        remembers = self.services.memory is not None and REMEMBER.match(user_text.strip()) is not None
        return not self.services.tools_on and not remembers

    def deltas(self, llm: ChatLLM, messages: list[dict[str, Any]], reply: Reply, persona: Persona,
               user_text: str) -> Iterator[str]:
        self._remember_if_asked(reply, user_text)
        session = self.services.session
        if session is None:
            self.last_messages = messages
            yield from llm.stream_reply(messages, reply.cancel, sampling=persona.llm)
            return
        approved = None
        pending, self.pending = self.pending, None
        if pending is not None and YES.match(user_text):
            approved, messages = pending.call, pending.messages
        self.last_messages = messages
        events = ToolEvents(on_call=lambda call: self._called(reply, call),
                            on_result=lambda result: self._finished(reply, result),
                            on_slow=lambda call: self.say(reply, FILLER),
                            on_confirm=lambda tool, call, so_far: self._ask(reply, tool, call, so_far))
        yield from stream_with_tools(llm, messages, session, reply.cancel, sampling=persona.llm, events=events,
                                     approved=approved)

    def _remember_if_asked(self, reply: Reply, user_text: str) -> None:
        match = REMEMBER.match(user_text.strip())
        if match is None or self.services.memory is None:
            return
        fact = match.group(1).strip()
        memory = self.services.memory.remember(fact, "fact")
        reply.tools.append({"id": f"memory-{memory.id}", "name": "remember", "arguments": {"fact": fact},
                            "output": f"remembered: {memory.text}", "ok": True, "elapsed_s": 0.0, "truncated": False})
        self.ctx.emit(ToolUse(reply.turn_id, f'remember(fact="{fact}")', f"remembered: {memory.text}", True))

    # ---- what the user sees and what is saved ------------------------------------------------------

    def _called(self, reply: Reply, call: ToolCall) -> None:
        self.ctx.emit(ToolUse(reply.turn_id, call.describe()))

    def _finished(self, reply: Reply, result: ToolResult) -> None:
        reply.tools.append(result.to_json())
        self.ctx.emit(ToolUse(reply.turn_id, result.call.describe(), result.output, result.ok))

    def _ask(self, reply: Reply, tool: Tool, call: ToolCall, so_far: list[dict[str, Any]]) -> str:
        self.pending = PendingCall(call, list(so_far))
        reply.tools.append({"id": call.id, "name": call.name, "arguments": call.arguments, "output": None,
                            "ok": False, "waiting_for_yes": True})
        self.ctx.emit(ToolUse(reply.turn_id, call.describe(), "waiting for your yes", False))
        where = tool.source.removeprefix("mcp:")
        return f"Shall I use {call.name.replace('_', ' ')} from {where}? Say yes to go ahead."

    # ---- after a reply, and at the end ---------------------------------------------------------------

    def after_reply(self, conversation: Conversation, llm: ChatLLM | None) -> None:
        """Fold the oldest turns into a summary once the history is long (never drop them)."""
        from agent.memory.summaries import fold_old_turns

        fold_old_turns(conversation, llm)

    def remember_conversation(self, conversation: Conversation) -> None:
        """Keep a summary of the finished conversation in the memory store (with ``--memory on``)."""
        from agent.memory.summaries import conversation_summary

        memory = self.services.memory
        if memory is None:
            return
        text = conversation_summary(conversation)
        if text:
            where = str(conversation.directory) if conversation.directory is not None else None
            memory.remember(text, "summary", where)
