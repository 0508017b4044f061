"""A stand-in for ``python -m sglang.launch_server`` on CPU: the same command line and HTTP routes,
generation by the embedded engine, and SGLang's rules where our code could break them.

It is what `rollout.server.server_module: tests.fakes.sglang_server` launches in the multi-node
CPU tests, so the driver's SGLang client, the per-node server launch, the colocated weight
transport and the memory hand-off run for real over loopback. Strict where SGLang is strict:

* ``/update_weights_from_tensor`` needs exactly one entry per TP rank (entry i for rank i), each
  a host-file payload (the CPU form of a CUDA IPC handle, rollout/sglang_weights.py) with the
  same bytes; it records which training rank and host sent each entry;
* ``/update_weight_version`` commits only after a complete load (the embedded engine's check);
* releasing a tag twice or resuming one that is not released is a 400, like SGLang's
  ``offload_tags``; generating while anything is released is a 500;
* the NCCL path (``/init_weights_update_group`` ...) joins a gloo group as ``rank_offset``
  (``--tp-size 1`` only) and receives one uint8 broadcast per bucket.

``GET /mel_fake/state`` reports what happened; ``POST /mel_fake/dump {"path"}`` saves the
weights it serves (torch.save of HF name -> tensor). With ``MEL_FAKE_DUMP_DIR`` set, every commit
also leaves ``engine-<port>-v<version>.pt`` there, and every change ``engine-<port>.json`` (the
state), so tests can read them after the run stopped the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

SG_TO_OURS = {"weights": "weights", "kv_cache": "kv_cache", "cuda_graph": "kv_cache"}


class FakeServer:
    def __init__(self, args: argparse.Namespace) -> None:
        from megatron_mel.rollout.embedded import EmbeddedEngine

        torch.set_num_threads(1)
        self.args = args
        self.engine = EmbeddedEngine.from_hf(args.model_path, seed=args.random_seed)
        self.version = "default"
        self.lock = threading.Lock()
        self.offloaded: set[str] = set()
        self.groups: dict[str, Any] = {}
        dump = os.environ.get("MEL_FAKE_DUMP_DIR")
        self.dump_dir = Path(dump) if dump else None
        self.state: dict[str, Any] = {
            "tp": args.tp_size, "base_gpu_id": args.base_gpu_id, "port": args.port,
            "nccl_port": args.nccl_port, "pid": os.getpid(), "memory_saver": args.enable_memory_saver,
            "env_rank": os.environ.get("RANK"), "env_master_addr": os.environ.get("MASTER_ADDR"),
            "tensor_updates": [], "commits": [], "releases": [], "resumes": [], "sessions": 0,
            "distributed_updates": 0, "generate_calls": 0,
        }  # fmt: skip

    # -- routes ----------------------------------------------------------------------------

    def handle(self, method: str, route: str, body: Any) -> tuple[int, Any]:
        with self.lock:
            status, answer = self._handle(method, route.split("?")[0], body)
            if self.dump_dir is not None and method == "POST" and route != "/generate":
                (self.dump_dir / f"engine-{self.args.port}.json").write_text(json.dumps(self.state))
            return status, answer

    def _handle(self, method: str, route: str, body: Any) -> tuple[int, Any]:
        ok = {"success": True, "message": "ok"}
        engine = self.engine
        if route in ("/health", "/health_generate"):
            return 200, None
        if route == "/model_info":
            return 200, {"model_path": self.args.model_path, "weight_version": self.version}
        if route == "/mel_fake/state":
            return 200, self.state
        if route == "/mel_fake/dump":
            self._dump(Path(body["path"]))
            return 200, ok
        if route == "/generate":
            return self._generate(body)
        if route == "/pause_generation":
            if not engine.paused:
                engine.pause()
            return 200, {"status": "ok"}
        if route == "/continue_generation":
            if engine.paused:
                engine.resume()
            return 200, {"status": "ok"}
        if route == "/flush_cache":
            return 200, "Cache flushed."
        if route in ("/release_memory_occupation", "/resume_memory_occupation"):
            return self._memory(route, body)
        if route == "/begin_weight_update":
            self.state["sessions"] += 1
            return 200, ok
        if route == "/end_weight_update":
            return 200, ok
        if route == "/update_weights_from_tensor":
            return self._tensor_update(body)
        if route == "/update_weight_version":
            try:
                engine.commit_weights(int(body["new_version"]))
            except Exception as exc:
                return 400, {"success": False, "message": f"commit refused: {exc}"}
            self.version = str(body["new_version"])
            self.state["commits"].append(self.version)
            if self.dump_dir is not None:
                self._dump(self.dump_dir / f"engine-{self.args.port}-v{self.version}.pt")
            return 200, {**ok, "new_version": self.version}
        if route == "/get_weights_by_name":
            tensor = engine.get_weights([body["name"]])[body["name"]]
            return 200, tensor.float()[: body["truncate_size"]].tolist()
        if route == "/init_weights_update_group":
            return self._init_group(body)
        if route == "/update_weights_from_distributed":
            return self._distributed_update(body)
        if route == "/destroy_weights_update_group":
            import torch.distributed as dist

            group = self.groups.pop(body["group_name"], None)
            if group is None:
                return 400, {
                    "success": False,
                    "message": "The group to be destroyed does not exist.",
                }
            dist.destroy_process_group(group)
            return 200, ok
        return 404, {"detail": f"no route {route}"}

    def _dump(self, path: Path) -> None:
        from megatron_mel.convert.mapping import expected_hf_names

        torch.save(self.engine.get_weights(expected_hf_names(self.engine.arch)), path)

    def _generate(self, body: dict) -> tuple[int, Any]:
        from megatron_mel.rollout.engine import GenerationRequest, SamplingParams

        if self.offloaded:
            return 500, {"error": f"generate while {sorted(self.offloaded)} released"}
        self.state["generate_calls"] += 1
        requests = []
        for i, (ids, sp) in enumerate(zip(body["input_ids"], body["sampling_params"])):
            params = SamplingParams(
                temperature=sp["temperature"], top_p=sp["top_p"], top_k=sp["top_k"],
                max_new_tokens=sp["max_new_tokens"], stop_token_ids=tuple(sp["stop_token_ids"]),
                seed=sp.get("sampling_seed"),
            )  # fmt: skip
            requests.append(GenerationRequest(f"{i}", list(ids), params))
        items = []
        for result in self.engine.generate(requests):
            (c,) = result.completions
            meta = {
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids)],
                "finish_reason": {"type": c.finish_reason},
                "weight_version": self.version,
            }
            items.append({"text": "", "output_ids": c.token_ids, "meta_info": meta})
        return 200, items

    def _memory(self, route: str, body: dict) -> tuple[int, Any]:
        tags = body.get("tags") or ["weights", "kv_cache", "cuda_graph"]
        release = route == "/release_memory_occupation"
        for tag in tags:
            if (tag in self.offloaded) == release:
                return 400, {"error": f"tag {tag!r} is {'already' if release else 'not'} released"}
        ours = sorted({SG_TO_OURS[t] for t in tags})
        if release:
            if not self.args.enable_memory_saver:
                return 200, None  # SGLang only warns: nothing is freed without the memory saver
            self.offloaded.update(tags)
            freed = self.engine.release_memory(ours)
            self.state["releases"].append({"tags": tags, "bytes": freed})
        else:
            self.offloaded.difference_update(tags)
            self.engine.resume_memory(ours)
            self.state["resumes"].append({"tags": tags})
        return 200, None

    def _tensor_update(self, body: dict) -> tuple[int, Any]:
        from megatron_mel.rollout.engine import WeightBucket
        from megatron_mel.rollout.sglang_weights import read_host_file_entry

        entries = body["serialized_named_tensors"]
        if body.get("load_format") != "flattened_bucket" or len(entries) != self.args.tp_size:
            return 400, {
                "success": False,
                "message": f"{len(entries)} entries for tp {self.args.tp_size}",
            }
        decoded = [read_host_file_entry(e) for e in entries]
        first = decoded[0][0]
        for tensors, _ in decoded[1:]:
            if [n for n, _ in tensors] != [n for n, _ in first] or not all(
                torch.equal(a, b) for (_, a), (_, b) in zip(tensors, first)
            ):
                return 400, {"success": False, "message": "TP ranks received different bytes"}
        self.engine.load_weights([WeightBucket.from_tensors([(n, t.clone()) for n, t in first])])
        self.state["tensor_updates"].append(
            {"senders": [s for _, s in decoded], "names": len(first)}
        )
        return 200, {"success": True, "message": "ok"}

    def _init_group(self, body: dict) -> tuple[int, Any]:
        from megatron_mel.rollout.sglang_weights import init_custom_process_group

        if self.args.tp_size != 1:
            return 400, {"success": False, "message": "the fake joins NCCL groups at tp 1 only"}
        if body["group_name"] in self.groups:
            return 400, {
                "success": False,
                "message": "The specified group name has already been created",
            }
        self.groups[body["group_name"]] = init_custom_process_group(
            backend="gloo", world_size=body["world_size"], rank=body["rank_offset"],
            init_method=f"tcp://{body['master_address']}:{body['master_port']}",
            group_name=body["group_name"], timeout=120,
        )  # fmt: skip
        return 200, {"success": True, "message": "ok"}

    def _distributed_update(self, body: dict) -> tuple[int, Any]:
        import torch.distributed as dist

        from megatron_mel.rollout.engine import WeightBucket

        group = self.groups[body["group_name"]]
        empties = [
            torch.empty(s, dtype=getattr(torch, d)) for s, d in zip(body["shapes"], body["dtypes"])
        ]
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in empties])
        dist.broadcast(flat, src=0, group=group)
        named, offset = [], 0
        for name, t in zip(body["names"], empties):
            size = t.numel() * t.element_size()
            named.append((name, flat[offset : offset + size].view(t.dtype).view(t.shape).clone()))
            offset += size
        self.engine.load_weights([WeightBucket.from_tensors(named)])
        self.state["distributed_updates"] += 1
        return 200, {"success": True, "message": "ok"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fake sglang.launch_server")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--nccl-port", type=int, default=None)
    parser.add_argument("--base-gpu-id", type=int, default=0)
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--mem-fraction-static", type=float, default=0.5)
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--skip-server-warmup", action="store_true")
    parser.add_argument("--enable-deterministic-inference", action="store_true")
    args, _ = parser.parse_known_args(argv)
    fake = FakeServer(args)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            try:
                status, answer = fake.handle(method, self.path, body)
            except Exception as exc:  # a bug in the fake or the caller: show it
                status, answer = 500, {"error": f"{type(exc).__name__}: {exc}"}
            data = b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"fake sglang server on {args.host}:{args.port} tp={args.tp_size}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
