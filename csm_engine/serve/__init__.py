"""``csm-serve``: CSM as a streaming speech server with an OpenAI-compatible ``/v1/audio/speech``.

    config.py   limits and settings (frozen dataclass)
    errors.py   OpenAI-style JSON errors
    wire.py     the wire format the server and its clients share: codes, PCM16, headers, events
    audio.py    request fields -> audio and codes (400s), the streamed WAV header
    schemas.py  request bodies (pydantic)
    speech.py   requests -> prompts -> the batch engine -> events on the event loop
    app.py      the FastAPI routes
    cli.py      the ``csm-serve`` command (uvicorn)
"""
