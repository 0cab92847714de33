"""After any mix of finished, aborted and preempted requests, every block is free or cached
with refcount 0; while requests run, refcounts equal block-table references."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peregrine import SamplingParams
from tests.conftest import assert_engine_drained, make_tiny_llm

_LLMS: dict = {}


def engine_for(model_dir: str, blocks: int, budget: int, prefix: bool):
    key = (blocks, budget, prefix)
    if key not in _LLMS:
        _LLMS[key] = make_tiny_llm(model_dir, num_kv_blocks=blocks, max_num_batched_tokens=budget,
                                   enable_prefix_caching=prefix, max_num_seqs=6,
                                   dtype="float32")
    return _LLMS[key].engine


request = st.tuples(st.integers(1, 40),  # prompt length
                    st.integers(1, 12),  # max tokens
                    st.integers(0, 3),  # which shared stem
                    st.integers(0, 6),  # arrives after this many steps
                    st.one_of(st.none(), st.integers(0, 8)),  # aborted after this many steps
                    st.integers(0, 2))  # priority


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(reqs=st.lists(request, min_size=1, max_size=12),
       blocks=st.sampled_from([24, 40, 200]), budget=st.sampled_from([5, 16, 64]),
       prefix=st.booleans())
def test_blocks_are_all_returned(tiny_model_dir, reqs, blocks, budget, prefix):
    engine = engine_for(tiny_model_dir, blocks, budget, prefix)
    stems = [[(7 * s + i) % 500 for i in range(16)] for s in range(4)]
    pending = sorted(enumerate(reqs), key=lambda r: r[1][3])
    live: dict[str, tuple] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][3] <= step:
            i, (plen, max_tokens, stem, _, abort_after, prio) = pending.pop(0)
            ids = (stems[stem] + [i] * plen)[:plen + 4]
            rid = f"r{i}-{id(reqs)}"
            engine.add_request(rid, {"prompt_token_ids": ids},
                               SamplingParams(temperature=0, max_tokens=max_tokens,
                                              ignore_eos=True), priority=prio)
            live[rid] = (step, abort_after)
        for rid, (start, abort_after) in list(live.items()):
            if abort_after is not None and step - start >= abort_after:
                engine.abort_request(rid)
                live.pop(rid)
        for out in engine.step():
            if out.finished:
                live.pop(out.request_id, None)
        engine.check_invariants()
        step += 1
        assert step < 2000, "the engine stopped making progress"
    assert_engine_drained(engine)
    assert all(rc == 0 for rc in engine.kv.ref_counts)
