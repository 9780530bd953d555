"""Fused path of the trust-ratio optimizers (Triton). Imported only when a fused step runs.

Nothing here knows an algorithm: each optimizer's :class:`~bigbatch.optim._base.FusedSpec` names
its table layout (``"chunks"`` or ``"tiles"``), the reduction that layout carries between the
passes (``"sum"`` or ``"max"``) and the function that launches its kernels on a pack
(LARS / LAMB / MERIT: ``kernels.launch_lars`` / ``launch_lamb`` / ``launch_merit``).

A *pack* is one param group's parameters of one dtype (and one shard group, under FSDP2). On
first use it moves their state into flat float32 buffers (moments, master weights) and a step
vector, and leaves ``optimizer.state`` entries as views into them (DTensors over such views for
sharded parameters), so ``state_dict`` / ``load_state_dict`` and the reference path keep working
unchanged. Per step the host work is: gather the gradients' data pointers (a list
comprehension; uploaded only when they changed, asynchronously from pinned memory on CUDA), zero
the reduction buffers (one memset per pack), and launch pass 1 (with the tile layout's reduce
kernel) and pass 2 of each pack (kernels in ``kernels.py``). No host synchronisation, except ``nonfinite="raise"``,
which reads one flag after the step to raise.

FSDP2 (DTensor parameters placed ``Shard(0)``, other mesh dims ``Replicate``): the kernels run on
the rank-local shards; between the passes each pack all-reduces its per-tensor partial results
over the shard group in one collective (the chunk layout's sums of squares: SUM; the tile layout's
column and whole-tensor maxima: MAX on the int32 float bits — rows are complete locally, since dim
0 is the sharded one), and the non-finite flag is all-reduced (MAX) so every rank skips together.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (how the kernels are tested without a GPU).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import Tensor

from bigbatch.optim._common import all_finite, is_dtensor, local, tensor_norms
from bigbatch.optim._fused import kernels as K

__all__ = ["fused_step", "shard_group"]

_PDT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ALIGN = 4  # flat-buffer offsets are multiples of 4 elements (16 bytes): vector loads (kernels.VEC)


def shard_group(p: Tensor) -> Any:
    """The process group ``p``'s values are split over (its one ``Shard(0)`` mesh dim), else None."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard

    dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    return p.device_mesh.get_group(dims[0]) if dims else None


def _upload(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _ptr_table(tensors: list[Tensor], device: torch.device) -> Tensor:
    return _upload(torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64), device)


def _aligned(tensors: list[Tensor]) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _chunks(numels: list[int], block: int) -> tuple[Tensor, Tensor]:
    tid, start = [], []
    for i, n in enumerate(numels):
        k = max(1, -(-n // block))
        tid += [i] * k
        start += [j * block for j in range(k)]
    return torch.tensor(tid, dtype=torch.int32), torch.tensor(start, dtype=torch.int64)


def _as_state(view: Tensor, p: Tensor) -> Tensor:
    """``view`` (a slice of a flat buffer, shaped like ``p``'s local shard) as ``p``'s state entry."""
    if not is_dtensor(p):
        return view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(view, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def _resolve(spec: str) -> Callable[..., None]:
    mod, _, name = spec.partition(":")
    return getattr(importlib.import_module(mod), name)


class _Pack:
    """One pack's buffers and tables. The launch function of the optimizer's
    :class:`~bigbatch.optim._base.FusedSpec` reads these public fields:

    ``p_table``, ``g_table`` (int64 pointers), ``bufs`` (``state_keys`` → flat float32 buffer),
    ``master`` (or None), ``master_arg`` (``master``, or a dummy tensor when there is none),
    ``off``, ``numel``, ``steps`` (float32 per tensor), ``pdt`` (0 float32, 1 bf16, 2 fp16),
    ``vec`` (the VEC constexpr for this step), ``warps``; with ``tables="chunks"``: ``ch_tid``,
    ``ch_start``, ``block``, ``acc`` (float32 ``[2 * n]`` sums); with ``tables="tiles"``: ``meta``,
    ``t_tid``/``t_r``/``t_i``/``t_j``, ``n_tiles``, ``n_vec_tiles``, ``bm``, ``bn``, ``part``,
    ``maxbuf``, ``items``, ``n_items``, ``pch``, ``rc`` (see ``kernels.py``'s layout comments).
    A launch may keep per-step values of its own on the pack (``pack.bc``: LAMB's bias corrections).
    """

    def __init__(self, opt: Any, group: dict, params: list[Tensor]) -> None:
        locs = [local(p) for p in params]
        dev = locs[0].device
        for p in locs:
            if not p.is_contiguous():
                raise ValueError("the fused path needs contiguous parameters; pass fused=False")
        self.spec = opt.fused_spec
        self.launch_fn = _resolve(self.spec.launch)
        self.params = params
        self.sharded = is_dtensor(params[0])
        self.pg = shard_group(params[0])  # all-reduce group (None: nothing to reduce)
        self.pdt = _PDT[locs[0].dtype]
        numels = [p.numel() for p in locs]
        offs, o = [], 0
        for n in numels:
            offs.append(o)
            o += -(-n // _ALIGN) * _ALIGN
        total = max(o, 1)
        self.n = len(params)
        self.off = torch.tensor(offs, dtype=torch.int64, device=dev)
        self.numel = torch.tensor(numels, dtype=torch.int64, device=dev)
        self.p_key = self.param_key()
        self.p_table = _ptr_table(locs, dev)
        self.g_key: tuple = ()
        self.g_table: Tensor | None = None
        self.g_aligned = False

        states = [opt.init_state(p, group) for p in params]
        keys = opt.state_keys
        self.bufs = {k: torch.zeros(total, dtype=torch.float32, device=dev) for k in keys}
        has_master = "master" in states[0]
        self.master = torch.zeros(total, dtype=torch.float32, device=dev) if has_master else None
        self.steps = torch.tensor([float(st["step"]) for st in states], dtype=torch.float32, device=dev)
        for i, (p, lp, st, o, n) in enumerate(zip(params, locs, states, offs, numels)):
            for k in (*keys, "master") if has_master else keys:
                flat = self.master if k == "master" else self.bufs[k]
                view = flat[o:o + n].view_as(lp)
                view.copy_(local(st[k]))
                st[k] = _as_state(view, p)
            st["step"] = self.steps[i]  # 0-d view: pass 2's counter update shows in state_dict

        # The layout's tables and its reduction buffers: ``red`` is zeroed before pass 1,
        # ``reduced`` (a part of it) is what the shard group all-reduces with ``red_op``.
        if self.spec.tables == "tiles":
            self._tile_tables(locs, dev)
        else:
            self._chunk_tables(numels, dev)
        self.red_op = self.spec.reduction
        self.vec_shape = self.vec_shape and _aligned(locs) and (self.master is None or _aligned([self.master]))

    @property
    def master_arg(self) -> Tensor:
        """``master``, or a dummy tensor for the kernels' MASTER argument when there is none."""
        return self.master if self.master is not None else self.steps

    @property
    def vec(self) -> bool:
        """This step's VEC constexpr: aligned shapes, parameters and (this step's) gradients."""
        return self.vec_shape and self.g_aligned

    def _chunk_tables(self, numels: list[int], dev: torch.device) -> None:
        self.block, self.warps = K.BLOCK, K.BLOCK_WARPS  # the chunk tables are built for this block
        tid, start = _chunks(numels, self.block)
        self.ch_tid, self.ch_start = tid.to(dev), start.to(dev)
        self.acc = torch.zeros(2 * self.n, dtype=torch.float32, device=dev)
        self.red = self.reduced = self.acc
        self.vec_shape = all(n % _ALIGN == 0 for n in numels)

    def _tile_tables(self, params: list[Tensor], dev: torch.device) -> None:
        BM, BN = self.bm, self.bn = K.TILE_M, K.TILE_N
        self.warps = K.TILE_WARPS
        PCH, RC = self.pch, self.rc = K.RED_PARTS, K.RED_COLS
        shapes = []
        tiles: tuple[list, list] = ([], [])  # (tensors the VEC variant can take, the others)
        for k, p in enumerate(params):
            if p.dim() >= 2:
                d0, d1 = p.shape[0], p.shape[1]
                rest = p.numel() // (d0 * d1) if d0 * d1 else 1
                s0, s1, vec = d1 * rest, rest, 0
                vec_ok = rest == 1 and d1 % _ALIGN == 0 and (BM + 1) * d1 < 2**31
            else:  # a vector is laid out as rows of BN; only its whole-tensor max is used
                rest, d1 = 1, BN
                d0, s0, s1, vec = max(1, -(-p.numel() // BN)), BN, 1, 1
                vec_ok = p.numel() % _ALIGN == 0
            shapes.append((d0, d1, s0, s1, vec, rest))
            n_rt, n_ct = -(-d0 // BM), -(-d1 // BN)
            tiles[0 if vec_ok else 1].extend(
                (k, r, it * BM, jt * BN) for r in range(rest) for it in range(n_rt) for jt in range(n_ct))
        # Tiles of VEC-able tensors first: pass 1 / 2 launch them with VEC=True and the rest with
        # VEC=False (one launch over all tiles with VEC=False when a pointer is misaligned).
        self.n_vec_tiles = len(tiles[0])
        self.vec_shape = True
        # Final maxima, int32 float bits in one buffer (one memset clears it):
        #   [row w | row u | col w | col u | tot w | tot u]; the part that FSDP all-reduces (columns and
        #   totals) is contiguous at the end.  Partials (float32, no zeroing: every entry is rewritten):
        #   [prow w | prow u | pcol w | pcol u], rows [n_col_tiles, rest, d0], cols [n_row_tiles, rest, d1].
        R = sum(s[0] * s[5] for s in shapes)
        C = sum(s[1] * s[5] for s in shapes if not s[4])
        PR = sum(-(-s[1] // BN) * s[5] * s[0] for s in shapes)
        PC = sum(-(-s[0] // BM) * s[5] * s[1] for s in shapes if not s[4])
        meta, items = [], []
        ro = co = pro = pco = 0
        for k, (d0, d1, s0, s1, vec, rest) in enumerate(shapes):
            n_rt, n_ct = -(-d0 // BM), -(-d1 // BN)
            row_w, row_u, prow_w, prow_u = ro, R + ro, pro, PR + pro
            col_w, col_u = 2 * R + co, 2 * R + C + co
            pcol_w, pcol_u = 2 * PR + pco, 2 * PR + PC + pco
            tot_w, tot_u = 2 * R + 2 * C + k, 2 * R + 2 * C + self.n + k
            meta.append([d0, d1, s0, s1, vec, rest, row_w, row_u, col_w, col_u, tot_w, tot_u,
                         prow_w, prow_u, pcol_w, pcol_u])
            # Reduce items: [parts, positions] blocks; the whole-tensor max rides on the column items
            # of a matrix (they cover every element) and on the row items of a vector.
            folds = [(prow_w, prow_u, n_ct, rest * d0, row_w, row_u, vec == 1)]
            if not vec:
                folds.append((pcol_w, pcol_u, n_rt, rest * d1, col_w, col_u, True))
            for sw, su, nparts, npos, dw, du, tot in folds:
                for p0 in range(0, nparts, PCH):
                    for pos0 in range(0, npos, RC):
                        items.append([sw + p0 * npos, su + p0 * npos, min(PCH, nparts - p0), npos, pos0, npos,
                                      dw, du, tot_w if tot else -1, tot_u if tot else -1])
            ro, pro = ro + rest * d0, pro + n_ct * rest * d0
            if not vec:
                co, pco = co + rest * d1, pco + n_rt * rest * d1
        self.meta = torch.tensor(meta, dtype=torch.int64).reshape(-1).to(dev)
        self.items = torch.tensor(items, dtype=torch.int64).reshape(-1).to(dev)
        self.n_items = len(items)
        tt = torch.tensor(tiles[0] + tiles[1], dtype=torch.int32).reshape(-1, 4).t().contiguous().to(dev)
        self.t_tid, self.t_r, self.t_i, self.t_j = tt
        self.n_tiles = tt.shape[1]
        self.maxbuf = torch.zeros(2 * R + 2 * C + 2 * self.n, dtype=torch.int32, device=dev)
        self.red, self.reduced = self.maxbuf, self.maxbuf[2 * R:]  # FSDP all-reduces columns and totals (MAX)
        self.part = torch.empty(max(2 * PR + 2 * PC, 1), dtype=torch.float32, device=dev)

    def set_grads(self) -> list[Tensor]:
        """Point the gradient table at this step's gradients; returns what must stay alive until launch."""
        grads = [p.grad for p in self.params]
        if self.sharded:
            grads = [g.to_local() for g in grads]
        key = tuple(g.data_ptr() for g in grads)
        if key == self.g_key:  # the caching allocator usually hands back the same blocks
            return grads
        for p, g in zip(self.params, grads):
            if g.dtype != p.dtype:
                raise ValueError(f"fused path needs grad dtype == param dtype, got {g.dtype} vs {p.dtype}")
        if all(g.is_contiguous() for g in grads):
            self.g_key = key
        else:  # contiguous copies, new every step: the table is rebuilt every step
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
            self.g_key = ()
        self.g_table = _ptr_table(grads, grads[0].device)
        self.g_aligned = _aligned(grads)
        return grads

    def param_key(self) -> tuple:
        """The parameters' storage: a pack is rebuilt when it moved (``model.to()``, a new FSDP shard)."""
        if self.sharded:
            return tuple(p.to_local().data_ptr() for p in self.params)
        return tuple(p.data_ptr() for p in self.params)

    def zero(self) -> None:
        self.red.zero_()

    def all_reduce(self) -> None:
        """Complete the per-tensor reductions across the shard group (one collective, no host sync)."""
        if self.pg is None or not self.reduced.numel():
            return
        import torch.distributed as dist

        op = dist.ReduceOp.MAX if self.red_op == "max" else dist.ReduceOp.SUM
        dist.all_reduce(self.reduced, op=op, group=self.pg)

    def launch(self, group: dict, pass_: int, flag: Tensor, gscale: Tensor | None) -> None:
        self.launch_fn(self, group, pass_, flag, gscale)


def _plan(opt: Any, cache: Any, fused_groups: list) -> list[tuple[dict, _Pack]]:
    """The packs of this step, cached in ``cache.packs`` (the optimizer clears it whenever the state is swapped)."""
    sig = tuple(id(p) for _, ps in fused_groups for p in ps)
    plan = cache.packs.get("plan")
    if plan is not None and plan[0] == sig and all(pk.p_key == pk.param_key() for _, pk in plan[1]):
        return plan[1]
    index = {id(g): i for i, g in enumerate(opt.param_groups)}
    out = []
    for group, params in fused_groups:
        by_kind: dict[tuple, list[Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.dtype, id(shard_group(p))), []).append(p)
        for ps in by_kind.values():
            key = (index[id(group)], ps[0].dtype, tuple(id(p) for p in ps))
            pack = cache.packs.get(key)
            if pack is None or pack.p_key != pack.param_key():
                pack = _Pack(opt, group, ps)
                cache.packs[key] = pack
            out.append((group, pack))
    cache.packs["plan"] = (sig, out)
    return out


def fused_step(opt: Any, cache: Any, fused_groups: list, run_reference: bool,
               ref_grads: list[Tensor] | None = None) -> Tensor:
    """One fused step over ``fused_groups``; returns the device flag (nonzero: step skipped).

    ``opt`` is read through public names only (``fused_spec``, ``state_keys``, ``init_state``,
    ``grad_prenorm``, ``nonfinite``, ``param_groups``); ``cache`` is its
    :class:`bigbatch.optim._base.FusedCache`."""
    dev = local(fused_groups[0][1][0]).device
    if cache.skipped is None or cache.skipped.device != dev:
        cache.flag = torch.zeros(1, dtype=torch.int32, device=dev)
        cache.skipped = torch.zeros((), dtype=torch.float32, device=dev)
    flag = cache.flag
    flag.zero_()
    if ref_grads:  # non-fused groups in the same optimizer: one verdict for the whole step
        flag.copy_((~all_finite(ref_grads)).to(torch.int32).to(dev).reshape(1))
    packs = _plan(opt, cache, fused_groups)
    keep = [pack.set_grads() for _, pack in packs]  # alive until the kernels have been queued
    gscale = None
    if opt.grad_prenorm is not None:
        c = opt.grad_prenorm
        all_grads = [p.grad for _, pack in packs for p in pack.params]
        gscale = (c / torch.clamp(tensor_norms(all_grads).square().sum().sqrt(), min=c)).reshape(1).to(dev)
    for _, pack in packs:
        pack.zero()
    for group, pack in packs:
        pack.launch(group, 1, flag, gscale)
    groups = {}
    for _, pack in packs:
        pack.all_reduce()
        if pack.pg is not None:
            groups[id(pack.pg)] = pack.pg
    if groups:  # a nan/inf gradient on any rank skips the step on every rank
        import torch.distributed as dist

        for pg in groups.values():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
    for group, pack in packs:
        pack.launch(group, 2, flag, gscale)
    del keep
    skipped = (flag != 0).to(torch.float32)
    for _, pack in packs:
        pack.steps.add_(1.0 - skipped)
    cache.skipped.add_(skipped[0])
    if opt.nonfinite == "raise" and bool(flag.item()):
        cache.skipped.sub_(1.0)
        raise FloatingPointError(
            f"{type(opt).__name__}: non-finite (nan/inf) gradient; the step was not applied and the "
            "optimizer state is unchanged (pass nonfinite='skip' to skip such steps)"
        )
    return flag
