"""The engine: owns the model, the KV cache and the step loop, which runs in its own thread.

Every change of engine state (new requests, aborts, knob changes) is a command queued to that thread
and run at a step boundary, so the loop needs no locks and a caller gets a definite outcome.
"""

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue

import torch

from optd.engine.config import EngineConfig, EngineError, SamplingParams
from optd.engine.drafter import ModelDrafter
from optd.engine.knobs import ApplyResult, KnobOutcome, Knobs, check_knob
from optd.engine.kv_cache import BlockAllocator, KVLayout, KVPool
from optd.engine.kv_compress import KVCompressor, PrefillPacker
from optd.engine.linear import Linear
from optd.engine.loader import load_model, resolve_model_path
from optd.engine.model_config import ModelConfig
from optd.engine.outputs import Delta, EngineStats, RequestOutput
from optd.engine.probe_texts import PROBE_TEXTS
from optd.engine.quality import QualityReport, ReferenceStore, probe_key, timed_report
from optd.engine.runner import ModelRunner
from optd.engine.sampler import PendingTokens, sample, sample_tokens
from optd.engine.scheduler import Scheduler
from optd.engine.sequence import Sequence, Status
from optd.engine.speculator import Speculator, make_drafter
from optd.engine.streaming import OutputStream, Sink
from optd.engine.tokenizer import Detokenizer, Tokenizer
from optd.engine.weight_bits import (
    Sensitivity,
    WeightSwitch,
    assign_bits,
    average_bits,
    current_bits,
    head_bits,
    head_bits_for,
    head_nbytes,
    layers_nbytes,
    set_layer_bits,
)

log = logging.getLogger("optd.engine")
Prompt = str | list[int]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device={name!r}: no CUDA/ROCm device is available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise EngineError(f"dtype={name!r} is not one of auto, {', '.join(dtypes)}")
    return dtypes[name]


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        folder = resolve_model_path(config.model)
        self.model_config = cfg = ModelConfig.from_file(folder / "config.json")
        self.tokenizer = Tokenizer(folder)
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, 4096)
        if cfg.sliding_window and self.max_model_len > cfg.sliding_window:
            raise EngineError(
                f"{folder / 'config.json'}: sliding_window={cfg.sliding_window} is not supported; "
                f"use max_model_len <= {cfg.sliding_window}"
            )
        if not config.max_num_seqs >= 1:
            raise EngineError(f"max_num_seqs must be >= 1, got {config.max_num_seqs}")
        self.model = load_model(folder, cfg, self.device, self.dtype, self.max_model_len)
        layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.block_size, self.dtype)
        num_blocks = self._num_kv_blocks(layout)
        allocator = BlockAllocator(num_blocks, config.block_size)
        if allocator.blocks_for(self.max_model_len) > num_blocks:
            raise EngineError(
                f"KV cache of {num_blocks} blocks cannot hold one sequence of max_model_len="
                f"{self.max_model_len}; give it more memory or lower max_model_len"
            )
        self.pool = KVPool(layout, num_blocks + 1, self.device)  # + the scratch block
        # The pool grows into what fewer weight bits free, and back (see _kv_blocks_for).
        self._kv_start_blocks, self._start_weight_bytes = num_blocks, self.weight_bytes
        # The draft's cache is never compressed: give it room for what the target holds at r = 0.75.
        per_seq = allocator.blocks_for(self.max_model_len)
        draft_blocks = max(min(config.max_num_seqs * per_seq, 4 * num_blocks), per_seq)
        self.drafter = make_drafter(config, self, draft_blocks + 1)
        draft_allocator = None
        if isinstance(self.drafter, ModelDrafter):
            draft_allocator = BlockAllocator(draft_blocks, config.block_size)
        self.scheduler = Scheduler(allocator, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, draft_allocator)
        widths = (1,) if self.drafter is None else tuple(range(1, config.max_spec_length + 2))
        self.runner = ModelRunner(self.model, self.pool, config.max_num_seqs, self.max_model_len,
                                  config.cuda_graphs, widths)
        self.compressor = KVCompressor(self.pool, self.scheduler)
        self.scheduler.prefill_blocks = self.compressor.prefill_blocks
        self._knobs = Knobs(max_batch_size=config.max_num_seqs)
        self._rng = torch.Generator(device=self.device).manual_seed(config.seed)
        self._ids = itertools.count()
        self._inbox: SimpleQueue[Callable[[], None]] = SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self._counters = EngineStats(kv_blocks_total=num_blocks, kv_bytes_per_token=layout.bytes_per_token,
                                     spec_accepted_per_pos=[0] * config.max_spec_length)
        self._step_time: dict[int, float] = {}  # decode step seconds by spec_length, smoothed
        self._stream = OutputStream(self.tokenizer, self.max_model_len, self._counters)
        self._speculator = self.drafter and Speculator(self.drafter, self.runner, self.max_model_len,
                                                       self._counters, config.max_spec_length,
                                                       config.cuda_graphs)
        self._model_folder = folder
        self._switch: WeightSwitch | None = None  # a weight_bits change in progress
        self._in_flight: InFlight | None = None  # a decode step launched, its tokens not yet taken
        self._sensitivity: Sensitivity | None = None
        cache = config.quality_cache_dir
        self._references = ReferenceStore(Path(cache) if cache else None)
        self._thread = threading.Thread(target=self._loop, name="optd-engine", daemon=True)
        self._thread.start()

    def _useful_kv_blocks(self) -> int:
        """Blocks max_num_seqs sequences of max_model_len fill natively: more would never be used."""
        return self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)

    def _num_kv_blocks(self, layout: KVLayout) -> int:
        c = self.config
        per_block = layout.num_layers * layout.block_bytes
        useful = self._useful_kv_blocks()
        if c.num_kv_blocks:
            return c.num_kv_blocks
        if c.kv_cache_memory:
            return max(c.kv_cache_memory // per_block, 1)
        if self.device.type != "cuda":
            return min(useful, (1 << 30) // per_block)
        free, total = torch.cuda.mem_get_info(self.device)
        m = self.model_config
        # Activations of the largest prefill step plus decode logits, generously.
        activations = c.max_num_batched_tokens * (4 * m.hidden_size + 4 * m.intermediate_size) * 4
        activations += 2 * c.max_num_seqs * m.vocab_size * 4
        budget = total * c.gpu_memory_utilization - (total - free) - activations
        return max(min(useful, int(budget // per_block)), 1)

    # ---- the step loop (engine thread) ----

    @property
    def weight_bytes(self) -> int:
        """Bytes the linear layers' weights occupy now (lm_head included, embedding not)."""
        m = self.model
        return sum(x.nbytes for x in m.modules() if isinstance(x, Linear)) + head_nbytes(m, head_bits(m))

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.clear()
            try:
                # Commands and background work see every sampled token taken (and change nothing under
                # a step in flight); so does an idle engine.
                busy = not self._inbox.empty() or self._switch is not None or self.runner.capturing
                if self._in_flight is not None and (busy or not self.scheduler.has_work()):
                    self._land(self._take_in_flight())
                self._run_commands()
                background = self._background()
                if not self.scheduler.has_work():
                    if not background:
                        self._wake.wait()
                    continue
                self._step()
            except Exception as e:  # a bug or fault outside the model call: fail the running requests,
                log.exception("engine step failed")  # keep the engine (and waiting requests) alive
                self._in_flight = None
                for seq in list(self.scheduler.running):
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")

    def _background(self) -> bool:
        """Between two steps: requantize one layer of a weight_bits change, or capture one graph; True
        while such work remains. A fault here is logged and ends that work (a change is reported failed,
        a graph left uncaptured runs eagerly), never the engine loop."""
        try:
            if self._switch is not None and self._switch.step():
                self._switch = None
            return self._switch is not None or self._capture_next()
        except Exception as e:
            log.exception("background work between steps failed")
            switch, self._switch = self._switch, None
            if switch is not None:
                switch.on_done(f"{type(e).__name__}: {e} (the change stopped part-way)")
            return False

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except Empty:
                return
            try:
                command()
            except Exception:  # a failing command must not take the step loop down with it
                log.exception("engine command failed")

    def _step(self) -> None:
        k = self._knobs.spec_length
        flight = self._take_in_flight()
        if flight is not None and not self._may_chain(flight, k):
            self._land(flight)  # this step starts from the tokens it sampled
            flight = None
        # A step in flight holds one more token per sequence than its token_ids show.
        self.scheduler.lookahead = k + (flight is not None)
        step = self.scheduler.schedule()
        chain = flight is not None and step is not None and not step.is_prefill and step.seqs == flight.seqs
        if flight is not None and not chain:  # the scheduler preempted some: no chaining after all
            self._land(flight, still_in_flight=True)  # keeps the slot this step writes
            if step is not None:
                step.seqs = [s for s in step.seqs if s.status is Status.RUNNING]
        if step is None or not step.seqs:
            return
        seqs = step.seqs
        start = time.perf_counter()
        try:
            if step.is_prefill:
                packer = PrefillPacker(self.compressor, seqs) if self.compressor.ratio > 0 else None
                new_tokens = [[t] for t in sample(self.runner.prefill(seqs, packer), seqs)]
                if k > 0:
                    self._speculator.prefill(seqs)
            elif k == 0:  # the plain decode path: launched now, its tokens taken at the next step
                logits = self.runner.decode(seqs, flight.tokens.device if chain else None)
                self._in_flight = InFlight(seqs, PendingTokens(sample_tokens(logits, seqs)), start)
                if chain:  # the host's work on the previous step overlaps this one on the GPU
                    self._land(flight, still_in_flight=True)
                    # This step runs on the GPU from about when the previous one's tokens arrived: its
                    # step time is the period between landings, not its time since launch (~two steps).
                    self._in_flight.started = time.perf_counter()
                return
            else:
                new_tokens = self._speculator.step(seqs, k)
        except Exception as e:  # a kernel or memory fault fails this step's requests, not the engine
            log.exception("step failed")
            self._in_flight = None
            for seq in seqs:
                if seq.status is not Status.FINISHED:
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            return
        if not step.is_prefill:
            self._record_step_time(k, time.perf_counter() - start)
        self._counters.steps_total += 1
        if step.is_prefill:
            self._counters.prompt_tokens_total += sum(s.prompt_len for s in seqs if s.num_generated == 0)
        now = time.monotonic()
        for seq, tokens in zip(seqs, new_tokens, strict=True):
            self._accept(seq, tokens, now)
        self._leave_packed_mode_if_unused()

    def _may_chain(self, flight: "InFlight", k: int) -> bool:
        """Whether the next step can start from the tokens `flight` sampled, before they reach the host:
        a plain decode of the same sequences (nothing waiting to be admitted), each with room for one
        more token (a sequence that turns out finished wastes a row), and no page packing (which moves
        blocks by token count)."""
        s = self.scheduler
        return (k == 0 and not s.waiting and s.running == flight.seqs
                and self.compressor.ratio == 0 and not self.pool.packed_mode
                and all(q.num_tokens + 1 < self.max_model_len and q.num_generated + 1 < q.params.max_tokens
                        for q in flight.seqs))

    def _take_in_flight(self) -> "InFlight | None":
        flight, self._in_flight = self._in_flight, None
        return flight

    def _land(self, flight: "InFlight", still_in_flight: bool = False) -> None:
        """Take a decode step's sampled tokens (waiting for them); `still_in_flight`: the next step,
        launched on them, is writing each sequence's next K/V slot (kept when trimming blocks)."""
        tokens = flight.tokens.wait()
        self._record_step_time(0, time.perf_counter() - flight.started)
        self._counters.steps_total += 1
        now = time.monotonic()
        for seq, token in zip(flight.seqs, tokens, strict=True):
            if seq.status is not Status.FINISHED:  # else stopped while this step ran: a wasted row
                self._accept(seq, [token], now, keep=int(still_in_flight))
        self._leave_packed_mode_if_unused()

    def _record_step_time(self, k: int, seconds: float) -> None:
        """Smooth the decode step time at spec_length k (EngineStats.step_time_s)."""
        self._step_time[k] = 0.9 * self._step_time.get(k, seconds) + 0.1 * seconds

    def _accept(self, seq: Sequence, tokens: list[int], now: float, keep: int = 0) -> None:
        """Append a step's new tokens to a sequence and stream them; a sequence preempted meanwhile
        keeps them too (it is recomputed with them) but holds no cache."""
        running = seq.status is Status.RUNNING
        if running:
            # The K/V of everything before the last new token is now cached (rejected drafts' slots
            # are simply overwritten later); blocks beyond that (and `keep` more) go back to the pool.
            seq.num_cached = seq.num_tokens + len(tokens) - 1
            seq.draft_cached = min(seq.draft_cached, seq.num_cached)
        for token in tokens:
            seq.token_ids.append(token)
            if reason := self._stream.on_token(seq, token, now):
                self._finish(seq, reason)
                return
        if running:
            self.scheduler.truncate(seq, seq.num_cached + keep)
            self.compressor.pack(seq)

    def _leave_packed_mode_if_unused(self) -> None:
        if self.pool.packed_mode and self.compressor.ratio == 0 and not any(
                s.packed_pages for s in self.scheduler.running):
            self._set_packed_mode(False)  # nothing packed is left: back to the 16-bit kernel

    def _probe(self) -> QualityReport:
        """Teacher-force the probe texts through the cache and kernels that serve requests (see
        optd.engine.quality) and compare with the 16-bit, uncompressed reference."""
        started = time.perf_counter()
        texts = [self.tokenizer.encode(t)[: self.max_model_len] for t in PROBE_TEXTS]
        try:
            rows = [self._teacher_force(ids, len(ids) // 2) for ids in texts]
        except EngineError as e:
            raise EngineError(f"quality probe: {e}") from None
        current = torch.cat(rows).cpu()
        key = probe_key(self._model_folder, self.dtype, texts)
        reference = self._references.get(key)
        if reference is None:
            if self._knobs.kv_compression != 0 or self._knobs.weight_bits != 16:
                raise EngineError("quality probe: no reference yet, and the knobs are not at 16 bits / "
                                  "uncompressed to make one")
            self._references.put(key, reference := current)
        return timed_report(reference, current, started)

    def _teacher_force(self, ids: list[int], split: int) -> torch.Tensor:
        """Log-probabilities [len(ids) - split, vocab] of the predictions of ids[split:], fed as a request
        would be: ids[:split] prefilled (and packed, under kv_compression), the rest as one chunk on top
        of that cache. Engine thread; holds blocks only while it runs."""
        seq = self.make_sequence(ids[:split], SamplingParams(max_tokens=1))
        sched = self.scheduler
        if not sched.can_grow(seq, len(ids)):
            raise EngineError("the KV cache is full right now; try again later")
        sched.allocator.grow(seq.blocks, self.compressor.prefill_blocks(seq))
        try:
            packer = PrefillPacker(self.compressor, [seq]) if self.compressor.ratio > 0 else None
            first = self.runner.prefill([seq], packer)
            seq.num_cached = seq.num_tokens
            sched.grow(seq, len(ids))
            rest = self.runner.extend([seq], [(split, ids[split:])])[0]
        finally:
            sched.release(seq)
        return torch.log_softmax(torch.cat([first, rest[:-1]]).float(), dim=-1)

    def logprobs(self, ids: list[int], split: int) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= split under the current knobs, through the serving path
        (the prefix ids[:split] goes through the KV cache as a request's prompt would)."""
        if not 0 < split < len(ids) <= self.max_model_len:
            raise EngineError(f"need 0 < split < len(ids) <= max_model_len, got {split}, {len(ids)}")
        rows = self._call(lambda: self._teacher_force(ids, split))
        return rows.gather(1, torch.tensor(ids[split:], device=rows.device)[:, None])[:, 0].tolist()

    def _layer_sensitivity(self) -> Sensitivity | None:
        """The probe's KL with each layer alone at 4 and at 8 bits (engine thread; blocks serving for
        2 probes per layer, once per model: the result is cached beside the probe references)."""
        key = "sensitivity-" + probe_key(self._model_folder, self.dtype, [])
        if (cached := self._references.get_json(key)) is not None:
            return {int(layer): {int(b): kl for b, kl in by_bits.items()}
                    for layer, by_bits in cached.items()}
        if current_bits(self.model) != [16] * len(self.model.layers):
            return None  # measured against the 16-bit model only; fall back to treating layers alike
        self._probe()  # makes sure the reference exists before any layer changes
        out: Sensitivity = {}
        for layer in range(len(self.model.layers)):
            out[layer] = {}
            for bits in (4, 8):
                set_layer_bits(self.model, self._model_folder, self.model_config, layer, bits)
                out[layer][bits] = self._probe().kl
            set_layer_bits(self.model, self._model_folder, self.model_config, layer, 16)
        self._references.put_json(key, out)
        return out

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        self._stream.on_finish(seq, time.monotonic(), error)

    # ---- the public interface (any thread) ----

    def _call(self, fn: Callable[[], object]) -> object:
        """Run fn on the engine thread at the next step boundary and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        done: Future = Future()

        def command() -> None:
            try:
                done.set_result(fn())
            except Exception as e:
                done.set_exception(e)

        self._inbox.put(command)
        self._wake.set()
        return done.result()

    def _post(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)
        self._wake.set()

    def make_sequence(self, prompt: Prompt, params: SamplingParams,
                      request_id: str | None = None) -> Sequence:
        """Validate a request and turn it into a sequence (does not queue it)."""
        params.validate()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise EngineError(f"prompt token ids must be in [0, {vocab})")
        else:
            raise EngineError("prompt must be a string or a list of token ids")
        if not ids:
            raise EngineError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise EngineError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} (prompt + output)"
            )
        generator = self._rng
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return Sequence(
            request_id=request_id or f"req-{next(self._ids)}",
            token_ids=ids,
            prompt_len=len(ids),
            params=params,
            detokenizer=Detokenizer.after_prompt(self.tokenizer, len(ids)),
            generator=generator,
        )

    def add(self, seq: Sequence, sink: Sink) -> None:
        def command() -> None:
            self._stream.sinks[seq.request_id] = sink
            self.scheduler.add(seq)
        self._post(command)

    def generate(self, prompts: list[Prompt] | Prompt,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts to completion, all submitted together; blocks the calling thread."""
        prompts = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        params = params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            try:
                seqs.append(self.make_sequence(prompt, p))
            except EngineError as e:
                raise EngineError(f"prompts[{i}]: {e}") from None
        outputs: dict[str, list[Delta]] = {s.request_id: [] for s in seqs}
        done = threading.Semaphore(0)

        def sink(d: Delta) -> None:
            outputs[d.request_id].append(d)
            if d.finish_reason:
                done.release()

        def command() -> None:
            for s in seqs:
                self._stream.sinks[s.request_id] = sink
                self.scheduler.add(s)
        self._post(command)
        for _ in seqs:
            done.acquire()
        return [_collect(s, outputs[s.request_id]) for s in seqs]

    async def submit(self, prompt: Prompt, params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[Delta]:
        """Stream a request's deltas; closing the iterator early aborts the request."""
        async for delta in self.submit_sequence(self.make_sequence(prompt, params, request_id)):
            yield delta

    async def submit_sequence(self, seq: Sequence) -> AsyncIterator[Delta]:
        """Stream a sequence made (and so validated) by make_sequence."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        self.add(seq, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d))
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:
                self.abort(seq.request_id)

    def abort(self, request_id: str) -> None:
        def command() -> None:
            self._stream.sinks.pop(request_id, None)  # whoever aborts is no longer listening
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                if seq.request_id == request_id:
                    self._finish(seq, "abort")
        self._post(command)

    @property
    def knobs(self) -> Knobs:
        return self._knobs

    def apply(self, **changes) -> ApplyResult:
        """Change knobs at the next step boundary; each is applied or rejected with a reason.
        weight_bits is reported once its last layer is requantized (requests keep flowing meanwhile)."""
        bits = changes.pop("weight_bits", None) if "weight_bits" in changes else None
        result = self._call(lambda: self._apply(changes)) if changes else ApplyResult()
        if bits is not None:
            result.outcomes["weight_bits"] = self._apply_weight_bits(bits)
        return result

    def _capture_next(self) -> bool:
        """Capture one pending CUDA graph (after a weight_bits change); True if one was pending."""
        fused = self._speculator.fused if self._speculator else None
        return self.runner.capture_next() or bool(fused and fused.capture_next())

    def _apply_weight_bits(self, value) -> KnobOutcome:
        start, current = time.perf_counter(), self._knobs.weight_bits
        reason = check_knob("weight_bits", value, max_num_seqs=self.config.max_num_seqs,
                            max_spec_length=self.config.max_spec_length, has_drafter=self.drafter is not None)
        if reason:
            return KnobOutcome("weight_bits", "rejected", current, value, reason)
        done: Future = Future()
        started = self._call(lambda: self._start_switch(float(value), done.set_result))
        if started is not None:
            return KnobOutcome("weight_bits", "rejected", current, value, started)
        if threading.current_thread() is self._thread:  # no loop to do it for us: do it all now
            while not self._switch.step():
                pass
            self._switch = None
        failure = done.result()
        cost = time.perf_counter() - start
        if failure:
            return KnobOutcome("weight_bits", "rolled_back", current, value, failure, cost)
        return KnobOutcome("weight_bits", "applied", self._knobs.weight_bits, value, cost_s=cost)

    def _start_switch(self, target: float, report: Callable[[str | None], None]) -> str | None:
        """Begin requantizing (engine thread); returns why not, or None. The KV pool lends the weights
        what more bits need before any layer grows, and takes what fewer bits free once all are swapped
        (or back, after a rollback): both while the CUDA graphs, which hold its addresses, are dropped."""
        if self._switch is not None:
            return "a weight_bits change is still in progress"
        if target not in (4, 8, 16) and self._sensitivity is None:
            self._sensitivity = self._layer_sensitivity()
        bits = assign_bits(target, len(self.model.layers), self._sensitivity)
        target_bytes = layers_nbytes(self.model, bits) + head_nbytes(self.model, head_bits_for(bits))

        def finish(failure: str | None) -> None:
            if failure is None:
                self._knobs = Knobs(**{**self._knobs.__dict__, "weight_bits": average_bits(bits)})
            self._fit_kv_to_weights()
            # The graphs held the old weights' addresses: capture them again, one per loop iteration.
            self._recapture_graphs()
            report(failure)

        self.runner.drop_graphs()  # eager until the last layer is swapped
        if self._speculator and self._speculator.fused:
            self._speculator.fused.drop_graphs()
        blocks = min(self.scheduler.allocator.num_blocks, self._kv_blocks_for(target_bytes))
        try:
            self._resize_kv(blocks)
        except Exception as e:
            log.exception("shrinking the KV pool failed")
            self._recapture_graphs()
            return f"the KV pool cannot shrink to {blocks} blocks for these weights: {type(e).__name__}: {e}"
        self._switch = WeightSwitch(self.model, self._model_folder, self.model_config, bits, finish)
        return None

    def _recapture_graphs(self) -> None:
        """Capture the CUDA graphs again, one per loop iteration (steps run eagerly meanwhile)."""
        self.runner.recapture(now=False)
        if self._speculator and self._speculator.fused:
            self._speculator.fused.recapture(now=False)

    def _kv_blocks_for(self, weight_bytes: int) -> int:
        """The KV pool's blocks (scratch excluded) while the weights take `weight_bytes`: the start-up
        size plus the bytes fewer bits free, up to what max_num_seqs sequences can use."""
        layout = self.pool.layout
        freed = max(0, self._start_weight_bytes - weight_bytes)
        grown = self._kv_start_blocks + freed // (layout.num_layers * layout.block_bytes)
        return max(self._kv_start_blocks, min(grown, self._useful_kv_blocks()))

    def _fit_kv_to_weights(self) -> None:
        """Size the KV pool for the weights held now (a failure leaves it as it is: serving goes on)."""
        blocks = self._kv_blocks_for(self.weight_bytes)
        try:
            self._resize_kv(blocks)
        except Exception:
            log.exception("resizing the KV pool to %d blocks failed; it keeps %d", blocks,
                          self.scheduler.allocator.num_blocks)

    def _resize_kv(self, blocks: int) -> None:
        """Resize the target's KV pool and allocator to `blocks` (engine thread, between steps, graphs
        dropped). Shrinking preempts the newest sequences until the rest fit (they are recomputed later),
        then moves the blocks above the new size into free ones below it. A failure leaves the pool and
        the allocator sized as they were."""
        sched, pool = self.scheduler, self.pool
        alloc, old = sched.allocator, sched.allocator.num_blocks
        if blocks < old:
            sched.preempt_to_fit(blocks)
            alloc.compact([s.blocks for s in sched.running], blocks, pool.move)
            alloc.resize(blocks)  # refuses if anything else holds a block above it
            try:
                pool.resize(blocks + 1)  # + the scratch block
            except Exception:
                alloc.resize(old)
                raise
        elif blocks > old:
            pool.resize(blocks + 1)
            alloc.resize(blocks)
        self._counters.kv_blocks_total = blocks

    def _apply(self, changes: dict) -> ApplyResult:
        result = ApplyResult()
        for name, value in changes.items():
            start = time.perf_counter()
            current = getattr(self._knobs, name, None)
            reason = check_knob(name, value, max_num_seqs=self.config.max_num_seqs,
                                max_spec_length=self.config.max_spec_length,
                                has_drafter=self.drafter is not None)
            if reason:
                result.outcomes[name] = KnobOutcome(name, "rejected", current, value, reason)
                continue
            if name == "max_batch_size":
                self.scheduler.max_batch_size = value
            if name == "kv_compression":
                self._set_kv_compression(float(value))
            self._knobs = Knobs(**{**self._knobs.__dict__, name: value})
            result.outcomes[name] = KnobOutcome(name, "applied", value, value,
                                                cost_s=time.perf_counter() - start)
        return result

    def _set_kv_compression(self, r: float) -> None:
        """New tokens are packed for r from the next step on; a raise re-packs every running sequence
        now (freeing blocks), a lowering leaves what is packed as it is (the information is gone)."""
        raised = r > self.compressor.ratio
        self.compressor.ratio = r
        if r > 0 and not self.pool.packed_mode:
            self._set_packed_mode(True)
        if raised:
            for seq in self.scheduler.running:
                self.compressor.repack(seq)

    def _set_packed_mode(self, on: bool) -> None:
        """Switch attention between the 16-bit and the packed-page kernel; CUDA graphs bake the kernel
        in, so they are captured again, one per loop iteration (steps run eagerly meanwhile)."""
        self.pool.packed_mode = on
        self._recapture_graphs()

    def probe(self) -> QualityReport:
        """Quality under the current knobs against the reference (runs between two steps)."""
        return self._call(self._probe)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(**{
            **self._counters.__dict__,
            "requests_running": len(s.running),
            "requests_waiting": len(s.waiting),
            "preemptions_total": s.preemptions_total,
            "kv_blocks_used": s.allocator.num_used,
            **self._kv_bytes(),
            "spec_accepted_per_pos": list(self._counters.spec_accepted_per_pos),
            "step_time_s": dict(self._step_time),
            "weight_bytes": self.weight_bytes,
            **{k: list(v) for k, v in self._stream.latency.items()},
        })

    def _kv_bytes(self) -> dict:
        """KV bytes per token of the running sequences' blocks (tails and partial blocks included) and
        the ratio that saves against native pages; with none running, what full pages reach."""
        layout, s = self.pool.layout, self.scheduler
        native = layout.bytes_per_token
        tokens = sum(seq.num_cached for seq in s.running)
        if tokens:
            blocks = sum(len(seq.blocks) for seq in s.running)
            per_token = blocks * layout.num_layers * layout.block_bytes / tokens
        else:
            per_token = native * (1 - self.compressor.nominal_ratio(self.compressor.ratio))
        return {"kv_bytes_per_token": round(per_token), "kv_compression_achieved": 1 - per_token / native}

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


@dataclass
class InFlight:
    """A plain decode step launched on the GPU whose sampled tokens the host has not taken yet."""

    seqs: list[Sequence]
    tokens: PendingTokens
    started: float  # perf_counter() when it started running (about: its launch, or the previous landing)


def _is_token_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) for t in x)


def _collect(seq: Sequence, deltas: list[Delta]) -> RequestOutput:
    final = deltas[-1]
    return RequestOutput(
        request_id=seq.request_id,
        prompt_token_ids=seq.token_ids[: seq.prompt_len],
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        finish_reason=final.finish_reason,
        ttft_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
        e2e_s=time.monotonic() - seq.arrival_time,
        error=final.error,
    )
