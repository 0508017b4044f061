"""Moving weights between Megatron model chunks, HF directories and Megatron dist-checkpoints.

All functions here are collective: every rank of the job calls them with its own model chunks
(after ``platform.init_distributed`` and ``models.build_model_chunks``).

* :func:`load_hf_weights` - each rank reads only its own shard of each HF tensor.
* :func:`iter_hf_tensors` - yields ``(hf_name, tensor)`` for this rank's pipeline stage, with the
  TP shards gathered; every TP rank receives the full tensors. Checkpoint export and weight sync
  both consume it.
* :func:`save_hf` - each pipeline stage's leader writes its layers' safetensors shard; global rank
  0 writes the index and the config/tokenizer files.
* :func:`save_mcore` / :func:`load_mcore` - a megatron-core ``torch_dist`` checkpoint plus
  ``mel_model.json`` (architecture, dtype, padded vocab, layout it was saved at). It loads at any
  TP/PP because sharded tensors carry global shapes and offsets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.models.gpt.gpt_model import GPTModel

from megatron_mel import platform
from megatron_mel.config import ConfigError
from megatron_mel.convert import hf_io
from megatron_mel.convert.mapping import MappingError, ParamMapping, map_param
from megatron_mel.convert.metadata import (
    MCORE_SUBDIR,
    METADATA_NAME,
    read_mcore_metadata,
    write_model_metadata,
)
from megatron_mel.models.arch import ModelArch


def unwrap(chunk: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, GPTModel) and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk  # type: ignore[return-value]


def layer_offset(chunk: torch.nn.Module) -> int:
    """Global index of the chunk's first transformer layer (its pipeline offset)."""
    layers = unwrap(chunk).decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def param_mappings(chunk: torch.nn.Module, arch: ModelArch) -> list[ParamMapping]:
    """Mapping of every parameter of ``chunk`` (module order, which is the same on all ranks)."""
    offset = layer_offset(chunk)
    return [map_param(name, arch, offset) for name, _ in unwrap(chunk).named_parameters()]


@torch.no_grad()
def load_hf_weights(
    chunks: list[torch.nn.Module], hf_dir: str | Path, arch: ModelArch, padded_vocab: int
) -> None:
    """Fill this rank's chunks from an HF checkpoint (no communication)."""
    reader = hf_io.HFCheckpointReader(hf_dir)
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        params = dict(unwrap(chunk).named_parameters())
        for mapping in param_mappings(chunk, arch):
            param = params[mapping.name]
            hf = [reader.get(name) for name in mapping.hf_names]
            shard = mapping.rule.layout.shard(hf, arch, tp_rank, tp_size, padded_vocab)
            if shard.shape != param.shape:
                raise MappingError(
                    f"{mapping.name}: HF {mapping.hf_names} give shape {tuple(shard.shape)}, "
                    f"Megatron expects {tuple(param.shape)}"
                )
            param.copy_(shard.to(param.dtype))


@torch.no_grad()
def iter_hf_tensors(
    chunks: list[torch.nn.Module], arch: ModelArch
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of this rank's pipeline stage, in a fixed order.

    Collective over the TP group: all TP ranks must iterate in lockstep. Tied-embedding copies on
    the last stage are skipped (the first stage exports the table).
    """
    tp_group = ps.get_tensor_model_parallel_group()
    tp_size = ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        params = dict(unwrap(chunk).named_parameters())
        for mapping in param_mappings(chunk, arch):
            if mapping.is_tied_copy:
                continue
            local = params[mapping.name].detach()
            if tp_size > 1 and mapping.rule.layout.sharded:
                local = platform.on_collective_device(local.contiguous(), tp_group)
                shards = [
                    platform.on_collective_device(torch.empty_like(local), tp_group)
                    for _ in range(tp_size)
                ]
                dist.all_gather(shards, local, group=tp_group)
            else:
                shards = [local]
            yield from zip(mapping.hf_names, mapping.rule.layout.merge(shards, arch))


def save_hf(
    chunks: list[torch.nn.Module],
    arch: ModelArch,
    out_dir: str | Path,
    *,
    metadata_from: str | Path,
) -> None:
    """Write an HF directory from the chunks of every rank (collective over the whole job).

    The leader of each pipeline stage (tp_rank 0, dp_rank 0) writes that stage's shard file;
    global rank 0 copies config/tokenizer files from ``metadata_from`` and writes the index.
    """
    out = Path(out_dir)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    pp_size = ps.get_pipeline_model_parallel_world_size()
    leader = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    tensors = dict(iter_hf_tensors(chunks, arch))
    file_name = hf_io.shard_file_name(pp_rank, pp_size)
    weight_map: dict[str, str] = {}
    size = 0
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    if leader:
        size = hf_io.write_safetensors(out / file_name, tensors)
        weight_map = dict.fromkeys(tensors, file_name)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (weight_map, size))
    if dist.get_rank() == 0:
        full_map: dict[str, str] = {}
        for part, _ in gathered:
            full_map.update(part)
        hf_io.copy_metadata_files(metadata_from, out)
        hf_io.set_config_dtype(out, dtype)
        hf_io.write_index(out, full_map, sum(s for _, s in gathered))
    dist.barrier()


def _sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    # One sub-dict per virtual-pipeline chunk: their module-local keys collide, while the
    # sharded-tensor keys inside are global, so any layout can read what any layout wrote.
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_mcore(
    chunks: list[torch.nn.Module],
    ckpt_dir: str | Path,
    *,
    hf_config: dict[str, Any],
    dtype: torch.dtype,
    padded_vocab: int,
    hf_metadata_from: str | Path | None = None,
) -> None:
    """Save a dist-checkpoint of the model (collective over all ranks)."""
    root = Path(ckpt_dir)
    if dist.get_rank() == 0:
        (root / MCORE_SUBDIR).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(chunks), str(root / MCORE_SUBDIR))
    if dist.get_rank() == 0:
        write_model_metadata(
            root,
            hf_config=hf_config,
            dtype=str(dtype).removeprefix("torch."),
            padded_vocab_size=padded_vocab,
            tp=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(),
            hf_files_from=hf_metadata_from,
        )
    dist.barrier()


def load_mcore(chunks: list[torch.nn.Module], ckpt_dir: str | Path, padded_vocab: int) -> None:
    """Load a dist-checkpoint into this rank's chunks (collective over all ranks)."""
    root = Path(ckpt_dir)
    meta = read_mcore_metadata(root)
    if meta["padded_vocab_size"] != padded_vocab:
        raise ConfigError(
            f"{root / METADATA_NAME}: checkpoint vocab is padded to {meta['padded_vocab_size']} "
            f"rows but this model pads to {padded_vocab}; set model.vocab_padding_multiple so "
            "they agree"
        )
    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(root / MCORE_SUBDIR))
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)
