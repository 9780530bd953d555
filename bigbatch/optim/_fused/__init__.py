"""Fused path for LARS / LAMB / MERIT (Triton). Imported only when a fused step runs.

A *pack* is one param group's parameters of one dtype (and one shard group, under FSDP2). On
first use it moves their state into flat float32 buffers (moments, master weights) and a step
vector, and leaves ``optimizer.state`` entries as views into them (DTensors over such views for
sharded parameters), so ``state_dict`` / ``load_state_dict`` and the reference path keep working
unchanged. Per step the host work is: gather the gradients' data pointers (a list
comprehension; uploaded only when they changed, asynchronously from pinned memory on CUDA), zero
the reduction buffers (one memset per pack), and launch pass 1, MERIT's reduce kernel and pass 2
of each pack (kernels in ``kernels.py``). No host synchronisation, except ``nonfinite="raise"``,
which reads one flag after the step to raise.

FSDP2 (DTensor parameters placed ``Shard(0)``, other mesh dims ``Replicate``): the kernels run on
the rank-local shards; between the passes each pack all-reduces its per-tensor partial results
over the shard group in one collective (LARS/LAMB sums of squares: SUM; MERIT column and
whole-tensor maxima: MAX on the int32 float bits — rows are complete locally, since dim 0 is the
sharded one), and the non-finite flag is all-reduced (MAX) so every rank skips together.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (how the kernels are tested without a GPU).
"""

from __future__ import annotations

from typing import Any

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


class _Pack:
    def __init__(self, opt: Any, group: dict, params: list[Tensor]) -> None:
        locs = [local(p) for p in params]
        dev = locs[0].device
        for p in locs:
            if not p.is_contiguous():
                raise ValueError("the fused path needs contiguous parameters; pass fused=False")
        self.algo = opt.algorithm
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

        if self.algo == "merit":
            self._merit_tables(locs, dev)
        else:
            self.block, self.warps = K.BLOCK, K.BLOCK_WARPS  # the chunk tables are built for this block
            tid, start = _chunks(numels, self.block)
            self.ch_tid, self.ch_start = tid.to(dev), start.to(dev)
            self.acc = torch.zeros(2 * self.n, dtype=torch.float32, device=dev)
            self.vec_shape = all(n % _ALIGN == 0 for n in numels)
        self.vec_shape = self.vec_shape and _aligned(locs) and (self.master is None or _aligned([self.master]))

    def _merit_tables(self, params: list[Tensor], dev: torch.device) -> None:
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
        self.reduced = self.maxbuf[2 * R:]  # what FSDP all-reduces (MAX)
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
        (self.maxbuf if self.algo == "merit" else self.acc).zero_()

    def all_reduce(self) -> None:
        """Complete the per-tensor reductions across the shard group (one collective, no host sync)."""
        if self.pg is None:
            return
        import torch.distributed as dist

        if self.algo == "merit":
            if self.reduced.numel():
                dist.all_reduce(self.reduced, op=dist.ReduceOp.MAX, group=self.pg)
        else:
            dist.all_reduce(self.acc, op=dist.ReduceOp.SUM, group=self.pg)

    def launch(self, group: dict, pass_: int, flag: Tensor, gscale: Tensor | None) -> None:
        master = self.master if self.master is not None else self.steps  # dummy when unused
        vec = self.vec_shape and self.g_aligned
        if self.algo == "lamb":
            b1, b2 = group["betas"]
            clip = group["trust_clip"]
            if pass_ == 1:  # (1 − β1^t, √(1 − β2^t)) per tensor, in float64: no host sync, no cancellation
                t = self.steps.double() + 1
                self.bc = torch.stack([1 - torch.pow(b1, t), (1 - torch.pow(b2, t)).sqrt()], 1).float().reshape(-1)
            K.lamb_kernel[(self.ch_tid.numel(),)](
                self.p_table, self.g_table, self.bufs["exp_avg"], self.bufs["exp_avg_sq"], master,
                self.off, self.numel, self.bc, self.ch_tid, self.ch_start, self.acc, flag,
                gscale if gscale is not None else self.steps,
                float(group["lr"]), b1, b2, 1.0 - b1, 1.0 - b2, group["eps"], group["weight_decay"],
                clip[0] if clip else 0.0, clip[1] if clip else 0.0,
                PASS=pass_, BIAS=group["bias_correction"], ADAPT=group["adapt"], CLIP=clip is not None,
                HAS_MASTER=self.master is not None, HAS_GSCALE=gscale is not None, PDT=self.pdt, VEC=vec,
                BLOCK=self.block, num_warps=self.warps,
            )
        elif self.algo == "lars":
            lr = float(group["lr"])
            lr_in, lr_out = (lr, 1.0) if group.get("momentum_convention", "paper") == "paper" else (1.0, lr)
            K.lars_kernel[(self.ch_tid.numel(),)](
                self.p_table, self.g_table, self.bufs["momentum_buffer"], master, self.off, self.numel,
                self.ch_tid, self.ch_start, self.acc, flag,
                lr, lr_in, lr_out, group["momentum"], group["weight_decay"], group["trust_coefficient"], group["eps"],
                PASS=pass_, ADAPT=group["adapt"], CLIP=group["clip"], NESTEROV=group["nesterov"],
                HAS_MOM=group["momentum"] != 0, HAS_MASTER=self.master is not None, PDT=self.pdt, VEC=vec,
                BLOCK=self.block, num_warps=self.warps,
            )
        else:
            b1, b2 = group["betas"]
            nv = self.n_vec_tiles if vec else 0
            for first, count, v in ((0, nv, True), (nv, self.n_tiles - nv, False)):
                if count == 0:
                    continue
                K.merit_kernel[(count,)](
                    self.p_table, self.g_table, self.bufs["exp_avg"], self.bufs["exp_avg_sq"], master,
                    self.off, self.numel, self.meta, self.t_tid, self.t_r, self.t_i, self.t_j, first,
                    self.part, self.maxbuf, flag,
                    float(group["lr"]), b1, b2, 1.0 - b1, 1.0 - b2, group["eps"], group["weight_decay"],
                    PASS=pass_, ADAPT=group["adapt"], HAS_MASTER=self.master is not None, PDT=self.pdt, VEC=v,
                    BM=self.bm, BN=self.bn, num_warps=self.warps,
                )
            if pass_ == 1 and group["adapt"] and self.n_items:
                K.merit_reduce_kernel[(self.n_items,)](
                    self.part, self.maxbuf, self.items, PCH=self.pch, RR=K.RED_ROWS, RC=self.rc, num_warps=4,
                )


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

    ``opt`` is read through public names only (``algorithm``, ``state_keys``, ``init_state``,
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
