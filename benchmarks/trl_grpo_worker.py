"""TRL's GRPOTrainer on the bench_vs_trl.py workload; run by that script in TRL's own venv.

    <trl-venv>/bin/python benchmarks/trl_grpo_worker.py MODEL_DIR GSM8K_JSONL OUT_JSON

TRL runs at its defaults except where the workload fixes a value: G = 4 completions of at most
128 tokens per prompt, 4 prompts (16 completions) per optimizer step, temperature 1 / top_p 1 /
no top_k, lr 1e-6 constant, clip 1.0, no KL (beta 0, TRL's default), one iteration per batch,
seed 0, fp32 (``bf16=False``; TRL's default is bf16), the first 8 questions in order (no
shuffling), no checkpoints or logging integrations. Left at TRL's defaults on purpose:
``per_device_train_batch_size=8`` (so 2 gradient-accumulation micro-batches make the step's 16
completions, generated in one call), gradient checkpointing on, ``loss_type="dapo"``, AdamW with
no weight decay, transformers ``generate`` for sampling.

Per optimizer step it records the wall time (TrainerCallback on_step_begin..on_step_end), the
time inside ``_generate_and_score_completions`` (generation + rewards; with one iteration per
batch TRL computes no old log-probs there) and the completion tokens generated.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload


def main() -> None:
    model_dir, data_path, out_path = sys.argv[1:4]
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    records = workload.first_questions(data_path)
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": r["question"] + workload.USER_SUFFIX}],
             "answer": r["answer"]}
            for r in records
        ]
    )  # fmt: skip

    def reward(completions: list, answer: list, **_: object) -> list[float]:
        return [
            workload.last_number_reward(c[0]["content"], a)[0] for c, a in zip(completions, answer)
        ]

    steps = workload.WARMUP_STEPS + workload.MEASURED_STEPS
    config = GRPOConfig(
        output_dir=str(Path(out_path).parent / "trl_output"),
        num_generations=workload.GROUP_SIZE,
        gradient_accumulation_steps=workload.PROMPTS_PER_STEP * workload.GROUP_SIZE // 8,
        max_completion_length=workload.MAX_NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=workload.LEARNING_RATE,
        lr_scheduler_type="constant",
        max_grad_norm=workload.CLIP_GRAD,
        beta=0.0,
        num_iterations=1,
        max_steps=steps,
        seed=workload.SEED,
        bf16=False,
        fp16=False,
        shuffle_dataset=False,
        save_strategy="no",
        report_to="none",
        model_init_kwargs={"dtype": torch.float32},
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(
        model=model_dir, reward_funcs=reward, args=config, train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip

    generation: list[tuple[float, int]] = []
    inner = trainer._generate_and_score_completions

    def timed_generation(inputs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        output = inner(inputs)
        tokens = int(output["completion_mask"].sum())
        generation.append((time.perf_counter() - start, tokens))
        return output

    trainer._generate_and_score_completions = timed_generation
    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.start = time.perf_counter()
            self.generated = len(generation)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            seconds = time.perf_counter() - self.start
            mine = generation[self.generated :]
            gen_s = sum(s for s, _ in mine)
            rows.append({"step": state.global_step, "step_s": seconds, "generation_s": gen_s,
                         "training_s": seconds - gen_s, "tokens": sum(t for _, t in mine)})  # fmt: skip
            print(f"trl step {state.global_step}/{steps} {seconds:.1f}s", flush=True)

    trainer.add_callback(StepTimer())
    trainer.train()
    versions = {"trl": _version("trl"), "transformers": _version("transformers"),
                "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    Path(out_path).write_text(json.dumps({"steps": rows, "versions": versions}))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
