"""Config: YAML + dotted overrides into typed sections, with errors naming file:line and key."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from megatron_mel.config import (
    ConfigError,
    ParallelConfig,
    RunConfig,
    flatten,
    load_config,
)
from megatron_mel.models.arch import validate_layout


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_yaml_and_overrides_build_typed_sections(tmp_path):
    path = _write(
        tmp_path,
        """
        model:
          hf_dir: /models/x
          dtype: float32
        parallel:
          tp: 2
        rollout:
          temperature: 1
        """,
    )
    cfg = load_config(path, ["parallel.pp=2", "optim.lr=3e-6", "reflection.max_pairs_per_prompt=4"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.rollout.temperature == 1.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.optim.lr == 3e-6
    assert cfg.reflection.max_pairs_per_prompt == 4
    assert cfg.algorithm.loss_agg == "seq-mean-token-mean"  # the paper's Eq. 10
    assert cfg.algorithm.uses_meta_experience
    assert flatten(cfg)["parallel.tp"] == 2


def test_unknown_key_names_line_and_closest_keys(tmp_path):
    path = _write(tmp_path, "model:\n  hf_dir: x\nparallel:\n  tpp: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}:4" in msg
    assert "'parallel.tpp'" in msg and "did you mean 'tp'" in msg


def test_unknown_section_suggests(tmp_path):
    path = _write(tmp_path, "model:\n  hf_dir: x\nrolout:\n  temperature: 1.0\n")
    with pytest.raises(
        ConfigError, match=r"recipe.yaml:3: unknown key 'rolout'.*did you mean 'rollout'"
    ):
        load_config(path)


def test_the_old_server_section_is_refused_naming_the_new_one(tmp_path):
    path = _write(tmp_path, "model:\n  hf_dir: x\nrollout:\n  sglang:\n    engine_tp: 2\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}:4: rollout.sglang is now rollout.server$"
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set rollout.sglang.urls: .* is now rollout.server"):
        load_config(None, ["model.hf_dir=x", "rollout.sglang.urls=[http://n1:30000]"])
    cfg = load_config(None, ["model.hf_dir=x", "rollout.server.engine_tp=2"])
    assert cfg.rollout.server.engine_tp == 2


def test_budgets_that_default_to_the_rollout_are_resolved_once():
    cfg = load_config(None, ["model.hf_dir=x", "rollout.max_new_tokens=77"])
    assert cfg.reflection.replay_max_new_tokens == 77
    assert cfg.trainer.eval_max_new_tokens == 77
    cfg = load_config(None, ["model.hf_dir=x", "trainer.eval_max_new_tokens=5",
                             "reflection.replay_max_new_tokens=6"])  # fmt: skip
    assert (cfg.trainer.eval_max_new_tokens, cfg.reflection.replay_max_new_tokens) == (5, 6)
    with pytest.raises(ConfigError, match=r"trainer.eval_max_new_tokens: must be >= 1"):
        load_config(None, ["model.hf_dir=x", "trainer.eval_max_new_tokens=0"])


def test_max_seq_len_shorter_than_a_rollout_sequence_is_refused():
    """model.max_seq_len means what it says: the longest prompt plus the response budget fits."""
    base = ["model.hf_dir=x", "data.max_prompt_tokens=100", "rollout.max_new_tokens=50"]
    assert load_config(None, [*base, "model.max_seq_len=150"]).model.max_seq_len == 150
    with pytest.raises(ConfigError, match=r"model.max_seq_len: 149 is shorter than .* = 150"):
        load_config(None, [*base, "model.max_seq_len=149"])


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"--set optim.lrr.*did you mean 'lr'"):
        load_config(None, ["model.hf_dir=x", "optim.lrr=1"])


def test_wrong_type_names_key_and_expectation(tmp_path):
    path = _write(tmp_path, "model:\n  hf_dir: x\nparallel:\n  tp: two\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:4: parallel.tp: expected int, got 'two'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"expected bool"):
        load_config(None, ["model.hf_dir=x", "parallel.sequence_parallel=3"])


def test_literal_and_range_checks():
    with pytest.raises(ConfigError, match=r"model.dtype: expected one of 'float32'"):
        load_config(None, ["model.hf_dir=x", "model.dtype=fp32"])
    with pytest.raises(ConfigError, match=r"--set rollout.top_p: rollout.top_p: must be in"):
        load_config(None, ["model.hf_dir=x", "rollout.top_p=0"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key model.hf_dir"):
        load_config(None, ["parallel.tp=1", "model.dtype=float32"])


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_config(None, ["parallel.tp"])
    path = _write(tmp_path, "model:\n  hf_dir: [x\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("kwargs", "world", "message"),
    [
        (dict(tp=2), 2, r"parallel.tp=2 does not divide the 9 attention heads \(valid tp: 1, 3\)"),
        (dict(tp=3, pp=4), 12, r"parallel.pp=4 does not divide the 30 layers"),
        (dict(tp=3, pp=2, dp=3), 12, r"parallel.dp=3 but world size 12 = tp 3 x pp 2 x dp 2"),
    ],
)
def test_layout_errors(kwargs, world, message):
    # SmolLM2-135M's shape: 30 layers, 9 query heads, 3 KV heads.
    with pytest.raises(ConfigError, match=message):
        validate_layout(
            ParallelConfig(**kwargs), num_layers=30, num_heads=9, num_kv_heads=3, world_size=world
        )


def test_layout_ok_and_world_size_mismatch():
    parallel = ParallelConfig(tp=2, pp=2)
    assert validate_layout(parallel, num_layers=4, num_heads=4, num_kv_heads=2, world_size=8) == 2
    with pytest.raises(ConfigError, match=r"world size 6 is not a multiple of tp x pp = 2 x 2"):
        validate_layout(parallel, num_layers=4, num_heads=4, num_kv_heads=2, world_size=6)
    with pytest.raises(ConfigError, match=r"KV heads"):
        validate_layout(
            ParallelConfig(tp=4), num_layers=4, num_heads=8, num_kv_heads=2, world_size=4
        )


def test_example_recipes_load():
    root = Path(__file__).resolve().parents[2] / "examples"
    recipes = sorted(root.glob("*.yaml"))
    assert recipes, "no example recipes"
    for recipe in recipes:
        load_config(recipe)


def test_top_level_sections_are_pinned():
    """Adding or renaming a section breaks every recipe: make it a deliberate change."""
    import dataclasses

    assert [f.name for f in dataclasses.fields(RunConfig)] == [
        "model",
        "parallel",
        "data",
        "rollout",
        "reflection",
        "algorithm",
        "reward",
        "optim",
        "checkpoint",
        "tracking",
        "trainer",
        "launch",
    ]
