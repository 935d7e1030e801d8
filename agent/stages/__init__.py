"""The agent's stages: capture -> transcribe -> think -> voice, plus model loading.

Each stage is a small module with one thread and one inbox of ``agent.frames`` frames (see
``agent.stages.base``); ``agent.pipeline`` builds and wires them.
"""
