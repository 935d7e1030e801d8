"""Persona files: the shipped ones load, and every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config.personas import BUILTIN_DIR, Persona, list_personas, load_persona
from agent.errors import AgentError

VALID = """
name = "Test Bot"
system_prompt = "You are a test."
speaker_id = 2
temperature = 0.7
topk = 30
max_audio_length_ms = 10000
voice = { clip = "clips/me.wav", transcript = "hello this is me" }

[llm]
temperature = 0.3
max_tokens = 50
"""


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_personas_all_load_with_a_voice():
    names = list_personas()
    assert {"default", "concise", "storyteller"} <= set(names)
    assert "voices" not in names  # the engine's voice table shares prompts/
    for name in names:
        persona = load_persona(name)
        assert isinstance(persona, Persona) and persona.name and persona.system_prompt
        assert persona.voice is not None and persona.path.parent == BUILTIN_DIR


def test_default_persona_when_no_name_is_given():
    assert load_persona(None).path.stem == "default"


def test_shipped_named_voices_resolve_in_the_engine_table():
    for name in list_personas():
        persona = load_persona(name)
        voice = persona.voice.resolve(persona.speaker_id)
        assert voice.speaker == persona.speaker_id and voice.text and voice.is_hub_ref


def test_valid_persona_file_with_inline_voice(tmp_path):
    persona = load_persona(write(tmp_path, VALID))
    assert persona.name == "Test Bot" and persona.speaker_id == 2 and persona.topk == 30
    assert persona.temperature == 0.7 and persona.max_audio_length_ms == 10000
    assert persona.llm.temperature == 0.3 and persona.llm.max_tokens == 50 and persona.llm.top_p == 0.95
    assert persona.voice.local_path() == (tmp_path / "clips" / "me.wav").resolve()
    assert persona.voice.transcript == "hello this is me"


def test_hub_clip_is_kept_as_data(tmp_path):
    text = VALID.replace('"clips/me.wav"', '"hf://sesame/csm-1b/prompts/conversational_a.wav"')
    voice = load_persona(write(tmp_path, text)).voice
    assert voice.is_hub and voice.local_path() is None
    assert voice.hub_file() == ("sesame/csm-1b", "prompts/conversational_a.wav")


def test_persona_is_frozen(tmp_path):
    persona = load_persona(write(tmp_path, VALID))
    with pytest.raises(AttributeError):
        persona.name = "x"


@pytest.mark.parametrize(
    "change,message",
    [
        (("temperature = 0.7", 'temperature = "hot"'), "'temperature' must be a number"),
        (("topk = 30", "topk = 2.5"), "'topk' must be a whole number"),
        (("speaker_id = 2", "speaker_id = -1"), "'speaker_id' must be between 0 and 31"),
        (("speaker_id = 2", "speaker_id = true"), "'speaker_id' must be a whole number"),
        (('name = "Test Bot"', 'nmae = "Test Bot"'), "'nmae' is not a persona setting"),
        (('name = "Test Bot"\n', ""), "'name' is missing"),
        (("max_tokens = 50", "max_tokens = 0"), "'llm.max_tokens' must be between 1 and 8192"),
        (("max_tokens = 50", "stream = true"), "'llm.stream' is not a persona setting"),
        ((', transcript = "hello this is me"', ""), "'voice.transcript' is missing"),
        (('"clips/me.wav"', '"hf://sesame"'), "'voice.clip' must look like hf://"),
        (('voice = { clip = "clips/me.wav", transcript = "hello this is me" }', "voice = 3"),
         "'voice' must be a table"),
    ],
)
def test_bad_persona_files_name_the_file_and_the_key(tmp_path, change, message):
    old, new = change
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new), "x.toml")
    with pytest.raises(AgentError) as info:
        load_persona(path)
    text = str(info.value)
    assert message in text and "x.toml" in text and "\n" not in text


def test_toml_syntax_error_is_one_line_with_the_line_number(tmp_path):
    path = write(tmp_path, 'name = "ok"\nsystem_prompt = "x"\ntopk = = 3\n', "broken.toml")
    with pytest.raises(AgentError) as info:
        load_persona(path)
    text = str(info.value)
    assert "broken.toml" in text and "line 3" in text and "\n" not in text


def test_unknown_persona_name_lists_the_known_ones():
    with pytest.raises(AgentError) as info:
        load_persona("nobody-by-this-name")
    assert "default" in str(info.value) and "concise" in str(info.value)


def test_missing_persona_path_is_an_agent_error(tmp_path):
    with pytest.raises(AgentError, match="persona file not found"):
        load_persona(tmp_path / "gone.toml")


def test_user_persona_dir_is_searched_first(tmp_path, monkeypatch):
    import agent.config.personas as personas

    user_dir = tmp_path / "user"
    user_dir.mkdir()
    write(user_dir, VALID.replace("Test Bot", "My Default"), "default.toml")
    write(user_dir, VALID, "mine.toml")
    monkeypatch.setattr(personas, "user_persona_dir", lambda: user_dir)
    assert "mine" in list_personas() and "storyteller" in list_personas()
    assert load_persona("default").name == "My Default"
    assert load_persona("mine").name == "Test Bot"
