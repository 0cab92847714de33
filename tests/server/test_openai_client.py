"""The official `openai` client against a real server: chat and completions, sync and async,
streaming and not."""

from __future__ import annotations

import asyncio

import openai
import pytest

from peregrine.sampling_params import SamplingParams

QUESTION = [{"role": "user", "content": "Name the capital city of France."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)


@pytest.fixture
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    # the LLM first, then the embedding model /v1/embeddings serves
    assert [m.id for m in models] == ["smollm2-135m", "all-minilm-l6-v2"]
    assert models[0].model_extra["max_model_len"] > 0


def test_chat_answers_the_capital_of_france(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=16,
                                       temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_greedy_completion_matches_the_offline_engine(client, server):
    prompt = "The quick brown fox"
    r = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8,
                                  temperature=0)
    engine = server.engine.engine
    ids = engine.tokenizer.encode(prompt)
    expected = asyncio.run(_run(server, ids, SamplingParams(temperature=0, max_tokens=8)))
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    assert r.choices[0].finish_reason == "length"


async def _run(server, ids: list[int], params: SamplingParams) -> str:
    """The same request run directly on the server's engine, bypassing HTTP."""
    stream = await server.engine.add_request(f"direct-{id(params)}",
                                             {"prompt_token_ids": ids}, params)
    last = None
    async for out in stream:
        last = out
    return last.outputs[0].text


def test_streamed_chat_equals_the_non_streamed_answer(client):
    kwargs = dict(model="smollm2-135m", messages=QUESTION, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # token by token, not one blob
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_streamed_completion_with_usage(client):
    stream = client.completions.create(model="smollm2-135m", prompt="Once upon a time",
                                       max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    again = client.completions.create(model="smollm2-135m", prompt="Once upon a time",
                                      max_tokens=6, temperature=0)
    assert again.choices[0].text == text


def test_n_samples_with_a_seed_are_reproducible(client):
    kwargs = dict(model="smollm2-135m", prompt="My favourite colour is", max_tokens=5,
                  temperature=1.0, n=3, seed=1234, extra_body={"min_tokens": 5})
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # the n samples differ from each other
    assert a.usage.completion_tokens == 15


def test_stop_string_ends_the_text(client):
    base = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,",
                                     max_tokens=8, temperature=0).choices[0].text
    assert " 6" in base
    r = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=8,
                                  temperature=0, stop=[" 6"])
    assert r.choices[0].text == base[:base.index(" 6")]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == " 6"


def test_batch_of_prompts_gives_one_choice_each(client):
    r = client.completions.create(model="smollm2-135m", prompt=["Hello", "The sky is"],
                                  max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    single = client.completions.create(model="smollm2-135m", prompt="The sky is",
                                       max_tokens=4, temperature=0)
    assert r.choices[1].text == single.choices[0].text


def test_token_id_prompt_and_echo(client, server):
    ids = server.engine.engine.tokenizer.encode("Hello there")
    r = client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=4,
                                  temperature=0, echo=True)
    assert r.choices[0].text.startswith("Hello there")
    assert r.usage.prompt_tokens == len(ids)


def test_system_prompt_and_list_content_parts(client):
    messages = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                             {"type": "text", "text": "of France?"}]}]
    r = client.chat.completions.create(model="smollm2-135m", messages=messages,
                                       max_completion_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 8


def test_vllm_extras_are_honoured(client):
    r = client.completions.create(
        model="smollm2-135m", prompt="Hi", max_tokens=6, temperature=0,
        extra_body={"min_tokens": 6, "ignore_eos": True, "top_k": 5, "min_p": 0.05,
                    "repetition_penalty": 1.1, "priority": 0, "skip_special_tokens": True})
    assert r.usage.completion_tokens == 6


def test_every_sampling_field_reaches_the_engine(client, server):
    """The server's answer equals the engine's for the SamplingParams the fields map to."""
    tok = server.engine.engine.tokenizer
    bias_token = tok.encode(" banana", add_special_tokens=False)[0]
    r = client.completions.create(
        model="smollm2-135m", prompt="I like", max_tokens=6, temperature=0.8, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.3, seed=7, stop=["\n\n"],
        logit_bias={str(bias_token): 5.0},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2})
    params = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05,
                            presence_penalty=0.5, frequency_penalty=0.3,
                            repetition_penalty=1.2, seed=7, stop=["\n\n"],
                            logit_bias={bias_token: 5.0})
    assert r.choices[0].text == asyncio.run(_run(server, tok.encode("I like"), params))


def test_logit_bias_forces_a_token(client, server):
    tok = server.engine.engine.tokenizer
    target = tok.encode(" banana", add_special_tokens=False)[0]
    ids = tok.encode("I like")
    params = SamplingParams(max_tokens=3, temperature=0, logit_bias={target: 100})
    if asyncio.run(_run(server, ids, params)) != tok.decode([target] * 3):
        pytest.skip("this engine does not apply logit_bias yet")
    r = client.completions.create(model="smollm2-135m", prompt="I like", max_tokens=3,
                                  temperature=0, logit_bias={str(target): 100})
    assert r.choices[0].text == tok.decode([target] * 3)


def test_logprobs_when_the_engine_provides_them(client, server):
    """Wired end to end; the engine fills CompletionOutput.logprobs (sampling work)."""
    r = client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                  max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    if lp is None:
        pytest.skip("this engine does not fill CompletionOutput.logprobs yet")
    assert len(lp.tokens) == 4 and "".join(lp.tokens) == r.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and token in top and len(top) <= 4
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely
    c = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert "".join(t.token for t in content) == c.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in content)


def test_async_client_concurrent_chats(aclient):
    async def main() -> list[str]:
        async def one(i: int) -> str:
            r = await aclient.chat.completions.create(
                model="smollm2-135m", max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": f"Count to {i + 3}."}])
            return r.choices[0].message.content

        async def streamed() -> str:
            stream = await aclient.chat.completions.create(
                model="smollm2-135m", max_tokens=8, temperature=0, stream=True,
                messages=[{"role": "user", "content": "Count to 3."}])
            return "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])

        try:
            return await asyncio.gather(*(one(i) for i in range(4)), streamed())
        finally:
            await aclient.close()

    answers = asyncio.run(main())
    assert all(answers)
    assert answers[0] == answers[4]  # "Count to 3." alone or streamed: same greedy text
