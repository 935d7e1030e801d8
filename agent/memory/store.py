"""What the agent remembers across conversations: facts and conversation summaries in SQLite.

One file, ``memory.db`` in the user's data directory, readable with the ``sqlite3`` tool::

    sqlite3 ~/.local/share/csm-chat/memory.db "select id, kind, text from memories"

Table ``memories``: ``id``, ``kind`` ("fact": the user asked to remember it; "summary": what a
finished conversation was about), ``text``, ``conversation`` (its directory, for summaries),
``created_at``. ``memories_fts`` is an FTS5 index over the text (Porter stemming), kept in step
by triggers; ``search`` ranks with BM25 on the words of the question. A store that SQLite cannot
read is moved aside (``memory.db.corrupt-<time>``) with one notice and a new one starts: nothing
is deleted and the conversation goes on.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs

Notice = Callable[[str, str], None]
KINDS = ("fact", "summary")
SCHEMA_VERSION = 1
MAX_TEXT_CHARS = 2000
# Words that say nothing about what a memory is about ("what is my ...?").
STOP_WORDS = frozenset(
    "a an and are as at be but by can could did do does for from had has have he her him his how i i'm is it its "
    "me my of on or our she so tell than that the their them then there they this to us was we were what when where "
    "which who whom why will with would you your yours please remember know about again said say".split())

_SCHEMA = """
create table if not exists memories (
    id integer primary key,
    kind text not null check (kind in ('fact', 'summary')),
    text text not null,
    conversation text,
    created_at real not null
);
create virtual table if not exists memories_fts using fts5(
    text, content='memories', content_rowid='id', tokenize='porter unicode61');
create trigger if not exists memories_ai after insert on memories begin
    insert into memories_fts(rowid, text) values (new.id, new.text);
end;
create trigger if not exists memories_ad after delete on memories begin
    insert into memories_fts(memories_fts, rowid, text) values ('delete', old.id, old.text);
end;
create trigger if not exists memories_au after update on memories begin
    insert into memories_fts(memories_fts, rowid, text) values ('delete', old.id, old.text);
    insert into memories_fts(rowid, text) values (new.id, new.text);
end;
"""


def default_memory_path() -> Path:
    return Path(platformdirs.user_data_dir("csm-chat")) / "memory.db"


@dataclass(frozen=True)
class Memory:
    id: int
    kind: str
    text: str
    conversation: str | None
    created_at: float


def query_words(text: str) -> list[str]:
    """The words of ``text`` worth searching for (no stop words, no punctuation, lower case)."""
    words = re.findall(r"[^\W_]+(?:'[^\W_]+)?", text.lower())
    words = [w.split("'")[0] if w.endswith(("'s", "'re", "'ll", "'ve", "'d")) else w for w in words]
    return list(dict.fromkeys(w for w in words if w not in STOP_WORDS and len(w) > 1))


class MemoryStore:
    """The memory database (thread-safe: one connection behind a lock)."""

    def __init__(self, path: str | Path | None = None, notice: Notice | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_memory_path()
        self._notice = notice if notice is not None else (lambda level, message: None)
        self._lock = threading.Lock()
        self._db = self._open()

    # ---- opening, and what to do with a broken file ---------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as error:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            try:
                self.path.replace(aside)
                where = f"moved to {aside}"
            except OSError as move_error:
                self._notice("error", f"memory store {self.path} is unreadable ({error}) and cannot be moved aside "
                                      f"({move_error.strerror}); memory is off for this run")
                return sqlite3.connect(":memory:", check_same_thread=False)
            self._notice("warning", f"memory store {self.path} was unreadable ({error}); {where}, "
                                    "starting an empty one")
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0)
        try:
            if db.execute("pragma quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            db.executescript(_SCHEMA)
            version = db.execute("pragma user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"made by a newer csm-chat (schema {version})")
            db.execute(f"pragma user_version = {SCHEMA_VERSION}")
            db.commit()
            db.execute("select count(*) from memories_fts").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- writing -------------------------------------------------------------------------------------

    def remember(self, text: str, kind: str = "fact", conversation: str | None = None) -> Memory:
        """Store a fact (or a conversation's summary, replacing an earlier one of that conversation)."""
        text = " ".join(str(text).split())[:MAX_TEXT_CHARS]
        if not text:
            raise ValueError("nothing to remember: the text is empty")
        if kind not in KINDS:
            raise ValueError(f"memory kind must be one of {KINDS}, got {kind!r}")
        now = time.time()
        with self._lock, self._db:
            if kind == "fact":
                same = self._db.execute("select id, created_at from memories where kind = 'fact' and lower(text) = ?",
                                        (text.lower(),)).fetchone()
                if same:
                    return Memory(same[0], kind, text, conversation, same[1])
            elif conversation is not None:
                self._db.execute("delete from memories where kind = 'summary' and conversation = ?", (conversation,))
            cursor = self._db.execute("insert into memories (kind, text, conversation, created_at) values (?, ?, ?, ?)",
                                      (kind, text, conversation, now))
            return Memory(cursor.lastrowid, kind, text, conversation, now)

    def forget(self, text: str | None = None) -> int:
        """Delete every memory (``text`` None) or those whose text matches ``text``; returns how many."""
        with self._lock, self._db:
            if text is None or not text.strip():
                return self._db.execute("delete from memories").rowcount
            ids = self._matching_ids(text, kinds=KINDS, limit=1000, all_words=True)
            ids |= {row[0] for row in self._db.execute("select id from memories where text like ?",
                                                       (f"%{text.strip()}%",))}
            if not ids:
                return 0
            marks = ",".join("?" * len(ids))
            return self._db.execute(f"delete from memories where id in ({marks})", tuple(ids)).rowcount

    # ---- reading -------------------------------------------------------------------------------------

    def search(self, text: str, limit: int = 5, kinds: tuple[str, ...] = KINDS) -> list[Memory]:
        """Memories about ``text``, most relevant first (BM25 over the question's words)."""
        words = query_words(text)
        if not words:
            return []
        query = " OR ".join(f'"{w}"*' if len(w) > 3 else f'"{w}"' for w in words)
        marks = ",".join("?" * len(kinds))
        with self._lock:
            rows = self._db.execute(
                f"select m.id, m.kind, m.text, m.conversation, m.created_at from memories_fts f "
                f"join memories m on m.id = f.rowid where memories_fts match ? and m.kind in ({marks}) "
                f"order by bm25(memories_fts) limit ?", (query, *kinds, limit)).fetchall()
        return [Memory(*row) for row in rows]

    def _matching_ids(self, text: str, kinds: tuple[str, ...], limit: int, all_words: bool) -> set[int]:
        words = query_words(text)
        if not words:
            return set()
        query = (" AND " if all_words else " OR ").join(f'"{w}"' for w in words)
        marks = ",".join("?" * len(kinds))
        return {row[0] for row in self._db.execute(
            f"select m.id from memories_fts f join memories m on m.id = f.rowid where memories_fts match ? "
            f"and m.kind in ({marks}) limit ?", (query, *kinds, limit))}

    def recent(self, limit: int = 5, kind: str | None = None) -> list[Memory]:
        with self._lock:
            if kind is None:
                rows = self._db.execute("select id, kind, text, conversation, created_at from memories "
                                        "order by created_at desc, id desc limit ?", (limit,)).fetchall()
            else:
                rows = self._db.execute("select id, kind, text, conversation, created_at from memories where kind = ? "
                                        "order by created_at desc, id desc limit ?", (kind, limit)).fetchall()
        return [Memory(*row) for row in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("select count(*) from memories").fetchone()[0]
