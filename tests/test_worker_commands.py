"""A worker's add / abort commands applied to a real engine (tiny model) in every arrival order."""
import pytest

from cluster.llm import LLM
from scheduler.sampling_params import SamplingParams
from worker.commands import EngineCommands

PARAMS = SamplingParams(max_tokens=50, ignore_eos=True).to_dict()


@pytest.fixture(scope="module")
def engine():
    return LLM("tiny", kv_cache_gib=0.05).engine


def add(request_id: str, prompt="hello") -> tuple:
    return ("add", request_id, prompt, PARAMS, 0, [], 0.0)


def finish_all(engine) -> None:
    while engine.has_unfinished():
        engine.step()


def test_add_then_abort_stops_the_request_and_frees_its_blocks(engine):
    commands = EngineCommands(engine)
    assert commands.apply(add("a/0/0")) is None
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    commands.apply(("abort", "a/0/0"))
    # at once: had the abort been dropped, running to max_tokens would free the blocks too
    assert engine.stats().kv_blocks_used == 0
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("a/0/0", "abort")]
    assert not engine.has_unfinished()


def test_an_abort_delivered_before_its_add_drops_the_add(engine):
    commands = EngineCommands(engine)
    commands.apply(("abort", "b/0/0"))
    assert commands.apply(add("b/0/0")) is None
    assert not engine.has_unfinished()
    # Only that one add is dropped: the id is forgotten once matched.
    commands.apply(add("b/0/0"))
    assert engine.has_unfinished()
    finish_all(engine)


def test_unmatched_aborts_are_bounded_oldest_first(engine):
    commands = EngineCommands(engine, max_unmatched_aborts=2)
    for rid in ("c1", "c2", "c3"):  # e.g. aborts of jobs that had already finished
        commands.apply(("abort", rid))
    commands.apply(add("c1"))  # forgotten: runs
    assert engine.has_unfinished()
    finish_all(engine)
    commands.apply(add("c3"))  # remembered: dropped
    assert not engine.has_unfinished()


def test_an_add_the_engine_refuses_is_returned_with_its_error(engine):
    commands = EngineCommands(engine)
    request_id, error = commands.apply(add("d/0/0", prompt=[]))
    assert request_id == "d/0/0" and "empty" in error.lower()
    assert not engine.has_unfinished()
