"""Numerical parity with transformers' CsmForConditionalGeneration on shared random weights.

This is the proof that the released weights will speak through our engine: both models get the
same tiny random checkpoint (ours in the original Sesame layout, theirs through our own
original -> transformers conversion), the same token frames, and must agree on backbone
logits, decoder logits and greedily decoded frames to float tolerance.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from csm_engine import weights  # noqa: E402
from csm_engine.config import CSMConfig, get_flavor  # noqa: E402
from csm_engine.model import CSMModel  # noqa: E402
from csm_engine.testing.checkpoints import random_state_dict  # noqa: E402

ATOL = 1e-4


def hf_config(cfg: CSMConfig):
    """A transformers CsmConfig with the same shapes (special token ids kept inside the text vocab)."""
    from transformers import CsmConfig, CsmDepthDecoderConfig

    def rope(t):
        rs = t.rope_scaling
        return {"rope_type": "llama3", "rope_theta": t.rope_base, "factor": rs.factor,
                "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings}

    bb, dec = cfg.backbone, cfg.decoder
    depth = CsmDepthDecoderConfig(
        num_codebooks=cfg.audio_num_codebooks, backbone_hidden_size=bb.dim, vocab_size=cfg.audio_vocab_size,
        hidden_size=dec.dim, intermediate_size=dec.intermediate_dim, num_hidden_layers=dec.n_layers,
        num_attention_heads=dec.n_heads, num_key_value_heads=dec.n_kv_heads, head_dim=dec.head_dim,
        max_position_embeddings=cfg.audio_num_codebooks + 1, rms_norm_eps=dec.norm_eps, rope_parameters=rope(dec),
    )
    v = cfg.text_vocab_size
    return CsmConfig(
        num_codebooks=cfg.audio_num_codebooks, vocab_size=cfg.audio_vocab_size, text_vocab_size=v,
        hidden_size=bb.dim, intermediate_size=bb.intermediate_dim, num_hidden_layers=bb.n_layers,
        num_attention_heads=bb.n_heads, num_key_value_heads=bb.n_kv_heads, head_dim=bb.head_dim,
        max_position_embeddings=bb.max_seq_len, rms_norm_eps=bb.norm_eps, rope_parameters=rope(bb),
        bos_token_id=v - 4, pad_token_id=v - 3, audio_token_id=v - 2, audio_eos_token_id=v - 1,
        depth_decoder_config=depth.to_dict(),
        # The codec inside CsmForConditionalGeneration is not part of the comparison: keep it small.
        codec_config={"model_type": "mimi", "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 64,
                      "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32, "num_filters": 8,
                      "codebook_dim": 32, "vector_quantization_hidden_dimension": 32, "upsample_groups": 64,
                      "num_quantizers": cfg.audio_num_codebooks},
    )


@pytest.fixture(scope="module")
def pair():
    """(ours, theirs, config) sharing one random tiny checkpoint, both float32 in eval mode."""
    return build_pair()


def build_pair():
    """``pair``'s value, made afresh (test_train_loss builds its own from it)."""
    from transformers import CsmForConditionalGeneration

    cfg = get_flavor("tiny")
    sd = random_state_dict(cfg, seed=1234)
    ours = CSMModel(cfg)
    ours.load_state_dict(sd, strict=True)
    ours.eval().setup_caches(1)
    torch.manual_seed(0)
    theirs = CsmForConditionalGeneration(hf_config(cfg)).eval()
    hf_sd = weights.original_to_transformers(sd, cfg)
    missing, unexpected = theirs.load_state_dict(hf_sd, strict=False)
    # Only the codec (not compared) and the tied decoder embedding may be absent from the converted dict.
    assert not unexpected, unexpected
    assert all(k.startswith("codec_model.") or k == "depth_decoder.model.embed_tokens.weight" for k in missing), missing
    theirs.depth_decoder.model.embed_tokens.weight.data.copy_(sd["audio_embeddings.weight"])
    return ours, theirs, cfg


def _frames(cfg: CSMConfig, n_text: int, n_audio: int, seed: int = 0):
    """A context of text rows then audio rows (with the all-zero end row), as token frames + mask."""
    g = torch.Generator().manual_seed(seed)
    n_cb = cfg.audio_num_codebooks
    tokens = torch.zeros(n_text + n_audio, n_cb + 1, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    tokens[:n_text, -1] = torch.randint(0, cfg.text_vocab_size - 4, (n_text,), generator=g)
    mask[:n_text, -1] = True
    audio_codes = torch.randint(1, cfg.audio_vocab_size - 3, (n_audio - 1, n_cb), generator=g)
    tokens[n_text:n_text + n_audio - 1, :n_cb] = audio_codes
    mask[n_text:, :n_cb] = True
    return tokens[None], mask[None]


def _their_embeddings(theirs, tokens, mask):
    """transformers' own embedding modules applied row by row: text rows -> text table, audio rows -> codebooks."""
    text = theirs.embed_text_tokens(tokens[..., -1])
    audio = theirs.backbone_model.embed_tokens(tokens[..., :-1])
    is_text = mask[..., -1:]
    return torch.where(is_text, text, audio)


@torch.inference_mode()
def test_backbone_logits_match_transformers(pair):
    ours, theirs, cfg = pair
    tokens, mask = _frames(cfg, n_text=7, n_audio=5)
    pos = torch.arange(tokens.shape[1])
    our_logits = ours.codebook0_head(ours.backbone_hidden(tokens, mask, pos))
    their_hidden = theirs.backbone_model(inputs_embeds=_their_embeddings(theirs, tokens, mask)).last_hidden_state
    their_logits = theirs.lm_head(their_hidden)
    torch.testing.assert_close(our_logits, their_logits, atol=ATOL, rtol=1e-4)


@torch.inference_mode()
def test_decoder_logits_match_transformers(pair):
    ours, theirs, cfg = pair
    tokens, mask = _frames(cfg, n_text=5, n_audio=3, seed=1)
    h = ours.backbone_hidden(tokens, mask, torch.arange(tokens.shape[1]))[:, -1]
    codes = torch.randint(0, cfg.audio_vocab_size, (1, cfg.audio_num_codebooks),
                          generator=torch.Generator().manual_seed(2))
    # Ours: positions 0..31 = [h, c0, c1, ..., c30], logits for codebook i read at position i.
    n_cb = cfg.audio_num_codebooks
    emb = torch.stack([ours.embed_audio(i, codes[:, i]) for i in range(n_cb - 1)], dim=1)
    x = ours.projection(torch.cat([h[:, None], emb], dim=1))
    dh = ours.decoder_hidden(x, torch.arange(n_cb))
    our_logits = torch.stack([dh[:, i] @ ours.audio_head[i - 1] for i in range(1, n_cb)], dim=1)
    # Theirs: position 0 is a placeholder replaced by the backbone's last hidden state.
    ids = torch.cat([torch.zeros(1, 1, dtype=torch.long), codes[:, : n_cb - 1]], dim=1)
    their_logits = theirs.depth_decoder(input_ids=ids, backbone_last_hidden_state=h).logits
    torch.testing.assert_close(our_logits, their_logits, atol=ATOL, rtol=1e-4)


@torch.inference_mode()
def test_greedy_frames_match_transformers_generate(pair):
    ours, theirs, cfg = pair
    n_frames = 4
    text_ids = torch.randint(0, cfg.text_vocab_size - 4, (1, 9), generator=torch.Generator().manual_seed(3))
    their_codes = theirs.generate(
        input_ids=text_ids, max_new_tokens=n_frames, do_sample=False, depth_decoder_do_sample=False,
        output_audio=False,
    )
    their_codes = their_codes if isinstance(their_codes, torch.Tensor) else their_codes.sequences
    their_codes = their_codes[0, -n_frames:]  # (frames, 32)

    n_cb = cfg.audio_num_codebooks
    tokens = torch.zeros(1, text_ids.shape[1], n_cb + 1, dtype=torch.long)
    tokens[..., -1] = text_ids
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[..., -1] = True
    pos = torch.arange(tokens.shape[1])
    ours_codes = []
    for _ in range(n_frames):
        frame = ours.generate_frame(tokens, mask, pos, temperature=0.0, topk=1)
        ours_codes.append(frame[0])
        tokens = torch.cat([frame, torch.zeros(1, 1, dtype=torch.long)], dim=1)[:, None]
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[..., -1] = False
        pos = pos[-1:] + 1
    assert torch.equal(torch.stack(ours_codes), their_codes)
