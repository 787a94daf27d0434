"""The free list's O(1) operations and BlockKey equality over whole prefix chains."""
from __future__ import annotations

import random

from kvcache import BlockKey
from kvcache.block_pool import Block, FreeBlockQueue


def test_free_queue_supports_removal_from_the_middle_and_both_ends():
    blocks = [Block(i) for i in range(6)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[3])
    queue.remove(blocks[0])
    queue.push_back(blocks[3])
    queue.push_front(blocks[0])
    assert [b.block_id for b in queue] == [0, 1, 2, 4, 5, 3]
    assert queue.pop_front() is blocks[0] and len(queue) == 5


def test_free_queue_matches_a_list_under_random_operations():
    rng = random.Random(7)
    blocks = [Block(i) for i in range(20)]
    queue, reference = FreeBlockQueue(blocks), list(blocks)
    taken: list[Block] = []
    for _ in range(500):
        op = rng.randrange(4)
        if op == 0 and reference:
            block = rng.choice(reference)
            queue.remove(block)
            reference.remove(block)
            taken.append(block)
        elif op == 1 and reference:
            block = queue.pop_front()
            assert block is reference.pop(0)
            taken.append(block)
        elif taken:
            block = taken.pop(rng.randrange(len(taken)))
            if op == 2:
                queue.push_back(block)
                reference.append(block)
            else:
                queue.push_front(block)
                reference.insert(0, block)
        assert list(queue) == reference and len(queue) == len(reference)


def chain(blocks: list[tuple[int, ...]], extra=None) -> BlockKey:
    key = None
    for tokens in blocks:
        key = BlockKey(key, tokens, extra)
    return key


def test_keys_equal_only_for_identical_chains():
    assert chain([(1, 2), (3, 4)]) == chain([(1, 2), (3, 4)])
    assert chain([(1, 2), (3, 4)]) != chain([(1, 9), (3, 4)])
    assert chain([(3, 4)]) != chain([(1, 2), (3, 4)])
    assert chain([(1, 2)], extra="a") != chain([(1, 2)], extra="b")


def test_colliding_parents_are_told_apart():
    # Same hash at every level (hash(-1) == hash(-2)), different content in the first block.
    first, second = chain([(-1,), (7,)]), chain([(-2,), (7,)])
    assert hash(first) == hash(second)
    assert first != second
    assert {first: "first"}.get(second) is None


def test_equality_of_long_chains_needs_no_recursion():
    length = 20_000  # far beyond Python's recursion limit
    left = chain([(i,) for i in range(length)])
    right = chain([(i,) for i in range(length)])
    assert left == right
