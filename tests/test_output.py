"""The msgpack wire form of engine outputs, as workers report them to the scheduler."""
from cluster.llm import LLM
from scheduler.sampling_params import SamplingParams
from worker.output import pack_outputs, unpack_outputs


def test_step_outputs_survive_the_wire_form():
    """Real engine outputs (logprobs with alternatives, finish reasons, text, emission times)
    come back equal, field for field."""
    engine = LLM("tiny").engine
    engine.add_request("The cluster", SamplingParams(max_tokens=5, logprobs=2, ignore_eos=True))
    engine.add_request("KV", SamplingParams(max_tokens=3, temperature=0.8, seed=3, n=2))
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step())
    outputs = [out for step in steps for out in step]
    assert any(o.logprobs for o in outputs) and any(o.finish_reason for o in outputs)
    assert any(o.logprobs is None for o in outputs)
    for step in steps:
        assert unpack_outputs(pack_outputs(step)) == step
    assert unpack_outputs(pack_outputs([])) == []
