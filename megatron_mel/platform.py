"""Device, process groups and Megatron parallel state, for cuda/nccl clusters and cpu/gloo laptops.

``init_distributed`` reads the launcher's environment (torchrun, Slurm ``srun``, or nothing for a
single process), creates the default process group, Megatron's TP/PP/DP groups and RNG trackers,
and returns a :class:`DistContext` describing this rank.

On a machine without CUDA, megatron-core needs a few shims, and they live here and nowhere else:

* a CPU RNG tracker in place of ``CudaRNGStatesTracker`` (which calls torch.cuda RNG APIs);
* activation recomputation (``model.recompute_activations``): megatron's ``CheckpointFunction``
  saves and restores "the CUDA RNG state" around every recomputed layer through
  ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``. On CPU the device
  generator *is* the CPU generator, which the same code already saves (``torch.get_rng_state``)
  next to the tracker's states, so the CUDA slot carries an empty state and setting it does
  nothing. (Unshimmed, the getter raises "Torch not compiled with CUDA enabled" and the setter
  would queue a never-run callback per layer and step in ``torch.cuda._queued_calls``.)
* ``torch.cuda.current_device()`` answering ``"cpu"`` (megatron allocates with
  ``device=torch.cuda.current_device()`` in ~200 places);
* no-op streams, events and ``synchronize``;
* a TorchFunctionMode that maps hard-coded ``device="cuda"`` / ``.cuda()`` to the CPU and makes
  ``Tensor.type()`` report the ``torch.cuda.*Tensor`` names the optimizer and grad-clip asserts.

Sequence parallelism is refused on CPU: its LayerNorm needs Transformer Engine or Apex.

Collectives take tensors on their backend's device: NCCL refuses CPU tensors and gloo CUDA ones,
and a CPU test cannot tell the two apart. :func:`collective_device` is the one rule that says
which device; every tensor megatron_mel hands to a collective is made by
:func:`collective_tensor` / :func:`collective_empty`, or checked by :func:`on_collective_device`
when the model produced it, and nothing else decides (tests/parallel/workers/collective_audit.py
records every collective of a TP2 x PP2 x DP2 step and fails on a tensor the rule did not see).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_mel.config import ConfigError, ParallelConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DistContext:
    """Where this process sits. Ranks are global unless prefixed with an axis name."""

    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or Slurm variables; (0, 1, 0) otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (loopback: single-node rendezvous; a
    node's address: a store other nodes connect to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def resolve_device(backend: str = "auto") -> tuple[torch.device, str]:
    """Pick (device, backend): cuda/nccl when CUDA is present, else cpu/gloo."""
    has_cuda = torch.cuda.is_available()
    if backend == "nccl" and not has_cuda:
        raise ConfigError("parallel.backend: nccl needs CUDA, and torch sees no GPU here")
    if backend == "auto":
        backend = "nccl" if has_cuda else "gloo"
    if has_cuda and backend == "nccl":
        _, _, local_rank = launcher_env()
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), backend
    return torch.device("cpu"), backend


def init_distributed(parallel: ParallelConfig, *, seed: int = 1234) -> DistContext:
    """Create the default process group and Megatron's parallel state for ``parallel``.

    Every rank of the job calls this once, collectively. It is idempotent for the default
    process group; the Megatron groups are rebuilt if they exist with another layout.
    """
    device, backend = resolve_device(parallel.backend)
    if device.type == "cpu":
        install_cpu_shims()
        if parallel.sequence_parallel:
            raise ConfigError(
                "parallel.sequence_parallel: needs Transformer Engine or Apex norms (GPU only)"
            )
    rank, world_size, _ = launcher_env()
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            init_method = "env://"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    return init_model_parallel(parallel, device=device, backend=backend, seed=seed)


def init_model_parallel(
    parallel: ParallelConfig, *, device: torch.device, backend: str, seed: int
) -> DistContext:
    """(Re)build Megatron's TP/PP/DP groups on an initialised default group; all ranks call."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world_size = dist.get_world_size()
    if world_size % (parallel.tp * parallel.pp):
        raise ConfigError(
            f"world size {world_size} is not a multiple of tp x pp = {parallel.tp * parallel.pp}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    if device.type == "cpu":
        _reset_cpu_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return DistContext(
        device=device,
        backend=backend,
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=launcher_env()[2],
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )


def destroy_distributed() -> None:
    """Tear down Megatron groups and the default group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Work that runs on the driver (global rank 0)
# ---------------------------------------------------------------------------------------------


def from_driver(fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0 and hand its (picklable) result to every rank.

    An exception on the driver is re-raised on every rank with the driver's message, so the
    job fails together instead of leaving the other ranks waiting in a collective.
    """
    holder: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            holder[0] = ("ok", fn())
        except Exception as exc:  # shipped to every rank, re-raised below
            holder[0] = ("error", exc)
    dist.broadcast_object_list(holder, src=0)
    status, value = holder[0]
    if status == "error":
        raise value
    return value


def on_driver(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on global rank 0 only (its result stays there: None elsewhere), then let every
    rank know whether it failed, so a bad config on the driver stops all ranks at once."""
    result: T | None = None
    status: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:
            status[0] = exc
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise status[0]
    return result


# ---------------------------------------------------------------------------------------------
# Where collective tensors live
# ---------------------------------------------------------------------------------------------

_RULE_MARK = "_mel_collective_device"


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device of tensors handed to a collective on ``group`` (None: the default group).

    CUDA (this rank's device) for NCCL and for mixed ``cpu:gloo,cuda:nccl`` groups, CPU for gloo.
    """
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mark(tensor: torch.Tensor) -> torch.Tensor:
    setattr(tensor, _RULE_MARK, True)
    return tensor


def collective_tensor(
    data: Any, *, dtype: torch.dtype, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """A new tensor holding ``data`` (numbers or a tensor), on ``group``'s collective device."""
    if isinstance(data, torch.Tensor):
        return _mark(data.to(device=collective_device(group), dtype=dtype, copy=True))
    return _mark(torch.tensor(data, dtype=dtype, device=collective_device(group)))


def collective_empty(
    *shape: int, dtype: torch.dtype, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """An uninitialised receive buffer on ``group``'s collective device."""
    return _mark(torch.empty(*shape, dtype=dtype, device=collective_device(group)))


def on_collective_device(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``tensor`` itself (in-place collectives need the very object), checked to live where
    ``group``'s backend needs it. For tensors the model produced (activations, gradients, weight
    buckets), whose device the model's placement chose."""
    want = collective_device(group)
    if tensor.device.type != want.type or (
        want.index is not None and tensor.device.index not in (None, want.index)
    ):
        raise RuntimeError(
            f"a {dist.get_backend(group)} collective needs tensors on {want}, got one on "
            f"{tensor.device} (shape {tuple(tensor.shape)}); build it with "
            "platform.collective_tensor / collective_empty"
        )
    return _mark(tensor)


def is_rule_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` was made or checked by the collective-device rule (for audits)."""
    return bool(getattr(tensor, _RULE_MARK, False))


# ---------------------------------------------------------------------------------------------
# CPU shims for megatron-core
# ---------------------------------------------------------------------------------------------


class CpuRNGStatesTracker:
    """Named CPU generator states with the interface of megatron's ``CudaRNGStatesTracker``.

    ``fork(name)`` swaps the global CPU RNG state for the named one and back, which is what the
    CUDA tracker does with the CUDA generator: tensor-parallel ranks draw different dropout masks
    inside TP regions and identical ones outside.
    """

    def __init__(self, *_: Any, **__: Any) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"RNG seed {seed} already registered")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name!r} already registered")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} is not registered")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _reset_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _no_device_rng_state(*_: Any, **__: Any) -> torch.Tensor:
    """The "CUDA RNG state" on CPU: empty (the CPU generator is saved separately)."""
    return torch.empty(0, dtype=torch.uint8)


def _ignore_device_rng_state(*_: Any, **__: Any) -> None:
    return None


def _install_recompute_shims() -> None:
    """Route megatron's checkpoint RNG save/restore to the CPU (see the module docstring)."""
    from megatron.core.tensor_parallel import random as tp_random

    # Module globals: CheckpointFunction and CheckpointWithoutOutput look them up at call time.
    tp_random._get_cuda_rng_state = _no_device_rng_state
    tp_random._set_cuda_rng_state = _ignore_device_rng_state


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() ints in a few places.
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Map CUDA device requests to the CPU; report CUDA tensor type names (see module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        elif func is torch.Tensor.cuda:
            return args[0]
        elif "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        elif func is torch.Tensor.to and len(args) >= 2 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event on CPU, where everything is already ordered."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def __enter__(self) -> _NoOpStream:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def wait_stream(self, *_: Any) -> None:
        return None

    def wait_event(self, *_: Any) -> None:
        return None

    def record_event(self, *_: Any) -> _NoOpStream:
        return self

    def record(self, *_: Any) -> None:
        return None

    def wait(self, *_: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, *_: Any) -> float:
        return 0.0


_cpu_mode: _CpuDeviceMode | None = None


def release_host_memory() -> None:
    """Give the heap memory freed since the last call back to the OS (glibc ``malloc_trim``).

    torch's CPU tensors come from malloc. glibc serves large blocks with mmap only above a
    threshold that it raises to the size of the largest block freed so far (up to 32 MiB), so
    after the first training step activations, logits chunks and freed engine weights all live
    in the heap, and freeing them keeps them resident: a run's RSS stays at its historical
    peak plus fragmentation, and grew by ~3 GiB over four steps in the bench_vs_trl workload.
    Called at the phase boundaries where a lot was just freed (the engine's release, the end of
    a training step); the next phase faults back in only what it uses. Elsewhere (GPU
    processes, non-glibc platforms) a no-op.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_LIBC: Any = None


def _glibc() -> Any:
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


@contextlib.contextmanager
def cpu_shims_suspended() -> Iterator[None]:
    """Run plain-torch code (no megatron inside) without the CPU device mode.

    The mode sees every torch call in Python, ~8 us each; the embedded engine's decode step
    makes ~1,400 of them (30 layers), which is ~10 ms per generated token on 2 cores. Nothing
    there names a CUDA device, so generation runs with the mode popped. A no-op when the shims
    are not installed or another mode sits above ours.
    """
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if _cpu_mode is None or _get_current_function_mode() is not _cpu_mode:
        yield
        return
    with _pop_mode_temporarily():
        yield


def install_cpu_shims() -> None:
    """Make megatron-core run on a CPU-only torch (idempotent; see the module docstring)."""
    global _cpu_mode
    if _cpu_mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("install_cpu_shims() called on a machine with CUDA")
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    cuda.Stream = _NoOpStream  # type: ignore[assignment,misc]
    cuda.Event = _NoOpStream  # type: ignore[assignment,misc]
    cuda.current_stream = lambda *a, **k: _NoOpStream()  # type: ignore[assignment]
    cuda.default_stream = lambda *a, **k: _NoOpStream()  # type: ignore[assignment]
    cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.manual_seed = lambda *a, **k: None  # type: ignore[assignment]
    cuda.manual_seed_all = lambda *a, **k: None  # type: ignore[assignment]
    cuda.empty_cache = lambda: None  # type: ignore[assignment]
    cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    _reset_cpu_rng_tracker()
    _install_recompute_shims()
    _cpu_mode = _CpuDeviceMode()
    # Entered for the life of the process: megatron hard-codes CUDA devices on many paths.
    _cpu_mode.__enter__()
