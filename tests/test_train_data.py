"""csm-finetune's data: sources, conversation-aware samples, trimming, and bad input (one line, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from csm_engine import weights
from csm_engine.errors import CSMError
from csm_engine.train.cli import main as finetune_main
from csm_engine.train.codes import CodesCache, encode_utterances, file_key
from csm_engine.train.data import find_utterances
from csm_engine.train.loss import csm_loss
from csm_engine.train.samples import IGNORE, build_samples, collate, segment_rows


@pytest.fixture(scope="module")
def codec(tiny_checkpoint):
    return weights.load_mimi(model_path=str(tiny_checkpoint))


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return weights.load_text_tokenizer(model_path=str(tiny_checkpoint))


@pytest.fixture(scope="module")
def conversation_encoded(saved_conversation, codec, tiny_checkpoint, tmp_path_factory):
    mimi_key = file_key(weights.find_mimi_file(model_path=str(tiny_checkpoint)))
    cache = CodesCache(tmp_path_factory.mktemp("codes"), mimi_key)
    return encode_utterances(find_utterances([saved_conversation]), codec, cache, progress=False)


def test_clip_folder_gives_one_utterance_per_clip(train_clip_folder):
    found = find_utterances([train_clip_folder], speaker=3)
    assert [u.text for u in found] == [(train_clip_folder / f"clip{i}.txt").read_text().strip() for i in range(3)]
    assert all(u.speaker == 3 and u.target and u.audio.path.suffix == ".wav" for u in found)
    assert len({u.conversation for u in found}) == 3  # clips stand alone


def test_manifest_orders_a_conversation_by_turn(train_clip_folder, tmp_path):
    lines = [{"audio": str(train_clip_folder / "clip1.wav"), "text": "second", "conversation": "c", "turn": 2,
              "speaker": 1},
             {"audio": str(train_clip_folder / "clip0.wav"), "text": "first", "conversation": "c", "turn": 1}]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    found = sorted(find_utterances([manifest], speaker=0), key=lambda u: u.order)
    assert [(u.text, u.speaker) for u in found] == [("first", 0), ("second", 1)]
    assert found[0].conversation == found[1].conversation


def test_saved_conversation_is_read_turn_by_turn(saved_conversation):
    found = find_utterances([saved_conversation])
    assert [u.text for u in found] == ["Hi, what is the weather like?", "It is sunny today.",
                                       "Do you want to go for a walk?", "Yes, that sounds lovely.",
                                       "Great, let us go after lunch.", "And tomorrow?", "It will rain tomorrow."]
    # Typed turns and the reply that was never spoken are context only.
    assert [u.target for u in found] == [True, True, True, False, True, False, False]
    assert found[3].audio is None and found[6].audio is None
    # The agent's two sentences are two utterances of one turn, slices of its WAV.
    a, b = found[1].audio, found[2].audio
    assert a.path == b.path and a.start == 0 and a.stop == b.start and found[1].turn == found[2].turn
    assert [u.speaker for u in found] == [1, 0, 0, 1, 0, 1, 0]
    only_agent = find_utterances([saved_conversation], roles=("agent",))
    assert [u.target for u in only_agent] == [False, True, True, False, True, False, False]


def test_codes_are_cached_by_content(train_clip_folder, codec, tmp_path):
    cache = CodesCache(tmp_path, "k")
    found = find_utterances([train_clip_folder])[:1]
    first = encode_utterances(found, codec, cache, progress=False)[0].codes
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    renamed = tmp_path / "renamed.wav"
    shutil.copy(train_clip_folder / "clip0.wav", renamed)
    (tmp_path / "renamed.txt").write_text("hello")
    again = encode_utterances(find_utterances([tmp_path]), codec, cache, progress=False)[0].codes
    assert torch.equal(first, again) and len(list(tmp_path.rglob("*.safetensors"))) == 1


def test_context_is_in_the_sequence_and_changes_the_loss(conversation_encoded, tokenizer, tiny_checkpoint):
    with_context = build_samples(conversation_encoded, tokenizer, window=2048)
    alone = build_samples(conversation_encoded, tokenizer, window=2048, context=False)
    last, bare = with_context[-1], alone[-1]
    assert last.context_turns == 3 and bare.context_turns == 0
    assert last.rows > bare.rows
    # The target's own rows and labels are the same; only what precedes them differs.
    assert torch.equal(last.tokens[-bare.rows:], bare.tokens[-bare.rows:])
    assert torch.equal(last.labels[-bare.rows:], bare.labels[-bare.rows:])
    assert (last.labels[:-bare.rows] == IGNORE).all()
    model = weights.load_csm_model(str(tiny_checkpoint))
    with torch.no_grad():
        loss_ctx = csm_loss(model, *collate([last])).total
        loss_bare = csm_loss(model, *collate([bare])).total
    assert abs(float(loss_ctx) - float(loss_bare)) > 1e-4


def test_context_trimming_keeps_whole_turns(conversation_encoded, tokenizer):
    """The agent's first reply has two sentences: when only one would fit, neither is kept."""
    rows = [segment_rows(tokenizer, e.utterance.speaker, e.utterance.text, e.codes)[0].shape[0]
            for e in conversation_encoded]
    full = build_samples(conversation_encoded, tokenizer, window=2048)[-1]
    target_rows = full.rows - sum(rows[:4])
    window = target_rows + rows[3] + rows[2] + 1  # the typed turn and the second sentence, not the first
    trimmed = build_samples(conversation_encoded, tokenizer, window=window)[-1]
    assert trimmed.context_turns == 1  # the typed turn only
    assert trimmed.rows == target_rows + rows[3]
    assert torch.equal(trimmed.tokens, full.tokens[sum(rows[:3]):])
    two_turns = build_samples(conversation_encoded, tokenizer, window=target_rows + sum(rows[1:4]))[-1]
    assert two_turns.context_turns == 2 and two_turns.rows == target_rows + sum(rows[1:4])


# ---- bad input: one line naming the fix, exit 2, nothing written ----


def _finetune(tiny_checkpoint, tmp_path, capsys, *data, extra=()):
    out = tmp_path / "out"
    rc = finetune_main([*map(str, data), "--out", str(out), "--csm-model", str(tiny_checkpoint), "--device", "cpu",
                        "--cache-dir", str(tmp_path / "cache"), "--quiet", "--steps", "1", *extra])
    err = capsys.readouterr().err.strip()
    return rc, err, out


def _clips(train_clip_folder, tmp_path) -> Path:
    folder = tmp_path / "clips"
    shutil.copytree(train_clip_folder, folder)
    return folder


def test_missing_transcript(train_clip_folder, tiny_checkpoint, tmp_path, capsys):
    folder = _clips(train_clip_folder, tmp_path)
    (folder / "clip1.txt").unlink()
    rc, err, out = _finetune(tiny_checkpoint, tmp_path, capsys, folder)
    assert rc == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert "clip1.wav has no transcript" in err and "clip1.txt" in err


@pytest.mark.parametrize("problem", ["empty", "corrupt", "silent"])
def test_empty_corrupt_or_silent_clip(train_clip_folder, tiny_checkpoint, tmp_path, capsys, problem):
    folder = _clips(train_clip_folder, tmp_path)
    clip = folder / "clip2.wav"
    if problem == "empty":
        soundfile.write(clip, np.zeros(0, np.float32), 24000)
    elif problem == "corrupt":
        clip.write_bytes(b"RIFF\x00\x01\x00\x00WAVEfmt this is not audio")
    else:
        soundfile.write(clip, np.zeros(24000, np.float32), 24000)
    rc, err, out = _finetune(tiny_checkpoint, tmp_path, capsys, folder)
    assert rc == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert "clip2.wav" in err and ("re-record" in err or "WAV, FLAC or OGG" in err or "non-empty" in err)


def test_clip_longer_than_the_window(train_clip_folder, tiny_checkpoint, tmp_path, capsys):
    rc, err, out = _finetune(tiny_checkpoint, tmp_path, capsys, train_clip_folder, extra=["--max-seq-len", "30"])
    assert rc == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert "do not fit the 30-position window" in err and "split the clip" in err


def test_conversation_with_a_missing_wav(saved_conversation, tiny_checkpoint, tmp_path, capsys):
    copy = tmp_path / "convo"
    shutil.copytree(saved_conversation, copy)
    name = json.loads((copy / "conversation.json").read_text())["turns"][1]["audio"]
    (copy / name).unlink()
    rc, err, out = _finetune(tiny_checkpoint, tmp_path, capsys, copy)
    assert rc == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert f"its audio {name} is missing" in err and "restore the file" in err


def test_no_data_and_unknown_source(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, err, out = _finetune(tiny_checkpoint, tmp_path, capsys, tmp_path / "empty")
    assert rc == 2 and "holds no clips" in err and not out.exists()
    with pytest.raises(CSMError, match="no training data given"):
        find_utterances([])
