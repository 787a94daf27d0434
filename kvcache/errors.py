"""Errors the KV cache raises for requests and calls it cannot serve."""
from __future__ import annotations


class RequestTooLargeError(ValueError):
    """A request needs more KV blocks than the cache could ever give it; reject it at once."""

    def __init__(self, num_tokens: int, blocks_needed: int, num_blocks: int, usable_blocks: int,
                 block_size: int) -> None:
        self.num_tokens = num_tokens
        self.blocks_needed = blocks_needed
        self.num_blocks = num_blocks
        self.usable_blocks = usable_blocks
        super().__init__(
            f"request of {num_tokens} tokens needs {_blocks(blocks_needed)} of {block_size} "
            f"tokens, but the cache has only {_blocks(num_blocks)} ({usable_blocks} usable after "
            f"the free-block watermark), so at most {usable_blocks * block_size} tokens fit; "
            f"shorten the prompt or max_tokens, or give the KV cache more memory"
        )


def _blocks(n: int) -> str:
    return f"{n} KV block" if n == 1 else f"{n} KV blocks"


class OutOfBlocksError(RuntimeError):
    """No free block for a call whose caller should have checked first (can_allocate, fork)."""
