"""Reading and writing Hugging Face model directories (safetensors + config + tokenizer).

Reads are lazy (``safe_open`` per tensor) so each rank touches only the tensors of its own shard.
Writes produce what ``transformers`` loads: ``model-XXXXX-of-YYYYY.safetensors`` files, an index
when there is more than one, and the non-weight files copied from a reference directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_mel.config import ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Everything transformers needs besides the weights.
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def _tensor_names(path: Path) -> list[str]:
    """Names in a safetensors file; ConfigError naming the file if it is truncated or broken
    (safetensors checks that the header's offsets cover the file exactly)."""
    if not path.is_file():
        raise ConfigError(f"{path}: missing (named by {INDEX_NAME})")
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # SafetensorError is not exported under a stable name
        raise ConfigError(
            f"{path}: not a readable safetensors file ({exc}); the file is truncated or "
            "damaged: copy or download it again"
        ) from None


def check_tokenizer_files(hf_dir: str | Path, key: str = "model.hf_dir") -> None:
    """ConfigError unless ``hf_dir`` holds a tokenizer transformers can load without extras
    (its own error for a missing tokenizer.json suggests installing sentencepiece)."""
    d = Path(hf_dir)
    if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file():
        return
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return
    raise ConfigError(
        f"{key}: {d} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json + "
        "merges.txt); copy the tokenizer files from the original model directory"
    )


class HFCheckpointReader:
    """Name -> tensor access over the safetensors files of an HF directory."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConfigError(f"HF model directory {str(self.dir)!r} does not exist")
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"{index}: not a safetensors index ({exc})") from None
            for file in sorted(set(weight_map.values())):
                _tensor_names(self.dir / file)
            self.files = {name: self.dir / file for name, file in weight_map.items()}
        elif (self.dir / SINGLE_NAME).is_file():
            names = _tensor_names(self.dir / SINGLE_NAME)
            self.files = dict.fromkeys(names, self.dir / SINGLE_NAME)
        else:
            raise ConfigError(
                f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints "
                "are supported; re-save with save_pretrained(safe_serialization=True))"
            )

    def names(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        path = self.files.get(name)
        if path is None:
            raise ConfigError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write ``tensors`` (contiguous CPU copies) to ``path``; return the byte count."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(cpu, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in cpu.values())


def write_index(out_dir: str | Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write the safetensors index; a single shard is renamed to ``model.safetensors`` instead."""
    out = Path(out_dir)
    files = sorted(set(weight_map.values()))
    if len(files) == 1:
        (out / files[0]).rename(out / SINGLE_NAME)
        return
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_metadata_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy config, generation config and tokenizer files; return the names copied."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in METADATA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    if "config.json" not in copied:
        raise ConfigError(f"{src}: config.json is missing")
    return copied


def set_config_dtype(out_dir: str | Path, dtype: torch.dtype) -> None:
    """Record the weights' dtype in config.json (``dtype`` in transformers 5, ``torch_dtype``
    before), so ``from_pretrained(dtype="auto")`` loads them as written."""
    path = Path(out_dir) / "config.json"
    cfg = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
