"""Summaries: old turns folded into a summary when the LLM's history grows too long (instead of
being dropped), and one line per finished conversation for the memory store.

Folding asks the LLM itself ("summarize these turns in two sentences"); when it cannot (an error,
an empty answer) the summary is extractive — what the user said, shortened — so nothing is lost
silently either way. The summary reaches the LLM as a system message before the recent turns
(``Conversation.llm_messages``) and is saved in ``conversation.json``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from agent.errors import AgentError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from agent.conversation.conversation import Conversation
    from agent.llm.base import ChatLLM

FOLD_AT_CHARS = 6000  # history text (after the summary) that triggers folding
KEEP_RECENT_CHARS = 2500  # what stays as turns after a fold
SUMMARY_CHARS = 600


def history_chars(conversation: Conversation) -> int:
    upto = conversation.summary[0] if conversation.summary else 0
    return sum(len(t.text) for t in conversation.turns if t.id > upto)


def fold_old_turns(conversation: Conversation, llm: ChatLLM | None, fold_at: int = FOLD_AT_CHARS,
                   keep_recent: int = KEEP_RECENT_CHARS) -> bool:
    """Summarize the oldest turns once the history passes ``fold_at`` characters; True if it folded."""
    if history_chars(conversation) <= fold_at:
        return False
    upto = conversation.summary[0] if conversation.summary else 0
    turns = [t for t in conversation.turns if t.id > upto and t.text.strip()]
    kept, recent = 0, 0
    for turn in reversed(turns):
        if recent + len(turn.text) > keep_recent:
            break
        recent += len(turn.text)
        kept += 1
    old = turns[: len(turns) - max(kept, 1)]
    if not old:
        return False
    earlier = conversation.summary[1] if conversation.summary else ""
    transcript = "\n".join(f"{'User' if t.role == 'user' else 'Assistant'}: {t.text}" for t in old)
    text = _llm_summary(llm, earlier, transcript) or _extractive(earlier, old)
    conversation.summary = (old[-1].id, text[:SUMMARY_CHARS])
    return True


def _llm_summary(llm: ChatLLM | None, earlier: str, transcript: str) -> str | None:
    if llm is None:
        return None
    from agent.llm.base import Sampling

    prompt = (f"Summary so far: {earlier}\n\n" if earlier else "") + transcript[-6000:]
    try:
        text = llm.reply([{"role": "system", "content": "Summarize this conversation in at most three short "
                                                         "sentences. Keep names, numbers and what the user asked for."},
                          {"role": "user", "content": prompt}], sampling=Sampling(temperature=0.0, max_tokens=120))
    except (AgentError, ValueError):  # no summary this time; the conversation itself is saved
        log.warning("could not summarize the conversation for memory", exc_info=True)
        return None
    text = " ".join(text.split())
    return text if len(text) > 20 else None


def _extractive(earlier: str, turns) -> str:
    said = "; ".join(t.text.strip()[:120] for t in turns if t.role == "user")
    return " ".join(f"{earlier} The user said: {said}".split())


def conversation_summary(conversation: Conversation) -> str | None:
    """One line about a finished conversation for the memory store (None when the user said nothing)."""
    upto = conversation.summary[0] if conversation.summary else 0
    said = [t.text.strip() for t in conversation.turns if t.role == "user" and t.text.strip() and t.id > upto]
    if not said and not conversation.summary:
        return None
    prefix = f"{conversation.summary[1]} Then: " if conversation.summary else "Things said: "
    return (prefix + "; ".join(s[:160] for s in said))[:1500]
