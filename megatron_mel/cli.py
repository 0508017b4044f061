"""``megatron-mel``: the command line of the project.

megatron-mel assets   [--cache-dir D]                  offline model + data (no hub access)
megatron-mel convert  hf-to-mcore|mcore-to-hf ...      checkpoint conversion (tools/ alias)
megatron-mel parity   --hf-dir H [--tp T --pp P]       Megatron vs transformers logits, log-probs
megatron-mel config   RECIPE.yaml [--set k=v ...]      validate and print a resolved config
megatron-mel train    RECIPE.yaml [--set k=v ...]      train (spawns ranks, or runs under torchrun)
megatron-mel eval     RECIPE.yaml [--hf-dir H]          evaluate a model on the recipe's benchmarks
megatron-mel serve    RECIPE.yaml [--node N]            a rollout-only node's SGLang servers
megatron-mel report   RUN_DIR [RUN_DIR ...] [--out D]   PNG plots + markdown summary of runs
megatron-mel plan     RECIPE.yaml [--nodes N --gpus-per-node G --gpu-mem-gib M] [--json]
                                                       layout + per-GPU memory, or a refusal
"""

from __future__ import annotations

import argparse
import sys

from megatron_mel.config import ConfigError


def _parity(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-mel parity")
    parser.add_argument("--hf-dir", default=None, help="HF model dir (default: SmolLM2 asset)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    from megatron_mel.convert.cli import add_noise_arguments

    add_noise_arguments(parser)
    args = parser.parse_args(argv)

    from megatron_mel.config import ParallelConfig
    from megatron_mel.convert.verify import ABS_FLOOR, run_parity
    from megatron_mel.launch import WorkerFailed, run_workers
    from megatron_mel.models.arch import load_arch

    hf_dir = args.hf_dir
    if hf_dir is None:
        from megatron_mel.assets import prepare_assets

        hf_dir = str(prepare_assets().model_dir)
    arch = load_arch(hf_dir)
    arch.validate_layout(ParallelConfig(tp=args.tp, pp=args.pp), args.tp * args.pp)
    floor = args.tolerance if args.tolerance is not None else ABS_FLOOR[args.dtype]
    try:
        run_workers(run_parity, args.tp * args.pp, hf_dir, args.tp, args.pp, args.dtype,
                    args.noise_factor, floor)  # fmt: skip
    except WorkerFailed as exc:
        return exc.exit_code
    return 0


def _config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-mel config")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args(argv)

    import yaml

    from megatron_mel.config import load_config, to_dict

    cfg = load_config(args.recipe, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _recipe_args(prog: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"megatron-mel {prog}")
    parser.add_argument("recipe", help="YAML recipe, e.g. examples/tiny_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    if prog == "eval":
        parser.add_argument("--hf-dir", default=None, help="evaluate this HF model instead")
    return parser.parse_args(argv)


def _train(argv: list[str]) -> int:
    """Validate everything cheap in this process, then run on TP x PP x DP ranks."""
    from pathlib import Path

    from megatron_mel.config import load_config
    from megatron_mel.data.datasets import load_run_datasets
    from megatron_mel.launch import WorkerFailed, already_launched, run_workers
    from megatron_mel.models.arch import load_arch
    from megatron_mel.run_dir import check_run_dir

    args = _recipe_args("train", argv)
    cfg = load_config(args.recipe, args.overrides)
    check_run_dir(cfg.launch.run_dir)
    arch = load_arch(cfg.model.hf_dir)
    _check_model_files(cfg.model.hf_dir)
    from megatron_mel.platform import launcher_env

    # Under torchrun/srun the launcher decides the world size (DP is inferred from it);
    # started plainly, we spawn TP x PP x DP local ranks.
    if already_launched():
        world = launcher_env()[1]
    else:
        world = cfg.parallel.tp * cfg.parallel.pp * (cfg.parallel.dp or 1)
    arch.validate_layout(cfg.parallel, world)
    # A bad record fails here, naming file:line and key.
    load_run_datasets(cfg.data, eval_limit=cfg.trainer.eval_limit)
    from megatron_mel.hooks import RewardFn, load_hook

    load_hook(cfg.reward.function, RewardFn, key="reward.function")
    try:
        # By name: this process never imports megatron-core (seconds of start-up saved).
        run_workers("megatron_mel.trainer.loop:train", world, cfg, Path(args.recipe).stem,
                    graceful_stop=True)  # fmt: skip
    except WorkerFailed as exc:  # its line is printed; the code says why (lifecycle.EXIT_*)
        return exc.exit_code
    return 0


def _check_model_files(hf_dir: str) -> None:
    """Weights readable (safetensors headers) and a tokenizer present: one line naming the file
    now, instead of a traceback from a worker later."""
    from megatron_mel.convert.hf_io import HFCheckpointReader, check_tokenizer_files

    HFCheckpointReader(hf_dir)
    check_tokenizer_files(hf_dir)


def _eval(argv: list[str]) -> int:
    from megatron_mel.config import load_config
    from megatron_mel.trainer.evaluate_cli import run_eval

    args = _recipe_args("eval", argv)
    overrides = list(args.overrides)
    if args.hf_dir:
        overrides.append(f"model.hf_dir={args.hf_dir}")
    cfg = load_config(args.recipe, overrides)
    _check_model_files(cfg.model.hf_dir)
    return run_eval(cfg)


def _assets(argv: list[str]) -> int:
    from megatron_mel.assets import main

    return main(argv)


def _report(argv: list[str]) -> int:
    from megatron_mel.report import main

    return main(argv)


def _convert(argv: list[str]) -> int:
    from megatron_mel.convert.cli import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    """Start the SGLang servers the placement puts on this rollout-only node and keep them up
    until SIGTERM/SIGINT (disaggregated jobs: slurm/launch.sh runs it on the rollout nodes)."""
    import os
    import signal
    import threading

    from megatron_mel.config import load_config
    from megatron_mel.rollout import placement
    from megatron_mel.rollout.servers import NodeServers

    parser = argparse.ArgumentParser(prog="megatron-mel serve")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--node", type=int, default=None, help="node index (default SLURM_NODEID)")
    args = parser.parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    node = args.node if args.node is not None else int(os.environ.get("SLURM_NODEID", "-1"))
    layout = placement.serve_layout(cfg)
    if not layout.topology.train_nodes <= node < layout.topology.num_nodes:
        raise ConfigError(
            f"--node {node}: rollout-only nodes are {list(layout.rollout_only_nodes)} "
            "(training nodes start their own servers)"
        )
    servers = NodeServers(layout.engines_on(node), cfg.rollout, model_path=cfg.model.hf_dir,
                          seed=cfg.launch.seed, log_dir=f"{cfg.launch.run_dir}/engine_logs")  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Slurm's time-limit warning reaches every process of the step; the trainers finish their
    # step on these servers first, and `srun --wait` ends this task once they are done.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        for url in servers.start():
            print(f"serving {url}", flush=True)
        stop.wait()
    finally:
        servers.close()
    return 0


def _plan(argv: list[str]) -> int:
    """Print the layout and memory estimate; exit 2 with the reason when it cannot fit."""
    import json

    from megatron_mel.config import load_config
    from megatron_mel.plan import describe, make_plan, to_json

    parser = argparse.ArgumentParser(prog="megatron-mel plan")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes of the allocation: training + launch.rollout_nodes")  # fmt: skip
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="training ranks per node (default: one per GPU)")  # fmt: skip
    parser.add_argument("--gpu-mem-gib", type=float, default=None,
                        help="memory of one GPU; without it the fit is not checked")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus_per_node", "ranks_per_node"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"plan: --{name.replace('_', '-')} must be >= 1")
    cfg = load_config(args.recipe, args.overrides)
    plan = make_plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     ranks_per_node=args.ranks_per_node, gpu_mem_gib=args.gpu_mem_gib)  # fmt: skip
    if args.json:
        print(json.dumps(to_json(plan), indent=1))
    else:
        print(describe(plan, cfg, args.recipe))
    if plan.refusal is not None:
        print(f"error: plan refused: {plan.refusal}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {
    "assets": _assets,
    "convert": _convert,
    "parity": _parity,
    "config": _config,
    "train": _train,
    "eval": _eval,
    "serve": _serve,
    "report": _report,
    "plan": _plan,
}


def main(argv: list[str] | None = None) -> int:
    from megatron_mel import lifecycle
    from megatron_mel.console import setup_console
    from megatron_mel.platform import launcher_env

    setup_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            __doc__.strip(),
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # Under torchrun/srun every rank runs this; one of them says what happened.
    speaks = launcher_env()[0] == 0
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as exc:
        if speaks:
            print(f"error: {exc}", file=sys.stderr)
        return lifecycle.EXIT_USAGE
    except lifecycle.RunStopped as exc:
        if speaks:
            print(exc, file=sys.stderr)
        return lifecycle.EXIT_STOPPED
    except KeyboardInterrupt:  # Ctrl-C before the workers (and their handler) started
        print("interrupted", file=sys.stderr)
        return 128 + 2


EXIT_STATUS_ENV = "MEL_EXIT_STATUS_FILE"


def record_exit_status(code: int) -> None:
    """Rank 0 writes its exit status to ``$MEL_EXIT_STATUS_FILE`` when set: torchrun reports any
    failed worker as 1, and slurm/launch.sh needs to tell a stop at a checkpoint (75, requeue)
    from a failure."""
    import os

    path = os.environ.get(EXIT_STATUS_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"{code}\n")


if __name__ == "__main__":
    status = main()
    record_exit_status(status)
    sys.exit(status)
