"""The transcript's own evidence that the user is done: P(end of message) from the chat LLM.

At a pause the end-of-turn judge (``agent.listen.end_of_turn``) asks ``TextTurn.evidence``:
Whisper transcribes the turn as it would end now (the same span and audio the final turn
would carry, so the transcript is reused when the turn does end there), and the chat model
already loaded for replies scores it: the probability of its end-of-turn token right after
the user's words in its own chat template. This is how LiveKit's turn detector reads a
transcript with a small LM (livekit-plugins-turn-detector ``base.py``): the text is lowercased
and stripped of punctuation (Whisper's "?" or "." would otherwise decide it), put in the chat
template as the last user message, the template's end-of-turn token and what follows are cut
off, and the model's softmax probability of that token is P(end). "what is the capital of
france" ends a message; "i stayed at home because" does not.

Only a local GGUF model can be scored (``LocalLLM.locked_llama``: llama.cpp's logits); with a
server LLM, or before the models have loaded, there is no evidence and the judge uses the
audio model alone. The scoring takes the LLM's own lock, so it never runs on the llama object
at the same time as a reply; when a reply holds it (the user talks over the agent) the
scoring is skipped rather than waited for. Runs on the caller's thread: the turn stage's, or
the judge's worker thread (``agent.listen.turn_jobs``), never on the TUI's event loop; evidence
that arrives after ``forget`` (the user went on meanwhile) is not kept.

``TextTurn`` also holds the reply started early on the tentative transcript
(``agent.stages.early_reply``), so that the turn stage can discard it when the user goes on.
"""

from __future__ import annotations

import re
import threading
import time
import unicodedata
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from agent.listen.asr import Transcriber, Transcript
    from agent.llm.base import ChatLLM, Message
    from agent.stages.early_reply import EarlyReply

LOCK_WAIT_S = 0.05  # a reply holding the LLM longer than this: no text evidence for this pause
PROBE = "\x00end\x00"  # stands for the user's words while the chat template is cut
SENTENCE_END = re.compile(r"[.?!]|[?!]{2,}")  # "..." and ".." trail off: not an end
_TEMPLATES: weakref.WeakKeyDictionary[Any, tuple[Any, list[int]] | None] = weakref.WeakKeyDictionary()


def normalize(text: str) -> str:
    """Lowercase, punctuation out (apostrophes and hyphens kept), single spaces: LiveKit's rule."""
    text = unicodedata.normalize("NFKC", text.lower())
    text = "".join(ch for ch in text if not (unicodedata.category(ch).startswith("P") and ch not in "'-"))
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class TextEvidence:
    """What the transcript of one pause says: its words and P(end of message) (None: not scored)."""

    span: tuple[int, int]
    transcript: Transcript
    probability: float | None
    asr_ms: float
    llm_ms: float


def _template(llama: Any) -> tuple[Any, list[int]] | None:
    """(the GGUF's chat template as a formatter, ids of the tokens that end a user message): its
    end-of-turn token, and the sentence-final punctuation a chat model not tuned on
    punctuation-free text writes first ("?" after "what is the capital of france")."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        return None

    def token_text(token_id: int) -> str:
        return llama.detokenize([token_id], special=True).decode("utf-8", "ignore") if token_id >= 0 else ""

    formatter = Jinja2ChatFormatter(template=template, eos_token=token_text(llama.token_eos()),
                                    bos_token=token_text(llama.token_bos()), add_generation_prompt=False)
    whole = formatter(messages=[{"role": "user", "content": PROBE}]).prompt
    after = llama.tokenize(whole[whole.rfind(PROBE) + len(PROBE):].encode("utf-8"), add_bos=False, special=True)
    if PROBE not in whole or not after:
        return None
    final = [t for t in range(llama.n_vocab()) if SENTENCE_END.fullmatch(token_text(t).strip())]
    return formatter, [after[0], *final]


def end_of_message_probability(llm: ChatLLM, text: str, context: list[Message] | None = None,
                               wait_s: float = LOCK_WAIT_S) -> float | None:
    """P(the user's message ends after ``text``) from ``llm``'s end-of-turn token; None when this
    LLM cannot be scored (a server), the text is empty, or a reply holds the model. ``context``:
    the conversation before it (the reply's own prompt: llama.cpp then evaluates only the new words,
    and the reply after reuses them)."""
    words = normalize(text)
    locked = getattr(llm, "locked_llama", None)
    if not words or locked is None:
        return None
    import llama_cpp

    with locked(wait_s) as llama:
        if llama is None:
            return None
        if llama not in _TEMPLATES:
            _TEMPLATES[llama] = _template(llama)
        if _TEMPLATES[llama] is None:
            return None
        formatter, end_tokens = _TEMPLATES[llama]
        messages = [*llm.fit_messages(list(context or []) + [{"role": "user", "content": words}], 16)]
        messages[-1] = {"role": "user", "content": PROBE}
        whole = formatter(messages=messages).prompt
        prompt = whole[: whole.rfind(PROBE)] + words
        # as llama-cpp-python tokenizes a chat prompt, so a reply after it reuses the cached prefix
        tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        cached = llama.input_ids[: llama.n_tokens]
        same = 0
        for a, b in zip(cached, tokens):
            if a != b:
                break
            same += 1
        llama.n_tokens = min(same, len(tokens) - 1)  # what llama.cpp already holds is not evaluated again
        llama.eval(tokens[llama.n_tokens:])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(llama.n_vocab(),))
        logits = logits.astype(np.float64)
        logits -= logits.max()
        weights = np.exp(logits)
        return float(weights[end_tokens].sum() / weights.sum())


class TextTurn:
    """Text evidence for the pauses of a turn (see the module docstring), one transcript per pause.

    ``transcriber()`` and ``llm()`` return the loaded models, or None while they load;
    ``context()`` the conversation so far as the reply's prompt will begin (system prompt, turns).
    """

    def __init__(self, transcriber: Callable[[], Transcriber | None], llm: Callable[[], ChatLLM | None],
                 context: Callable[[], list[Message]] | None = None) -> None:
        self._transcriber = transcriber
        self._llm = llm
        self._context = context
        self._lock = threading.Lock()
        self._last: TextEvidence | None = None
        self._generation = 0  # bumped by forget: evidence begun before it is not kept
        self._early: EarlyReply | None = None
        self.early_started = self.early_discarded = self.early_taken = 0  # replies started early, and their fate

    def evidence(self, span: tuple[int, int], audio: np.ndarray) -> TextEvidence | None:
        """The evidence for the turn as it would end at ``span`` (computed once per span)."""
        return self.evidence_later(span, audio)()

    def evidence_later(self, span: tuple[int, int], audio: np.ndarray) -> Callable[[], TextEvidence | None]:
        """``evidence`` as a call to make later (in another thread): it belongs to the pause current
        now, and is not kept as that pause's transcript if ``forget`` came in between."""
        generation = self._generation
        return lambda: self._evidence(span, audio, generation)

    def _evidence(self, span: tuple[int, int], audio: np.ndarray, generation: int) -> TextEvidence | None:
        last = self._last
        if last is not None and last.span == span:
            return last
        transcriber, llm = self._transcriber(), self._llm()
        if transcriber is None:
            return None
        started = time.perf_counter()
        transcript = transcriber.transcribe(audio)
        asr_done = time.perf_counter()
        context = self._context() if self._context is not None else None
        probability = end_of_message_probability(llm, transcript.text, context) if llm is not None else None
        evidence = TextEvidence(span, transcript, probability, (asr_done - started) * 1000,
                                (time.perf_counter() - asr_done) * 1000)
        with self._lock:
            if generation == self._generation:
                self._last = evidence
        return evidence

    def forget(self) -> None:
        """A new turn or pause (the detector's spans may start again from 0 after a reset)."""
        with self._lock:
            self._generation += 1
            self._last = None

    def transcript_for(self, span: tuple[int, int] | None) -> Transcript | None:
        """The transcript already made of exactly ``span``, if any (the transcribe stage reuses it)."""
        last = self._last
        return last.transcript if last is not None and span is not None and last.span == span else None

    # ---- the reply started early on the tentative transcript ---------------------------------

    def started_early(self, early: EarlyReply, text: str) -> None:
        """``early`` runs on ``text``, the transcript of the current pause; if that pause is already
        over (the user went on before the reply started) it is discarded at once."""
        last = self._last
        current = last is not None and last.transcript.text == text
        with self._lock:
            old, self._early = self._early, early if current else None
            self.early_started += 1
        for reply in (old, None if current else early):
            if reply is not None:
                self._discard(reply)

    def went_on(self) -> None:
        """The user spoke again after the pause: a reply started on its transcript is discarded."""
        with self._lock:
            early, self._early = self._early, None
        if early is not None:
            self._discard(early)

    def take_early(self) -> EarlyReply | None:
        """The early reply, handed over (to the think stage) and no longer discarded from here."""
        with self._lock:
            early, self._early = self._early, None
            self.early_taken += early is not None
        return early

    def _discard(self, early: EarlyReply) -> None:
        early.discard()
        with self._lock:
            self.early_discarded += 1
