"""LLM(workers=N): the same Python API through the daemon on an embedded local Ray cluster."""
import os
import time

import pytest
import ray
import torch

from cluster import bringup

from cluster.llm import LLM
from scheduler.service import NAMESPACE
from scheduler.sampling_params import SamplingParams

pytestmark = pytest.mark.xdist_group("ray")  # see conftest.py

os.environ["RAY_AUTH_MODE"] = "disabled"


def test_workers_give_the_same_output_as_the_in_process_engine(capsys):
    prompts = [f"prompt {i} " * (i + 1) for i in range(6)]
    params = [SamplingParams(max_tokens=24, temperature=0.7, seed=i, ignore_eos=True)
              for i in range(6)]
    torch.set_num_threads(1)  # the workers' setting, so float reductions run the same way
    local = LLM("tiny", kv_cache_gib=0.05).generate(prompts, params, progress=True)
    assert "6/6" in capsys.readouterr().err  # the progress bar counted every job
    with LLM("tiny", workers=2, kv_cache_gib=0.05) as llm:
        remote = llm.generate(prompts, params, progress=True)
        assert "6/6" in capsys.readouterr().err
        # the tokenizer is there without an in-process engine
        assert llm.tokenizer.decode(remote[0].outputs[0].token_ids) == remote[0].outputs[0].text
        _interrupted_generate_aborts_its_jobs(llm)
        with pytest.raises(ValueError,
                           match=r"already up .*\(`pagedserve down`, or that LLM.s close\(\)\)"):
            LLM("tiny", workers=1)  # would have shared this daemon, and closed it
        assert llm.generate(prompts[:1], params[:1])[0].outputs[0].token_ids == \
            remote[0].outputs[0].token_ids
    with pytest.raises(RuntimeError, match="this LLM is closed"):
        llm.generate(prompts[:1])  # was an AttributeError about `engine`
    assert [o.outputs[0].token_ids for o in remote] == [o.outputs[0].token_ids for o in local]
    assert [o.outputs[0].text for o in remote] == [o.outputs[0].text for o in local]


def _interrupted_generate_aborts_its_jobs(llm):
    """Ctrl-C while generate waits (here: raised where it waits) must not leave the jobs
    running on the workers, ahead of the next call's."""
    client = llm._daemon.client
    real_results = client.results

    def interrupted(ids, **kwargs):
        submitted.extend(ids)
        raise KeyboardInterrupt

    submitted = []
    client.results = interrupted
    try:
        llm.generate(["long"] * 3, SamplingParams(max_tokens=1500, ignore_eos=True))
    except KeyboardInterrupt:
        pass
    finally:
        client.results = real_results
    assert len(submitted) == 3
    assert [client.result(j).outputs[0].finish_reason for j in submitted] == ["abort"] * 3


def test_an_interrupted_start_leaves_no_ray_running(monkeypatch):
    def interrupted(*args, **kwargs):  # Ctrl-C while the workers load
        raise KeyboardInterrupt

    monkeypatch.setattr(bringup, "up", interrupted)
    with pytest.raises(KeyboardInterrupt):
        LLM("tiny", workers=1)
    assert not ray.is_initialized()  # was: the embedded Ray left running, and its agents


def test_more_workers_than_the_joined_clusters_npus_are_refused_at_once():
    """On a cluster this process joined, with fewer NPUs than workers=N, LLM waited 5 minutes
    for workers that could not start, then said that the daemon stayed up (it was taken down)."""
    ray.init(address="local", num_cpus=2, resources={"NPU": 1}, namespace=NAMESPACE,
             include_dashboard=False, log_to_driver=False)
    try:
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"^the Ray cluster this process joined has 1 NPU, "
                                             r"fewer than workers=2"):
            LLM("tiny", workers=2)
        assert time.monotonic() - started < 30
        assert bringup.find_scheduler() is None  # nothing was started
    finally:
        ray.shutdown()
