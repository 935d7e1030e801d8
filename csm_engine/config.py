"""Model flavors of CSM as frozen dataclasses.

A checkpoint's ``config.json`` (original Sesame layout) names its flavors:
``{"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M", "text_vocab_size": 128256,
"audio_vocab_size": 2051, "audio_num_codebooks": 32}``. Test flavors that no public checkpoint
uses are written with their dimensions inline (``"backbone": {...}``) so that any file written
by ``make-checkpoint`` is self-describing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FRAME_RATE_HZ = 12.5
SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 1920  # 80 ms at 24 kHz
FRAME_MS = 80


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling of rotary embeddings."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TransformerConfig:
    """One Llama-style transformer (the backbone or the audio decoder)."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    intermediate_dim: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def n_params(self) -> int:
        """Parameters of the transformer layers and final norm (no embeddings or heads)."""
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * self.dim * self.intermediate_dim
        return self.n_layers * (attn + mlp + 2 * self.dim) + self.dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        d = dict(d)
        rs = d.pop("rope_scaling", {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown transformer config keys: {sorted(unknown)}")
        return cls(**d, rope_scaling=RopeScaling(**rs) if rs is not None else None)


# The flavors of the public reference implementation, plus small ones for tests.
TRANSFORMER_FLAVORS: dict[str, TransformerConfig] = {
    "llama-8B": TransformerConfig(n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, intermediate_dim=14336),
    "llama-3B": TransformerConfig(n_layers=28, dim=3072, n_heads=24, n_kv_heads=8, intermediate_dim=8192),
    "llama-1B": TransformerConfig(n_layers=16, dim=2048, n_heads=32, n_kv_heads=8, intermediate_dim=8192),
    "llama-100M": TransformerConfig(n_layers=4, dim=1024, n_heads=8, n_kv_heads=2, intermediate_dim=8192),
    # tiny: a few MB, every code path (GQA, scaled RoPE, both transformers) but fast.
    "tiny-backbone": TransformerConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, intermediate_dim=128),
    "tiny-decoder": TransformerConfig(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, intermediate_dim=64),
}


@dataclass(frozen=True)
class CSMConfig:
    """A whole CSM model: backbone + audio decoder + vocabularies."""

    backbone_flavor: str
    decoder_flavor: str
    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    audio_num_codebooks: int = 32

    @property
    def max_seq_len(self) -> int:
        return self.backbone.max_seq_len

    @property
    def frame_width(self) -> int:
        """Columns of one token frame: the audio codebooks then the text token."""
        return self.audio_num_codebooks + 1

    def to_json_dict(self) -> dict[str, Any]:
        """The original-layout config.json; non-public flavors carry their dimensions."""
        d: dict[str, Any] = {
            "backbone_flavor": self.backbone_flavor,
            "decoder_flavor": self.decoder_flavor,
            "text_vocab_size": self.text_vocab_size,
            "audio_vocab_size": self.audio_vocab_size,
            "audio_num_codebooks": self.audio_num_codebooks,
        }
        for key, name, cfg in (("backbone", self.backbone_flavor, self.backbone),
                               ("decoder", self.decoder_flavor, self.decoder)):
            if TRANSFORMER_FLAVORS.get(name) != cfg:
                d[key] = cfg.to_dict()
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> CSMConfig:
        """Parse a config.json of the original layout (raises ValueError naming the bad key)."""
        try:
            b_name, d_name = d["backbone_flavor"], d["decoder_flavor"]
        except KeyError as e:
            raise ValueError(f"config.json lacks {e.args[0]!r}") from None

        def resolve(key: str, name: str) -> TransformerConfig:
            if key in d:
                return TransformerConfig.from_dict(d[key])
            if name not in TRANSFORMER_FLAVORS:
                raise ValueError(f"config.json: unknown {key}_flavor {name!r} "
                                 f"(known: {', '.join(TRANSFORMER_FLAVORS)})")
            return TRANSFORMER_FLAVORS[name]

        return cls(
            backbone_flavor=b_name,
            decoder_flavor=d_name,
            backbone=resolve("backbone", b_name),
            decoder=resolve("decoder", d_name),
            text_vocab_size=int(d.get("text_vocab_size", 128_256)),
            audio_vocab_size=int(d.get("audio_vocab_size", 2051)),
            audio_num_codebooks=int(d.get("audio_num_codebooks", 32)),
        )


def _flavor(backbone: str, decoder: str, **kw: Any) -> CSMConfig:
    return CSMConfig(backbone_flavor=backbone, decoder_flavor=decoder,
                     backbone=TRANSFORMER_FLAVORS[backbone], decoder=TRANSFORMER_FLAVORS[decoder], **kw)


# Model flavors. "1B" is the released sesame/csm-1b. "tiny" keeps the real vocabularies'
# structure (2051 audio tokens, 32 codebooks, because Mimi emits them) but a small text vocab.
FLAVORS: dict[str, CSMConfig] = {
    "1B": _flavor("llama-1B", "llama-100M"),
    "3B": _flavor("llama-3B", "llama-100M"),
    "8B": _flavor("llama-8B", "llama-100M"),
    "tiny": _flavor("tiny-backbone", "tiny-decoder", text_vocab_size=512),
}


def get_flavor(name: str) -> CSMConfig:
    try:
        return FLAVORS[name]
    except KeyError:
        raise ValueError(f"unknown model flavor {name!r}; choose one of {', '.join(FLAVORS)}") from None
