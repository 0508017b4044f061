"""The layout of a megatron-mel model checkpoint directory, readable without megatron-core.

<dir>/mel_model.json   architecture (the HF config), dtype, padded vocab, saved layout
<dir>/model/           megatron-core torch_dist checkpoint (loads at any TP/PP)
<dir>/hf/              config/tokenizer files, so an HF export needs no other input
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_mel.config import ConfigError
from megatron_mel.models.arch import ModelArch, arch_from_hf_config

MCORE_SUBDIR = "model"
METADATA_NAME = "mel_model.json"
HF_META_SUBDIR = "hf"
FORMAT_VERSION = 1


def write_model_metadata(
    root: str | Path,
    *,
    hf_config: dict[str, Any],
    dtype: str,
    padded_vocab_size: int,
    tp: int,
    pp: int,
    hf_files_from: str | Path | None,
) -> None:
    """Write ``mel_model.json`` (and the ``hf/`` files) of a checkpoint directory; rank 0 only.

    Both the conversion tool and training checkpoints write it, so either converts back to HF.
    """
    from megatron_mel.convert.hf_io import copy_metadata_files

    meta = {
        "format_version": FORMAT_VERSION,
        "hf_config": hf_config,
        "dtype": dtype,
        "padded_vocab_size": padded_vocab_size,
        "saved_layout": {"tp": tp, "pp": pp},
    }
    (Path(root) / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    if hf_files_from is not None:
        copy_metadata_files(hf_files_from, Path(root) / HF_META_SUBDIR)


def read_mcore_metadata(ckpt_dir: str | Path) -> dict[str, Any]:
    """The ``mel_model.json`` of a checkpoint, with clear errors for a wrong directory."""
    root = Path(ckpt_dir)
    path = root / METADATA_NAME
    if not root.is_dir():
        raise ConfigError(f"Megatron checkpoint directory {str(root)!r} does not exist")
    if not path.is_file() or not (root / MCORE_SUBDIR).is_dir():
        raise ConfigError(
            f"{root}: not a megatron-mel checkpoint (expected {METADATA_NAME} and {MCORE_SUBDIR}/)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return meta


def arch_of_checkpoint(ckpt_dir: str | Path) -> ModelArch:
    """The model architecture a checkpoint was saved with."""
    meta = read_mcore_metadata(ckpt_dir)
    return arch_from_hf_config(meta["hf_config"], source=str(Path(ckpt_dir) / METADATA_NAME))
