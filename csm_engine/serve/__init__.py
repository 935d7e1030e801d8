"""``csm-serve``: CSM as a streaming speech server with an OpenAI-compatible ``/v1/audio/speech``.

    config.py   limits and settings (frozen dataclass)
    errors.py   OpenAI-style JSON errors
    audio.py    WAV/PCM16 bytes, base64 audio and codes
    schemas.py  request bodies (pydantic)
    speech.py   requests -> prompts -> the batch engine -> events on the event loop
    app.py      the FastAPI routes
    cli.py      the ``csm-serve`` command (uvicorn)
"""
