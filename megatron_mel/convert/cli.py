"""``convert_checkpoint``: HF <-> Megatron dist-checkpoint conversion, with logit verification.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir H --out-dir M --tp T --pp P [--verify]
    python tools/convert_checkpoint.py mcore-to-hf --mcore-dir M --out-dir H2 \
        [--hf-config-from H] [--tp T --pp P] [--verify]

Both run on T x P ranks: under torchrun/srun on the launched ranks, otherwise on local workers
spawned here (gloo on CPU). Inputs are validated in the parent before any worker starts.
``--verify`` runs a fixed batch and a THD pack through Megatron (loaded from the written/read
checkpoint) and through transformers (from the HF side) at the checkpoint dtype and in fp64, and
exits 1 unless Megatron is as close to the fp64 logits as transformers itself is:
``max|Megatron - fp64| <= --noise-factor x max|transformers - fp64| + --tolerance``
(see megatron_mel/convert/verify.py for why a fixed tolerance cannot work).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_mel.config import ConfigError, ModelConfig, ParallelConfig
from megatron_mel.convert.verify import ABS_FLOOR, NOISE_FACTOR
from megatron_mel.models.arch import ModelArch, load_arch

DTYPE_NAMES = tuple(ABS_FLOOR)


@dataclass(frozen=True, slots=True)
class ConvertJob:
    direction: str  # hf-to-mcore | mcore-to-hf
    hf_dir: str  # source (hf-to-mcore) or metadata source (mcore-to-hf)
    mcore_dir: str
    out_dir: str
    tp: int
    pp: int
    dtype: str
    verify: bool
    noise_factor: float
    tolerance: float
    """Absolute floor added to the noise bound."""


def _hf_dtype(hf_cfg: dict) -> str:
    name = str(hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32")
    return name if name in ABS_FLOOR else "float32"


def plan_job(args: argparse.Namespace) -> tuple[ConvertJob, ModelArch]:
    """Validate the command line cheaply (no megatron import) and describe the job."""
    from megatron_mel.config import read_hf_config

    if args.direction == "hf-to-mcore":
        arch = load_arch(args.hf_dir)
        dtype = args.dtype or _hf_dtype(read_hf_config(args.hf_dir))
        hf_dir, mcore_dir = args.hf_dir, args.out_dir
    else:
        from megatron_mel.convert.metadata import (
            HF_META_SUBDIR,
            arch_of_checkpoint,
            read_mcore_metadata,
        )

        meta = read_mcore_metadata(args.mcore_dir)
        arch = arch_of_checkpoint(args.mcore_dir)
        dtype = args.dtype or meta["dtype"]
        hf_dir = args.hf_config_from or str(Path(args.mcore_dir) / HF_META_SUBDIR)
        if not (Path(hf_dir) / "config.json").is_file():
            raise ConfigError(
                f"{hf_dir}: no config.json to copy into the HF export; pass --hf-config-from"
            )
        mcore_dir = args.mcore_dir
    arch.validate_layout(ParallelConfig(tp=args.tp, pp=args.pp), args.tp * args.pp)
    tolerance = args.tolerance if args.tolerance is not None else ABS_FLOOR[dtype]
    job = ConvertJob(
        direction=args.direction,
        hf_dir=str(hf_dir),
        mcore_dir=str(mcore_dir),
        out_dir=str(args.out_dir),
        tp=args.tp,
        pp=args.pp,
        dtype=dtype,
        verify=args.verify,
        noise_factor=args.noise_factor,
        tolerance=tolerance,
    )
    return job, arch


def run_job(job: ConvertJob, arch: ModelArch) -> None:
    """Worker body: every rank calls it (see module docstring)."""
    from megatron_mel import platform
    from megatron_mel.convert import checkpoint
    from megatron_mel.models.gpt import DTYPES, build_model_chunks

    parallel = ParallelConfig(tp=job.tp, pp=job.pp)
    platform.init_distributed(parallel)
    model_cfg = ModelConfig(hf_dir=job.hf_dir, dtype=job.dtype)  # type: ignore[arg-type]
    padded = arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
    try:
        chunks = build_model_chunks(arch, model_cfg, parallel)
        if job.direction == "hf-to-mcore":
            from megatron_mel.config import read_hf_config

            checkpoint.load_hf_weights(chunks, job.hf_dir, arch, padded)
            checkpoint.save_mcore(
                chunks,
                job.out_dir,
                hf_config=read_hf_config(job.hf_dir),
                dtype=DTYPES[job.dtype],
                padded_vocab=padded,
                hf_metadata_from=job.hf_dir,
            )
            _say(f"saved Megatron checkpoint to {job.out_dir} (tp={job.tp} pp={job.pp})")
            if job.verify:
                fresh = build_model_chunks(arch, model_cfg, parallel)
                checkpoint.load_mcore(fresh, job.out_dir, padded)
                _verify(fresh, arch, job.hf_dir, job)
        else:
            checkpoint.load_mcore(chunks, job.mcore_dir, padded)
            checkpoint.save_hf(chunks, arch, job.out_dir, metadata_from=job.hf_dir)
            _say(f"saved HF checkpoint to {job.out_dir}")
            if job.verify:
                _verify(chunks, arch, job.out_dir, job)
    finally:
        platform.destroy_distributed()


def _verify(chunks: list, arch: ModelArch, hf_dir: str, job: ConvertJob) -> None:
    """Compare Megatron and transformers logits on fixed inputs (collective)."""

    from megatron_mel.convert.verify import check_parity, stop_unless_parity
    from megatron_mel.models.gpt import DTYPES

    report = check_parity(chunks, arch, hf_dir, DTYPES[job.dtype])
    header = f"verify: tp={job.tp} pp={job.pp} dtype={job.dtype}:"
    stop_unless_parity(report, job.noise_factor, job.tolerance, header)


def _say(message: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(message, flush=True)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="convert_checkpoint", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron dist-checkpoint")
    to_mcore.add_argument("--hf-dir", required=True)
    to_mcore.add_argument("--out-dir", required=True)
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron dist-checkpoint -> HF directory")
    to_hf.add_argument("--mcore-dir", required=True)
    to_hf.add_argument("--out-dir", required=True)
    to_hf.add_argument(
        "--hf-config-from",
        default=None,
        help="HF dir whose config/tokenizer files to copy (default: the checkpoint's hf/ copy)",
    )
    for p in (to_mcore, to_hf):
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to run with")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks to run with")
        p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None)
        p.add_argument("--verify", action="store_true", help="compare logits with transformers")
        add_noise_arguments(p)
    return parser


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """The verification bound's two knobs (shared with ``megatron-mel parity``)."""
    parser.add_argument(
        "--noise-factor", type=float, default=NOISE_FACTOR,
        help="pass when max|Megatron - fp64| <= this x max|transformers - fp64| + --tolerance",
    )  # fmt: skip
    parser.add_argument(
        "--tolerance", type=float, default=None,
        help=f"absolute floor added to the bound (default per dtype: {ABS_FLOOR})",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from megatron_mel.console import setup_console

    setup_console()
    args = build_parser().parse_args(argv)
    from megatron_mel.launch import WorkerFailed, run_workers

    try:
        job, arch = plan_job(args)
        run_workers(run_job, job.tp * job.pp, job, arch)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed:
        return 1
    return 0
