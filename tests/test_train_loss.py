"""CSM's training loss against transformers' CsmForConditionalGeneration on shared random weights.

Both models get one tiny random checkpoint (ours in the original layout, theirs through our
original -> transformers conversion), the same batch of conversation samples (context + target,
two lengths, right-padded) and the same decoder frame subset; the loss, its two terms and the
gradients of named parameters must agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_parity import build_pair  # noqa: E402

from csm_engine import weights  # noqa: E402
from csm_engine.testing.checkpoints import build_text_tokenizer  # noqa: E402
from csm_engine.tokens import TextTokenizer  # noqa: E402
from csm_engine.train.codes import EncodedUtterance  # noqa: E402
from csm_engine.train.data import Utterance  # noqa: E402
from csm_engine.train.loss import choose_decoder_frames, csm_loss  # noqa: E402
from csm_engine.train.samples import IGNORE, build_samples, collate  # noqa: E402

TOL = 1e-5


def _utterance(conversation: str, turn: int, speaker: int, text: str, target: bool = True) -> Utterance:
    return Utterance(text, speaker, None, conversation, (float(turn), 0), f"{conversation}@{turn}", target, text)


@pytest.fixture(scope="module")
def pair():
    """test_parity's ours/theirs pair (one random tiny checkpoint), made once for this module."""
    return build_pair()


@pytest.fixture(scope="module")
def batch(pair):
    """Two samples (one with two context turns, one alone) padded into one batch: tokens, mask, labels."""
    _, _, cfg = pair
    g = torch.Generator().manual_seed(5)
    codes = lambda n: torch.randint(1, 2048, (32, n), generator=g)  # noqa: E731
    items = [
        EncodedUtterance(_utterance("a", 0, 1, "hello there, how are you?"), codes(6)),
        EncodedUtterance(_utterance("a", 1, 0, "I'm doing well, thanks."), codes(5)),
        EncodedUtterance(_utterance("a", 2, 1, "What about the weather today?"), codes(7)),
        EncodedUtterance(_utterance("b", 0, 0, "Good morning!"), codes(9)),
    ]
    tokenizer = TextTokenizer(build_text_tokenizer(cfg.text_vocab_size))
    samples = build_samples(items, tokenizer, window=2048)
    last = [s for s in samples if s.context_turns == 2] + [s for s in samples if s.conversation == "b"]
    assert len(last) == 2 and last[0].rows != last[1].rows
    return collate(last)


def _their_inputs(theirs, tokens, mask):
    """transformers' own embedding modules: text rows -> text table, audio rows -> summed codebooks."""
    text = theirs.embed_text_tokens(tokens[..., -1])
    audio = theirs.backbone_model.embed_tokens(tokens[..., :-1])
    return torch.where(mask[..., -1:], text, audio)


def _their_labels(labels, decoder_frames):
    """transformers' labels: codebooks 1..31 of rows outside the decoder's subset are ignored (its -101)."""
    out = labels.clone()
    rows = labels[..., 0] != IGNORE
    out[rows & ~decoder_frames, 1:] = IGNORE
    return out


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_loss_and_gradients_match_transformers(pair, batch, fraction):
    ours, theirs, cfg = pair
    tokens, mask, labels = batch
    frames = choose_decoder_frames(labels, fraction, torch.Generator().manual_seed(1))
    if fraction < 1:
        assert 0 < int(frames.sum()) < int((labels[..., 0] != IGNORE).sum())
    ours.zero_grad()
    theirs.zero_grad()
    mine = csm_loss(ours, tokens, mask, labels, frames)
    mine.total.backward()
    out = theirs(inputs_embeds=_their_inputs(theirs, tokens, mask), labels=_their_labels(labels, frames))
    out.loss.backward()

    torch.testing.assert_close(mine.backbone, out.backbone_loss, atol=TOL, rtol=0)
    torch.testing.assert_close(mine.decoder, out.depth_decoder_loss, atol=TOL, rtol=0)
    torch.testing.assert_close(mine.total, out.loss, atol=TOL, rtol=0)

    names = ["codebook0_head.weight", "audio_head", "projection.weight", "text_embeddings.weight",
             "backbone.layers.0.attn.q_proj.weight", "backbone.layers.1.mlp.w1.weight",
             "backbone.layers.1.sa_norm.scale", "decoder.layers.0.attn.k_proj.weight", "decoder.layers.1.mlp.w2.weight"]
    params = dict(ours.named_parameters())
    converted = weights.original_to_transformers({n: params[n].grad for n in names}, cfg)
    theirs_params = dict(theirs.named_parameters())
    for name, grad in converted.items():
        assert grad.abs().max() > 0, f"{name}: no gradient reached it"
        torch.testing.assert_close(grad, theirs_params[name].grad, atol=TOL, rtol=1e-4, msg=name)
    # The audio codebook table: ours is one table; transformers' depth decoder may hold a tied or separate copy.
    audio = theirs.backbone_model.embed_tokens.embed_audio_tokens.weight
    depth = theirs.depth_decoder.model.embed_tokens.weight
    their_audio_grad = audio.grad if depth is audio else audio.grad + depth.grad
    torch.testing.assert_close(params["audio_embeddings.weight"].grad, their_audio_grad, atol=TOL, rtol=1e-4)


def test_text_rows_and_context_carry_no_loss(pair, batch):
    """Only the target's audio rows are labelled: text rows, context and padding are IGNORE."""
    _, _, cfg = pair
    tokens, mask, labels = batch
    labelled = labels[..., 0] != IGNORE
    assert not (labelled & mask[..., -1]).any()  # no text row
    assert not (labelled & ~mask.any(-1)).any()  # no padding row
    # Sample 0 has two context turns before its target; its labelled rows are one run at the end.
    rows = labelled[0].nonzero().squeeze(1)
    assert torch.equal(rows, torch.arange(rows[0], rows[-1] + 1))
    audio_rows_before = int(mask[0, :rows[0], 0].sum())
    assert audio_rows_before == (6 + 1) + (5 + 1)  # both context turns' audio (with end frames) precede it
    assert not labels[0, rows[-1]].any()  # the last labelled row is the all-zero end frame


def test_decoder_fraction_picks_a_share_of_frames():
    labels = torch.full((2, 50, 32), IGNORE)
    labels[0, 10:42] = 7
    labels[1, 5:21] = 3
    chosen = choose_decoder_frames(labels, 1 / 16, torch.Generator().manual_seed(0))
    assert int(chosen.sum()) == 3  # ceil(48 / 16)
    assert bool(((labels[..., 0] != IGNORE) | ~chosen).all())  # only labelled frames
    other = choose_decoder_frames(labels, 1 / 16, torch.Generator().manual_seed(1))
    assert not torch.equal(chosen, other)


def test_gradient_checkpointing_changes_no_gradient(pair, batch):
    ours, _, _ = pair
    tokens, mask, labels = batch
    grads = []
    for checkpointing in (False, True):
        ours.backbone.gradient_checkpointing = ours.decoder.gradient_checkpointing = checkpointing
        ours.zero_grad()
        csm_loss(ours, tokens, mask, labels).total.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    ours.backbone.gradient_checkpointing = ours.decoder.gradient_checkpointing = False
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bfloat16_autocast_loss_is_close_to_float32(pair, batch):
    ours, _, _ = pair
    tokens, mask, labels = batch
    with torch.no_grad():
        exact = csm_loss(ours, tokens, mask, labels).total
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = csm_loss(ours, tokens, mask, labels).total
    assert rounded.dtype == torch.float32 and torch.isfinite(rounded)
    assert abs(float(rounded) - float(exact)) < 0.05 * float(exact)
