"""Continuous batching: which sequences run in the next step, and which must give way."""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from optd.engine.kv_cache import BlockAllocator, blocks_needed
from optd.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    is_prefill: bool


class Scheduler:
    """`draft_allocator` (with a draft model) hands out the draft cache's blocks, by position: the
    target's tail is packed by kv_compression, the draft's cache never is."""

    def __init__(self, allocator: BlockAllocator, max_batch_size: int, max_num_batched_tokens: int,
                 max_model_len: int, draft_allocator: BlockAllocator | None = None):
        self.allocator = allocator
        self.draft_allocator = draft_allocator
        # Blocks a sequence's prefill fills (fewer than its tokens need natively under kv_compression).
        self.prefill_blocks: Callable[[Sequence], int] = lambda seq: allocator.blocks_for(seq.num_tokens)
        self.max_model_len = max_model_len
        self.lookahead = 0  # extra slots a decode step writes: the draft tokens being verified
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions_total = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        # Lowering max_batch_size takes effect now: the newest sequences are preempted (recomputed
        # later), so the running count never exceeds the knob after the step that follows it.
        while len(self.running) > self.max_batch_size:
            self._preempt(self.running[-1])
        prefill = self._admit()
        if prefill:
            return ScheduledStep(prefill, is_prefill=True)
        return self._decode()

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            over_budget = tokens + seq.num_tokens > self.max_num_batched_tokens
            # Keep one block of headroom per running sequence so admission does not cause preemption.
            reserve = len(self.running)
            need = self.prefill_blocks(seq)
            fits = need + reserve <= self.allocator.num_free
            if (draft := self.draft_allocator) is not None:
                fits = fits and draft.blocks_for(seq.num_tokens) + reserve <= draft.num_free
            if (over_budget and admitted) or not fits:
                break
            self.waiting.popleft()
            self.allocator.grow(seq.blocks, need)
            if draft is not None:
                draft.grow(seq.draft_blocks, draft.blocks_for(seq.num_tokens))
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            tokens += seq.num_tokens
        return admitted

    def _decode(self) -> ScheduledStep | None:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted below to make room for an earlier sequence
            need = min(seq.num_tokens + self.lookahead, self.max_model_len)
            while not self.can_grow(seq, need):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.grow(seq, need)
                scheduled.append(seq)
        return ScheduledStep(scheduled, is_prefill=False) if scheduled else None

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        alloc, draft = self.allocator, self.draft_allocator
        return alloc.can_grow(seq.blocks, blocks_needed(seq, num_tokens, alloc.block_size)) and (
            draft is None or draft.can_grow(seq.draft_blocks, draft.blocks_for(num_tokens)))

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give the sequence's caches room for `num_tokens` tokens (raises MemoryError if full)."""
        self.allocator.grow(seq.blocks, blocks_needed(seq, num_tokens, self.allocator.block_size))
        if (draft := self.draft_allocator) is not None:
            draft.grow(seq.draft_blocks, draft.blocks_for(num_tokens))

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Return the blocks beyond what `num_tokens` tokens need (rolled-back speculation)."""
        self.allocator.truncate(seq.blocks, blocks_needed(seq, num_tokens, self.allocator.block_size))
        if (draft := self.draft_allocator) is not None:
            draft.truncate(seq.draft_blocks, draft.blocks_for(num_tokens))

    def release(self, seq: Sequence) -> None:
        self.allocator.release(seq.blocks)
        if self.draft_allocator is not None:
            self.draft_allocator.release(seq.draft_blocks)
        seq.packed_pages = seq.tail_start = 0

    def preempt_to_fit(self, num_blocks: int) -> None:
        """Preempt the newest sequences until at most `num_blocks` blocks are in use (the KV pool is
        about to shrink); like any preempted sequence, they are recomputed when re-admitted."""
        while self.allocator.num_used > num_blocks and self.running:
            self._preempt(self.running[-1])

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it is recomputed from its tokens when re-admitted."""
        self.running.remove(seq)
        self.release(seq)
        seq.num_cached = seq.draft_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions_total += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)
        seq.status = Status.FINISHED
