"""`megatron-mel train` end to end on a micro random policy with TP=2 on gloo: `mel` and `grpo`
each run 2 steps; every MEL.md §3 metric is logged every step (JSONL and MLflow); grpo does no
reflection work; meta-experiences reach the store and MLflow."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import run_train

pytestmark = pytest.mark.slow

PER_STEP = [
    "reward/mean", "mel/mixed_groups", "mel/pairs", "mel/candidates", "mel/kept", "mel/retention",
    "mel/me_length", "mel/truncation_rate", "mel/leak_rate", "train/pg_loss", "train/nll_loss",
    "rollout/response_length", "train/clip_fraction", "train/entropy", "time/rollout",
    "time/reflection", "time/replay", "time/train", "time/sync", "tokens/rollout",
    "tokens/reflection", "tokens/replay", "sync/weight_version", "rollout/train_logprob_abs_diff",
]  # fmt: skip


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(micro_policy, tmp_path_factory):
    out = {}
    for name, algorithm, extra in (("mel", "mel", []), ("grpo", "grpo", []),
                                   ("mel-resident", "mel", ["rollout.release_memory=false"])):  # fmt: skip
        run_dir = tmp_path_factory.mktemp(name)
        stdout = run_train(run_dir, micro_policy, f"algorithm.name={algorithm}", "parallel.tp=2",
                           "trainer.num_steps=2", *extra)  # fmt: skip
        out[name] = (run_dir, stdout)
    return out


@pytest.fixture(scope="module")
def other_algorithms(micro_policy, tmp_path_factory):
    """RFT, and REINFORCE++ with a KL term to the frozen reference, pipelined over 2 ranks."""
    out = {}
    for name, extra in (("rft", ["parallel.pp=2"]),
                        ("reinforce_pp", ["parallel.pp=2", "algorithm.kl_coef=0.05",
                                          "algorithm.meta_experience=true"])):  # fmt: skip
        run_dir = tmp_path_factory.mktemp(name)
        run_train(run_dir, micro_policy, f"algorithm.name={name}", "trainer.num_steps=2",
                  "trainer.eval_every=0", *extra)  # fmt: skip
        out[name] = _metrics(run_dir)
    return out


def test_rft_trains_nll_on_correct_responses_only(other_algorithms):
    for metrics in other_algorithms["rft"]:
        assert metrics["train/pg_tokens"] == 0 and metrics["train/nll_tokens"] > 0
        assert "mel/pairs" not in metrics


def test_reinforce_pp_with_kl_and_meta_experience(other_algorithms):
    for metrics in other_algorithms["reinforce_pp"]:
        assert metrics["train/pg_tokens"] > 0 and metrics["time/reference"] > 0
        assert metrics["mel/pairs"] > 0  # the meta-experience term switched on for REINFORCE++


def test_mel_logs_every_metric_every_step(runs):
    run_dir, stdout = runs["mel"]
    steps = _metrics(run_dir)
    assert [m["step"] for m in steps] == [1, 2]
    for metrics in steps:
        missing = [k for k in PER_STEP if k not in metrics]
        assert not missing, missing
        assert metrics["mel/pairs"] > 0 and metrics["mel/kept"] > 0
        assert metrics["train/nll_loss"] > 0 and metrics["train/nll_tokens"] > 0
        assert metrics["rollout/train_logprob_abs_diff"] < 1e-4
    assert steps[1]["sync/weight_version"] == 2
    assert "eval/gsm8k/pass_at_1" in steps[1]
    assert "step 2/2" in stdout and "mlflow ui --backend-store-uri" in stdout


# Wall-clock measurements differ between runs by nature; so do the hand-off's own metrics.
VOLATILE = ("time/", "sync/seconds", "sync/gb_per_s", "rollout/released_gib")


def test_memory_handoff_frees_memory_and_changes_nothing_else(runs):
    """Colocated (the default): the embedded engine frees its weights and KV cache before every
    training step and gets them back from the sync; the run equals one without the hand-off."""
    handed = _metrics(runs["mel"][0])
    resident = _metrics(runs["mel-resident"][0])
    for with_handoff, without in zip(handed, resident, strict=True):
        assert with_handoff["rollout/released_gib"] > 0
        assert with_handoff["time/release"] > 0 and with_handoff["time/resume"] > 0
        assert "rollout/released_gib" not in without and "time/release" not in without
        stable = {k: v for k, v in with_handoff.items() if not k.startswith(VOLATILE)}
        assert stable == {k: v for k, v in without.items() if not k.startswith(VOLATILE)}


def test_store_and_mlflow_hold_the_run(runs):
    run_dir, _ = runs["mel"]
    records = [json.loads(x) for x in (run_dir / "meta_experiences.jsonl").read_text().splitlines()]
    assert records and {r["step"] for r in records} == {1, 2}
    assert all(r["text"] for r in records) and any(r["kept"] for r in records)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "megatron-mel-tiny-cpu"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["algorithm.name"] == "mel"
    history = client.get_metric_history(run.info.run_id, "mel/retention")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"meta_experiences", "config.yaml", "eval"} <= artifacts
    (store,) = client.list_artifacts(run.info.run_id, "meta_experiences")
    assert store.path.endswith("meta_experiences.jsonl")


def test_grpo_does_no_reflection_work(runs):
    run_dir, _ = runs["grpo"]
    for metrics in _metrics(run_dir):
        assert metrics["train/nll_tokens"] == 0 and metrics["train/pg_tokens"] > 0
        assert not any(k.startswith("mel/") or k in ("tokens/reflection", "tokens/replay",
                                                     "time/reflection") for k in metrics)  # fmt: skip
    store = run_dir / "meta_experiences.jsonl"
    assert not store.exists() or store.read_text() == ""
