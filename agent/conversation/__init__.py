"""The conversation record: turns with their text and audio, the CSM and LLM views of it, saving."""
