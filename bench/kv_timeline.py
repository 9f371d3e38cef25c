"""Where one call of the quantized-page attention kernel spends its time, program by program (GPU).

    python bench/kv_timeline.py                      # int4 pages, 8k context, the kv_attention.py case
    python bench/kv_timeline.py --format int8 --context 32768

Runs instrumented copies of kernels/packed_attention.py and paged_attention.py (written to a temporary
directory: source edits that read %clock64 at each phase of a partition program and %globaltimer at the
entry and end of both kernels' programs; each edit asserts that it applies, so a kernel change that moves
its anchor fails here loudly). Prints, from the last call of a CUDA graph of kv_attention.py's calls:
when the programs of both kernels start and end, the phases of a partition program (prologue, each tile
of two pages, the 16-bit tail, the epilogue), and each SM's tiles against the time its last program ends.
"""

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from decode import graph_seconds
from kv_attention import BLOCK_SIZE, CALLS_PER_GRAPH, FORMATS, HEAD_DIM, KV_HEADS, Case

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
TIMERS = '''
    @triton.jit
    def _stamp(rec, k):
        tl.store(rec + k, tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [k], dtype=tl.int64,
                                                    is_pure=False, pack=1))

    @triton.jit
    def _stamp_time(rec, k):
        tl.store(rec + k, tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [k], dtype=tl.int64,
                                                    is_pure=False, pack=1))
'''
ENTRY, WAITED, END, SM = 24, 25, 26, 27  # globaltimer slots of a partition program's 32; 0..22 clock64


def edit(text: str, old: str, new: str, count: int = 1) -> str:
    assert text.count(old) == count, f"instrumenting: {old!r} found {text.count(old)} times, not {count}"
    return text.replace(old, new)


def instrumented_modules():
    pa = (KERNELS / "packed_attention.py").read_text()
    pg = (KERNELS / "paged_attention.py").read_text()
    pa = edit(pa, "if triton is not None:\n", "RECORDS = [None, None]\nif triton is not None:\n" + TIMERS)
    for fn in ("_quant_pages(\n        ", "_streams_partition(\n        "):
        pa = edit(pa, f"def {fn}q_ptr,", f"def {fn}rec, q_ptr,")
    pa = edit(pa, "_quant_pages(q_row,", "_quant_pages(rec, q_row,", 2)
    call = "_streams_partition(\n                "
    pa = edit(pa, call + "q_ptr,", call + "rec, q_ptr,")
    pa = edit(pa, "def _partition_kernel(\n        q_ptr,", "def _partition_kernel(\n        q_ptr, rec_ptr,")
    pa = edit(pa, "num_parts)](\n        q,", "num_parts)](\n        q, RECORDS[0],")
    pa = edit(pa, "        pdl_wait(PDL)\n        r = tl.program_id(0)", f"""\
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        pid = pid * tl.num_programs(2) + tl.program_id(2)
        rec = rec_ptr + pid * 32
        _stamp(rec, 0)
        _stamp_time(rec, {ENTRY})
        tl.store(rec + {SM}, tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32,
                                                        is_pure=False, pack=1))
        pdl_wait(PDL)
        _stamp(rec, 1)
        _stamp_time(rec, {WAITED})
        r = tl.program_id(0)""")
    loop = "        for i in tl.range(0, count, NS, num_stages=STAGES):"
    pa = edit(pa, loop, "        _stamp(rec, 2)\n" + loop)
    last = "            blk0, n0, blk1, n1 = nblk0, nn0, nblk1, nn1\n"
    pa = edit(pa, last, last + "            _stamp(rec, 3 + i // NS)\n")
    finish = "        l, acc = _finish_values(rl, rpv, rz, acc, F16)\n"
    pa = edit(pa, finish, finish + "        _stamp(rec, 20)\n")
    join = "        # Each head's streams into one (m, l, acc).\n"
    pa = edit(pa, join, "        _stamp(rec, 21)\n" + join)
    store = "acch, mask=hmask[None, :])\n"
    pa = edit(pa, store, store + f"        _stamp(rec, 22)\n        _stamp_time(rec, {END})\n")
    pa = edit(pa, "reduce_partitions[(num_rows, num_heads)](\n            m,",
              "reduce_partitions[(num_rows, num_heads)](\n            RECORDS[1], m,")
    pg = edit(pg, "if triton is not None:\n", "if triton is not None:\n" + TIMERS)
    pg = edit(pg, "def reduce_partitions(\n        m_ptr,", "def reduce_partitions(\n        rec_ptr, m_ptr,")
    start = "        t = tl.program_id(0)\n        h = tl.program_id(1)\n        n_valid"
    pg = edit(pg, "        pdl_wait(PDL)\n" + start, """\
        rec = rec_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 4
        _stamp_time(rec, 0)
        pdl_wait(PDL)
        _stamp_time(rec, 1)
""" + start)
    out = "        tl.store(out_ptr + t * so0 + h * so1 + d, res.to(out_ptr.dtype.element_ty))\n"
    pg = edit(pg, out, out + "        _stamp_time(rec, 2)\n")
    mods = []
    folder = Path(tempfile.mkdtemp())
    for name, text in (("paged_timed", pg), ("packed_timed", pa)):
        (folder / f"{name}.py").write_text(text)  # triton.jit needs the source in a file
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        mods.append(importlib.util.module_from_spec(spec))
        sys.modules[name] = mods[-1]
        spec.loader.exec_module(mods[-1])
    mods[1].paged = mods[0]
    return mods[1]


def spread(x: torch.Tensor) -> str:
    """min, p10, median, p90, max of x's finite values."""
    x = x[x.isfinite()].sort().values
    if not len(x):
        return "-"
    return " ".join(f"{float(x[int(f * (len(x) - 1))]):7.2f}" for f in (0, 0.1, 0.5, 0.9, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="int4", choices=["int8", "int4"])
    p.add_argument("--context", type=int, default=8192)
    args = p.parse_args()
    pa = instrumented_modules()
    case = Case(FORMATS[args.format], args.context, 8, torch.Generator(device="cuda").manual_seed(0))
    cfg = pa.default_config(8, KV_HEADS, case.pages, case.q.device)
    parts = -(-case.pages // cfg.pages_per_part)
    pa.RECORDS[:] = [torch.zeros(8 * KV_HEADS * parts, 32, dtype=torch.int64, device="cuda"),
                     torch.zeros(8 * case.q.shape[1], 4, dtype=torch.int64, device="cuda")]

    def call(i):
        pa.packed_paged_attention_triton(
            case.q, case.data, case.meta, case.tables[i % len(case.tables)], case.packed_pages,
            case.tail_lens, case.scale, block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
            out=case.out, config=cfg)

    secs = graph_seconds(call, CALLS_PER_GRAPH, 5)
    print(f"{args.format} at {args.context} tokens, {parts} partitions of up to {cfg.pages_per_part} pages: "
          f"{secs * 1e6:.1f} us a call, instrumented (globaltimer us from the first program's entry)")
    rec, red = (r.cpu().double() for r in pa.RECORDS)
    t0 = rec[:, ENTRY].min()
    for name, x in (("partition entry", rec[:, ENTRY]), ("partition end", rec[:, END]),
                    ("reduce entry", red[:, 0]), ("reduce waited", red[:, 1]), ("reduce end", red[:, 2])):
        print(f"  {name:16s} {spread((x - t0) / 1e3)}")
    ghz = float(((rec[:, 22] - rec[:, 0]) / (rec[:, END] - rec[:, ENTRY])).median())
    tiles = rec[:, 3:20].masked_fill(rec[:, 3:20] == 0, float("nan"))
    marks = torch.cat([rec[:, :3], tiles, rec[:, 20:23]], 1)
    phases = ["wait", "prologue", *(f"tile {k}" for k in range(1, 18)), "finish", "tail", "epilogue"]
    steps = (marks[:, 1:] - marks[:, :-1]) / ghz / 1e3
    # finish: from the last tile the program ran, whichever slot that is
    steps[:, phases.index("finish")] = (rec[:, 20] - tiles.nan_to_num(0).amax(1)) / ghz / 1e3
    print(f"phases of a partition program, us at {ghz:.2f} GHz (min p10 p50 p90 max)")
    for k, name in enumerate(phases):
        if steps[:, k].isfinite().any():
            print(f"  {name:16s} {spread(steps[:, k])}")
    print(f"  {'total':16s} {spread((rec[:, 22] - rec[:, 0]) / ghz / 1e3)}")
    sm = rec[:, SM].long()
    programs = torch.bincount(sm)
    sm_tiles = torch.bincount(sm, weights=tiles.isfinite().sum(1).double())
    sm_end = torch.full_like(sm_tiles, float("nan")).scatter_reduce(0, sm, (rec[:, END] - t0) / 1e3, "amax",
                                                                    include_self=False)
    print("SMs by tiles (pairs of pages) on them: programs, SMs, when the SM's last program ends (us)")
    for n in sorted(set(sm_tiles[programs > 0].long().tolist())):
        on = (sm_tiles == n) & (programs > 0)
        print(f"  {n:3d} tiles  {sorted(set(programs[on].tolist()))} programs  {int(on.sum()):3d} SMs  "
              f"end {spread(sm_end[on])}")


if __name__ == "__main__":
    main()
