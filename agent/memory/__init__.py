"""Memory across conversations: a SQLite store of facts and conversation summaries."""
