"""LoRA adapters over HTTP, as vLLM serves them: `--lora-modules`, each adapter a model of
its own name in /v1/models (parent: the base model), requests for adapters and the base
model batched together, POST /v1/load_lora_adapter and /v1/unload_lora_adapter at run time
behind the API key, errors in OpenAI's shape, and metrics labelled by adapter."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from peregrine import LLM, LoRARequest, SamplingParams
from peregrine.config import EngineConfig
from peregrine.server.app import ServerArgs
from peregrine.server.lora import parse_lora_modules
from tests.conftest import write_hf_checkpoint
from tests.lora.conftest import make_adapter
from tests.server.conftest import RunningServer, serve

KEY = "sk-lora"
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory, smollm2_path):
    """A tiny random Llama with SmolLM2's vocabulary (served with SmolLM2's tokenizer) and
    three adapters of it: rank 8, rank 4, and rank 16 (over the server's max of 8)."""
    root = tmp_path_factory.mktemp("lora-server")
    path, model = write_hf_checkpoint(root, "llama", vocab_size=49152)
    return path, {"all8": make_adapter(model, str(root / "all8"), seed=1, r=8),
                  "attn4": make_adapter(model, str(root / "attn4"), seed=2, r=4,
                                        targets=["q_proj", "v_proj"]),
                  "big16": make_adapter(model, str(root / "big16"), seed=3, r=16)}


def engine_config(path: str, smollm2_path: str) -> EngineConfig:
    return EngineConfig(model=path, tokenizer=smollm2_path, num_kv_blocks=128, max_loras=2,
                        max_lora_rank=8)


@pytest.fixture(scope="module")
def lora_server(base_and_adapters, smollm2_path) -> Iterator[RunningServer]:
    path, adapters = base_and_adapters
    args = ServerArgs(api_key=KEY, served_model_name="tiny", embedding_model=None,
                      lora_modules=[f"all8={adapters['all8'].path}"])
    with serve(args, engine_config(path, smollm2_path)) as s:
        yield s


@pytest.fixture(scope="module")
def offline(base_and_adapters, smollm2_path) -> dict[str | None, list[str]]:
    """Each prompt's greedy text offline, on the base model and on each adapter."""
    path, adapters = base_and_adapters
    config = engine_config(path, smollm2_path)
    llm = LLM(path, tokenizer=smollm2_path, num_kv_blocks=128, enable_lora=True,
              max_loras=config.max_loras, max_lora_rank=config.max_lora_rank)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out: dict[str | None, list[str]] = {}
    for name in (None, "all8", "attn4"):
        lora = None if name is None else LoRARequest(name, adapters[name].path)
        out[name] = [o.outputs[0].text for o in llm.generate(PROMPTS, params,
                                                            lora_request=lora)]
    return out


@pytest.fixture
def http(lora_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lora_server.url, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def complete(http: httpx.Client, model: str, prompt: str) -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12,
                                           "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["text"]


def test_an_adapter_is_a_model_whose_parent_is_the_base(http, base_and_adapters):
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert cards["all8"]["parent"] == "tiny"
    assert cards["all8"]["root"] == base_and_adapters[1]["all8"].path
    assert cards["tiny"]["parent"] is None


def test_requests_for_adapters_and_the_base_model_run_together(http, offline):
    """Every prompt on the base model and on the adapter, sent at once: each answer is
    the one it gets offline."""
    jobs = [(model, i) for model in ("tiny", "all8") for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda j: complete(http, j[0], PROMPTS[j[1]]), jobs))
    want = [offline[None if m == "tiny" else m][i] for m, i in jobs]
    assert texts == want
    assert offline["all8"] != offline[None]


def test_adapters_load_and_unload_at_run_time(http, offline, base_and_adapters):
    path = base_and_adapters[1]["attn4"].path
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "attn4", "lora_path": path})
    assert r.status_code == 200 and "attn4" in r.text
    assert "attn4" in {c["id"] for c in http.get("/v1/models").json()["data"]}
    chat = http.post("/v1/chat/completions", json={
        "model": "attn4", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "attn4"
    assert complete(http, "attn4", PROMPTS[0]) == offline["attn4"][0]
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "attn4"})
    assert r.status_code == 200
    gone = http.post("/v1/completions", json={"model": "attn4", "prompt": "x"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    again = http.post("/v1/unload_lora_adapter", json={"lora_name": "attn4"})
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "lora_adapter_not_found"


@pytest.mark.parametrize("body, message", [
    ({"lora_name": "x", "lora_path": "/no/such/dir"}, "no adapter directory"),
    ({"lora_name": "big", "lora_path": "{big16}"}, "max_lora_rank 8"),
    ({"lora_name": "tiny", "lora_path": "{all8}"}, "already served"),
    ({"lora_name": "again", "lora_path": "{all8}", "base_model_name": "nope"},
     "does not exist"),
    ({"lora_name": "x"}, "lora_path"),
])
def test_adapters_that_cannot_be_served_are_refused(http, base_and_adapters, body, message):
    paths = {f"{{{n}}}": a.path for n, a in base_and_adapters[1].items()}
    body = {k: paths.get(v, v) for k, v in body.items()}
    r = http.post("/v1/load_lora_adapter", json=body)
    assert r.status_code in (400, 404)
    error = r.json()["error"]
    assert message in error["message"]
    assert r.status_code == 404 or error["type"] == "invalid_request_error"


def test_the_adapter_routes_want_the_api_key(lora_server, base_and_adapters):
    r = httpx.post(lora_server.url + "/v1/load_lora_adapter",
                   json={"lora_name": "attn4", "lora_path": base_and_adapters[1]["attn4"].path})
    assert r.status_code == 401
    r = httpx.post(lora_server.url + "/v1/unload_lora_adapter", json={"lora_name": "all8"})
    assert r.status_code == 401


def test_request_metrics_are_labelled_by_adapter(http, lora_server):
    complete(http, "all8", PROMPTS[1])
    lora_server.wait_idle()
    text = httpx.get(lora_server.url + "/metrics").text
    assert 'peregrine:request_success_total{finished_reason="length",model_name="all8"}' in text
    assert 'peregrine:time_to_first_token_seconds_count{model_name="all8"}' in text


def test_lora_modules_take_name_equals_path_or_vllm_json():
    parsed = parse_lora_modules(["sql=/a/sql", '{"name": "chat", "path": "/a/chat", '
                                               '"base_model_name": "smol"}'])
    assert parsed == [(LoRARequest("sql", "/a/sql"), None),
                      (LoRARequest("chat", "/a/chat"), "smol")]
    with pytest.raises(ValueError, match="expected name=path"):
        parse_lora_modules(["sql"])
