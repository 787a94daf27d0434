"""One sample's output stream: incremental text, stop strings, and what was already sent."""
from __future__ import annotations

import time

from scheduler.request import FinishReason, Request
from worker.output import RequestOutput
from worker.output import TokenLogprobs
from worker.tokenizer import IncrementalDetokenizer, Tokenizer


class SampleStream:
    """Turns a request's new tokens into deltas; holds back text that might begin a stop string."""

    def __init__(self, request: Request, job_id: str, index: int, tokenizer: Tokenizer) -> None:
        self.request = request
        self.job_id = job_id
        self.index = index
        self._resumed = request.num_output_tokens
        self._tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, request.token_ids[:request.num_prompt_tokens],
            request.params.skip_special_tokens)
        self.text = ""
        self.logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: list[TokenLogprobs] = []  # of prompt tokens 1.. (the first has none)
        self._prompt_logprobs_sent = False
        self.stop_string: str | None = None  # the stop string found in the text, if one was
        self.done = False
        self._tokens_read = self._resumed
        self._tokens_sent = self._resumed
        self._holdback = max((len(s) for s in request.params.stop), default=1) - 1
        self._text_sent = self._replay(request.output_token_ids)

    def _replay(self, resumed: list[int]) -> int:
        """Rebuilds the text of output resumed from an earlier run (failover), token by token
        as that run did, and returns how much of it that run sent: all but the tail it held
        back as the possible start of a stop string, which is sent from here, and in which a
        stop string can begin."""
        for token_id in resumed:
            self.text += self.detokenizer.add(token_id)
        return max(0, len(self.text) - self._holdback)

    def absorb(self) -> None:
        """Detokenize the request's new tokens and look for stop strings in the new text."""
        new_tokens = self.request.output_slice(self._tokens_read)
        self._tokens_read += len(new_tokens)
        if not new_tokens or self.stopped_by_text:
            return
        seen = len(self.text)
        self.text += self.detokenizer.add(self._shown(new_tokens))
        if self.request.is_finished:  # release a character held back as incomplete
            self.text += self.detokenizer.flush()
        params = self.request.params
        if self._tokens_read < params.min_tokens:
            return  # as vLLM: stop strings count from min_tokens on
        # only a stop string that ends in the new text: one in the text before was looked for
        # then, or came before min_tokens
        hits = [(at, len(s), s) for s in params.stop
                if (at := self.text.find(s, max(0, seen - len(s) + 1))) >= 0]
        if hits:
            at, length, self.stop_string = min(hits)
            self.text = self.text[: at + length if params.include_stop_str_in_output else at]

    def _shown(self, new_tokens: list[int]) -> list[int]:
        """The tokens whose text is output: as vLLM does, the EOS or stop token that ended the
        sample stays out of the text (it is still in the token ids) unless
        include_stop_str_in_output."""
        req = self.request
        if req.finish_reason is FinishReason.STOP and new_tokens[-1] in req.stop_ids() and \
                not req.params.include_stop_str_in_output:
            return new_tokens[:-1]
        return new_tokens

    def emit(self) -> RequestOutput | None:
        """The output since the last call; None when there is nothing new to say."""
        req = self.request
        finished = req.is_finished
        if self.done or (self._tokens_read == self._tokens_sent and not finished):
            return None
        end = len(self.text) if finished else max(self._text_sent, len(self.text) - self._holdback)
        new_tokens = req.output_slice(self._tokens_sent, self._tokens_read)
        out = RequestOutput(
            request_id=self.job_id, index=self.index, new_token_ids=new_tokens,
            text=self.text[self._text_sent:end], num_prompt_tokens=req.num_prompt_tokens,
            finish_reason=req.finish_reason.value if finished else None,
            logprobs=self._decoded(
                self.logprobs[self._tokens_sent - self._resumed:self._tokens_read - self._resumed])
            if req.params.logprobs is not None else None,
            prompt_logprobs=self._prompt_logprobs_once(),
            emitted_at=time.time(), stop_reason=self._stop_reason() if finished else None)
        self._tokens_sent = self._tokens_read
        self._text_sent = end
        self.done = finished
        return out

    def _stop_reason(self) -> int | str | None:
        """As vLLM: the stop string or stop token id that ended the sample; None for the
        tokenizer's EOS and for any other end. The other end-of-sequence ids a checkpoint's
        generation_config.json names count as stop token ids, as vLLM makes them."""
        req = self.request
        if req.finish_reason is not FinishReason.STOP:
            return None
        if self.stopped_by_text:
            return self.stop_string
        last = req.output_token_ids[-1] if req.output_token_ids else None
        if req.params.ignore_eos:
            return last if last in req.params.stop_token_ids else None
        return None if last == self._tokenizer.eos_token_id else last

    @property
    def stopped_by_text(self) -> bool:
        return self.stop_string is not None

    def _prompt_logprobs_once(self) -> list[TokenLogprobs] | None:
        """With the first output, once the whole prompt is scored (if they were asked for)."""
        if self._prompt_logprobs_sent or self.request.params.prompt_logprobs is None or \
                len(self.prompt_logprobs) < self.request.num_prompt_tokens - 1:
            return None
        self._prompt_logprobs_sent = True
        return self._decoded(self.prompt_logprobs)

    def _decoded(self, logprobs: list[TokenLogprobs]) -> list[TokenLogprobs]:
        """``logprobs``, each with its tokens' texts (vLLM's decoded_token): filled in as they
        are sent, so only the positions and tokens a user gets are decoded, once."""
        text = self._tokenizer.token_text
        for lp in logprobs:
            lp.decoded = [text(lp.token_id), *(text(token_id) for token_id, _ in lp.top)]
        return logprobs
