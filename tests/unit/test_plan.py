"""`megatron-mel plan`: layouts that fit, refusals with their reason (exit 2), parseable JSON."""

from __future__ import annotations

import json

from megatron_mel.cli import main
from tests.conftest import REPO

R70B = str(REPO / "examples" / "llama3_70b_h100.yaml")
R70B_DISAGG = str(REPO / "examples" / "llama3_70b_h100_disagg.yaml")
ALLOC = ["--nodes", "8", "--gpus-per-node", "8", "--gpu-mem-gib", "80"]


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_70b_on_8x8_h100_fits_with_every_engine_on_a_real_gpu(capsys):
    code, out, err = _plan(capsys, R70B, *ALLOC)
    assert code == 0, err
    assert "fits: peak 64.4 GiB of 80 GiB per GPU" in out
    assert "optimizer" in out and "activations" in out and "KV cache" in out
    code, out, _ = _plan(capsys, R70B, *ALLOC, "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] is True and plan["refusal"] is None
    assert len(plan["ranks"]) == 64 and len(plan["engines"]) == 8
    for engine in plan["engines"]:
        assert 0 <= engine["node"] < 8 and all(0 <= g < 8 for g in engine["gpus"])
        assert engine["url"].startswith(f"http://node{engine['node']}:")
    assert {(r["node"], r["gpu"]) for r in plan["ranks"]} == {
        (n, g) for n in range(8) for g in range(8)
    }
    assert plan["memory"]["gpus"][0]["role"] == "train+engine"


def test_70b_at_tp1_pp1_is_refused_with_the_reason(capsys):
    code, out, err = _plan(capsys, R70B, *ALLOC, "--set", "parallel.tp=1", "--set", "parallel.pp=1")
    assert code == 2
    assert err.startswith("error: plan refused: train+engine GPU needs 445.6 GiB")
    assert "does not fit:" in out
    code, out, _ = _plan(capsys, R70B, *ALLOC, "--set", "parallel.tp=1", "--set", "parallel.pp=1",
                         "--json")  # fmt: skip
    plan = json.loads(out)
    assert code == 2 and plan["fits"] is False and "445.6 GiB" in plan["refusal"]


def test_a_world_size_the_model_cannot_split_into_is_refused(capsys):
    code, _, err = _plan(capsys, R70B, "--nodes", "7", "--gpus-per-node", "8")
    assert code == 2
    assert "world size 56 is not a multiple of tp x pp = 8 x 4 = 32" in err


def test_engines_that_cannot_be_placed_are_refused(capsys):
    code, _, err = _plan(capsys, R70B, *ALLOC, "--set", "rollout.server.num_engines=9")
    assert code == 2 and "rollout.server.num_engines=9" in err and "room for 8" in err


def test_disaggregated_70b_keeps_training_and_rollout_nodes_apart(capsys):
    code, out, err = _plan(capsys, R70B_DISAGG, *ALLOC, "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert {r["node"] for r in plan["ranks"]} == {0, 1, 2, 3}
    assert {e["node"] for e in plan["engines"]} == {4, 5, 6, 7}
    assert all(len(e["gpus"]) == 4 and set(e["gpus"]) <= set(range(8)) for e in plan["engines"])
    assert [g["role"] for g in plan["memory"]["gpus"]] == ["train", "engine"]


def test_cpu_recipe_plans_without_a_gpu_size(capsys):
    recipe = str(REPO / "examples" / "tiny_cpu.yaml")
    code, out, err = _plan(capsys, recipe, "--nodes", "1", "--gpus-per-node", "2")
    assert code == 0, err
    assert "fit: not checked" in out and "2 rank(s)" in out


def test_unknown_model_without_config_json_is_one_error_line(capsys, tmp_path):
    code, _, err = _plan(capsys, R70B, *ALLOC, "--set", f"model.hf_dir={tmp_path / 'Mystery-1B'}")
    assert code == 2 and err.startswith("error: model.hf_dir:") and "Mystery-1B" in err
