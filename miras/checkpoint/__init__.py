"""Checkpoints: the folder layout, the manifest, commit, validation, retention and resume state.

A checkpoint is `runs/<run>/checkpoints/step_XXXXXXXX/`: a `from_pretrained` folder (config, sharded
safetensors, tokenizer files) plus `trainer/` (what resume needs) and `manifest.json`, written last.
"""

from .layout import LATEST_NAME, MANIFEST_NAME, checkpoint_name, parse_step
from .manifest import ManifestError, build_manifest, read_manifest, verify_folder, write_manifest

__all__ = [
    "LATEST_NAME",
    "MANIFEST_NAME",
    "ManifestError",
    "build_manifest",
    "checkpoint_name",
    "parse_step",
    "read_manifest",
    "verify_folder",
    "write_manifest",
]
