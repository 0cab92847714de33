"""/v1/embeddings through the official `openai` client and raw HTTP: all-MiniLM-L6-v2 and
the served LLM's pooled hidden states, every input form and encoding, OpenAI-shaped errors,
and the batcher that puts concurrent requests into one forward."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import torch

from peregrine.config import EngineConfig
from peregrine.server.app import ServerArgs
from peregrine.server.embeddings import EmbeddingBatcher, EmbeddingService
from peregrine.server.errors import APIError
from peregrine.server.serving import ServingContext
from tests.server.conftest import SMALL_KV, RunningServer, serve

MINILM = "all-minilm-l6-v2"
LLM = "smollm2-135m"
TEXTS = ["The cat sits on the mat.", "A feline rests on a rug.", "Stocks fell sharply today."]


@pytest.fixture(scope="module")
def emb_server() -> Iterator[RunningServer]:
    """SmolLM2 with a 64-token context beside MiniLM; at most 16 inputs a request."""
    args = ServerArgs(max_embedding_inputs=16)
    with serve(args, EngineConfig(**SMALL_KV, max_model_len=64)) as s:
        yield s


@pytest.fixture(scope="module")
def client(emb_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=emb_server.api, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(emb_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emb_server.api, timeout=60) as c:
        yield c


def encoder(server: RunningServer):
    """The server's own MiniLM (loaded by the first embeddings request)."""
    enc = server.app.state.peregrine.embeddings.encoder
    assert enc is not None
    return enc


def b64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


def assert_400(r: httpx.Response, param: str, needle: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert needle in err["message"], err["message"]


# --- MiniLM ------------------------------------------------------------------------------
def test_float_list_input_matches_the_encoder(client, emb_server):
    r = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format="float")
    assert r.object == "list" and r.model == MINILM
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(d.object == "embedding" and len(d.embedding) == 384 for d in r.data)
    got = torch.tensor([d.embedding for d in r.data])
    enc = encoder(emb_server)
    ids = [e.token_ids for e in enc.tokenize(TEXTS)]
    assert torch.allclose(got, enc.embed(ids), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(x) for x in ids)
    # the paraphrase is nearer than the unrelated sentence
    assert float(got[0] @ got[1]) > float(got[0] @ got[2])


def test_base64_is_little_endian_float32_of_the_same_vector(client, http):
    floats = client.embeddings.create(model=MINILM, input=TEXTS[0], encoding_format="float")
    raw = http.post("/embeddings", json={"model": MINILM, "input": TEXTS[0],
                                         "encoding_format": "base64"}).json()
    vec = b64(raw["data"][0]["embedding"])
    assert vec.shape == (384,)
    assert np.array_equal(vec, np.array(floats.data[0].embedding, dtype=np.float32))
    # the client's default: it asks for base64 and decodes it itself
    default = client.embeddings.create(model=MINILM, input=TEXTS[0])
    assert np.allclose(default.data[0].embedding, vec, atol=0)


def test_token_id_input_equals_its_text(client, emb_server):
    ids = encoder(emb_server).tokenize(TEXTS[:2])
    by_text = client.embeddings.create(model=MINILM, input=TEXTS[:2], encoding_format="float")
    by_ids = client.embeddings.create(model=MINILM, input=[e.token_ids for e in ids],
                                      encoding_format="float")
    one = client.embeddings.create(model=MINILM, input=ids[0].token_ids,
                                   encoding_format="float")
    for a, b in zip(by_text.data, by_ids.data):
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, by_text.data[0].embedding,
                                              atol=1e-6)
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens


def test_dimensions_and_aliases(client):
    r = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input="hi",
                                 dimensions=384, encoding_format="float")
    assert r.model == MINILM and len(r.data[0].embedding) == 384


def test_no_model_means_the_embedding_model(http):
    r = http.post("/embeddings", json={"input": "hi"})
    assert r.status_code == 200 and r.json()["model"] == MINILM


def test_truncate_prompt_tokens_cuts_instead_of_refusing(http):
    long = "word " * 300  # 302 tokens with [CLS] and [SEP]
    assert_400(http.post("/embeddings", json={"model": MINILM, "input": long}), "input",
               "302 tokens")
    r = http.post("/embeddings", json={"model": MINILM, "input": long,
                                       "truncate_prompt_tokens": -1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256
    r = http.post("/embeddings", json={"model": MINILM, "input": [long, "short"],
                                       "truncate_prompt_tokens": 8})
    assert r.json()["usage"]["prompt_tokens"] == 8 + 3


@pytest.mark.parametrize("body,param,needle", [
    ({"input": ""}, "input", "must not be empty"),
    ({"input": []}, "input", "must not be empty"),
    ({"input": ["ok", ""]}, "input", "input[1] must not be empty"),
    ({"input": [[101, 102], []]}, "input", "must not be empty"),
    ({"input": "x", "dimensions": 128}, "dimensions", "must be 384"),
    ({"input": "x", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ({"input": "x", "dimensions": "384"}, "dimensions", "valid integer"),
    ({"input": 5}, "input", ""),
    ({"input": ["a", 1]}, "input", ""),
    ({"input": [30522]}, "input", "token ids must be in [0, 30522)"),
    ({"input": [[-1]]}, "input", "token ids must be in"),
    ({"input": [101] * 257}, "input", "257 tokens"),
    ({"input": ["x"] * 17}, "input", "at most 16"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", ""),
    ({"input": "x", "pooling": "last"}, "pooling", "must be mean"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "-1"),
])
def test_bad_requests_are_400_in_openai_shape(http, body, param, needle):
    assert_400(http.post("/embeddings", json={"model": MINILM, **body}), param, needle)


def test_unknown_model_is_404_through_the_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert e.value.body["param"] == "model" and MINILM in e.value.body["message"]


def test_models_lists_the_embedding_model(client):
    assert [m.id for m in client.models.list().data] == [LLM, MINILM]


# --- the LLM's pooled hidden states ------------------------------------------------------
def test_llm_pooling_by_model_name(http, emb_server):
    hidden = emb_server.engine.hidden_size
    out = {}
    for pooling in ("mean", "last"):
        r = http.post("/embeddings", json={"model": LLM, "input": TEXTS, "pooling": pooling})
        body = r.json()
        assert r.status_code == 200 and body["model"] == LLM
        out[pooling] = torch.tensor([d["embedding"] for d in body["data"]])
        assert out[pooling].shape == (3, hidden)
        assert torch.allclose(out[pooling].norm(dim=-1), torch.ones(3), atol=1e-5)
    default = http.post("/embeddings", json={"model": LLM, "input": TEXTS[0]}).json()
    assert torch.allclose(torch.tensor(default["data"][0]["embedding"]), out["last"][0],
                          atol=1e-5)
    assert not torch.allclose(out["mean"], out["last"], atol=1e-2)
    # the same as the engine's own pooling of the same ids, run between two steps
    ids = asyncio.run(emb_server.engine.tokenize(TEXTS))
    ref = asyncio.run(emb_server.engine.call(lambda engine: engine.embed(ids, "mean")))
    assert torch.allclose(out["mean"], ref, atol=1e-5)
    usage = http.post("/embeddings", json={"model": LLM, "input": ids[0]}).json()["usage"]
    assert usage["prompt_tokens"] == len(ids[0])


def test_llm_limits(http, emb_server):
    assert_400(http.post("/embeddings", json={"model": LLM, "input": "x", "dimensions": 384}),
               "dimensions", f"must be {emb_server.engine.hidden_size}")
    long = "one two three four five six seven eight nine ten " * 10
    assert_400(http.post("/embeddings", json={"model": LLM, "input": long}), "input",
               "takes at most 64")
    r = http.post("/embeddings", json={"model": LLM, "input": long,
                                       "truncate_prompt_tokens": 10})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 10
    assert_400(http.post("/embeddings", json={"model": LLM, "input": [[10**6]]}), "input",
               "token ids must be in")


# --- batching ----------------------------------------------------------------------------
def test_inputs_waiting_during_a_batch_go_together_in_the_next():
    async def main() -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        seen: list[list[int]] = []
        gate = asyncio.Event()

        async def run(items: list[int]) -> torch.Tensor:
            seen.append(list(items))
            await gate.wait()
            return torch.tensor(items, dtype=torch.float32)[:, None]

        batcher = EmbeddingBatcher[int](run)
        first = asyncio.ensure_future(batcher.embed([1]))
        await asyncio.sleep(0)  # the first batch starts with what is queued: [1]
        rest = [asyncio.ensure_future(batcher.embed([i, i + 10])) for i in (2, 3, 4)]
        dropped = asyncio.ensure_future(batcher.embed([99]))
        await asyncio.sleep(0)
        dropped.cancel()  # its client went away: never computed
        gate.set()
        results = await asyncio.gather(first, *rest)
        return seen, [[float(t) for t in r] for r in results]

    seen, results = asyncio.run(main())
    assert seen == [[1], [2, 12, 3, 13, 4, 14]]
    assert results == [[1.0], [2.0, 12.0], [3.0, 13.0], [4.0, 14.0]]


def test_a_failed_batch_fails_its_requests_and_the_next_batch_runs():
    async def main() -> tuple[str, list[torch.Tensor]]:
        calls = 0

        async def run(items: list[int]) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("boom")
            return torch.ones(len(items), 2)

        batcher = EmbeddingBatcher[int](run)
        with pytest.raises(RuntimeError) as e:
            await batcher.embed([1, 2])
        return str(e.value), await batcher.embed([3])

    message, rows = asyncio.run(main())
    assert message == "boom" and len(rows) == 1


def test_concurrent_requests_each_get_their_own_rows(emb_server):
    """Twelve requests at once share batches; each still gets its own inputs' vectors."""
    aclient = openai.AsyncOpenAI(base_url=emb_server.api, api_key="unused", max_retries=0)

    async def main():
        return await asyncio.gather(*(aclient.embeddings.create(
            model=MINILM, input=[t] * 4, encoding_format="float") for t in TEXTS * 4))

    results = asyncio.run(main())
    enc = encoder(emb_server)
    ref = enc.embed([e.token_ids for e in enc.tokenize(TEXTS)])
    for i, r in enumerate(results):
        for d in r.data:
            assert np.allclose(d.embedding, ref[i % 3].numpy(), atol=1e-5)


def test_embedding_model_none_routes_everything_to_the_llm():
    ctx = ServingContext(None, None, [LLM, "alias"],  # type: ignore[arg-type]
                         ServerArgs(embedding_model="none"))
    service = EmbeddingService(ctx)
    assert service.model_name is None
    assert service.target(None) == service.target("alias") == "decoder"
    with pytest.raises(APIError) as e:
        service.target(MINILM)
    assert e.value.status == 404 and e.value.param == "model"
