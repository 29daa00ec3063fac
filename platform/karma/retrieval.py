"""Item retrieval for evaluation and serving: exact chunked top-k and full-corpus ranks
in torch (any device), and a faiss inner-product index (flat or IVF, CPU or GPU).

Multi-interest queries [B,H,d] score an item by its best head (max over heads),
matching karma.losses.head_scores(reduce="max"). `exclude` lists are [B,L] int64
item ids padded with -1 (typically the user's history).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from karma.metrics import TAIL_THRESHOLD, long_tail_report, ranking_report

__all__ = [
    "exact_topk",
    "exact_ranks",
    "ItemIndex",
    "ranks_from_topk",
    "evaluate_retrieval",
]


def _as_heads(q: torch.Tensor, d: int, name: str = "queries") -> torch.Tensor:
    if q.dim() == 2:
        q = q.unsqueeze(1)
    if q.dim() != 3 or q.shape[2] != d:
        raise ValueError(f"{name} must be [B,{d}] or [B,H,{d}], got shape {tuple(q.shape)}")
    return q


def _check_exclude(exclude: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor | None:
    if exclude is None:
        return None
    ex = torch.as_tensor(exclude, device=device).long()
    if ex.dim() != 2 or ex.shape[0] != B:
        raise ValueError(f"exclude must be [B,L] with B={B}, got shape {tuple(ex.shape)}")
    return ex


def _chunk_scores(
    q: torch.Tensor, items: torch.Tensor, start: int, end: int, ex: torch.Tensor | None,
    dtype: torch.dtype | None = torch.float32, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Max-over-heads scores of items[start:end] as [B, end-start] (`dtype`; None keeps the
    matmul's), excluded ids at -inf. One matmul over all heads; no reduction pass when H = 1.
    `out`: a flat scratch of >= B*H*(end-start) elements of the items' dtype for the matmul."""
    B, H, d = q.shape
    mm_out = None if out is None else out[: B * H * (end - start)].view(B * H, end - start)
    s = torch.matmul(q.reshape(B * H, d), items[start:end].T, out=mm_out)
    s = s.view(B, H, -1).amax(dim=1) if H > 1 else s
    if dtype is not None:
        s = s.to(dtype)
    if ex is not None:
        _mask_excluded(s, ex, start)
    return s


def _mask_excluded(s: torch.Tensor, ex: torch.Tensor, start: int) -> None:
    """s[b, ex[b, j] - start] = -inf where that id lies in this chunk, in place, without reading
    anything back to the host: out-of-chunk and padding ids take +inf under a min-scatter."""
    local = ex - start
    inside = (local >= 0) & (local < s.shape[1])
    vals = torch.full(local.shape, float("inf"), dtype=s.dtype, device=s.device).masked_fill_(inside, float("-inf"))
    s.scatter_reduce_(1, local.clamp(0, s.shape[1] - 1), vals, reduce="amin", include_self=True)


def _block_topk(s: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates that surely hold the top-k of each row of s [B, C]: the top-min(k, block) of
    every `block` columns (unsorted), plus the ragged tail whole. Many small selections are
    cheaper than one selection over a long row; the final top-k over the survivors is exact."""
    B, C = s.shape
    nb = C // block
    kb = min(k, block)
    vals, idx = s[:, : nb * block].view(B, nb, block).topk(kb, dim=2, sorted=False)
    idx = idx + torch.arange(0, nb * block, block, device=s.device).view(1, nb, 1)
    vals, idx = vals.reshape(B, nb * kb), idx.reshape(B, nb * kb)
    if nb * block < C:
        tail = torch.arange(nb * block, C, device=s.device).expand(B, -1)
        vals, idx = torch.cat([vals, s[:, nb * block :]], 1), torch.cat([idx, tail], 1)
    return vals, idx


def _defaults(device: torch.device) -> tuple[int, int]:
    """(chunk_size, block) for exact_topk. A GPU scores 2^20 items per chunk with one-stage
    selection: on an H100 (1M x 128 fp16 items, top-200, batches of 4,096) that ran 110k
    queries/s against 83k for 262,144-item chunks with the two-stage select and 96k with
    8,192-item blocks (bench/results/retrieval_cuda_1m_variants_h100.json). A CPU keeps small chunks."""
    return (1 << 20, 0) if device.type == "cuda" else (65_536, 0)


def _user_chunk(device: torch.device) -> int:
    """Users scored at once by exact_topk and exact_ranks: their [users, item chunk] score
    block is what memory holds, whatever the number of users. A GPU takes 4,096 (the batch
    the H100 top-k numbers above ran fastest at); a CPU 1,024 (bench/results/eval_memory_cpu.json)."""
    return 4096 if device.type == "cuda" else 1024


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")


@torch.no_grad()  # a selection: nothing to differentiate, and no graph held over the chunks
def exact_topk(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    chunk_size: int | None = None,
    block: int | None = None,
    score_dtype: torch.dtype | None = None,
    user_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product (max over heads), on the tensors' device.

    Users are taken `user_chunk` at a time and items `chunk_size` at a time, each chunk merged
    into a running top-k, so beyond the [B,k] answer memory is O(user_chunk * (chunk_size + k))
    however many users and items. Scores are computed and selected in
    `score_dtype` (default: the items' dtype; fp16/bf16 halves the bytes every selection pass
    reads) and only the k winners are upcast. `block` > 0 selects in two stages (top-k per
    block of items, then over the survivors): the same items, fewer passes over long rows.
    Defaults per device: chunk 2^20, one stage and 4,096 users on CUDA; 65,536, one stage and
    1,024 users on CPU.
    Returns (scores [B,k] float32, ids [B,k] int64), best first; slots with no eligible item
    hold -inf / -1. Nothing reads back to the host: exclusions are scattered on the device.
    """
    if items.dim() != 2:
        raise ValueError(f"items must be [N,d], got shape {tuple(items.shape)}")
    N, d = items.shape
    dtype = score_dtype or items.dtype
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    default_chunk, default_block = _defaults(items.device)
    chunk_size = default_chunk if chunk_size is None else chunk_size
    block = default_block if block is None else block
    user_chunk = _user_chunk(items.device) if user_chunk is None else user_chunk
    _check_positive(chunk_size=chunk_size, user_chunk=user_chunk)
    if block < 0:
        raise ValueError(f"block must be >= 0 (0 = one-stage selection), got {block}")
    items = items.to(dtype)
    q = _as_heads(queries, d).to(device=items.device, dtype=dtype)
    B = q.shape[0]
    ex = _check_exclude(exclude, B, items.device)
    if B <= user_chunk:
        return _topk_block(q, items, k, ex, chunk_size, block)
    parts = [_topk_block(q[u : u + user_chunk], items, k, None if ex is None else ex[u : u + user_chunk],
                         chunk_size, block) for u in range(0, B, user_chunk)]
    return torch.cat([s for s, _ in parts]), torch.cat([i for _, i in parts])


def _topk_block(
    q: torch.Tensor, items: torch.Tensor, k: int, ex: torch.Tensor | None, chunk_size: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """exact_topk of one block of users: q [B,H,d] and items already in the scoring dtype."""
    B, N = q.shape[0], items.shape[0]
    best_s = torch.full((B, k), float("-inf"), dtype=items.dtype, device=items.device)
    best_i = torch.full((B, k), -1, dtype=torch.long, device=items.device)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        s = _chunk_scores(q, items, start, end, ex, dtype=None)
        if block and end - start >= 2 * block and k < block:
            s, cols = _block_topk(s, k, block)
        else:
            cols = None
        cs, ci = s.topk(min(k, s.shape[1]), dim=1)
        ci = ci if cols is None else cols.gather(1, ci)
        best_s, pick = torch.cat([best_s, cs], dim=1).topk(k, dim=1)
        best_i = torch.cat([best_i, ci + start], dim=1).gather(1, pick)
    best_i = best_i.masked_fill(best_s == float("-inf"), -1)
    return best_s.float(), best_i


@torch.no_grad()  # a count: nothing to differentiate, and no graph held over the chunks
def exact_ranks(
    queries: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    exclude: torch.Tensor | None = None,
    chunk_size: int = 65536,
    user_chunk: int | None = None,
    exclude_offset: float | None = None,
) -> torch.Tensor:
    """Full-corpus 1-based rank of each target, pessimistic on ties, exactly as
    karma.metrics.target_ranks on the full score matrix: 1 + the other, non-excluded items
    scoring at least the target's score; NaN scores count against the target, and a NaN target
    ranks last. The target itself is never excluded, even if it appears in `exclude`.
    With `exclude_offset` the `exclude` ids stay in the ranking with that much added to their
    scores (the target's too when it is one of them): model.seen_offset's score of the history.

    Chunked both ways, at most `user_chunk` users (default: 4,096 on CUDA, 1,024 on CPU)
    against `chunk_size` items at a time, so memory is O(user_chunk * chunk_size) (times H for
    multi-head queries) beyond the inputs and the [B] answer, whatever the number of users and
    items; never [B,N]. A block holds users whose targets lie in the same item chunk, so few
    users against many chunks make more, smaller blocks (at most B/user_chunk + N/chunk_size),
    doing the same arithmetic. Runs on the items' device."""
    if items.dim() != 2:
        raise ValueError(f"items must be [N,d], got shape {tuple(items.shape)}")
    N, d = items.shape
    q = _as_heads(queries, d).to(device=items.device, dtype=items.dtype)
    B = q.shape[0]
    t = torch.as_tensor(targets, device=items.device).long()
    if t.shape != (B,):
        raise ValueError(f"targets must be [B]=[{B}], got shape {tuple(t.shape)}")
    if B and (int(t.min()) < 0 or int(t.max()) >= N):
        raise ValueError(f"targets must lie in [0, {N})")
    user_chunk = _user_chunk(items.device) if user_chunk is None else user_chunk
    _check_positive(chunk_size=chunk_size, user_chunk=user_chunk)
    ex = _check_exclude(exclude, B, items.device)
    # Blocks of users whose targets share an item chunk: that chunk's one matmul gives both the
    # targets' scores and their competitors', so a tie (a duplicated item, say) is a tie bit
    # for bit (a matmul over other rows may round differently).
    home = t // chunk_size
    order = torch.argsort(home, stable=True)
    rank = torch.empty(B, dtype=torch.long, device=items.device)
    # one block's scores and comparisons live in these, reused by every block: a fresh
    # allocation of that size per chunk costs the CPU its page faults again each time
    cells = min(user_chunk, B) * min(chunk_size, N)
    scratch = (torch.empty(cells * q.shape[1], dtype=items.dtype, device=items.device),
               torch.empty(cells, dtype=torch.bool, device=items.device))
    first = 0
    for c, n in enumerate(torch.bincount(home, minlength=-(-N // chunk_size)).tolist()):
        for u in range(first, first + n, user_chunk):
            rows = order[u : min(u + user_chunk, first + n)]
            rank[rows] = _block_ranks(q[rows], items, t[rows], None if ex is None else ex[rows], c * chunk_size,
                                      chunk_size, scratch, exclude_offset)
        first += n
    return rank


def _block_ranks(
    q: torch.Tensor, items: torch.Tensor, t: torch.Tensor, ex: torch.Tensor | None, home: int, chunk_size: int,
    scratch: tuple[torch.Tensor, torch.Tensor], offset: float | None = None,
) -> torch.Tensor:
    """exact_ranks of a block of users whose targets all lie in the item chunk starting at `home`,
    as karma.metrics.target_ranks on the full score matrix:
    rank = 1 + #(items not below the target) - #(those among the target and its excluded ids),
    where "not below" (not s < target) is the pessimistic rule in one comparison: ties, NaN
    scores, and everything against a NaN target. The target and excluded ids are read back with
    a gather rather than masked in the scores, so an excluded item never counts, NaN or not.
    With `offset` the excluded ids are then counted back with their scores + offset."""
    N = items.shape[0]
    drop = t.unsqueeze(1) if ex is None else torch.cat([t.unsqueeze(1), ex], dim=1)
    drop = _unique_rows(drop)
    shifted = None
    if offset is not None and ex is not None:
        shifted = _unique_rows(ex)
        shifted = shifted.masked_fill(shifted == t.unsqueeze(1), -1)  # the target is counted once, as the floor
        t_shift = offset * (ex == t.unsqueeze(1)).any(dim=1, keepdim=True)
    not_below = torch.zeros(q.shape[0], dtype=torch.long, device=items.device)
    for start in [home, *(s for s in range(0, N, chunk_size) if s != home)]:
        end = min(start + chunk_size, N)
        s = _chunk_scores(q, items, start, end, None, out=scratch[0])
        if start == home:
            floor = s.gather(1, (t - start).unsqueeze(1))  # the targets' scores, [B,1]
            if shifted is not None:
                floor = floor + t_shift
        dropped = _not_below_at(s, drop, start, end, floor)
        below = torch.lt(s, floor, out=scratch[1][: s.numel()].view(s.shape)).sum(dim=1, dtype=torch.int32)
        not_below += (end - start) - below - dropped.sum(dim=1)
        if shifted is not None:
            not_below += _not_below_at(s, shifted, start, end, floor, offset).sum(dim=1)
    return 1 + not_below


def _unique_rows(ids: torch.Tensor) -> torch.Tensor:
    """Each row's ids sorted, each id once: a repeat becomes padding (-1)."""
    ids = ids.sort(dim=1).values
    ids[:, 1:].masked_fill_(ids[:, 1:] == ids[:, :-1], -1)
    return ids


def _not_below_at(s: torch.Tensor, ids: torch.Tensor, start: int, end: int, floor: torch.Tensor,
                  offset: float = 0.0) -> torch.Tensor:
    """[B,L] bool: ids (-1 = padding) inside items[start:end] whose score + offset is not below
    the row's floor (the pessimistic rule: ties and NaN count)."""
    local = ids - start
    inside = (local >= 0) & (local < end - start)
    return inside & ~(s.gather(1, local.clamp(0, end - start - 1)) + offset < floor)


def ranks_from_topk(ids: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> torch.Tensor:
    """1-based float64 rank of each target inside its top-K list; +inf when absent,
    which karma.metrics treats as a miss at every cutoff."""
    ids_t = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).long()
    t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
    t = t.long().to(ids_t.device)
    if ids_t.dim() != 2 or t.shape != (ids_t.shape[0],):
        raise ValueError(f"ids must be [B,K] and targets [B], got {tuple(ids_t.shape)} and {tuple(t.shape)}")
    hit = ids_t == t.unsqueeze(1)
    pos = hit.float().argmax(dim=1).double() + 1.0  # first hit
    return torch.where(hit.any(dim=1), pos, torch.full_like(pos, math.inf))


def _np32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class ItemIndex:
    """faiss inner-product index over item embeddings.

    kind="flat": exact (IndexFlatIP). kind="ivf": IndexIVFFlat with nlist clusters
    (default ~4*sqrt(N)) trained on the items themselves, nprobe probed per query.
    use_gpu: "auto" (GPU when faiss was built with it and sees one), True, False.
    """

    def __init__(
        self,
        item_emb: np.ndarray | torch.Tensor,
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        use_gpu: bool | str = "auto",
    ):
        import faiss

        x = _np32(item_emb)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"item_emb must be a non-empty [N,d] array, got shape {x.shape}")
        N, d = x.shape
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = nlist or max(1, int(round(4 * math.sqrt(N))))
            if not 1 <= nlist <= N:
                raise ValueError(f"nlist must be in [1, {N}], got {nlist}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.nprobe = min(nprobe, nlist)
        else:
            raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}")
        index.add(x)
        self._setup(index, use_gpu)

    @classmethod
    def load(cls, path: str, use_gpu: bool | str = "auto") -> "ItemIndex":
        import faiss

        self = cls.__new__(cls)
        self._setup(faiss.read_index(str(path)), use_gpu)
        return self

    def _setup(self, cpu_index, use_gpu: bool | str) -> None:
        import faiss

        if use_gpu not in ("auto", True, False):
            raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
        has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if use_gpu is True and not has_gpu:
            raise ValueError("use_gpu=True but this faiss build has no GPU support or sees no GPU")
        self.kind = "ivf" if faiss.try_extract_index_ivf(cpu_index) is not None else "flat"
        self._res = None
        if has_gpu and use_gpu in ("auto", True):
            self._res = faiss.StandardGpuResources()  # must outlive the GPU index
            self.index = faiss.index_cpu_to_gpu(self._res, 0, cpu_index)
            self.device = "cuda:0"
        else:
            self.index = cpu_index
            self.device = "cpu"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def save(self, path: str) -> None:
        import faiss

        idx = faiss.index_gpu_to_cpu(self.index) if self.device != "cpu" else self.index
        faiss.write_index(idx, str(path))

    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int,
        exclude: np.ndarray | torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per user: (scores [B,k] float32, ids [B,k] int64), best first.

        Each head is searched for k + L results (L = exclude width) so that after
        dropping excluded ids at least k remain; heads are merged by max score per
        item. Missing slots hold score -inf and id -1.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _np32(queries)
        if q.ndim == 2:
            q = q[:, None, :]
        if q.ndim != 3 or q.shape[2] != self.dim:
            raise ValueError(f"queries must be [B,{self.dim}] or [B,H,{self.dim}], got shape {q.shape}")
        B, H, d = q.shape
        ex = None
        if exclude is not None:
            ex = np.asarray(exclude.cpu() if isinstance(exclude, torch.Tensor) else exclude, dtype=np.int64)
            if ex.ndim != 2 or ex.shape[0] != B:
                raise ValueError(f"exclude must be [B,L] with B={B}, got shape {ex.shape}")
        kk = min(k + (ex.shape[1] if ex is not None else 0), self.ntotal)
        if self.device != "cpu" and kk > 2048:  # faiss GPU k-selection limit
            raise ValueError(f"k + exclude width must be <= 2048 on a GPU index, got {kk}")
        D, I = self.index.search(np.ascontiguousarray(q.reshape(B * H, d)), kk)
        D = D.reshape(B, H * kk).astype(np.float32)
        I = I.reshape(B, H * kk).astype(np.int64)
        bad = I < 0
        if ex is not None:
            # row-wise membership via one isin on (row, id) keys
            rows = np.arange(B, dtype=np.int64)[:, None]
            stride = np.int64(self.ntotal + 1)
            ex_keys = (rows * stride + ex)[ex >= 0]
            bad |= np.isin(rows * stride + I, ex_keys)
        if H > 1:
            # keep each item once per user, at its best head: order by score, then a
            # stable sort by id puts each id's best copy first
            o = np.argsort(-D, axis=1, kind="stable")
            Is = np.take_along_axis(I, o, 1)
            o2 = np.argsort(Is, axis=1, kind="stable")
            Iss = np.take_along_axis(Is, o2, 1)
            dup_sorted = np.zeros_like(Iss, dtype=bool)
            dup_sorted[:, 1:] = Iss[:, 1:] == Iss[:, :-1]
            dup = np.empty_like(dup_sorted)
            np.put_along_axis(dup, np.take_along_axis(o, o2, 1), dup_sorted, 1)
            bad |= dup
        D[bad] = -np.inf
        I[bad] = -1
        top = np.argsort(-D, axis=1, kind="stable")[:, :k]
        S, ids = np.take_along_axis(D, top, 1), np.take_along_axis(I, top, 1)
        if S.shape[1] < k:  # corpus smaller than k
            pad = k - S.shape[1]
            S = np.pad(S, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return S, ids


def evaluate_retrieval(
    queries: np.ndarray | torch.Tensor,
    item_emb: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (10, 50, 200),
    index: ItemIndex | None = None,
    exclude: np.ndarray | torch.Tensor | None = None,
    chunk_size: int = 65536,
    target_counts: np.ndarray | None = None,
    tail_threshold: int = TAIL_THRESHOLD,
    user_chunk: int | None = None,
) -> dict[str, float | int]:
    """HR@k / NDCG@k and MRR from exact chunked full-corpus ranks (pessimistic ties, any torch
    device, no faiss needed); with an `index`, HR@k / NDCG@k come from its top-max(ks) search
    instead (what an approximate serving index would retrieve), MRR stays exact.
    With `target_counts` (every item's training-target count), also the long-tail breakdown
    (`tail/...`, karma.metrics.long_tail_report) from the same exact ranks.

    Users are scored `user_chunk` at a time (exact_ranks' default per device), the index
    searched as many at a time, so memory beyond the inputs and one rank per user does not
    grow with the number of users.
    A target is always rankable: it is removed from its own exclude row first.
    """
    items_t = item_emb if isinstance(item_emb, torch.Tensor) else torch.from_numpy(_np32(item_emb))
    q_t = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(_np32(queries))
    # a copy: targets often come read-only from Parquet/Arrow, which torch warns about
    t = torch.as_tensor(np.array(targets, dtype=np.int64) if not isinstance(targets, torch.Tensor) else targets).long()
    if q_t.shape[0] != t.shape[0] or t.dim() != 1:
        raise ValueError(f"targets must be [B] with B={q_t.shape[0]}, got shape {tuple(t.shape)}")
    if not ks:
        raise ValueError("ks must name at least one cutoff")
    ex = None
    if exclude is not None:
        ex = torch.as_tensor(np.asarray(exclude) if not isinstance(exclude, torch.Tensor) else exclude).long()
        if ex.dim() != 2 or ex.shape[0] != t.shape[0]:
            raise ValueError(f"exclude must be [B,L] with B={t.shape[0]}, got shape {tuple(ex.shape)}")
        ex = ex.masked_fill(ex == t.to(ex.device).unsqueeze(1), -1)
    if index is not None and index.ntotal != items_t.shape[0]:
        raise ValueError(f"index holds {index.ntotal} items but item_emb has {items_t.shape[0]}")
    user_chunk = _user_chunk(items_t.device) if user_chunk is None else user_chunk
    exact = exact_ranks(q_t.to(items_t.device), items_t, t, None if ex is None else ex, chunk_size, user_chunk)
    out = ranking_report(exact.double().cpu(), ks)
    if index is not None:
        ex_np = None if ex is None else ex.cpu().numpy()
        found = [ranks_from_topk(index.search(q_t[u : u + user_chunk], max(ks),
                                              None if ex_np is None else ex_np[u : u + user_chunk])[1],
                                 t[u : u + user_chunk]) for u in range(0, t.shape[0], user_chunk)]
        out.update({k: v for k, v in ranking_report(torch.cat(found), ks).items() if k != "MRR"})
    out["n_queries"] = int(t.shape[0])
    if target_counts is not None:
        out.update(long_tail_report(exact, np.asarray(target_counts)[t.cpu().numpy()], tail_threshold, tuple(ks)))
    return out
