"""Listening: is someone speaking (VAD), are they done (end of turn), what did they say (ASR),
and what their voice means during a reply (barge-in)."""
