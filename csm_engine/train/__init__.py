"""``csm-finetune``: fine-tune CSM (LoRA or full) on clips, manifests or saved conversations.

The path of a run, one module each:

- ``data``: find utterances (audio + transcript + speaker, with conversation and turn order)
  in clip folders, ``voices.toml`` tables, JSONL manifests and csm-chat conversation directories;
- ``codes``: audio -> 24 kHz -> trimmed -> Mimi codes, cached by content, with a progress bar;
- ``samples``: a target utterance with the earlier turns of its conversation as context,
  trimmed to the window by whole turns, as token frames + labels on the target's audio only;
- ``loss``: CSM's loss, codebook 0 from the backbone on every target frame plus codebooks
  1..31 from the decoder on a random share of them (1/16 by default);
- ``lora``: LoRA through ``peft`` on the model's own ``nn.Linear`` layers, or full weights;
- ``trainer``: accumulation, schedule, eval split, checkpoints, resume, Ctrl-C;
- ``cli``: the ``csm-finetune`` command (and ``--merge``).

The adapter files it writes are read by ``csm_engine.adapters`` (no ``peft`` needed there).
"""
