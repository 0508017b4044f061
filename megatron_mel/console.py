"""What our commands print: logging format and the third-party warnings we silence.

megatron-core warns at import time that Transformer Engine and Apex are missing, and
torch.distributed.checkpoint warns about its own API changes; on a CPU machine these are expected
and drown the one line a command has to say. Only those known messages are filtered; everything
else still shows. The places where a missing GPU package matters (attention backend, sequence
parallelism, SGLang) raise their own error at the point of use.
"""

from __future__ import annotations

import logging
import os
import warnings

_KNOWN_NOISE = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"absl\.logging is not installed",
    r"full scope is deprecated",
    r"torch\.distributed is disabled, unavailable or uninitialized",
    r"The argument order of load has been changed",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    # torch deprecations hit inside megatron-core's own collectives and DDP hooks
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)
_NOISY_LOGGERS = ("megatron.core.models.gpt.gpt_model",)
# Megatron DDP asks callers to precompute a layout it then computes itself; nothing to act on.
_NOISY_LOG_MESSAGES = ("full_param_layout not provided", "MCore's async save is deprecated")


class _DropKnownMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _NOISY_LOG_MESSAGES)


def setup_console(level: int | None = None) -> None:
    """Install the warning filters and a compact log format (idempotent)."""
    # transformers draws a progress bar for every checkpoint load; it honours this variable.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # GPTModel logs its deprecation in favour of HybridModel at WARNING on every construction;
    # HybridModel's stock spec needs TE, so GPTModel is the supported CPU path (see docs).
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in (
        "megatron.core.distributed.distributed_data_parallel",
        "megatron.core.dist_checkpointing.strategies.torch",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownMessages) for f in logger.filters):
            logger.addFilter(_DropKnownMessages())
    if level is None:
        level = logging.DEBUG if os.environ.get("MEGATRON_MEL_DEBUG") else logging.INFO
    # Third-party libraries log at WARNING and above; our own modules at ``level``.
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    logging.getLogger("megatron_mel").setLevel(level)
