"""SGLang engine on CPU, up to the process boundary: exact /generate payloads, response parsing,
routing, failures against real local HTTP servers (errors, hangs, deaths, recovery), the
update session and version commit, the memory routes, and a real gloo broadcast into the fake
server process (tests/fakes/sglang_server.py)."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from megatron_mel.config import RolloutConfig, ServerConfig
from megatron_mel.rollout.engine import (
    EngineError,
    GenerationRequest,
    SamplingParams,
    WeightBucket,
    request_seed,
)
from megatron_mel.rollout.http import request_json
from megatron_mel.rollout.sglang_engine import (
    LeastOutstandingRouter,
    SGLangEngine,
    build_generate_payload,
    parse_generate_response,
)
from megatron_mel.rollout.sglang_weights import (
    GPUBackendUnavailable,
    StageSender,
    bucket_metadata,
    distributed_request,
    host_file_serializer,
    plan_weight_group,
    read_host_file_entry,
    sglang_serializer,
)

REPO = Path(__file__).resolve().parents[2]


# -- a fake SGLang HTTP server ---------------------------------------------------------------


class FakeSGLang:
    """Speaks the SGLang routes the engine uses; ``mode``: ok | error | hang | fail_update."""

    def __init__(self, port: int = 0, *, delay: float = 0.0) -> None:
        self.mode, self.delay, self.hang_s = "ok", delay, 3.0
        self.version = "default"
        self.sessions = True  # /begin_weight_update exists (SGLang >= 0.5.21)
        self.legacy_version_route = False  # only /get_weight_version (SGLang < 0.5.6)
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
        if route == "/model_info" and not self.legacy_version_route:
            return 200, {"model_path": "/m", "weight_version": self.version}
        if route == "/get_weight_version" and self.legacy_version_route:
            return 200, {"weight_version": self.version}
        if route in ("/begin_weight_update", "/end_weight_update") and self.sessions:
            if self.mode == "fail_update":
                return 400, {"success": False, "message": "boom"}
            return 200, ok
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
        if route == "/get_weights_by_name" and body["name"] in self.weights:
            return 200, self.weights[body["name"]].tolist()[: body["truncate_size"]]
        return 404, {"detail": "Not Found"}

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
    kwargs.setdefault("health_timeout_s", 2.0)
    kwargs.setdefault("control_timeout_s", 5.0)
    kwargs.setdefault("flush_timeout_s", 5.0)
    return SGLangEngine([f.url for f in fakes], engine_tps=[tp] * len(fakes), placement=placement,
                        request_timeout_s=timeout, **kwargs)  # fmt: skip


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


def _commit(engine, version):
    """The driver's part of a sync: open the update, (buckets travel elsewhere), commit."""
    engine.pause()
    engine.flush()
    engine.begin_weight_update()
    engine.commit_weights(version)
    engine.resume()


def test_server_that_missed_an_update_is_not_readmitted(servers):
    a, b = servers(2)
    engine = engine_for([a, b])
    engine.router.mark_unhealthy(b.url, "lost earlier")
    _commit(engine, 1)
    assert a.version == "1" and b.version == "default"
    engine.generate(requests(2))
    assert b.url in engine.router.unhealthy and "expected '1'" in engine.router.unhealthy[b.url]


def test_version_is_read_from_model_info_or_the_legacy_route(servers):
    new, old = servers(2)
    old.legacy_version_route = True
    old.version = "7"
    engine = engine_for([new, old])
    assert engine._server_version(new.url) == "default"
    assert engine._server_version(old.url) == "7"
    assert old.routes("/model_info") and old.routes("/get_weight_version")  # 404, then fallback
    assert not new.routes("/get_weight_version")


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
    assert engine.release_memory() == 0  # SGLang does not say what it freed
    with pytest.raises(EngineError, match="released"):
        engine.generate(requests(1))
    engine.resume_memory(["weights"])
    engine.resume_memory()
    for fake in fakes:
        assert fake.routes("/pause_generation") == [{"mode": "abort"}]
        assert fake.routes("/continue_generation") == [{}]
        # Our KV cache is SGLang's kv_cache with its CUDA graphs; a resume names exactly what
        # was released and not resumed yet.
        assert fake.routes("/release_memory_occupation") == [
            {"tags": ["weights", "kv_cache", "cuda_graph"]}
        ]
        assert fake.routes("/resume_memory_occupation") == [
            {"tags": ["weights"]},
            {"tags": ["kv_cache", "cuda_graph"]},
        ]
    assert len(fakes[0].routes("/flush_cache")) == 4  # 2 refused + flush + release's flush
    assert len(fakes[1].routes("/flush_cache")) == 2
    assert len(engine.generate(requests(1))) == 1


def test_control_failure_names_server(servers):
    good, bad = servers(2)
    engine = engine_for([good, bad])
    bad.mode = "error"
    with pytest.raises(EngineError) as info:
        engine.pause()
    assert info.value.engine == bad.url and not engine.paused


# -- the update session and the one commit -----------------------------------------------------


def test_commit_opens_and_closes_sessions_and_stamps_once(servers):
    new, old = servers(2)
    old.sessions = False  # before SGLang 0.5.21: /begin_weight_update is a 404
    engine = engine_for([new, old])
    with pytest.raises(EngineError, match="pause"):
        engine.commit_weights(1)
    _commit(engine, 1)
    assert engine.weight_version == 1
    assert len(new.routes("/begin_weight_update")) == 1 and new.routes("/end_weight_update") == [{}]
    assert len(old.routes("/begin_weight_update")) == 1 and not old.routes("/end_weight_update")
    stamp = {"new_version": "1", "abort_all_requests": False}
    for fake in (new, old):
        assert fake.routes("/update_weight_version") == [stamp] and fake.version == "1"
    results = engine.generate(requests(2))  # the servers now report version "1", as expected
    assert all(c.weight_version == 1 for r in results for c in r.completions)
    with pytest.raises(EngineError, match="this engine receives weights from its transport"):
        engine.pause()
        engine.load_weights([WeightBucket.from_tensors([("w", torch.ones(2))])])
    engine.resume()


def test_failed_update_takes_the_server_out(servers):
    good, bad = servers(2)
    engine = engine_for([good, bad])
    bad.mode = "fail_update"
    engine.pause()
    with pytest.raises(EngineError, match="boom") as info:
        engine.begin_weight_update()
    assert info.value.engine == bad.url and engine.weight_version == 0
    assert bad.url in engine.router.unhealthy  # it may hold a mix of weights now
    engine.commit_weights(3)
    assert good.version == "3" and not bad.routes("/update_weight_version")
    engine.resume()


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


def _buckets():
    b1 = WeightBucket.from_tensors(
        [("a.weight", torch.arange(6.0).view(2, 3)), ("a.bias", torch.ones(3))]
    )
    b2 = WeightBucket.from_tensors([("b.weight", torch.zeros(4, dtype=torch.bfloat16))])
    return [b1, b2]


def test_bucket_metadata_counts_bytes_and_requests_stamp_nothing():
    """SGLang's flattened bucket is uint8 with byte offsets (weight_sync/tensor_bucket.py)."""
    b1, b2 = _buckets()
    meta = [(m["name"], m["shape"], m["dtype"], m["start_idx"], m["end_idx"], m["numel"])
            for m in bucket_metadata(b1)]  # fmt: skip
    assert meta == [("a.weight", [2, 3], torch.float32, 0, 24, 24),
                    ("a.bias", [3], torch.float32, 24, 36, 12)]  # fmt: skip
    assert [m["end_idx"] for m in bucket_metadata(b2)] == [8]
    body = distributed_request(b2, "mel-pp0")
    assert body == {"names": ["b.weight"], "dtypes": ["bfloat16"], "shapes": [[4]], "group_name": "mel-pp0",
                    "flush_cache": False, "load_format": "flattened_bucket"}  # fmt: skip
    plain = distributed_request(b1, "g", load_format=None)
    assert "load_format" not in plain and "weight_version" not in plain
    assert plain["dtypes"] == ["float32", "float32"]


def test_host_file_entries_round_trip_bytes_and_sender(tmp_path):
    b1, b2 = _buckets()
    serialize = host_file_serializer(tmp_path)
    for bucket in (b1, b2):
        tensors, sender = read_host_file_entry(serialize(bucket))
        assert [n for n, _ in tensors] == [e.name for e in bucket.entries]
        assert all(torch.equal(t, ref) for (_, t), (_, ref) in zip(tensors, bucket.tensors()))
        assert set(sender) == {"rank", "host"}


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


def test_gpu_paths_explain_themselves_without_cuda_or_sglang(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from megatron_mel.rollout.placement import EngineSlot
    from megatron_mel.rollout.servers import NodeServers

    slot = EngineSlot(index=0, node=0, gpus=(0,), host="127.0.0.1", port=30000)
    servers = NodeServers([slot], RolloutConfig(engine="sglang", server=ServerConfig()),
                          model_path="/models/x", seed=0, log_dir=tmp_path)  # fmt: skip
    with pytest.raises(
        GPUBackendUnavailable, match=r"pip install -e \.\[sglang\].*rollout.engine: embedded"
    ):
        servers.start()
    with pytest.raises(GPUBackendUnavailable, match="CUDA"):
        sglang_serializer()
    with pytest.raises(GPUBackendUnavailable):
        StageSender(["http://x"], [1], stage=0, master_address="127.0.0.1").connect()


# -- a real broadcast (gloo) into the fake server process ------------------------------------


def test_stage_sender_broadcasts_uint8_buckets_over_gloo(tiny_models, tmp_path, monkeypatch):
    """The NCCL path on gloo: one group per stage, one uint8 broadcast per bucket, destroyed on
    close; the fake joins the group like SGLang's model runner and serves what it received."""
    from safetensors.torch import load_file

    from megatron_mel.convert.mapping import expected_hf_names
    from megatron_mel.rollout.placement import EngineSlot
    from megatron_mel.rollout.servers import NodeServers

    model = tiny_models["qwen2"]
    slot = EngineSlot(index=0, node=0, gpus=(0,), host="127.0.0.1", port=_free_port())
    cfg = RolloutConfig(engine="sglang", placement="disaggregate",
                        server=ServerConfig(server_module="tests.fakes.sglang_server", launch_timeout_s=120))  # fmt: skip
    servers = NodeServers([slot], cfg, model_path=str(model), seed=0, log_dir=tmp_path)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    servers.start()
    try:
        weights = load_file(model / "model.safetensors")
        names = [n for n in expected_hf_names(_arch(model)) if n in weights]
        changed = {n: weights[n] + 0.5 for n in names}
        half = len(names) // 2
        request_json("POST", slot.url + "/pause_generation", {"mode": "abort"}, timeout=30)
        senders = [
            StageSender(
                [slot.url], [1], stage=s, master_address="127.0.0.1", backend="gloo", timeout_s=60
            )
            for s in (0, 1)
        ]
        for stage, part in ((0, names[:half]), (1, names[half:])):
            senders[stage].send(WeightBucket.from_tensors([(n, changed[n]) for n in part]), 0)
        assert senders[1].plan.group_name == "mel-pp1"
        request_json("POST", slot.url + "/update_weight_version", {"new_version": "1"}, timeout=30)
        request_json(
            "POST", slot.url + "/mel_fake/dump", {"path": str(tmp_path / "w.pt")}, timeout=60
        )
        served = torch.load(tmp_path / "w.pt")
        assert all(torch.equal(served[n], changed[n]) for n in names)
        for sender in senders:
            sender.close()
        state = request_json("GET", slot.url + "/mel_fake/state", timeout=30)
        assert state["distributed_updates"] == 2 and state["commits"] == ["1"]
    finally:
        servers.close()


def _free_port() -> int:
    from megatron_mel.platform import free_port

    return free_port()


def _arch(model):
    from megatron_mel.models.arch import load_arch

    return load_arch(model)
