"""Launch the decode kernels on CuPy arrays: workspaces, split sizes, seeds, pointers."""
import cupy
import numpy

from . import _dependent, _kernels, rng
from .reference import TILE

THREADS = 256
SCHEME_CODES = {"iid": 0, "stratified": 1, "systematic": 2, "tile": 3}
KEY_GROUP_CODES = {"mean": 0, "head": 1}   # kernels_cu: KEY_GROUP_*
NULL = numpy.uint64(0)
# kernels_cu: pipeline stages and the data bytes of each (a row-major stage pads each row by 16 B)
EXACT_STAGES, EXACT_STAGE_BYTES = 2, 16384
SCORE_STAGES, SCORE_STAGE_BYTES = 4, 8192
KEY_STAGES, STAGE_DATA_BYTES = 4, 8192
# kernels_cu/warp_pipe.cuh: per-warp pipelines of 16-bit caches (chunks of 16 rows);
# kernels_cu/plan.cuh: statistics parts per tile
CHUNK_ROWS, STAT_PARTS = 16, 4
EXACT_PIPE_RINGS, EXACT_RING_WARPS_256, EXACT_PIPE_STAGES = 8, 2, 2
SCORE_PIPE_WARPS, SCORE_PIPE_STAGES, SCORE_PIPE_CHUNKS = 4, 2, 2
TILE_DRAWS_BYTES = 40      # kernels_cu: sizeof(TileDraws)
VALUE_WARP_BYTES = 12 * TILE   # kernels_cu: VALUE_WARP_BYTES
MAX_TILES_PER_VALUE_BLOCK = 32
VALUE_WARPS = THREADS // 32   # kernels_cu: VALUE_WARPS

_workspaces = {}
_call_counters = {}


class Workspace:
    """Scratch buffers kept per (device, stream) and grown on demand.

    The split-merge counters are zeroed once; each kernel leaves them at zero.
    """

    def __init__(self):
        self.buffers = {}

    def get(self, name, size, dtype, zero=False):
        buf = self.buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = (cupy.zeros if zero else cupy.empty)(max(size, 1), dtype=dtype)
            self.buffers[name] = buf
        return buf


def _workspace():
    key = (cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr)
    ws = _workspaces.get(key)
    if ws is None:
        ws = _workspaces[key] = Workspace()
    return ws


def _call_counter():
    """Per-device call counter for seed=None; the SANTA kernels advance it on the device."""
    dev = cupy.cuda.runtime.getDevice()
    c = _call_counters.get(dev)
    if c is None:
        c = _call_counters[dev] = cupy.asarray(numpy.array([rng._next_offset()], dtype=numpy.uint32))
    return c


def _stage_bytes(dtype, dim, data_bytes):
    row = dim * dtype.itemsize
    return (data_bytes // row) * row


def _pipelined(dtype):
    """16-bit caches run the per-warp pipelines (kernels_cu/warp_pipe.cuh)."""
    return dtype.itemsize == 2


def _stat_parts(dtype, key_draws):
    """Statistics parts per tile that pass 1 writes: STAT_PARTS where it runs the per-warp pipeline
    on a standard cache, else 1 (per tile)."""
    return STAT_PARTS if key_draws is None and _pipelined(dtype) else 1


def _chunk_bytes(dtype, dim):
    return CHUNK_ROWS * dim * dtype.itemsize


class _KernelInfo:
    """What the host needs of one compiled kernel, read from the driver once (``attributes``
    queries them all), and the launch settings already made on it."""

    def __init__(self, kernel):
        attrs = kernel.attributes
        self.static_smem = attrs["shared_size_bytes"]
        self.regs = attrs["num_regs"]
        self.smem_allowed = 0
        self.max_shared = False
        self.resident = {}      # (dynamic smem, threads) -> blocks per multiprocessor


_infos = {}


def _info(kernel):
    info = _infos.get(id(kernel))
    if info is None:
        info = _infos[id(kernel)] = _KernelInfo(kernel)
    return info


def _launch(name, dtype_name, dim, smem, max_shared=False):
    """The kernel, allowed ``smem`` bytes of dynamic shared memory (static plus dynamic above
    48 KB needs opting in); ``max_shared``: the multiprocessors it runs on keep all the shared
    memory they can (the L1 the least), so that another kernel's blocks fit beside its own."""
    k = _kernels.kernel(name, dtype_name, dim)
    info = _info(k)
    if smem + info.static_smem > 48 * 1024 and info.smem_allowed < smem:
        k.max_dynamic_shared_size_bytes = smem
        info.smem_allowed = smem
    if max_shared and not info.max_shared:
        k.preferred_shared_memory_carveout = 100
        info.max_shared = True
    return k


_sm_counts = {}


def _sm_count():
    """Multiprocessors of the current device, looked up once (``Device().attributes`` reads them all)."""
    rt = cupy.cuda.runtime
    dev = rt.getDevice()
    n = _sm_counts.get(dev)
    if n is None:
        n = _sm_counts[dev] = rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, dev)
    return n


def _blocks_per_sm(kernel, smem, threads):
    """How many blocks of ``kernel`` (``threads`` each, ``smem`` dynamic bytes) fit on one multiprocessor."""
    info = _info(kernel)
    n = info.resident.get((smem, threads))
    if n is None:
        dev = cupy.cuda.Device().attributes
        by_regs = dev["MaxRegistersPerMultiprocessor"] // (-(-info.regs // 8) * 8 * threads)
        by_smem = dev["MaxSharedMemoryPerMultiprocessor"] // (smem + info.static_smem + 1024)
        by_threads = dev["MaxThreadsPerMultiProcessor"] // threads
        n = info.resident[(smem, threads)] = max(1, min(by_regs, by_smem, by_threads))
    return n


def _splits(units, pairs, kernel, smem, threads=THREADS, max_per=None, multiple=1):
    """(splits, units per split): one full wave of resident blocks over the (batch, KV head) pairs,
    each split a whole number of ``multiple`` units where it exceeds one ``multiple``."""
    slots = _sm_count() * _blocks_per_sm(kernel, smem, threads)
    want = max(1, slots // pairs)
    per = max(1, -(-units // want))
    if per > multiple:
        per = -(-per // multiple) * multiple
    if max_per:
        per = min(per, max_per)
    return -(-units // per), per


def _contiguous(name, x):
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous on the GPU path")
    return x


def _cache_args(k, kv_lens, page_table, geo):
    lens = NULL if kv_lens is None else cupy.ascontiguousarray(kv_lens, dtype=cupy.int32)
    if page_table is None:
        pt, max_pages, num_pages = NULL, 1, 1
    else:
        pt = cupy.ascontiguousarray(page_table, dtype=cupy.int32)
        max_pages, num_pages = page_table.shape[1], k.shape[0]
    i32 = numpy.int32
    return (lens, pt, i32(max_pages), i32(geo.page_size), i32(num_pages), i32(geo.capacity),
            i32(geo.kv_heads), i32(geo.q_heads))


def _seed_args(seed, batch):
    """(keys pointer, key, seq_per_batch, offset pointer, offset, advance pointer)."""
    if seed is None:
        counter = _call_counter()
        return NULL, numpy.uint64(rng.fresh_key()), numpy.int32(1), counter, numpy.uint32(0), counter
    if isinstance(seed, cupy.ndarray):
        if seed.shape != (batch,) or seed.dtype.kind not in "iu":
            raise ValueError(f"seed array must be an integer array of shape ({batch},)")
        keys = cupy.ascontiguousarray(seed).view(cupy.uint64) if seed.dtype.itemsize == 8 else seed.astype(cupy.uint64)
        return keys, numpy.uint64(0), numpy.int32(0), NULL, numpy.uint32(0), NULL
    if isinstance(seed, (int, numpy.integer)) and not isinstance(seed, bool):
        return NULL, numpy.uint64(rng.int_seed(seed)), numpy.int32(1), NULL, numpy.uint32(0), NULL
    plan = rng.resolve_seed(seed, batch)
    return cupy.asarray(plan.keys), numpy.uint64(0), numpy.int32(0), NULL, numpy.uint32(0), NULL


def _outputs(q, out, return_lse, geo):
    res = cupy.empty(q.shape, dtype=q.dtype) if out is None else out
    lse = cupy.empty((geo.batch, geo.q_heads), dtype=cupy.float32) if return_lse else None
    return res, lse


def _exact_pass(name, q, geo, out, return_lse, args):
    """Launch ``exact_decode`` or ``stash_decode`` (split-KV p V, splits merged by the last block;
    ``stash_decode`` as a dependent of the ``key_scores`` launch before it);
    ``args(rows per split, part_o, part_ml, counters, out, lse)`` gives the kernel's arguments."""
    dt, D, G = q.dtype.name, geo.dim, geo.group
    pairs = geo.batch * geo.kv_heads
    ws = _workspace()
    if name == "exact_decode" and _pipelined(q.dtype):
        # kernels_cu: exact_pipe_rings, exact_ring_warps. Where the (sequence, KV head) pairs fill the
        # multiprocessors or pages are looked up, 4 rings per block: three such blocks per
        # multiprocessor keep more copies in flight than one of 8 (H200: batch 32 / 8k -2%, pages
        # -4%; batch 1 +1-7%)
        if D >= 256:
            rings, ring_warps = EXACT_PIPE_RINGS // 2, EXACT_RING_WARPS_256
        else:
            many = geo.paged or pairs >= _sm_count()
            rings, ring_warps = EXACT_PIPE_RINGS // (2 if many else 1), 1
        smem = max(rings * EXACT_PIPE_STAGES * 2 * _chunk_bytes(q.dtype, D), 4 * rings * G * (D + 2))
        threads, kern = 32 * rings * ring_warps, _launch(name, dt, D, smem)
        nsplit, rows = _splits(geo.capacity, pairs, kern, smem, threads, multiple=CHUNK_ROWS * rings)
    else:
        vec = 16 // q.dtype.itemsize
        stage_rows = EXACT_STAGE_BYTES // (D * q.dtype.itemsize)
        smem = (2 * EXACT_STAGES * _stage_bytes(q.dtype, D, EXACT_STAGE_BYTES)
                + 4 * (G * D + max(G * stage_rows, THREADS * vec)))
        threads, kern = THREADS, _launch(name, dt, D, smem)
        nsplit, per = _splits(-(-geo.capacity // TILE), pairs, kern, smem)
        rows = per * TILE
    if 8 * G * nsplit > smem:                # the split merge holds (max, weight) per head and split
        smem = 8 * G * nsplit
        kern = _launch(name, dt, D, smem)
    part_o = ws.get("part_o", geo.batch * geo.q_heads * nsplit * D, cupy.float32)
    part_ml = ws.get("part_ml", geo.batch * geo.q_heads * nsplit * 2, cupy.float32)
    counters = ws.get("exact_counters", pairs, cupy.int32, zero=True)
    res, lse = _outputs(q, out, return_lse, geo)
    _dependent.launch(kern, (nsplit, geo.kv_heads, geo.batch), (threads,),
                      args(numpy.int32(rows), part_o, part_ml, counters, res, NULL if lse is None else lse),
                      shared_mem=smem, dependent=name == "stash_decode")
    return res, lse


def decode_exact(q, k, v, kv_lens, page_table, geo, scale, out, return_lse):
    q = cupy.ascontiguousarray(q)
    k, v = _contiguous("k", k), _contiguous("v", v)
    cache = _cache_args(k, kv_lens, page_table, geo)
    return _exact_pass("exact_decode", q, geo, out, return_lse,
                       lambda rows, *outs: (q, k, v, *cache, numpy.float32(scale), rows, *outs))


def decode_exact_scored(q, k, v, kv_lens, page_table, geo, scale, seed, out, return_lse, key_draws):
    """Exact p V over the scores ``key_scores`` writes from a feature-major cache (``key_draws``:
    see :func:`_score_pass`), in two launches."""
    q = cupy.ascontiguousarray(q)
    k, v = _contiguous("k", k), _contiguous("v", v)
    cache = _cache_args(k, kv_lens, page_table, geo)
    launch1, buf = _score_pass(q, k, cache, geo, scale, 1, "systematic", seed, key_draws)
    launch1()
    return _exact_pass("stash_decode", q, geo, out, return_lse,
                       lambda rows, *outs: (v, *cache, rows, buf["stash"], buf["stride"], *outs, buf["advance"]))


def _score_pass(q, k, cache, geo, scale, samples, scheme, seed, key_draws, publish=False, part_cdf=False):
    """Prepare SANTA pass 1: ``santa_scores`` on a standard cache, ``key_scores`` on a feature-major
    one (``key_draws``: None for a standard cache, else ``(draws, stratified, group code)``, draws 0
    for exact scores). ``publish``: each pair's plan is published to ``santa_values``, which must
    follow (it resets the flags). ``part_cdf``: ``santa_part_scores`` (16-bit caches), whose stash
    ``santa_part_values`` reads. Returns the launch and the buffers pass 2 reads."""
    dt, D = q.dtype.name, geo.dim
    B, H, G = geo.batch, geo.q_heads, geo.group
    tiles_max = -(-geo.capacity // TILE)
    ws = _workspace()
    stride = tiles_max * TILE
    buf = dict(
        tiles_max=numpy.int32(tiles_max), stride=numpy.int32(stride),
        stash=ws.get("stash", B * H * stride, cupy.float32),
        stat_m=ws.get("stat_m", B * H * tiles_max * STAT_PARTS, cupy.float32),
        stat_l=ws.get("stat_l", B * H * tiles_max * STAT_PARTS, cupy.float32),
        plan_M=ws.get("plan_M", B * H, cupy.float32),
        plan_Z=ws.get("plan_Z", B * H, cupy.float64),
        plan_P=ws.get("plan_P", B * H * (tiles_max + 1), cupy.float64),
        plan_pos=ws.get("plan_pos", B * H * samples if scheme == "iid" else 1, cupy.float64),
        plan_off=ws.get("plan_off", 1, cupy.uint32))
    # kernels_cu: pass 1's split counters, then santa_values' (split counters, published plans, pairs
    # done), then pass 1's queue of tail units (next ticket, blocks done)
    pairs = B * geo.kv_heads
    counters = ws.get("santa_counters", 3 * pairs + 3, cupy.int32, zero=True)
    ready = counters[2 * pairs:3 * pairs] if publish else NULL
    keys, key, seq_per_batch, off_ptr, off, advance = _seed_args(seed, B)
    sort_bytes = 12 * samples if scheme == "iid" else 0      # kernels_cu/plan.cuh: sort_positions
    if _stat_parts(q.dtype, key_draws) > 1:
        smem = max(SCORE_PIPE_WARPS * SCORE_PIPE_STAGES * SCORE_PIPE_CHUNKS * _chunk_bytes(q.dtype, D), sort_bytes)
        name = "santa_part_scores" if part_cdf else "santa_scores"
        kern, threads = _launch(name, dt, D, smem, max_shared=True), 32 * SCORE_PIPE_WARPS
        n1, per1 = _splits(tiles_max * STAT_PARTS, pairs, kern, smem, threads, multiple=SCORE_PIPE_WARPS)
        split_arg, stat_parts = per1 * (TILE // STAT_PARTS), STAT_PARTS       # rows per split
        tail_units = _tail_units(per1, n1)
    else:
        if key_draws is None:
            smem = max(SCORE_STAGES * _stage_bytes(q.dtype, D, SCORE_STAGE_BYTES) + 4 * G * (D + TILE), sort_bytes)
            kern = _launch("santa_scores", dt, D, smem, max_shared=True)
        else:
            rows = STAGE_DATA_BYTES // (TILE * q.dtype.itemsize)      # kernels_cu: key_scores stage layout
            smem = max(KEY_STAGES * (STAGE_DATA_BYTES + 16 * rows) + 64 * D + D * (16 + 4 * G), sort_bytes)
            kern = _launch("key_scores", dt, D, smem, max_shared=True)
        threads = THREADS
        n1, per1 = _splits(tiles_max, pairs, kern, smem)
        # santa_scores takes rows per split, key_scores tiles
        split_arg, stat_parts = (per1 * TILE if key_draws is None else per1), 1
        tail_units = 0
    if key_draws is None:
        extra = (ready, numpy.int32(tail_units), counters[3 * pairs + 1:])
    else:
        extra = (ready, *(numpy.int32(x) for x in key_draws))
    args = (q, k, *cache, numpy.float32(scale), numpy.int32(split_arg), buf["tiles_max"], buf["stride"],
            buf["stash"], buf["stat_m"], buf["stat_l"], counters[:pairs],
            numpy.int32(SCHEME_CODES[scheme]), numpy.int32(samples), keys, key, seq_per_batch, off_ptr, off,
            buf["plan_M"], buf["plan_Z"], buf["plan_P"], buf["plan_pos"], buf["plan_off"], *extra)
    buf.update(counters=counters[pairs:], advance=advance, seed=(keys, key, seq_per_batch),
               stat_parts=numpy.int32(stat_parts))
    return _dependent.prepare(kern, (n1, geo.kv_heads, B), (threads,), args, shared_mem=smem, dependent=False), buf


def _tail_units(parts_per_split, splits):
    """Units of SCORE_PIPE_WARPS statistics parts at the end of each pass-1 split (16-bit caches)
    that go to a queue, from which the blocks that finish their own share first take them: one per
    80 parts where pairs have several splits. Measured on an H200 (bench/NOTES.md, version 92):
    about 1% faster at batch 8 and 16 / 32k; slower with more units, or with one split per pair
    (a block that builds a plan leaves, so the queue loses its blocks)."""
    return parts_per_split // (20 * SCORE_PIPE_WARPS) if splits > 1 else 0


def _value_task_parts(stat_parts, scheme, samples, geo):
    """Statistics parts per pass-2 task: 1 (tile tasks: a warp scans each whole tile that receives
    draws), or STAT_PARTS (part draws: pass 1 stashes each 64-row part's CDF, and pass 2 reads only
    the parts its draws land in) where draws are sparse: at most one per 8 parts, or one per 2
    parts with at least 32 (sequence, KV head) pairs. Measured on an H200 (bench/NOTES.md, versions
    46 and 85): where draws are denser or pairs fewer, tile tasks stay faster."""
    if stat_parts != STAT_PARTS or scheme == "tile":
        return 1
    draws_per_part = samples / -(-geo.capacity // (TILE // STAT_PARTS))
    pairs = geo.batch * geo.kv_heads
    return STAT_PARTS if draws_per_part <= 1 / 8 or (draws_per_part <= 1 / 2 and pairs >= 32) else 1


def decode(q, k, v, kv_lens, page_table, geo, scale, samples, scheme, seed, out, return_lse, return_counts,
           key_draws=None):
    """SANTA decode in two launches. ``key_draws``: see :func:`_score_pass`."""
    q = cupy.ascontiguousarray(q)
    k, v = _contiguous("k", k), _contiguous("v", v)
    dt, D = q.dtype.name, geo.dim
    B, H, G = geo.batch, geo.q_heads, geo.group
    cache = _cache_args(k, kv_lens, page_table, geo)
    task_parts = _value_task_parts(_stat_parts(q.dtype, key_draws), scheme, samples, geo)
    # everything is prepared before the first launch, so the two kernels run back to back
    launch1, buf = _score_pass(q, k, cache, geo, scale, samples, scheme, seed, key_draws, publish=True,
                               part_cdf=task_parts > 1)
    per_max = MAX_TILES_PER_VALUE_BLOCK
    # kernels_cu: santa_values' per-warp buffers and tile draws; santa_part_values' per-head tables
    # (draws before each part, parts' offsets and scales, tiles' offsets, head totals) in their place
    if task_parts == 1:
        name, tables = "santa_values", TILE_DRAWS_BYTES * G * per_max
    else:
        parts = per_max * task_parts
        name = "santa_part_values"
        tables = 8 * -(-2 * G * (parts + 1) // 8) + 8 * G * parts + 8 * G * per_max + 20 * G
    smem2 = VALUE_WARPS * VALUE_WARP_BYTES + tables
    kern2 = _launch(name, dt, D, smem2)
    # whole rounds of tiles for the block's warps
    n2, per2 = _splits(int(buf["tiles_max"]), B * geo.kv_heads, kern2, smem2, max_per=per_max, multiple=VALUE_WARPS)
    part_o = _workspace().get("part_o", B * H * n2 * D, cupy.float32)
    res, lse = _outputs(q, out, return_lse, geo)
    counts = cupy.zeros((B, H, geo.capacity), dtype=cupy.int32) if return_counts else None
    args2 = (v, *cache, numpy.int32(per2), buf["tiles_max"], buf["stride"], buf["stash"], buf["stat_m"],
             buf["stat_l"], buf["stat_parts"], buf["counters"], numpy.int32(SCHEME_CODES[scheme]),
             numpy.int32(samples), *buf["seed"],
             buf["plan_M"], buf["plan_Z"], buf["plan_P"], buf["plan_pos"], buf["plan_off"],
             part_o, res, NULL if lse is None else lse, NULL if counts is None else counts, buf["advance"])
    launch2 = _dependent.prepare(kern2, (n2, geo.kv_heads, B), (THREADS,), args2, shared_mem=smem2)
    launch1()
    launch2()
    return res, lse, counts


def key_scores(q, k, kv_lens, page_table, geo, scale, seed, key_draws):
    """Scores of a feature-major cache from ternary queries (pass 1 alone), float32
    (batch, q_heads, n_max) with ``-inf`` past ``kv_lens``."""
    q = cupy.ascontiguousarray(q)
    k = _contiguous("k", k)
    launch, buf = _score_pass(q, k, _cache_args(k, kv_lens, page_table, geo), geo, scale, 1, "systematic", seed,
                              key_draws)
    launch()
    if not isinstance(buf["advance"], numpy.uint64):
        buf["advance"] += 1                     # seed=None: the next call draws afresh
    n_max = geo.capacity if kv_lens is None else int(kv_lens.max())
    s = buf["stash"][:geo.batch * geo.q_heads * int(buf["stride"])].reshape(geo.batch, geo.q_heads, -1)[..., :n_max]
    lens = cupy.full(geo.batch, geo.capacity, cupy.int32) if kv_lens is None else kv_lens
    return cupy.where(cupy.arange(n_max)[None, None, :] < lens[:, None, None], s, -cupy.inf)
