"""``csm-chat --check-audio``: against the simulated room it finds the room's delay and level;
without devices, or with a bad room, it says what to do in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.audio import list_devices
from agent.config.settings import AgentSettings
from agent.echo.check_audio import analyse, check_signal, format_report, record_in_room, run_check_audio
from agent.echo.room import load_room


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    # `python -m agent.cli` from the checkout, so the command runs this tree's code.
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)


@pytest.mark.slow
def test_check_audio_in_the_room_reports_its_delay_in_real_time():
    spec = load_room("living-room")
    result = _run_cli("--check-audio", "--room", "living-room")
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    delay = float(re.search(r"echo delay:\s+([\d.]+) ms", result.stdout).group(1))
    assert abs(delay - spec.device_delay_ms) <= 10.0 and abs(delay - spec.echo_delay_ms) <= 1.0
    assert "hands-free will work" in result.stdout


@pytest.mark.parametrize("room_name", ["office", "living-room-loud"])
def test_check_audio_measures_each_rooms_delay_level_and_erle(room_name):
    spec = load_room(room_name)
    check = run_check_audio(AgentSettings(room=room_name, realtime=False))
    print(room_name, format_report(check), sep="\n")
    assert abs(check.delay_ms - spec.device_delay_ms) <= 10.0
    # The echo's level relative to the signal: the room's gain, less what falls outside the window.
    assert spec.echo_gain_db - 3.0 <= check.echo_level_db <= spec.echo_gain_db + 0.5
    assert check.noise_dbfs == pytest.approx(spec.noise_dbfs, abs=1.0)
    assert check.erle_db >= 25.0 and check.hands_free


def test_check_audio_without_echo_cancellation_says_use_headphones():
    check = run_check_audio(AgentSettings(room="office-loud", realtime=False, aec="off"))
    assert check.erle_db is None and check.aec == "off" and not check.hands_free
    assert check.verdict.startswith("use headphones or push-to-talk (--mode ptt)")


def test_check_audio_with_the_speaker_far_away_needs_no_canceller():
    # A quiet coupling (-60 dB): the echo is lost in the noise floor, so hands-free works as is.
    from dataclasses import replace

    spec = replace(load_room("office"), name="far", echo_gain_db=-60.0)
    recording = record_in_room(spec, check_signal(), 24_000, aec=False)
    check = analyse(recording, aec="off")
    assert check.hands_free and check.delay_ms is None and "hardly any" in check.verdict


def test_check_audio_without_devices_is_one_line_naming_the_fix():
    inputs, outputs = list_devices()
    if inputs and outputs:
        pytest.skip("this machine has a speaker and a microphone: the check would play through them")
    result = _run_cli("--check-audio")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--check-audio found no speaker and microphone" in lines[0]
    assert "--room office" in lines[0]


def test_bad_room_file_on_the_command_line_is_one_line(tmp_path):
    room = tmp_path / "room.toml"
    room.write_text("rt60_s = -1\n")
    result = _run_cli("--check-audio", "--room", str(room))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "rt60_s = -1 is out of range: use 0.05 to 2 seconds" in lines[0]
