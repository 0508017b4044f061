"""SGLang engine on CPU, up to the process boundary: exact /generate payloads, response parsing,
routing, failures against real local HTTP servers (errors, hangs, deaths, recovery), the two
weight transports' payloads, and a real gloo broadcast into a fake engine process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from megatron_mel.config import RolloutConfig, SGLangConfig
from megatron_mel.rollout.engine import (
    EngineError,
    GenerationRequest,
    SamplingParams,
    WeightBucket,
    request_seed,
)
from megatron_mel.rollout.sglang_engine import (
    GPUBackendUnavailable,
    LeastOutstandingRouter,
    SGLangEngine,
    build_generate_payload,
    launch_command,
    launch_env,
    parse_generate_response,
)
from megatron_mel.rollout.sglang_weights import (
    DistributedTransport,
    bucket_metadata,
    distributed_request,
    init_custom_process_group,
    iter_buckets,
    plan_weight_group,
    sglang_serializer,
    with_last,
)

REPO = Path(__file__).resolve().parents[2]


# -- a fake SGLang HTTP server ---------------------------------------------------------------


class FakeSGLang:
    """Speaks the SGLang routes the engine uses; ``mode``: ok | error | hang | fail_update."""

    def __init__(self, port: int = 0, *, delay: float = 0.0) -> None:
        self.mode, self.delay, self.hang_s = "ok", delay, 3.0
        self.version = "default"
        self.calls: list[tuple[str, str, object]] = []
        self.flush_busy = 0  # answer 400 to this many /flush_cache calls first
        self.weights: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.server = self._serve(port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def routes(self, route: str) -> list[object]:
        with self._lock:
            return [body for _, r, body in self.calls if r == route]

    def _serve(self, port: int) -> ThreadingHTTPServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                fake._handle(self, "GET")

            def do_POST(self):
                fake._handle(self, "POST")

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def restart(self) -> None:
        self.server = self._serve(self.server.server_address[1])

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        with self._lock:
            self.calls.append((method, h.path, body))
        if self.mode == "hang":
            time.sleep(self.hang_s)
        if self.mode == "error":
            return _reply(h, 500, {"error": "scheduler died"})
        status, answer = self._answer(h.path, body)
        _reply(h, status, answer)

    STATIC = {  # noqa: RUF012
        "/health_generate": None,
        "/pause_generation": {"status": "ok"},
        "/continue_generation": {"status": "ok"},
        "/release_memory_occupation": None,
        "/resume_memory_occupation": None,
    }

    def _answer(self, route: str, body):
        ok = {"success": True, "message": "ok"}
        if route in self.STATIC:
            return 200, self.STATIC[route]
        if route == "/get_weight_version":
            return 200, {"weight_version": self.version}
        if route == "/generate":
            time.sleep(self.delay)
            pairs = zip(body["input_ids"], body["sampling_params"])
            return 200, [self._complete(ids, sp) for ids, sp in pairs]
        if route == "/flush_cache":
            self.flush_busy -= 1
            return (400, "requests pending") if self.flush_busy >= 0 else (200, "Cache flushed.")
        if route == "/update_weight_version":
            self.version = body["new_version"]
            return 200, ok
        if route == "/update_weights_from_tensor":
            if self.mode == "fail_update":
                return 400, {"success": False, "message": "boom"}
            self.version = body.get("weight_version", self.version)
            return 200, ok
        if route == "/get_weights_by_name" and body["name"] in self.weights:
            return 200, self.weights[body["name"]].tolist()[: body["truncate_size"]]
        return 400, {"error": {"message": f"{route} failed"}}

    def _complete(self, ids: list[int], sp: dict) -> dict:
        tokens = [100 + len(ids) + k for k in range(sp["max_new_tokens"])]
        reason = {"type": "length", "length": sp["max_new_tokens"]}
        if sp["stop_token_ids"]:
            tokens = [7, sp["stop_token_ids"][0]]
            reason = {"type": "stop", "matched": tokens[-1]}
        pairs = [[-0.5 - 0.1 * k, t, None] for k, t in enumerate(tokens)]
        meta = {"output_token_logprobs": pairs, "finish_reason": reason}
        meta["weight_version"] = self.version
        return {"text": "", "output_ids": tokens, "meta_info": meta}


def _reply(h: BaseHTTPRequestHandler, status: int, answer) -> None:
    data = b"" if answer is None else json.dumps(answer).encode()
    try:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    except OSError:  # the client gave up (timeout test)
        pass


@pytest.fixture
def servers():
    made: list[FakeSGLang] = []

    def make(count: int = 1, **kwargs) -> list[FakeSGLang]:
        new = [FakeSGLang(**kwargs) for _ in range(count)]
        made.extend(new)
        return new

    yield make
    for fake in made:
        fake.stop()


def engine_for(fakes, *, tp: int = 1, timeout: float = 5.0, placement="colocate", **kwargs):
    cfg = RolloutConfig(
        engine="sglang",
        placement=placement,
        sglang=SGLangConfig(urls=[f.url for f in fakes], engine_tp=tp, request_timeout_s=timeout),
    )
    kwargs.setdefault("health_timeout_s", 2.0)
    kwargs.setdefault("control_timeout_s", 5.0)
    kwargs.setdefault("flush_timeout_s", 5.0)
    return SGLangEngine(cfg, **kwargs)


def requests(count: int, **params) -> list[GenerationRequest]:
    sp = SamplingParams(max_new_tokens=3, **params)
    return [GenerationRequest(f"r{i}", [1, 2, 3 + i], sp) for i in range(count)]


# -- pure request building and parsing -------------------------------------------------------


def test_generate_payload_is_exact():
    params = SamplingParams(
        n=2, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=16, stop_token_ids=(2, 5), seed=7
    )
    payload = build_generate_payload(GenerationRequest("q1", [11, 12], params), "q1@3")
    base = request_seed(7, "q1")
    sp = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 16,
          "stop_token_ids": [2, 5], "ignore_eos": False}  # fmt: skip
    assert payload == {
        "input_ids": [[11, 12], [11, 12]],
        "sampling_params": [{**sp, "sampling_seed": base}, {**sp, "sampling_seed": base + 1}],
        "rid": ["q1@3/0", "q1@3/1"],
        "return_logprob": True,
        "stream": False,
    }
    assert json.loads(json.dumps(payload)) == payload
    plain = build_generate_payload(GenerationRequest("a", [1], SamplingParams()), "a@0")
    (sp,) = plain["sampling_params"]  # no stop tokens: EOS must not stop either
    assert sp["ignore_eos"] is True and "sampling_seed" not in sp and sp["top_k"] == -1
    # Requests of one call sharing the seed get disjoint streams (replays of one question).
    other = build_generate_payload(GenerationRequest("q2", [11, 12], params), "q2@3")
    seeds = {c["sampling_seed"] for c in payload["sampling_params"] + other["sampling_params"]}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)


def _item(tokens, reason, version=None, output_ids=True):
    meta = {"output_token_logprobs": [[-1.0 - t / 10, t, None] for t in tokens]}
    meta["finish_reason"] = reason
    if version is not None:
        meta["weight_version"] = version
    item = {"text": "x", "meta_info": meta}
    if output_ids:
        item["output_ids"] = list(tokens)
    return item


def test_parse_response_finish_reasons_logprobs_and_n():
    body = [
        _item([4, 2], {"type": "stop", "matched": 2}),
        _item([5, 6, 7], {"type": "length", "length": 3}, output_ids=False),
        _item([], {"type": "abort", "message": "paused"}),
    ]
    out = parse_generate_response(body, 3, version=4)
    assert [c.token_ids for c in out] == [[4, 2], [5, 6, 7], []]
    assert out[0].logprobs == pytest.approx([-1.4, -1.2])
    assert [c.finish_reason for c in out] == ["stop", "length", "abort"]
    assert out[1].truncated and all(c.weight_version == 4 for c in out)
    single = parse_generate_response(_item([9], {"type": "stop", "matched": 9}), 1, 0)
    assert single[0].token_ids == [9]


@pytest.mark.parametrize(
    "body, n, problem",
    [
        ([_item([1], {"type": "stop"})], 2, "expected 2"),
        ([{"meta_info": {"finish_reason": {"type": "stop"}}}], 1, "output_token_logprobs"),
        ([{**_item([1, 2], {"type": "stop"}), "output_ids": [1, 3]}], 1, "disagree"),
        ([_item([1], {"type": "weird"})], 1, "finish_reason"),
        ([_item([1], {"type": "stop"}, version="3")], 1, "weight version"),
    ],
)
def test_parse_response_rejects(body, n, problem):
    with pytest.raises(ValueError, match=problem):
        parse_generate_response(body, n, version=5, expected_server_version="5")


def test_launch_command_and_env():
    cmd = launch_command(
        "/m", host="127.0.0.1", port=30001, tp=2, mem_fraction_static=0.4, colocate=True,
        deterministic=True, base_gpu_id=2, seed=9, extra_args=["--dtype", "bfloat16"],
    )  # fmt: skip
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    flags = " ".join(cmd[3:])
    for part in ("--model-path /m", "--tp-size 2", "--mem-fraction-static 0.4", "--port 30001",
                 "--host 127.0.0.1", "--base-gpu-id 2", "--random-seed 9",
                 "--enable-memory-saver", "--enable-deterministic-inference",
                 "--dtype bfloat16"):  # fmt: skip
        assert part in flags
    plain = launch_command("/m", host="h", port=1, tp=1, mem_fraction_static=0.5, colocate=False)
    assert "--enable-memory-saver" not in plain and "--enable-deterministic-inference" not in plain
    env = launch_env({"PATH": "/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert env["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1" and "PYTORCH_CUDA_ALLOC_CONF" not in env


def test_router_least_outstanding_and_health():
    router = LeastOutstandingRouter(["a", "b", "c"])
    assert [router.acquire() for _ in range(4)] == ["a", "b", "c", "a"]
    router.release("b")
    router.release("c")
    assert router.acquire() == "b"
    router.mark_unhealthy("c", "down")
    assert router.healthy == ["a", "b"] and router.unhealthy == {"c": "down"}
    router.mark_unhealthy("a", "down")
    router.mark_unhealthy("b", "down")
    assert router.acquire() is None
    router.mark_healthy("b")
    assert router.acquire() == "b"


# -- generation against real local HTTP servers ----------------------------------------------


def test_generate_dispatches_over_servers_in_request_order(servers):
    fakes = servers(2, delay=0.05)
    engine = engine_for(fakes)
    batch = requests(6, stop_token_ids=(2,))
    results = engine.generate(batch)
    assert [r.request_id for r in results] == [f"r{i}" for i in range(6)]
    assert all(
        c.token_ids == [7, 2] and c.finish_reason == "stop" for r in results for c in r.completions
    )
    assert all(len(f.routes("/generate")) > 0 for f in fakes)
    sent = [b for f in fakes for b in f.routes("/generate")]
    assert sorted(b["input_ids"][0][-1] for b in sent) == [3, 4, 5, 6, 7, 8]
    body = sent[0]
    rid = body["rid"][0]
    request = next(r for r in batch if rid.startswith(r.request_id + "@"))
    assert body == build_generate_payload(request, rid.rsplit("/", 1)[0])
    assert engine.health().healthy and "2/2" in engine.health().detail


def test_n_copies_come_back_as_completions(servers):
    (fake,) = servers(1)
    engine = engine_for([fake])
    (result,) = engine.generate(
        [GenerationRequest("g", [5, 6], SamplingParams(n=3, max_new_tokens=2))]
    )
    assert len(result.completions) == 3
    assert all(
        c.finish_reason == "length" and c.token_ids == [102, 103] for c in result.completions
    )


@pytest.mark.parametrize("failure", ["error", "hang", "dead"])
def test_failure_names_server_and_lost_ids_then_retry_succeeds(servers, failure):
    (fake,) = servers(1)
    engine = engine_for([fake], timeout=0.5)
    batch = requests(3)
    if failure == "dead":
        fake.stop()
    else:
        fake.mode = failure
    start = time.monotonic()
    with pytest.raises(EngineError) as info:
        engine.generate(batch)
    assert time.monotonic() - start < 2.5  # the hang is cut by request_timeout_s
    assert info.value.engine == fake.url and fake.url in str(info.value)
    assert info.value.lost == ["r0", "r1", "r2"]
    assert fake.url in engine.router.unhealthy
    assert not engine.health().healthy
    if failure == "dead":
        fake.restart()
    fake.mode = "ok"
    results = engine.generate(batch)  # the unhealthy server is probed and taken back
    assert [r.request_id for r in results] == ["r0", "r1", "r2"]
    assert engine.router.healthy == [fake.url]


def test_completed_results_are_kept_for_the_retry(servers):
    good, bad = servers(2, delay=0.2)
    bad.mode = "error"
    engine = engine_for([good, bad])
    batch = requests(4)
    with pytest.raises(EngineError) as info:
        engine.generate(batch)
    lost = info.value.lost
    assert info.value.engine == bad.url and 0 < len(lost) < 4
    assert "kept for the retry" in str(info.value)
    bad.mode = "ok"
    results = engine.generate(batch)
    assert [r.request_id for r in results] == ["r0", "r1", "r2", "r3"]
    # Only the lost requests were generated again; the kept ones came from the first call.
    total = len(good.routes("/generate")) + len(bad.routes("/generate"))
    assert total == 4 + len(lost)


def test_server_that_missed_an_update_is_not_readmitted(servers):
    a, b = servers(2)
    engine = engine_for([a, b], serializer=lambda bucket: "handle")
    engine.router.mark_unhealthy(b.url, "lost earlier")
    engine.pause()
    engine.update_weights([WeightBucket.from_tensors([("w", torch.ones(2))])], 1)
    engine.resume()
    assert a.version == "1" and b.version == "default"
    engine.generate(requests(2))
    assert b.url in engine.router.unhealthy and "expected '1'" in engine.router.unhealthy[b.url]


def test_scaled_logprob_servers_refuse_other_temperatures(servers):
    (fake,) = servers(1)
    engine = engine_for([fake], unscaled_logprobs=False)
    with pytest.raises(EngineError, match="SGLANG_RETURN_ORIGINAL_LOGPROB") as info:
        engine.generate(requests(2, temperature=0.6))
    assert info.value.lost == ["r0", "r1"]
    assert len(engine.generate(requests(1, temperature=1.0))) == 1


# -- control routes --------------------------------------------------------------------------


def test_pause_flush_resume_and_memory_routes(servers):
    fakes = servers(2)
    engine = engine_for(fakes)
    fakes[0].flush_busy = 2  # 400 twice: requests still pending
    engine.pause()
    engine.flush()
    engine.resume()
    engine.release_memory()
    engine.resume_memory(["weights"])
    engine.resume_memory()
    for fake in fakes:
        assert fake.routes("/pause_generation") == [{"mode": "abort"}]
        assert fake.routes("/continue_generation") == [{}]
        assert fake.routes("/release_memory_occupation") == [{"tags": None}]
        assert fake.routes("/resume_memory_occupation") == [{"tags": ["weights"]}, {"tags": None}]
    assert len(fakes[0].routes("/flush_cache")) == 4  # 2 refused + flush + release's flush
    assert len(fakes[1].routes("/flush_cache")) == 2


def test_control_failure_names_server(servers):
    good, bad = servers(2)
    engine = engine_for([good, bad])
    bad.mode = "error"
    with pytest.raises(EngineError) as info:
        engine.pause()
    assert info.value.engine == bad.url and not engine.paused


# -- weights through the engine --------------------------------------------------------------


def _buckets():
    b1 = WeightBucket.from_tensors(
        [("a.weight", torch.arange(6.0).view(2, 3)), ("a.bias", torch.ones(3))]
    )
    b2 = WeightBucket.from_tensors([("b.weight", torch.zeros(4, dtype=torch.bfloat16))])
    return [b1, b2]


def test_colocated_update_sends_one_payload_per_tp_rank(servers):
    fakes = servers(2)
    made = []

    def serializer(bucket):
        made.append(bucket)
        return f"handle-{len(made)}"

    engine = engine_for(fakes, tp=2, serializer=serializer)
    with pytest.raises(EngineError, match="pause"):
        engine.update_weights(_buckets(), 1)
    engine.pause()
    engine.update_weights(iter(_buckets()), 1)  # a generator: the last bucket is found by lookahead
    engine.resume()
    assert engine.weight_version == 1 and len(made) == 2 * 2 * 2  # engines x tp x buckets
    for fake in fakes:
        first, last = fake.routes("/update_weights_from_tensor")
        assert (
            first["load_format"] == "flattened_bucket"
            and len(first["serialized_named_tensors"]) == 2
        )
        assert first["flush_cache"] is False and "weight_version" not in first
        assert last["flush_cache"] is True and last["weight_version"] == "1"
        assert fake.version == "1"
    results = engine.generate(requests(2))  # the servers now report version "1", as expected
    assert all(c.weight_version == 1 for r in results for c in r.completions)


def test_failed_update_takes_the_server_out_and_empty_update_stamps(servers):
    good, bad = servers(2)
    engine = engine_for([good, bad], serializer=lambda bucket: "h")
    bad.mode = "fail_update"
    engine.pause()
    with pytest.raises(EngineError, match="boom") as info:
        engine.update_weights(_buckets(), 1)
    assert info.value.engine == bad.url and engine.weight_version == 0
    assert bad.url in engine.router.unhealthy  # it holds a mix of weights now
    engine.update_weights([], 3)  # nothing to send: flush and stamp the version
    stamp = {"new_version": "3", "abort_all_requests": False}
    assert good.routes("/update_weight_version") == [stamp] and good.version == "3"
    assert good.routes("/flush_cache") and not bad.routes("/update_weight_version")


def test_get_weights_returns_the_truncated_prefix(servers):
    (fake,) = servers(1)
    fake.weights = {"w": torch.arange(15.0).view(5, 3), "norm": torch.arange(4.0)}
    engine = engine_for([fake], truncate_size=2)
    got = engine.get_weights(["w", "norm"])
    assert torch.equal(got["w"], torch.arange(6.0).view(2, 3)) and got["w"].dtype == torch.float32
    assert torch.equal(got["norm"], torch.tensor([0.0, 1.0]))
    assert fake.routes("/get_weights_by_name")[0] == {"name": "w", "truncate_size": 2}
    with pytest.raises(EngineError, match="missing") as info:
        engine.get_weights(["missing"])
    assert info.value.engine == fake.url


# -- pure transport parts --------------------------------------------------------------------


def test_bucket_metadata_and_distributed_request():
    b1, b2 = _buckets()
    meta = [(m["name"], m["shape"], m["dtype"], m["start_idx"], m["end_idx"], m["numel"])
            for m in bucket_metadata(b1)]  # fmt: skip
    assert meta == [("a.weight", [2, 3], torch.float32, 0, 6, 6),
                    ("a.bias", [3], torch.float32, 6, 9, 3)]  # fmt: skip
    assert set(bucket_metadata(b1)[0]) == {
        "name",
        "shape",
        "dtype",
        "start_idx",
        "end_idx",
        "numel",
    }
    body = distributed_request(
        b2, "mel-pp0", flush_cache=True, weight_version="2", load_format="flattened_bucket"
    )
    assert body == {"names": ["b.weight"], "dtypes": ["bfloat16"], "shapes": [[4]], "group_name": "mel-pp0",
                    "flush_cache": True, "load_format": "flattened_bucket", "weight_version": "2"}  # fmt: skip
    plain = distributed_request(b1, "g", flush_cache=False, weight_version=None, load_format=None)
    assert "load_format" not in plain and "weight_version" not in plain
    assert plain["dtypes"] == ["float32", "float32"]


def test_group_plan_order_and_rank_offsets():
    plan = plan_weight_group(["http://e0", "http://e1", "http://e2"], [2, 1, 4], stage=1,
                             master_address="10.0.0.1", master_port=29555)  # fmt: skip
    assert plan.group_name == "mel-pp1" and plan.world_size == 8
    assert [url for url, _ in plan.requests] == ["http://e0", "http://e1", "http://e2"]
    assert [body["rank_offset"] for _, body in plan.requests] == [1, 3, 4]
    assert plan.requests[0][1] == {"master_address": "10.0.0.1", "master_port": 29555, "rank_offset": 1,
                                   "world_size": 8, "group_name": "mel-pp1", "backend": "nccl"}  # fmt: skip
    with pytest.raises(ValueError):
        plan_weight_group(["a"], [1, 2], stage=0, master_address="x", master_port=1)


def test_iter_buckets_chunks_by_dtype_and_size():
    named = [
        ("a", torch.zeros(10)),  # 40 bytes
        ("h", torch.zeros(4, dtype=torch.bfloat16)),  # 8 bytes
        ("b", torch.zeros(10)),
        ("big", torch.zeros(30)),  # 120 bytes > cap: a bucket of its own
        ("c", torch.zeros(5)),
    ]
    buckets = list(iter_buckets(named, max_bytes=100))
    assert [[e.name for e in b.entries] for b in buckets] == [["a", "b"], ["big"], ["c"], ["h"]]
    assert all(
        b.flat.dtype == (torch.bfloat16 if b.entries[0].name == "h" else torch.float32)
        for b in buckets
    )
    assert [x for x, _ in with_last([])] == [] and list(with_last("ab")) == [
        ("a", False),
        ("b", True),
    ]


def test_gpu_paths_explain_themselves_without_cuda_or_sglang():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = RolloutConfig(engine="sglang")
    with pytest.raises(
        GPUBackendUnavailable, match=r"pip install -e \.\[gpu\].*rollout.engine: embedded"
    ):
        SGLangEngine(cfg, model_path="/models/x")
    with pytest.raises(GPUBackendUnavailable, match="CUDA"):
        sglang_serializer()
    with pytest.raises(GPUBackendUnavailable):
        DistributedTransport(["http://x"], [1], backend="nccl").connect()


# -- a real broadcast (gloo) into a fake engine process ---------------------------------------


def _fake_receiver_main(port_file: str) -> None:
    """A fake disaggregated SGLang server: joins weight groups and receives buckets the way
    SGLang's model runner does (one flat buffer in order, or one broadcast per tensor)."""
    import torch.distributed as dist

    groups, weights = {}, {}

    def answer(route, body):
        if route == "/init_weights_update_group":
            groups[body["group_name"]] = init_custom_process_group(
                backend=body["backend"], world_size=body["world_size"], rank=body["rank_offset"],
                init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                group_name=body["group_name"], timeout=60,
            )  # fmt: skip
            return {"success": True, "message": "ok"}
        if route == "/update_weights_from_distributed":
            group = groups[body["group_name"]]
            empties = [
                torch.empty(s, dtype=getattr(torch, d))
                for s, d in zip(body["shapes"], body["dtypes"])
            ]
            if body.get("load_format") == "flattened_bucket":
                flat = torch.cat([t.reshape(-1) for t in empties])
                dist.broadcast(flat, src=0, group=group)
                received, offset = [], 0
                for t in empties:
                    received.append(flat[offset : offset + t.numel()].view(t.shape))
                    offset += t.numel()
            else:
                received = empties
                for t in received:
                    dist.broadcast(t, src=0, group=group)
            weights.update(zip(body["names"], received))
            return {"success": True, "message": "ok"}
        if route == "/get_weights_by_name":
            return weights[body["name"]].float().tolist()[: body["truncate_size"]]
        if route == "/destroy_weights_update_group":
            dist.destroy_process_group(groups.pop(body["group_name"]))
            return {"success": True, "message": "ok"}
        if route == "/get_weight_version":
            return {"weight_version": "default"}
        return {"status": "ok"}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            _reply(self, 200, answer(self.path, None))

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            _reply(
                self,
                200,
                answer(self.path, json.loads(self.rfile.read(length)) if length else None),
            )

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


def test_disaggregated_broadcast_over_gloo(tmp_path):
    port_file = tmp_path / "port"
    code = f"from tests.unit.test_sglang_engine import _fake_receiver_main; _fake_receiver_main({str(port_file)!r})"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "fake engine did not start"
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        fake = type("F", (), {"url": url})()
        engine = engine_for(
            [fake], placement="disaggregate", weight_backend="gloo", truncate_size=1000
        )
        engine.pause()
        engine.update_weights(_buckets(), 1)  # group mel-pp0, one broadcast per bucket
        got = engine.get_weights(["a.weight", "a.bias", "b.weight"])
        assert torch.equal(got["a.weight"], torch.arange(6.0).view(2, 3))
        assert torch.equal(got["a.bias"], torch.ones(3)) and torch.equal(
            got["b.weight"], torch.zeros(4)
        )
        # A second pipeline stage: its own group, one broadcast per tensor.
        sender = engine.weight_sender(stage=1, load_format=None)
        stage1 = WeightBucket.from_tensors([("c.weight", torch.full((3, 2), 2.5))])
        assert sender.send([stage1], None) == 1 and sender.plan.group_name == "mel-pp1"
        assert torch.equal(engine.get_weights(["c.weight"])["c.weight"], torch.full((3, 2), 2.5))
        sender.close()
        engine.update_weights([], 2)  # stages sent their own buckets: stamp the version only
        engine.resume()
        engine.shutdown()
    finally:
        proc.kill()
        proc.wait(timeout=30)
