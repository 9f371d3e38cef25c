import pytest
import torch

from optd.kernels.kv_pages import (
    FMT_INT4,
    FMT_INT8,
    FMT_NATIVE,
    encode_meta,
    pack_pages,
    tokens_per_page,
    unpack_pages,
)
from optd.kernels.packed_attention import (
    PackedConfig,
    packed_paged_attention,
    packed_paged_attention_ref,
    packed_paged_attention_triton,
)
from optd.kernels.paged_attention import paged_attention_ref, paged_attention_triton
from tests.kernels.test_rmsnorm import DEVICE, needs_triton, run_compile_script

FULL = None  # a quantized page filled to its format's capacity


def make_case(rows, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """A pool layer holding the rows' pages in shuffled blocks. rows: [(packed pages as (fmt, ntok), tail
    tokens)]. Every byte a row must not read is garbage: block 0 (the target of unused table entries) is
    all 0xFF (NaN in every float view), 16-bit slots past a tail are NaN."""
    g = torch.Generator().manual_seed(seed)
    bb = 2 * block_size * num_kv_heads * head_dim * dtype.itemsize
    cap = {f: tokens_per_page(f, bb, num_kv_heads, head_dim, block_size) for f in (FMT_INT8, FMT_INT4)}
    pages_of = [len(packed) + -(-tail // block_size) for packed, tail in rows]
    num_blocks = sum(pages_of) + 2
    data = torch.full((num_blocks, bb), 0xFF, dtype=torch.uint8)
    meta = torch.randint(0, 1 << 20, (num_blocks,), generator=g, dtype=torch.int32)  # native: ignored
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(rows), max(pages_of) + 1, dtype=torch.int32)

    def rand_kv(n):
        k = torch.randn(1, n, num_kv_heads, head_dim, generator=g)
        k[..., 1] = k[..., 1] * 8 + 3  # an outlier channel
        return k.to(dtype), torch.randn(1, n, num_kv_heads, head_dim, generator=g).to(dtype)

    for r, (packed, tail) in enumerate(rows):
        for p, (fmt, ntok) in enumerate(packed):
            blk = perm.pop()
            ntok = cap[fmt] if ntok is FULL else ntok
            data[blk] = pack_pages(*rand_kv(ntok), fmt, bb)[0]
            meta[blk] = encode_meta(fmt, ntok)
            tables[r, p] = blk
        for i in range(-(-tail // block_size)):
            blk = perm.pop()
            n = min(block_size, tail - i * block_size)
            kv = torch.full((2, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
            kv[0, :n], kv[1, :n] = (x[0] for x in rand_kv(n))
            data[blk] = kv.view(-1).view(torch.uint8)
            tables[r, len(packed) + i] = blk
    qkv = torch.randn(len(rows), num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype)
    q = qkv[:, :num_heads]  # a slice of a wider projection: row stride != num_heads * head_dim
    packed_pages = torch.tensor([len(p) for p, _ in rows], dtype=torch.int32)
    tail_lens = torch.tensor([t for _, t in rows], dtype=torch.int32)
    args = [x.to(DEVICE) for x in (q, data, meta, tables, packed_pages, tail_lens)]
    kw = dict(block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim)
    return [*args, head_dim**-0.5], kw


def naive(q, data, meta, tables, packed_pages, tail_lens, scale, *, block_size, num_kv_heads, head_dim):
    """Row by row: unpack the row's pages one by one, concatenate their visible tokens, textbook softmax."""
    num_rows, num_heads, _ = q.shape
    out = torch.zeros(num_rows, num_heads, head_dim)
    for r in range(num_rows):
        ks, vs = [], []
        for p in range(int(packed_pages[r])):
            blk = int(tables[r, p])
            fmt, ntok = int(meta[blk]) >> 8, int(meta[blk]) & 255
            k, v = unpack_pages(data[blk : blk + 1], fmt, ntok, num_kv_heads, head_dim, q.dtype)
            ks.append(k[0])
            vs.append(v[0])
        tail = int(tail_lens[r])
        for i in range(-(-tail // block_size)):
            blk = int(tables[r, int(packed_pages[r]) + i])
            n = min(block_size, tail - i * block_size)
            k, v = unpack_pages(data[blk : blk + 1], FMT_NATIVE, n, num_kv_heads, head_dim, q.dtype)
            ks.append(k[0])
            vs.append(v[0])
        if not ks:
            continue
        k, v = torch.cat(ks).cpu(), torch.cat(vs).cpu()
        for h in range(num_heads):
            kvh = h // (num_heads // num_kv_heads)
            p = torch.softmax(q[r, h].float().cpu() @ k[:, kvh].T * scale, dim=-1)
            out[r, h] = p @ v[:, kvh]
    return out


I8, I4 = FMT_INT8, FMT_INT4
# (rows, num_heads, num_kv_heads, head_dim, block_size). Rows: formats change mid-partition, partial
# quantized pages, tails ending mid-page and on a page boundary, tail only, packed only, an empty row.
MIXED = [
    (I8, FULL), (I8, FULL), (I4, 20), (I8, FULL), (I4, FULL), (I8, 7), (I4, FULL), (I4, FULL), (I8, FULL),
]
CASES = {
    "gqa4": ([(MIXED, 37), ([], 100), ([(I4, FULL)] * 9, 0), ([], 0), ([(I8, FULL)] * 6, 32), ([(I4, 3)], 1),
              ([(I4, FULL), (I4, 9), (I4, FULL), (I4, 30), (I4, FULL)], 5)],
             8, 2, 64, 16),
    "gqa1": ([([(I4, FULL), (I8, 5), (I8, FULL)], 9),
              ([(I8, FULL), (I8, 3), (I8, FULL), (I8, 12), (I8, 1)], 0), ([], 40)],
             2, 2, 32, 8),
}


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_naive(name):
    rows, *shape = CASES[name]
    args, kw = make_case(rows, *shape, dtype=torch.float32, seed=0)
    torch.testing.assert_close(packed_paged_attention_ref(*args, **kw).cpu(), naive(*args, **kw),
                               atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("ppp", [4, 32], ids=["parts", "single"])
@pytest.mark.parametrize("tile_rows", [64, 128, 256])
@pytest.mark.parametrize("name", CASES)
def test_triton_matches_reference_fp32(name, tile_rows, ppp):
    """Tiles of one or two pages (tile_rows // T rounded up to 2^k, at most 2)."""
    rows, *shape = CASES[name]
    args, kw = make_case(rows, *shape, dtype=torch.float32, seed=tile_rows // 64)
    config = PackedConfig(ppp, tile_rows=tile_rows)
    got = packed_paged_attention_triton(*args, **kw, config=config)
    assert not got.isnan().any()
    torch.testing.assert_close(got, packed_paged_attention_ref(*args, **kw), atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_half(dtype):
    rows, *shape = CASES["gqa4"]
    args, kw = make_case(rows, *shape, dtype=dtype, seed=3)
    got = packed_paged_attention_triton(*args, **kw, config=PackedConfig(4, tile_rows=128))
    assert got.dtype == dtype and not got.isnan().any()
    want = packed_paged_attention_ref(*args, **kw).float()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@needs_triton
@pytest.mark.parametrize("ppp", [8, 6])
def test_triton_long_random_tables(ppp):
    """Many partitions of random pages: mixed formats, or one format with random fill, and one page's keys
    made extreme so that the reduce kernel's rescaling across partitions matters. Partitions of a power
    of 2 pages or not."""
    g = torch.Generator().manual_seed(4)
    rows = []
    for single_format in (False, True, False):
        num = int(torch.randint(20, 40, (1,), generator=g))
        fmts = torch.randint(1, 3, (num,), generator=g).tolist()
        fill = torch.randint(1, 29, (num,), generator=g).tolist()
        fmts = fmts[:1] * num if single_format else fmts
        packed = [(f, FULL if x % 3 else x) for f, x in zip(fmts, fill, strict=True)]
        rows.append((packed, int(torch.randint(0, 70, (1,), generator=g))))
    args, kw = make_case(rows, 4, 1, 32, 8, dtype=torch.float32, seed=5)
    data, tables = args[1], args[3]
    last = int(tables[0, len(rows[0][0]) - 1])  # row 0's last quantized page: large K codes
    data[last, : data.shape[1] // 8] = 250
    got = packed_paged_attention_triton(*args, **kw, config=PackedConfig(ppp))
    torch.testing.assert_close(got, packed_paged_attention_ref(*args, **kw), atol=1e-4, rtol=1e-4)


# The engine's test models (tests/engine/checkpoints.py, engine/demo): block_size 16 and small heads, so a
# page holds many more quantized tokens than at head_dim 128 (head_dim 16, 2 kv heads: 26 int8 / 48 int4;
# head_dim 64, 1 kv head: 29 / 56), GQA groups of 5, 3, 2 and 1 (not powers of 2: padded query columns).
ENGINE_SHAPES = {
    "demo": (5, 1, 64), "demo_draft": (3, 1, 64), "llama": (4, 2, 16), "qwen3": (4, 1, 32),
    "draft": (2, 1, 16), "gqa1_hd16": (2, 2, 16),
    "group16": (16, 1, 64),  # more query heads a kv head than the 8 columns a page slot takes
}
# Mixed formats, partial pages, a row of quantized pages only, a tail-only row, and a CUDA-graph padding row
# (no pages at all: its table is all zeros, like the engine's).
ENGINE_ROWS = [
    ([(I4, FULL), (I8, FULL), (I4, 11), (I8, 3), (I4, FULL), (I4, FULL), (I8, FULL)], 21),
    ([(I8, FULL)] * 3 + [(I4, FULL)] * 2, 0), ([], 35), ([(I4, 1)], 16), ([], 0),
]


@needs_triton
@pytest.mark.parametrize("ppp", [2, 6, 16], ids=["ppp2", "ppp6", "single"])
@pytest.mark.parametrize("name", ENGINE_SHAPES)
def test_triton_engine_shapes(name, ppp):
    """The engine's model shapes in bfloat16 (its dtype), with partitions of 2 pages (one tile), 6 (not a
    power of 2; row 0's second partition is a tile whose second page is absent) and all pages in one
    program."""
    args, kw = make_case(ENGINE_ROWS, *ENGINE_SHAPES[name], 16, dtype=torch.bfloat16, seed=10)
    got = packed_paged_attention_triton(*args, **kw, config=PackedConfig(ppp))
    assert not got.isnan().any()
    want = packed_paged_attention_ref(*args, **kw).float()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    assert (got[4] == 0).all()  # the padding row attends to nothing


def native_case(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    rows = [([], n) for n in lens]
    args, kw = make_case(rows, num_heads, num_kv_heads, head_dim, block_size, dtype, seed)
    q, data, _, tables, _, tails, scale = args
    kv = data.view(dtype).view(data.shape[0], 2, block_size, num_kv_heads, head_dim)
    return args, kw, (q, kv[:, 0], kv[:, 1], tables, tails, scale)


def test_native_only_reference_equals_paged_attention():
    args, kw, old = native_case([300, 0, 17, 64], 8, 2, 64, 16, torch.float32, seed=6)
    assert torch.equal(packed_paged_attention_ref(*args, **kw), paged_attention_ref(*old))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_only_triton_equals_paged_attention(dtype):
    # With 256-token partitions (paged_attention's) the 16-bit path is the same computation, bit for bit.
    block_size = 16
    args, kw, old = native_case([600, 0, 17, 256], 8, 2, 64, block_size, dtype, seed=7)
    got = packed_paged_attention_triton(*args, **kw, config=PackedConfig(256 // block_size))
    assert torch.equal(got, paged_attention_triton(*old, part=256))


@needs_triton
def test_triton_writes_into_strided_out():
    rows, *shape = CASES["gqa1"]
    args, kw = make_case(rows, *shape, dtype=torch.float32, seed=8)
    buf = torch.full((3, 2, 2 * 32), 7.0, device=DEVICE)
    out = buf[:, :, :32]  # non-contiguous destination; the other half must stay untouched
    ret = packed_paged_attention_triton(*args, **kw, out=out, config=PackedConfig(2))
    assert ret is out
    torch.testing.assert_close(out, packed_paged_attention_ref(*args, **kw), atol=1e-4, rtol=1e-4)
    assert (buf[:, :, 32:] == 7.0).all()


def test_dispatch():
    rows, *shape = CASES["gqa1"]
    args, kw = make_case(rows, *shape, dtype=torch.float32, seed=9)
    out = torch.empty(3, 2, 32, device=DEVICE)
    assert packed_paged_attention(*args, **kw, out=out) is out
    if DEVICE == "cpu":
        assert torch.equal(out, packed_paged_attention_ref(*args, **kw))
    else:
        torch.testing.assert_close(out, packed_paged_attention_ref(*args, **kw), atol=1e-4, rtol=1e-4)


# The partition kernel for the GPUs the engine runs on, compiled with no GPU: the PTX paths (inline asm,
# L2 prefetch, programmatic dependent launch) for sm_90, plain Triton for gfx942 (MI300X). Shapes: the
# 8B model's, a GQA group of 16 (one page a tile) and float32 in one partition; and the reduce kernel.
COMPILE_SCRIPT = r"""
import torch
import optd.kernels.packed_attention as PA
import optd.kernels.paged_attention as PG

def partition_types(dtype):
    t = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    return {"q_ptr": t, "words_ptr": "*i32", "half_ptr": "*fp16", "kv_ptr": t, "meta_ptr": "*i32",
            "bt_ptr": "*i32", "packed_ptr": "*i32", "tail_ptr": "*i32", "out_ptr": t, "m_ptr": "*fp32",
            "l_ptr": "*fp32", "acc_ptr": "*fp32", "scale_log2": "fp32"}

shapes = [(torch.bfloat16, 32, 8, 128, 20, False), (torch.bfloat16, 16, 1, 64, 6, False),
          (torch.float32, 5, 1, 64, 16, True)]
reduce_types = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "lens_ptr": "*i32",
                "out_ptr": "*bf16"}
reduce_consts = dict(HEAD_DIM=128, PART=20, CHUNK=16, MARKED=True)
for target, nvidia in GPU_TARGETS:
    for dtype, heads, kv_heads, head_dim, ppp, single in shapes:
        cfg = PA.PackedConfig(ppp)
        consts = PA.kernel_constants(dtype, heads, kv_heads, head_dim, 16, cfg, single, nvidia, nvidia)
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if nvidia:
            options["maxnreg"] = cfg.maxnreg
        consts["PDL"] = nvidia
        try:
            compile_for(target, PA._partition_kernel, partition_types(dtype), consts, options)
        except Exception as e:
            sys.exit(f"{target.arch} partition kernel {dtype} {heads} q / {kv_heads} kv heads, head_dim "
                     f"{head_dim}: {type(e).__name__}: {e}")
    try:
        reduce_consts["PDL"] = nvidia
        compile_for(target, PG.reduce_partitions, reduce_types, reduce_consts, {"num_warps": 4})
    except Exception as e:
        sys.exit(f"{target.arch} reduce kernel: {type(e).__name__}: {e}")
print("compiled", len(shapes), "partition kernels and the reduce kernel for sm_90 and gfx942")
"""


@needs_triton
def test_kernels_compile_for_gpus():
    run_compile_script(COMPILE_SCRIPT)
