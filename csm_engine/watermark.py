"""Audio watermarking of generated speech with silentcipher (44.1 kHz, CSM's public key).

Everything CSM generates is marked so it can later be identified as synthetic, as Sesame's
reference does: silentcipher's 44.1 kHz model embeds the 5-byte key ``CSM_WATERMARK_KEY`` at a
message SDR of 36 dB, and ``verify`` decodes it back.

Model files: a local folder holding ``enc_c.ckpt``, ``dec_c.ckpt``, ``dec_m_0.ckpt`` and
``hparams.yaml`` (``ckpt_dir=`` or ``$CSM_WATERMARK_DIR``), else the hub repo ``sony/silentcipher``
(folder ``44_1_khz/73999_iteration``), downloaded once into the Hugging Face cache.

Costs on CPU (silentcipher's convolutions run over the whole 2049-bin spectrogram), measured
on a 2-core machine with the random-init model (timing does not depend on weight values): a
160 ms chunk takes ~110 ms to mark (0.5-0.75x real time when the machine is quiet, 2-3x when it
is shared), decoding ~3x real time. So ``verify`` reads only the first ``max_duration_s``
seconds and skips silentcipher's phase-shift search (205 decoder passes) unless asked; files
written by this project are never shifted.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from csm_engine.audio_io import resample
from csm_engine.errors import CSMError, first_line

if TYPE_CHECKING:
    from csm_engine.watermark_stream import StreamingWatermarker

# Sesame's public key for CSM-1B output. Public, so it marks audio; it does not authenticate it.
CSM_WATERMARK_KEY: tuple[int, ...] = (212, 211, 146, 56, 201)
WATERMARK_SAMPLE_RATE = 44100
# The strength Sesame's reference embeds with (silentcipher's own default is hparams' 47 dB).
MESSAGE_SDR_DB = 36.0

HUB_REPO_ID = "sony/silentcipher"
HUB_MODEL_SUBDIR = "44_1_khz/73999_iteration"
CHECKPOINT_FILES = ("enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt", "hparams.yaml")
WATERMARK_DIR_ENV = "CSM_WATERMARK_DIR"

# The 44.1 kHz model's STFT: 4096-sample window, 2048 hop; one message is 21 STFT frames long
# (20 two-bit symbols + an end marker), repeated over the whole clip.
STFT_WINDOW = 4096
STFT_HOP = 2048
MESSAGE_FRAMES = 21
MESSAGE_PERIOD_S = MESSAGE_FRAMES * STFT_HOP / WATERMARK_SAMPLE_RATE  # ~0.975 s
# Decoding needs at least one whole message; shorter clips cannot carry a verifiable mark.
MIN_VERIFY_S = (MESSAGE_FRAMES - 1) * STFT_HOP / WATERMARK_SAMPLE_RATE  # ~0.93 s
DEFAULT_VERIFY_S = 8.0
# Long clips are embedded in blocks of whole messages: silentcipher's activations grow with
# length (~90 MB per second of audio; 15 s peaked at +1.35 GB here) and a 90 s reply would
# need several GB. Blocks start on message boundaries, so the repeating pattern carries on.
BLOCK_MESSAGES = 6
BLOCK_SAMPLES = BLOCK_MESSAGES * MESSAGE_FRAMES * STFT_HOP  # at 44.1 kHz, ~5.9 s

_FIX_HINT = (
    f"set {WATERMARK_DIR_ENV} (or --watermark-dir) to a folder with "
    f"{', '.join(CHECKPOINT_FILES)} from the {HUB_REPO_ID} repo ({HUB_MODEL_SUBDIR}), "
    "or, when generating, pass --no-watermark"
)

# silentcipher keeps per-call state in shared objects: its STFT is a process-wide singleton
# whose `num_samples` each encode sets, and its BatchNorm layers run in training mode (the
# library never calls .eval(), and the published key was embedded that way, so we keep it),
# updating running statistics in place. One lock for every model in the process.
_SILENTCIPHER_LOCK = threading.Lock()


@dataclass(frozen=True)
class WatermarkResult:
    """Outcome of decoding a clip: is CSM's key there, and how consistently it decoded.

    ``confidence`` is silentcipher's agreement score in [0, 1] (the share of decoded symbols
    that match the majority message across the clip's repetitions), not a probability.
    ``message`` is the decoded 5-byte message, or None when nothing decodable was found.
    """

    present: bool
    confidence: float
    message: tuple[int, ...] | None
    detail: str = ""

    def describe(self) -> str:
        """One line for a CLI: the verdict plus the evidence."""
        if self.present:
            return f"CSM watermark present (confidence {self.confidence:.2f})"
        if self.message is None:
            why = self.detail or "no watermark message could be decoded"
            return f"no CSM watermark found: {why}"
        decoded = ", ".join(str(b) for b in self.message)
        return (
            f"no CSM watermark found: decoded message [{decoded}] is not the CSM key "
            f"(confidence {self.confidence:.2f})"
        )


class Watermarker:
    """A loaded silentcipher 44.1 kHz model plus the key it embeds and looks for.

    Safe to share between threads: calls into silentcipher are serialized by a lock.
    """

    sample_rate = WATERMARK_SAMPLE_RATE

    def __init__(self, model, *, source: Path, device: str = "cpu",
                 key: tuple[int, ...] = CSM_WATERMARK_KEY) -> None:
        if len(key) != 5 or not all(0 <= int(b) <= 255 for b in key):
            raise CSMError(f"watermark key must be 5 bytes (0-255), got {list(key)}")
        self.model = model
        self.source = Path(source)
        self.device = str(device)
        self.key = tuple(int(b) for b in key)

    def __repr__(self) -> str:
        return f"Watermarker(source={str(self.source)!r}, device={self.device!r})"

    def apply(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Watermark a mono clip; returns float32 audio of the same length and sample rate."""
        samples = mono_samples(wav, "audio to watermark")
        if samples.size == 0 or not np.any(samples):
            # Silence carries no watermark (silentcipher would print and return it unchanged).
            return _like_input(samples.copy(), wav)
        marked = self.apply_numpy(samples, sample_rate)
        return _like_input(marked, wav)

    def apply_numpy(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Watermark float32 mono samples at ``sample_rate`` Hz; same length out."""
        check_rate(sample_rate)
        samples = np.asarray(samples, dtype=np.float32)
        if samples.size == 0 or not np.any(samples):
            return samples.copy()
        at_44k = resample(samples, sample_rate, WATERMARK_SAMPLE_RATE)
        encoded = np.concatenate([self._encode_block(block) for block in _blocks(at_44k, BLOCK_SAMPLES)])
        # Carry back only what the watermark changed: the message lives below ~11 kHz (1024 of
        # 2049 bins), inside a 24 kHz clip's band, so the original samples are not put through
        # a second round of resampling filters.
        delta = encoded - at_44k
        delta = _fit_length(resample(delta, WATERMARK_SAMPLE_RATE, sample_rate), samples.size)
        return (samples + delta).astype(np.float32)

    def _encode_block(self, block: np.ndarray) -> np.ndarray:
        if not np.any(block):
            return block  # silence carries no mark (silentcipher would print and skip it)
        with _SILENTCIPHER_LOCK:
            encoded, _ = self.model.encode_wav(
                block, WATERMARK_SAMPLE_RATE, list(self.key),
                message_sdr=MESSAGE_SDR_DB, calc_sdr=False,  # the SDR report is unused (and breaks off 44.1 kHz)
            )
        return np.asarray(encoded, dtype=np.float32)

    def verify(self, wav: torch.Tensor | np.ndarray, sample_rate: int, *,
               phase_shift_search: bool = False,
               max_duration_s: float | None = DEFAULT_VERIFY_S) -> WatermarkResult:
        """Decode the first ``max_duration_s`` seconds (None: all) and compare with the key.

        ``phase_shift_search`` runs silentcipher's alignment search (as Sesame's reference
        does); it costs 205 decoder passes and only matters for clips that were cut or shifted.
        """
        check_rate(sample_rate)
        samples = mono_samples(wav, "audio to verify")
        if max_duration_s is not None:
            samples = samples[: int(round(max_duration_s * sample_rate))]
        duration_s = samples.size / sample_rate
        if duration_s < MIN_VERIFY_S:
            return WatermarkResult(False, 0.0, None,
                                   f"clip is {duration_s:.2f} s, shorter than one watermark "
                                   f"message ({MIN_VERIFY_S:.2f} s)")
        if not np.any(samples):
            return WatermarkResult(False, 0.0, None, "the clip is silent")
        at_44k = resample(samples, sample_rate, WATERMARK_SAMPLE_RATE)
        with _SILENTCIPHER_LOCK, warnings.catch_warnings():
            # An undecodable clip makes scipy/numpy warn on its way to status=False.
            warnings.simplefilter("ignore")
            result = self.model.decode_wav(at_44k, WATERMARK_SAMPLE_RATE,
                                           phase_shift_decoding=phase_shift_search)
        return _result_from_decode(result, self.key)

    def streaming(self, sample_rate: int = 24000, min_samples: int | None = None) -> StreamingWatermarker:
        """A ``StreamingWatermarker`` (``csm_engine.watermark_stream``) for PCM chunks at ``sample_rate`` Hz."""
        from csm_engine.watermark_stream import StreamingWatermarker

        return StreamingWatermarker(self, sample_rate=sample_rate, min_samples=min_samples)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_watermarker(ckpt_dir: str | Path | None = None, device: str = "cpu") -> Watermarker:
    """Load (once per folder and device) the silentcipher 44.1 kHz model.

    ``ckpt_dir`` or ``$CSM_WATERMARK_DIR`` names a local checkpoint folder (or a download of the
    whole ``sony/silentcipher`` repo); with neither, the model comes from the hub cache.
    """
    chosen = ckpt_dir if ckpt_dir is not None else os.environ.get(WATERMARK_DIR_ENV) or None
    key = str(Path(chosen).expanduser().resolve()) if chosen is not None else None
    return _load_watermarker_cached(key, str(device))


@lru_cache(maxsize=4)
def _load_watermarker_cached(ckpt_dir: str | None, device: str) -> Watermarker:
    folder = checkpoint_dir(ckpt_dir)
    model = _load_silentcipher(folder, device)
    return Watermarker(model, source=folder, device=device)


def checkpoint_dir(ckpt_dir: str | Path | None = None) -> Path:
    """The folder holding the model files: checked if given, else fetched from the hub."""
    if ckpt_dir is None:
        return _download_checkpoint()
    folder = Path(ckpt_dir).expanduser()
    if not folder.is_dir():
        raise CSMError(f"watermark model folder {folder} does not exist; {_FIX_HINT}")
    if not (folder / "hparams.yaml").is_file() and (folder / HUB_MODEL_SUBDIR).is_dir():
        folder = folder / HUB_MODEL_SUBDIR  # a download of the whole repo
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise CSMError(f"watermark model folder {folder} lacks {', '.join(missing)}; {_FIX_HINT}")
    return folder


def _download_checkpoint() -> Path:
    try:
        from huggingface_hub import snapshot_download

        # Only the 44.1 kHz inference files: the repo also holds optimizer state and a 16 kHz model.
        root = snapshot_download(
            repo_id=HUB_REPO_ID,
            allow_patterns=[f"{HUB_MODEL_SUBDIR}/{name}" for name in CHECKPOINT_FILES],
        )
    except Exception as error:  # noqa: BLE001 - any hub failure has the same fix
        raise CSMError(
            f"could not get the watermark model from the hub ({HUB_REPO_ID}: {first_line(error)}); "
            f"connect once so it is cached, or {_FIX_HINT}"
        ) from error
    return checkpoint_dir(Path(root) / HUB_MODEL_SUBDIR)


def _load_silentcipher(folder: Path, device: str):
    import yaml

    try:
        hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CSMError(f"cannot read {folder / 'hparams.yaml'}: {first_line(error)}; {_FIX_HINT}") from error
    if not isinstance(hparams, dict) or hparams.get("SR") != WATERMARK_SAMPLE_RATE:
        got = hparams.get("SR") if isinstance(hparams, dict) else None
        raise CSMError(
            f"{folder / 'hparams.yaml'} is not silentcipher's 44.1 kHz model (SR={got}); {_FIX_HINT}"
        )
    # silentcipher calls torch.load itself; on torch >= 2.6 that already means weights_only=True.
    # Checking every file here with weights_only=True keeps that guarantee on older torch too:
    # a .ckpt that needs arbitrary pickled code is refused before the library opens it.
    for name in CHECKPOINT_FILES[:-1]:
        try:
            torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - corrupt, truncated or not a tensor file
            raise CSMError(
                f"{folder / name} is not a readable weights file ({first_line(error)}); "
                f"re-download it or {_FIX_HINT}"
            ) from error
    silentcipher = _import_silentcipher()
    try:
        return silentcipher.get_model(
            model_type="44.1k",
            ckpt_path=str(folder),
            config_path=str(folder / "hparams.yaml"),
            device=device,
        )
    except (RuntimeError, KeyError, AttributeError, ValueError, TypeError, AssertionError) as error:
        raise CSMError(
            f"could not load the watermark model from {folder} ({first_line(error)}); {_FIX_HINT}"
        ) from error


def _import_silentcipher():
    try:
        with warnings.catch_warnings():
            # pydub (imported by silentcipher) warns about a missing ffmpeg that we never use.
            warnings.simplefilter("ignore", RuntimeWarning)
            import silentcipher
    except ImportError as error:
        raise CSMError(
            "silentcipher is not installed; run `pip install --no-deps silentcipher==1.0.5` "
            "(its torch pin is too old; librosa, pydub and pyyaml are needed) or pass --no-watermark"
        ) from error
    return silentcipher


# ---------------------------------------------------------------------------------------------
# Module-level conveniences (what csm-generate, csm-verify and the agent call)
# ---------------------------------------------------------------------------------------------


def apply_watermark(wav: torch.Tensor, sample_rate: int,
                    watermarker: Watermarker | None = None) -> torch.Tensor:
    """Watermark a (samples,) float32 clip with CSM's key; same length and sample rate out."""
    return (watermarker or load_watermarker()).apply(wav, sample_rate)


def verify(wav: torch.Tensor | np.ndarray, sample_rate: int, watermarker: Watermarker | None = None,
           **options) -> WatermarkResult:
    """Whether CSM's watermark is in a mono clip (see ``Watermarker.verify`` for options)."""
    return (watermarker or load_watermarker()).verify(wav, sample_rate, **options)


def verify_file(path: str | Path, watermarker: Watermarker | None = None, **options) -> WatermarkResult:
    """Whether CSM's watermark is in an audio file (WAV/FLAC/OGG; channels are averaged)."""
    from csm_engine.audio_io import load_audio  # missing/unreadable/empty files -> CSMError

    samples = load_audio(path, sample_rate=WATERMARK_SAMPLE_RATE)
    return verify(samples, WATERMARK_SAMPLE_RATE, watermarker, **options)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _result_from_decode(result: dict, key: tuple[int, ...]) -> WatermarkResult:
    """silentcipher's decode_wav dict -> WatermarkResult for the first (only) message."""
    if not result.get("status") or not result.get("messages"):
        return WatermarkResult(False, 0.0, None, "no watermark message could be decoded")
    message = tuple(int(b) for b in result["messages"][0])
    confidence = float(result["confidences"][0]) if result.get("confidences") else 0.0
    return WatermarkResult(message == tuple(key), confidence, message)


def mono_samples(wav: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """``wav`` as 1-D float32 numpy samples; CSMError naming ``what`` when it is not mono or not finite."""
    if isinstance(wav, torch.Tensor):
        array = wav.detach().to("cpu", torch.float32).numpy()
    else:
        array = np.asarray(wav, dtype=np.float32)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise CSMError(f"{what} must be mono (samples,), got shape {tuple(array.shape)}; downmix it first")
    if not np.all(np.isfinite(array)):
        raise CSMError(f"{what} contains NaN or infinite samples; check what produced it")
    return array


def _like_input(samples: np.ndarray, like: torch.Tensor | np.ndarray) -> torch.Tensor:
    out = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    if isinstance(like, torch.Tensor):
        out = out.to(like.device)
    return out


def check_rate(sample_rate: int) -> None:
    """CSMError unless ``sample_rate`` is a positive whole number of Hz."""
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise CSMError(f"sample_rate must be a positive integer in Hz, got {sample_rate!r}")


def _blocks(samples: np.ndarray, size: int) -> list[np.ndarray]:
    return [samples[i:i + size] for i in range(0, samples.size, size)] or [samples]


def _fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    if samples.size >= length:
        return samples[:length]
    return np.pad(samples, (0, length - samples.size))

