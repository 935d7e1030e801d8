"""Loading CSM, Mimi and the text tokenizer from checkpoint directories or hub repos, either tensor layout.

The package is the engine's one place that knows file names, repo ids and formats (moshi's
``loaders.py`` habit), one module per job:

    hub.py          where checkpoints live: repo ids, file names, local dirs or hub downloads
    config_json.py  config.json in Sesame's original layout or transformers' CsmConfig, both ways
    layouts.py      tensor names and q/k row order of the two layouts, conversion both ways
    checkpoint.py   reading a checkpoint's tensors lazily; writing safetensors files atomically
    loading.py      building a CSMModel (one tensor at a time), Mimi and the text tokenizer

A CSM checkpoint directory holds ``config.json`` + ``model.safetensors`` (or shards with an
index). Tensors are read with ``safetensors`` only: nothing here ever unpickles a file. What
callers use is importable from here.
"""

from csm_engine.weights.checkpoint import (
                                           Checkpoint,
                                           load_state_dict,
                                           open_checkpoint,
                                           save_safetensors,
                                           write_safetensors,
)
from csm_engine.weights.config_json import config_from_transformers, read_config, transformers_config_dict
from csm_engine.weights.hub import (
                                           CONFIG_FILE,
                                           DEFAULT_CSM_REPO,
                                           MIMI_FILE,
                                           MIMI_REPO,
                                           MODEL_FILE,
                                           TOKENIZER_FILE,
                                           TOKENIZER_REPO,
                                           download_file,
                                           hub_error,
                                           hub_reachable,
                                           resolve_model_dir,
)
from csm_engine.weights.layouts import (
                                           ORIGINAL,
                                           TRANSFORMERS,
                                           detect_layout,
                                           expected_shapes,
                                           key_map,
                                           original_to_transformers,
                                           transformers_to_original,
)
from csm_engine.weights.loading import (
                                           as_dtype,
                                           find_mimi_file,
                                           find_tokenizer_file,
                                           load_csm_model,
                                           load_mimi,
                                           load_text_tokenizer,
)

__all__ = [
    "CONFIG_FILE", "DEFAULT_CSM_REPO", "MIMI_FILE", "MIMI_REPO", "MODEL_FILE", "ORIGINAL", "TOKENIZER_FILE",
    "TOKENIZER_REPO", "TRANSFORMERS", "Checkpoint", "as_dtype", "config_from_transformers", "detect_layout",
    "download_file", "expected_shapes", "find_mimi_file", "find_tokenizer_file", "hub_error", "hub_reachable",
    "key_map", "load_csm_model", "load_mimi", "load_state_dict", "load_text_tokenizer", "open_checkpoint",
    "original_to_transformers", "read_config", "resolve_model_dir", "save_safetensors", "transformers_config_dict",
    "transformers_to_original", "write_safetensors",
]
