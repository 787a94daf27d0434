"""The in-process LLM API as a ported vLLM script uses it: vLLM's spellings of options and
arguments, prompt forms, the checkpoint's sampling defaults, and what its outputs carry."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from cluster import LLM, SamplingParams
from scheduler.sampling_params import InvalidRequestError
from worker.models.tiny import tiny_model_dir

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    with LLM(model="tiny") as engine:
        yield engine


def tiny_copy(tmp_path, config_changes=None, generation_config=None):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), directory)
    if config_changes:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **config_changes}))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory


def test_vllm_spellings_of_engine_options_are_taken():
    with LLM(model="tiny", dtype="float", gpu_memory_utilization=0.5, max_num_seqs=None,
             max_num_batched_tokens=None, tensor_parallel_size=1, trust_remote_code=True,
             enforce_eager=True, disable_log_stats=True, tokenizer="tiny", task="generate",
             quantization=None, kv_cache_dtype="auto", revision=None, swap_space=4) as llm:
        config = llm.engine.config
        assert (config.dtype, config.memory_utilization) == ("float32", 0.5)
        assert (config.max_num_seqs, config.max_num_batched_tokens) == (256, 2048)  # defaults


@pytest.mark.parametrize("option, message", [
    ({"tensor_parallel_size": 2}, "tensor_parallel_size=2: pagedserve runs one copy of the "
                                  "model per device; use workers=N"),
    ({"tokenizer": "another/tokenizer"}, "tokenizer='another/tokenizer': the checkpoint "
                                         "directory's own tokenizer is used"),
    ({"enable_lora": True}, "LLM() has no option 'enable_lora'; its engine options are device, "),
    ({"quantization": "awq"}, "quantization='awq': not supported by pagedserve, which takes it "
                              "only as None (no effect)"),
    ({"task": "embed"}, "task='embed': not supported by pagedserve, which takes it only as "
                        "'auto' or 'generate' (no effect)"),
    ({"dtype": "int8"}, "dtype='int8': must be one of float32, bfloat16, float16, auto"),
    ({"block_size": "16"}, "block_size='16': must be an integer >= 1"),
    ({"max_model_len": 20.5}, "max_model_len=20.5: must be an integer >= 1, or null"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization=1.5: must be a number in (0, 1]"),
])
def test_options_that_cannot_be_served_are_one_line(option, message):
    """They raised TypeError naming an internal class (EngineConfig.__init__); values of the
    wrong type failed inside torch or numba, and a memory fraction above 1 was taken."""
    with pytest.raises(ValueError) as error:
        LLM(model="tiny", **option)
    assert str(error.value).startswith(message)


def test_dtype_auto_takes_the_checkpoint_s(tmp_path):
    directory = tiny_copy(tmp_path, {"dtype": "bfloat16"})
    with LLM(model=str(directory), dtype="auto") as llm:
        assert str(llm.engine.dtype) == "torch.bfloat16"
        assert next(llm.engine.model.parameters()).dtype == llm.engine.dtype


def test_prompt_forms_and_vllm_argument_names(llm):
    expected = [job.outputs[0].token_ids for job in llm.generate(["hi", [3, 4, 5]], GREEDY)]
    forms = [{"prompt": "hi"}, {"prompt_token_ids": np.array([3, 4, 5])}]
    jobs = llm.generate(forms, sampling_params=GREEDY, use_tqdm=False)
    assert [job.outputs[0].token_ids for job in jobs] == expected
    assert llm.generate((3, 4, 5), GREEDY)[0].outputs[0].token_ids == expected[1]
    assert llm.generate([np.int64(3), np.int64(4), np.int64(5)],
                        GREEDY)[0].outputs[0].token_ids == expected[1]
    with pytest.raises(InvalidRequestError, match='just "prompt" .* got keys'):
        llm.generate({"prompt": "hi", "multi_modal_data": {}}, GREEDY)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_request'"):
        llm.generate("hi", GREEDY, lora_request=None)


def test_outputs_carry_the_prompt_and_the_cumulative_logprob(llm):
    text_job, ids_job = llm.generate(["hi", [3, 4, 5]],
                                     SamplingParams(max_tokens=3, logprobs=0, ignore_eos=True))
    assert (text_job.prompt, text_job.prompt_token_ids) == ("hi", llm.tokenizer.encode("hi"))
    assert (ids_job.prompt, ids_job.prompt_token_ids) == (None, [3, 4, 5])
    sample = text_job.outputs[0]
    assert sample.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in sample.logprobs))
    assert llm.generate("hi", GREEDY)[0].outputs[0].cumulative_logprob is None  # not asked for


def test_without_sampling_params_the_checkpoint_s_generation_config_decides(tmp_path, caplog):
    """vLLM takes generation_config.json's sampling fields as the defaults: a job with no
    SamplingParams sampled at temperature 1 for 16 tokens whatever the checkpoint said."""
    directory = tiny_copy(tmp_path, generation_config={
        "bos_token_id": 256, "eos_token_id": 257, "top_k": 1, "max_new_tokens": 6})
    with LLM(model=str(directory)) as llm:
        assert (llm.default_params.top_k, llm.default_params.max_tokens) == (1, 6)
        greedy = llm.generate("defaults", SamplingParams(max_tokens=6, temperature=0))
        assert [job.outputs[0].token_ids for job in llm.generate(["defaults"] * 3)] == \
            [greedy[0].outputs[0].token_ids] * 3
    (directory / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with caplog.at_level(logging.WARNING), LLM(model=str(directory)) as llm:
        assert llm.default_params == SamplingParams()
        mine = llm.get_default_sampling_params()  # vLLM's basic example changes it
        mine.max_tokens = 3
        assert llm.default_params.max_tokens == 16
        assert llm.generate("hi", mine)[0].outputs[0].finished()
    assert "not using" in caplog.text and "temperature" in caplog.text


def test_an_end_id_generation_config_adds_is_a_stop_token_with_its_stop_reason(tmp_path):
    """vLLM makes generation_config.json's end-of-sequence ids other than the tokenizer's EOS
    stop token ids: a sample they end says which (Qwen2.5's <|endoftext|> next to <|im_end|>).
    It was None, as for the tokenizer's EOS, which still gives None."""
    directory = tiny_copy(tmp_path, generation_config={"eos_token_id": [257, 65]})
    with LLM(model=str(directory)) as llm:
        assert llm.tokenizer.eos_token_id == 257
        ended = [llm.generate("end", SamplingParams(max_tokens=4, temperature=0,
                                                    logit_bias={end: 100}))[0].outputs[0]
                 for end in (65, 257)]
        assert [(o.token_ids, o.finish_reason, o.stop_reason) for o in ended] == \
            [([65], "stop", 65), ([257], "stop", None)]
        ignored = llm.generate("end", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                     logit_bias={65: 100}))[0].outputs[0]
        assert (ignored.token_ids, ignored.finish_reason) == ([65] * 4, "length")


def test_chat_takes_the_template_options(llm):
    messages = [{"role": "user", "content": "hi"}]
    replying = llm.chat(messages, GREEDY)[0].prompt_token_ids
    continuing = llm.chat(messages, GREEDY, add_generation_prompt=False)[0].prompt_token_ids
    assert replying == llm.tokenizer.apply_chat_template(messages, tokenize=True)
    assert continuing == llm.tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                                           tokenize=True)
    assert continuing != replying


def test_chat_takes_vllm_s_template_arguments(llm):
    """chat_template, continue_final_message and tools were passed on to generate, which
    refused them naming itself; chat_template_kwargs holding add_generation_prompt raised a
    TypeError from the tokenizer (vLLM lets them override chat's own arguments)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]
    tokenizer = llm.tokenizer

    def prompt_text(**options):
        return tokenizer.decode(llm.chat(messages, GREEDY, **options)[0].prompt_token_ids,
                                skip_special_tokens=False)

    listing = "{% for m in messages %}{{ m.content }};{% endfor %}{{ tools }}"
    assert prompt_text(chat_template=listing, tools=[{"name": "f"}]) == "hi;Sure;[{'name': 'f'}]"
    assert prompt_text(continue_final_message=True).endswith("<|assistant|>Sure")
    assert prompt_text(chat_template_kwargs={"add_generation_prompt": False}) == \
        prompt_text(add_generation_prompt=False)
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(messages, GREEDY, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="conversation 1's last message to be the assistant's "
                                         "to continue, not a user message"):
        llm.chat([messages, messages[:1]], GREEDY, continue_final_message=True)
    with pytest.raises(ValueError, match="not a user message"):  # set through the template's kwargs
        llm.chat(messages[:1], GREEDY, chat_template_kwargs={"continue_final_message": True})
    assert llm.chat(messages=messages, sampling_params=GREEDY)[0].prompt_token_ids == \
        tokenizer.apply_chat_template(messages, tokenize=True)  # vLLM's argument names


def test_tokenizer_answers_what_ported_scripts_ask(llm):
    tokenizer = llm.get_tokenizer()
    assert tokenizer.eos_token_id == tokenizer.eos_token_ids[0]
    assert tokenizer.convert_tokens_to_ids(["a", "b"]) == [tokenizer.token_to_id("a"),
                                                          tokenizer.token_to_id("b")]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert isinstance(text, str)  # tokenize= was taken as a template variable, returning text
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True) \
        == tokenizer.encode(text, add_special_tokens=False)
