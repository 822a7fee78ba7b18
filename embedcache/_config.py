"""Tuning knobs: block, chunk and segment sizes.

They are not part of any public signature. Code reads them at call time as
``_config.NAME`` (never ``from embedcache._config import NAME``), so a test can shrink one for
a single call to reach odd block boundaries::

    with _config.override(PAIRS_BLOCK=5, PAIRS_COLUMNS=5):
        ec.similar_pairs(x, 0.9)

Results never depend on these values (the kernels are exact and deterministic whatever the
block sizes); only speed and peak memory do.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

# --- kernels: rows per block; the score tile of one block is (query rows) x (corpus rows) float32
#: fewest corpus rows per block in top_k
TOPK_CORPUS_BLOCK = 2048
#: bytes of one top_k score tile (query rows x corpus rows float32); it should stay in the
#: last-level cache between the BLAS call that writes it and the scan that reads it
TOPK_TILE_BYTES = 16 * 1024 * 1024
#: query rows per block in top_k
TOPK_QUERY_BLOCK = 1024
#: top_k's BLAS writes corpus-major score tiles (corpus rows x query rows), else query-major
TOPK_CORPUS_MAJOR = True
#: largest corpus block top_k grows to when it streams few queries
TOPK_MAX_BLOCK = 65536
#: up to this many queries, top_k streams the corpus once through all threads
STREAM_MAX_QUERIES = 16
#: corpus rows per chunk when top_k streams the corpus (0: one chunk per numba thread)
TOPK_STREAM_CHUNK = 0
#: row side of a similar_pairs tile
PAIRS_BLOCK = 2048
#: column side of a similar_pairs tile (2048 x 8192 float32 scores: 64 MiB)
PAIRS_COLUMNS = 4 * PAIRS_BLOCK

# --- workflows
#: rows of the query side per pair-search or top-k call; one progress step each
CHUNK_ROWS = 8192

#: deduplicate (connected rule) joins pairs into a spanning forest inside the pair search,
#: in memory bounded by the rows; False lists every pair first (the reference tests compare with)
DEDUP_FOREST = True

# --- engine
#: live rows per block of a job's tasks (a pair task reads two blocks: 2 x 48 MiB at d=384)
ENGINE_BLOCK_ROWS = 32768
#: seconds to wait for a Dask scheduler to answer when connecting to it
SCHEDULER_TIMEOUT = 10

# --- partition index (embedcache.index)
#: cells per square root of the row count when no ``cells=`` is given (small collections)
INDEX_CELLS_PER_SQRT = 1.0
#: mean rows per cell when no ``cells=`` is given for large collections: the cells grow as the
#: rows (above ``INDEX_ROWS_PER_CELL**2`` rows), so a probe costs the same per row at any size
INDEX_ROWS_PER_CELL = 1000
#: no cell is made for fewer rows than this (fewer rows: one cell, i.e. exact)
INDEX_MIN_CELL = 64
#: k-means trains on at most this many sampled rows per cell
INDEX_SAMPLE_PER_CELL = 32
#: above this many cells, rows are assigned through two levels (coarse groups of cells first)
INDEX_TWO_LEVEL_CELLS = 2048
#: coarse groups a row looks into when assigned through two levels
INDEX_COARSE_PROBES = 8
#: nearest cells kept per indexed row after its first search (int32 each; more probes: recomputed)
INDEX_ROW_CELLS = 16
#: rows × cells past which a search that probes every cell runs the exact kernels instead
#: (same answer, without a per-row list of every cell: 3M rows × 3,000 cells would be 68 GiB)
INDEX_EVERY_CELL_ENTRIES = 1 << 27
#: pairs a partitioned search holds in memory before it writes its runs to a temporary file
INDEX_SPILL_PAIRS = 1 << 22
#: pairs per band of the final sort of a partitioned search (its memory beyond the output)
INDEX_SORT_BAND = 1 << 22
#: bytes of the probe lists kept with an index for its next search (more: only the probes
#: of the search at hand, recomputed next time); 10M rows x 8 cells with their scores: 640 MB
INDEX_ROW_CELLS_BYTES = 1 << 30
#: rounds of spherical k-means
INDEX_KMEANS_ITERS = 8
#: flat k-means rounds after two-level training (above ``INDEX_TWO_LEVEL_CELLS`` cells): every
#: sampled row goes to its nearest of all centroids, not only of its coarse group's. Each
#: round costs sample x cells products (10M rows: 320k x 10,000, about 25 s on two cores,
#: against about 280 s for the whole build); 0: two-level training only. The first round
#: gives most of the gain (1M rows, two levels forced: store recall@10 at 1 / 10 / 20 probes
#: 0.615 / 0.893 / 0.937 without, 0.667 / 0.910 / 0.948 after one, 0.692 / 0.916 / 0.949
#: after four; one-level training 0.757 / 0.939 / 0.961)
INDEX_REFINE_ITERS = 1
#: cells larger than this many times the mean cell size are split again (on the training
#: sample; after every row is assigned, past ``INDEX_RESPLIT`` times that)
INDEX_MAX_CELL_FACTOR = 4
#: cells are split on the training sample (its share of that size), before every row is
#: assigned: one pass over the rows then gives each row its cell and its probe list. After
#: the pass, a cell the sample under-counted is split again only past this many times that
#: size (rows of near-identical directions fall into k-means' sub-cells unevenly), and the
#: lists are computed again
INDEX_RESPLIT = 2.0
#: most cells a row probes when a pair search probes by score gap (a row searches its own cell
#: and, of its first this many cells, those whose centroid scores within the calibrated gap of
#: its best); 0: a fixed number of probes per row, calibrated
INDEX_GAP_PROBES = 8
#: rows of cells of at most this many rows probe all those first cells whatever the gap: a
#: few rows each, often the stray rows of a near-identical block split by k-means, each with
#: thousands of pairs across a wide gap, which a sample of rows rarely holds
INDEX_GAP_SMALL_CELL = 64
#: rows per band when the pairs within a cell are searched band by band (the BLAS products
#: then cover about the upper triangle, not the whole square of the cell)
INDEX_TRIANGLE_ROWS = 256
#: query rows in each half of the recall sample (calibration, then measurement)
INDEX_RECALL_SAMPLE = 1000
#: when > 0, the sampled rows' exact pairs are searched among at most this many rows (a
#: uniform sample of the rows beyond it), so calibration costs the same at any size. Off by
#: default: a row with one or two true pairs then often shows none, and the choice of probes
#: rests on the few rows of near-identical blocks (3M rows at 1M partners: 1 probe chosen
#: for 0.99, 0.88 reached, though the interval covered it)
INDEX_RECALL_COLUMNS = 0
#: rows per band of a cell (rows ordered by angle to its centroid) when the sampled rows' exact
#: pairs are searched: a band whose angles cannot reach a sampled row's is skipped (exact;
#: smaller bands skip more and multiply in smaller products)
INDEX_RECALL_TRUTH_BAND = 256
#: ... unless the bands leave more than this share of the products (the plain scan, in larger
#: products, is then faster)
INDEX_RECALL_TRUTH_SHARE = 0.4
#: true pairs looked at per sampled row (more are subsampled, and weighted back)
INDEX_RECALL_PAIRS_PER_ROW = 64
#: probes are chosen where the calibration sample's one-sided lower bound at this level
#: reaches the recall asked for (0.5: the point estimate; 0.9: the low end of an 80%
#: interval). At 0.975 (the low end of the reported 95% interval) 0.99 is out of reach of
#: 1000 sampled rows when a few blocks hold the pairs (3M rows: about 340 effective rows,
#: and 0.989 is the best low end 340 rows without a miss give): every cell would be probed
INDEX_RECALL_CHOOSE_LEVEL = 0.9
#: the calibration looks a pair's cell up in a row's first this many probe cells (the
#: search's own list); a recall that needs more probes is reached by probing every cell
INDEX_RECALL_DEPTH = 64
#: rows sampled per cell to estimate how many pairs its rows hold (the pair calibration
#: draws rows of dense cells, near-identical blocks, more often, and weights them back)
INDEX_RECALL_CELL_ROWS = 16
#: ... looked at against the rows drawn in this many nearest cells (its own included)
INDEX_RECALL_CELL_NEIGHBOURS = 8
#: share of the pair calibration's rows drawn uniformly (the rest by cell density and among
#: border rows): bounds the weight of any row at 1 / this times a uniform sample's
INDEX_RECALL_UNIFORM = 0.5
#: share of the pair calibration's rows drawn among the border rows (a pair search by score
#: gap misses pairs that straddle two cells). Off by default: where the missed pairs' rows
#: are not the rows nearest a border (``benchmarks/bench_index.py --miss-rows`` shows where
#: they are), a share here only thins the other draws
INDEX_RECALL_BORDER = 0.0
#: the border rows: this share of the rows, those with the smallest gap between their best
#: and second-best centroid scores
INDEX_RECALL_BORDER_ROWS = 0.05
#: measurement rounds of the calibration: while the measurement's lower bound at
#: ``INDEX_RECALL_CHOOSE_LEVEL`` misses the recall asked for, the probes are chosen again on
#: all the evidence (at least one step more) and measured on a fresh sample
INDEX_RECALL_ROUNDS = 3
#: method="auto" is exact up to this many distinct rows, partitioned above
INDEX_AUTO_ROWS = 50_000
#: the most rows a calibrated partitioned search may fall back to probing every cell (an
#: exact, quadratic search) when only that reaches the recall asked for; above it the search
#: raises ``RecallUnreachableError`` (exact pairs of 300k rows take about 4 min on 2 cores)
INDEX_EXACT_FALLBACK_ROWS = 300_000
#: a store's index is stale (searches scan exactly) when rows added or deleted since it was
#: built exceed this share of the rows it holds
INDEX_STALE_FRACTION = 0.2
#: neighbours per sampled query in the recall-vs-probes curve a store's index records
INDEX_CURVE_K = 10

# --- store
#: segments never exceed this size, so a search touches at most one segment's pages at a time
MAX_SEGMENT_BYTES = 256 * 1024 * 1024
#: vectors are converted, checked and written in pieces of about this size (bounded memory)
STORE_CHUNK_BYTES = 16 * 1024 * 1024
#: up to this many queries, a search through a store's index scans the probed cells of all
#: queries in one compiled pass (per-cell kernel calls above: each cell read once per batch)
STORE_INDEX_FEW_QUERIES = 16
#: rows per thread at least in that pass (fewer rows: fewer threads; one thread never waits
#: for a second that a busy machine has descheduled)
STORE_INDEX_SHARE_ROWS = 32768
#: a search through an index with codes (fewer than every cell probed) scores exactly the
#: best max(STORE_INDEX_SHORTLIST, STORE_INDEX_SHORTLIST_PER_K * k) rows of each query by
#: the codes' estimate; a row outside that shortlist is missed
STORE_INDEX_SHORTLIST = 100
STORE_INDEX_SHORTLIST_PER_K = 60
#: with 1-bit codes as well, each query first keeps its best max(STORE_INDEX_SIGN_SHORTLIST,
#: STORE_INDEX_SIGN_SHORTLIST_PER_K * k, STORE_INDEX_SIGN_SHORTLIST_SHARE * the rows its
#: probes hold on average) rows by their estimate, estimated again from the 8-bit codes
#: into the shortlist above (a row outside it is missed)
STORE_INDEX_SIGN_SHORTLIST = 2000
STORE_INDEX_SIGN_SHORTLIST_PER_K = 400
STORE_INDEX_SIGN_SHORTLIST_SHARE = 0.025
#: ... but never more than this many (each query holds two of them for each thread)
STORE_INDEX_SIGN_SHORTLIST_MAX = 1 << 16
#: queries searched together through codes (each holds its shortlists while its block runs;
#: fewer at a time when their 1-bit shortlists are long)
STORE_INDEX_QUERY_BLOCK = 4096
#: an index's codes keep the leading principal directions of the rows' offsets from their
#: centroids that hold this share of the offsets' energy (a small share of the dimensions
#: when the spectrum falls steeply, about this share of them when it is flat)
STORE_INDEX_CODE_ENERGY = 0.9
#: rows whose offsets train those directions (evenly spaced over the index)
STORE_INDEX_CODE_SAMPLE = 65536
#: VectorStore.add_texts embeds this many texts per call to the embedder
STORE_EMBED_CHUNK = 4096

# --- cache
#: keys per SQL statement (SQLite builds before 3.32 allow 999 parameters per statement)
CACHE_SQL_CHUNK = 900
#: texts per call to an embedder whose ``embed`` takes no ``on_batch`` (and has no ``batch_size``)
CACHE_MISS_CHUNK = 256
#: a cache write that would leave less free space than this on the cache's disk is refused
CACHE_MIN_FREE_BYTES = 256 * 1024 * 1024
#: rows deleted per transaction when a namespace is pruned
CACHE_DELETE_CHUNK = 10_000
#: page size of a new cache database (an existing one keeps its own); see embedcache.cache._diskcache
CACHE_PAGE_SIZE = 4096
#: bytes of a cache database SQLite reads through a memory map (SQLite caps it at its build's
#: SQLITE_MAX_MMAP_SIZE, 2 GiB in common builds); pages beyond it are read with read() calls
CACHE_MMAP_BYTES = 2**31
#: bytes of database pages SQLite keeps in memory per connection (beyond the memory map)
CACHE_PAGE_CACHE_BYTES = 32 * 2**20
#: rows per fetch when the filter of absent keys reads the cache's keys (embedcache.cache._keyfilter)
KEYFILTER_CHUNK = 65_536
#: keys the filter of absent keys holds in a set (some 90 bytes each) before it merges them into
#: its sorted arrays (8 bytes each; a merge copies the smaller array, a quarter of the time the larger)
KEYFILTER_MERGE_KEYS = 65_536

# --- proxy (embedcache serve); read when an app is created
#: bytes of recently served vectors the proxy keeps in memory in front of the cache (0: none)
SERVER_MEMORY_BYTES = 256 * 2**20
#: vectors answered but not yet written to the cache beyond which upstream batches wait for
#: the writer (so a disk slower than the upstream cannot grow memory without bound)
SERVER_MAX_PENDING = 100_000
#: answered vectors are written to the cache once this many are pending, or ...
SERVER_WRITE_ROWS = 1024
#: ... this many seconds after the oldest of them was answered (a write of 1,024 rows costs a
#: third of the CPU per row of one of 64, CPU the proxy's requests need on a small machine)
SERVER_WRITE_DELAY = 0.1


@contextlib.contextmanager
def override(**values: int) -> Iterator[None]:
    """Set knobs for the duration of a ``with`` block (for tests); unknown names raise."""
    module = sys.modules[__name__]
    old = {}
    for name, value in values.items():
        if not name.isupper() or not hasattr(module, name):
            raise AttributeError(f"no tuning knob named {name!r}")
        old[name] = getattr(module, name)
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)
