"""The agent's words: chat LLMs (llama.cpp in-process, or an OpenAI-compatible server) and GGUF files."""
