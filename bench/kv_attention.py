"""Decode attention over quantized KV pages on a GPU: bandwidth over the compressed bytes, and time
against the 16-bit kernel.

    python bench/kv_attention.py            # Llama-3-8B attention shape, batch 8, contexts 8k and 32k
    python bench/kv_attention.py --sweep    # also time other kernel configs per case; print the best

One layer's decode attention: 32 query heads, 8 KV heads, head_dim 128, bf16, block_size 16. Each row
holds `context` tokens: for int8/int4, context // T full quantized pages (T tokens each, kv_pages.py) and
the rest in a 16-bit tail, as the engine keeps them; for "native" and the 16-bit kernel, 16-bit pages only.
Cases: the existing 16-bit kernel (kernels/paged_attention.py), then the packed kernel on native, int8 and
int4 pages. Bytes = the pages the rows reference x block_bytes (the compressed bytes, scales and unused
slots included) + q + out; GB/s over those bytes is compared with the device-to-device copy bandwidth
(bench/decode.py's copy_bandwidth, read + write). Each time is per call, from a CUDA graph replaying many
calls that cycle over enough copies of the batch's pages to overflow L2 (each decode step reads every
layer's pages once, from DRAM). Each kernel is checked against its reference first. The table comes last.
"""

import argparse
import math
import time
from dataclasses import replace

import torch
from decode import copy_bandwidth, graph_seconds

from optd.kernels import packed_attention as pa
from optd.kernels.kv_pages import FMT_INT4, FMT_INT8, FMT_NATIVE, encode_meta, pack_pages, tokens_per_page
from optd.kernels.packed_attention import (
    PackedConfig,
    default_config,
    packed_paged_attention_ref,
    packed_paged_attention_triton,
)
from optd.kernels.paged_attention import paged_attention_ref, paged_attention_triton

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
BLOCK_BYTES = 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * DTYPE.itemsize
CALLS_PER_GRAPH = 32
FORMATS = {"native": FMT_NATIVE, "int8": FMT_INT8, "int4": FMT_INT4}


def time_calls(fn, tables: list, reps: int = 10) -> float:
    """Seconds per call of fn(block_tables), cycling over `tables`."""
    return graph_seconds(lambda i: fn(tables[i % len(tables)]), CALLS_PER_GRAPH, reps)


class Case:
    """A batch of `rows` rows at `context` tokens in pages of one format, `copies` times over (disjoint
    blocks, shuffled), in one layer's pool rows."""

    def __init__(self, fmt: int, context: int, rows: int, g: torch.Generator):
        self.fmt = fmt
        t = tokens_per_page(fmt, BLOCK_BYTES, KV_HEADS, HEAD_DIM, BLOCK_SIZE)
        self.tokens_per_page = t
        self.packed = 0 if fmt == FMT_NATIVE else context // t
        self.tail = context - self.packed * t
        self.pages = self.packed + -(-self.tail // BLOCK_SIZE)
        self.read_bytes = rows * self.pages * BLOCK_BYTES + 2 * rows * HEADS * HEAD_DIM * DTYPE.itemsize
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        copies = max(2, math.ceil(4 * l2 / self.read_bytes))
        num_blocks = rows * self.pages * copies + 1
        # 16-bit random K/V everywhere first (the tails), then quantized pages over their blocks.
        data = torch.randn(num_blocks, BLOCK_BYTES // 2, generator=g, device="cuda", dtype=DTYPE)
        self.data = data.view(torch.uint8)
        self.meta = torch.zeros(num_blocks, dtype=torch.int32, device="cuda")
        perm = torch.randperm(num_blocks - 1, generator=g, device="cuda") + 1
        tables = perm.view(copies, rows, self.pages).to(torch.int32)
        self.tables = list(tables.unbind(0))
        if self.packed:
            # A few distinct packed pages repeated over every quantized block (speed does not depend on
            # the values); keys with an outlier channel, as real keys have.
            k = torch.randn(64, t, KV_HEADS, HEAD_DIM, generator=g, device="cuda")
            k[..., 7] = k[..., 7] * 20 + 5
            v = torch.randn(64, t, KV_HEADS, HEAD_DIM, generator=g, device="cuda")
            base = pack_pages(k.to(DTYPE), v.to(DTYPE), fmt, BLOCK_BYTES)
            qblocks = tables[:, :, : self.packed].flatten().long()
            self.data[qblocks] = base[torch.arange(qblocks.numel(), device="cuda") % 64]
            self.meta[qblocks] = encode_meta(fmt, t)
        self.q = torch.randn(rows, HEADS, HEAD_DIM, generator=g, device="cuda", dtype=DTYPE)
        self.out = torch.empty_like(self.q)
        self.packed_pages = torch.full((rows,), self.packed, dtype=torch.int32, device="cuda")
        self.tail_lens = torch.full((rows,), self.tail, dtype=torch.int32, device="cuda")
        self.scale = HEAD_DIM**-0.5
        self.want = None

    def packed_call(self, config: PackedConfig | None, rows=slice(None)):
        return lambda bt: packed_paged_attention_triton(
            self.q[rows], self.data, self.meta, bt[rows], self.packed_pages[rows], self.tail_lens[rows],
            self.scale, block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
            out=self.out[rows], config=config)

    def kv_views(self):
        kv = self.data.view(DTYPE).view(-1, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        return kv[:, 0], kv[:, 1]

    def peer_call(self):
        k, v = self.kv_views()
        return lambda bt: paged_attention_triton(self.q, k, v, bt, self.tail_lens, self.scale, out=self.out)

    def check(self, peer: bool, config: PackedConfig | None = None) -> float:
        """max |kernel - reference| / max |reference| on the first two rows."""
        r = slice(0, 2)
        bt = self.tables[0]
        k, v = self.kv_views()
        if peer:
            got = paged_attention_triton(self.q[r], k, v, bt[r], self.tail_lens[r], self.scale)
            want = paged_attention_ref(self.q[r], k, v, bt[r], self.tail_lens[r], self.scale)
        else:
            got = self.packed_call(config, r)(bt).clone()
            if self.want is None:
                self.want = packed_paged_attention_ref(
                    self.q[r], self.data, self.meta, bt[r], self.packed_pages[r], self.tail_lens[r],
                    self.scale, block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM).float()
            want = self.want
        assert not got.isnan().any(), "NaN in the kernel's output"
        return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def describe(cfg: PackedConfig) -> str:
    cap = f" r{cfg.maxnreg}" if cfg.maxnreg else ""
    asm = "" if cfg.asm else " noasm"
    l2 = "" if cfg.l2_prefetch else " nol2"
    return (f"ppp {cfg.pages_per_part} rows {cfg.tile_rows} w{cfg.num_warps} s{cfg.num_stages}/"
            f"{cfg.quant_stages}{cap}{asm}{l2}")


# The sweep's kernel variants for quantized pages: (tile_rows, quant_stages, maxnreg, num_warps).
QUANT_VARIANTS = [(128, 1, 128, 4), (128, 2, 128, 4), (128, 1, 112, 4), (64, 1, 128, 4)]
# Pages per partition the sweep tries (the tiles hold two int4 / two int8 pages: even counts).
SWEEP_PPP = (4, 6, 8, 10, 12, 16, 20, 24, 32)


def sweep(case: "Case", secs: float, cfg: PackedConfig, bandwidth: float, deadline: float, label: str,
          tuned: dict):
    """The fastest of the default and the sweep's configs (each checked against the reference first):
    pages per partition, then (the first time a page format comes up) QUANT_VARIANTS around the best;
    later cases of that format start from its best variant. Stops at the deadline."""
    best = (secs, cfg)
    seen = {cfg}

    def run(c: PackedConfig) -> None:
        nonlocal best
        if time.monotonic() > deadline or c in seen:
            return
        seen.add(c)
        try:
            if case.check(False, c) > 2e-2:
                print(f"    {label} {describe(c)}: WRONG RESULT", flush=True)
                return
            t = time_calls(case.packed_call(c), case.tables, reps=5)
        except Exception as e:  # e.g. out of resources at this config: report and go on
            print(f"    {label} {describe(c)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            return
        print(f"    {label} {describe(c)}: {t * 1e6:.1f} us ({case.read_bytes / t / bandwidth:.2f} of copy)",
              flush=True)
        best = min(best, (t, c), key=lambda x: x[0])

    start = tuned.get(case.fmt, cfg)
    run(start)
    for ppp in SWEEP_PPP:
        run(replace(start, pages_per_part=ppp))
    if case.fmt != FMT_NATIVE and case.fmt not in tuned:
        for rows, stages, maxnreg, warps in QUANT_VARIANTS:
            run(replace(best[1], tile_rows=rows, quant_stages=stages, maxnreg=maxnreg, num_warps=warps))
        top = best[1]
        run(replace(top, asm=False))
        run(replace(top, l2_prefetch=False))
    tuned.setdefault(case.fmt, best[1])
    return best


def kernel_resources() -> str:
    """Registers, spills and shared memory of each compiled variant of the partition kernel (best effort:
    the cache's layout is Triton's internal business)."""
    lines = []
    names = pa._partition_kernel.arg_names
    try:
        for cache in pa._partition_kernel.device_caches.values():
            for kernel in cache[0].values():
                md = kernel.metadata
                consts = getattr(getattr(kernel, "src", None), "constexprs", None) or {}
                picked = {}
                for key, v in consts.items():
                    idx = key[0] if isinstance(key, tuple) else key
                    name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
                    if name in ("PPP", "NS", "STAGES", "ASM"):
                        picked[name] = v
                lines.append(f"  regs {kernel.n_regs} spills {kernel.n_spills} warps {md.num_warps} "
                             f"stages {getattr(md, 'num_stages', '?')} maxnreg {getattr(md, 'maxnreg', '?')} "
                             f"shared {md.shared} {picked}")
    except Exception as e:  # report and go on
        lines.append(f"  (no resource report: {type(e).__name__}: {e})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="8192,32768")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--formats", default="native,int8,int4", help="page formats for the packed kernel")
    p.add_argument("--sweep", action="store_true", help="time other kernel configs per case; print the best")
    p.add_argument("--budget-s", type=float, default=270, help="the sweep times no new config after this")
    args = p.parse_args()

    deadline = time.monotonic() + args.budget_s
    bandwidth = copy_bandwidth()
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"copy bandwidth (read+write): {bandwidth / 1e9:.0f} GB/s")
    g = torch.Generator(device="cuda").manual_seed(0)
    table = []
    tuned = {}  # the sweep's best config per page format so far
    for context in (int(c) for c in args.contexts.split(",")):
        base = None
        for name in ["16-bit kernel", *args.formats.split(",")]:
            peer = name == "16-bit kernel"
            case = Case(FORMATS.get(name, FMT_NATIVE), context, args.batch, g)
            cfg = None if peer else default_config(args.batch, KV_HEADS, case.pages, case.q.device)
            err = case.check(peer, cfg)
            secs = time_calls(case.peer_call() if peer else case.packed_call(cfg), case.tables)
            if args.sweep and not peer:
                secs, cfg = sweep(case, secs, cfg, bandwidth, deadline, f"ctx {context} {name}", tuned)
            base = base or secs
            rate = case.read_bytes / secs
            where = "paged_attention" if peer else describe(cfg)
            table.append((context, name, case.tokens_per_page, case.pages, case.read_bytes / 1e6, secs * 1e6,
                          rate / 1e9, rate / bandwidth, base / secs, err, where))
            print(f"  ctx {context} {name}: {secs * 1e6:.1f} us, {rate / 1e9:.0f} GB/s, err {err:.1e}",
                  flush=True)
            del case
            torch.cuda.empty_cache()

    print("\ncompiled partition kernels:\n" + kernel_resources())
    print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; batch {args.batch}, {HEADS} q / {KV_HEADS} kv "
          f"heads, head_dim {HEAD_DIM}, bf16, block_size {BLOCK_SIZE} ({BLOCK_BYTES} B per page and layer); "
          "'vs 16-bit' = 16-bit kernel time / this time; 'err' = max |kernel - ref| / max |ref|")
    print(f"{'context':>8} {'kernel':<14}{'tok/pg':>7}{'pages':>7}{'MB':>8}{'us':>9}{'GB/s':>7}{'of copy':>8}"
          f"{'vs 16-bit':>10}{'err':>9}  config")
    for ctx, name, tpp, pages, mb, us, gbs, frac, speedup, err, where in table:
        print(f"{ctx:>8} {name:<14}{tpp:>7}{pages:>7}{mb:>8.1f}{us:>9.1f}{gbs:>7.0f}{frac:>8.2f}"
              f"{speedup:>10.2f}{err:>9.1e}  {where}")


if __name__ == "__main__":
    main()
