"""The fused Triton kernels of every registry entry that has them (LARS, LAMB, MERIT and the
extension ``tests/ext_fused_optim.py``, see ``_fused_registry.py``) run on CPU under Triton's
interpreter (``TRITON_INTERPRET=1``) and must match the foreach reference path.

Each case runs in a fresh subprocess: the interpreter is chosen when ``triton.jit`` decorates the
kernels, so the variable must be set before they are imported. Small tile sizes (set through the
module-level constants in ``bigbatch.optim._fused.kernels``) make a few-thousand-element tensor
span many tiles in both directions and several reduce chunks, so the partial-max reduction across
tiles is exercised; one case keeps the real tile sizes. Skipped without Triton, except where
``BIGBATCH_REQUIRE_TRITON=1`` (CI: ``.ci/run`` installs Triton and sets it), where it must run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("BIGBATCH_REQUIRE_TRITON") == "1":
    import triton  # noqa: F401  (CI: a missing Triton fails here instead of skipping every kernel test)
else:
    pytest.importorskip("triton")

from _fused_registry import default_kwargs, extensions_registered, fused_names, register_extensions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL_TILES = {"TILE_M": 4, "TILE_N": 8, "RED_PARTS": 4, "RED_ROWS": 2, "RED_COLS": 8, "BLOCK": 64}


def _run(which: str, **kw) -> dict:
    # The caller's PYTHONPATH stays behind ROOT (Triton may live there, outside the venv).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, __file__, which, json.dumps(kw)], capture_output=True, text=True, env=env,
                       check=False, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


FUSED = fused_names()  # the registry's fused entries: "lars", "lamb", "merit", "fromage"
with extensions_registered():
    # Case name → (registry name, constructor arguments). Every entry gets a case under its own
    # name (the registry's defaults, unless one is written here); the variants are further cases.
    CASES = {name: (name, default_kwargs(name)) for name in FUSED}
CASES.update({
    "lars": ("lars", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "trust_coefficient": 0.01}),
    "lars_nesterov_clip": ("lars", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True, "clip": True}),
    "lars_plain": ("lars", {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}),
    "lars_torch": ("lars", {"lr": 0.7, "momentum": 0.9, "weight_decay": 1e-4, "trust_coefficient": 0.01,
                            "momentum_convention": "torch"}),
    "lars_torch_nesterov_clip": ("lars", {"lr": 0.7, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True,
                                          "clip": True, "momentum_convention": "torch"}),
    "lamb": ("lamb", {"lr": 1e-2, "weight_decay": 0.01}),
    "lamb_clip_prenorm": ("lamb", {"lr": 1e-2, "weight_decay": 0.01, "bias_correction": False, "trust_clip": (0.01, 5.0),
                                       "grad_prenorm": 1.0}),
    "merit": ("merit", {"lr": 1e-2, "weight_decay": 0.01}),
    "merit_b95": ("merit", {"lr": 1e-2, "weight_decay": 0.0, "betas": (0.9, 0.95)}),
    "fromage_wd": ("fromage", {"lr": 0.05, "weight_decay": 1e-3}),
})
# The non-finite case of each entry (its plain case unless written here).
NONFINITE = {"lars": {"lr": 0.1, "momentum": 0.9}, "lamb": {"lr": 1e-2}, "merit": {"lr": 1e-2, "weight_decay": 0.01}}
FSDP = {"lamb": {"lr": 0.05, "grad_prenorm": 0.5}, "lars": {"lr": 0.5, "momentum": 0.9, "trust_coefficient": 0.02},
        "merit": {"lr": 0.05}}  # the FSDP case of each entry (its plain case unless written here)


def test_the_registry_drives_the_cases():
    # The extension (one file: module + record) is among the entries every case runs over.
    assert {"lars", "lamb", "merit", "fromage"} <= set(FUSED), FUSED
    assert set(FUSED) <= {algo for algo, _ in CASES.values()}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_foreach_small_tiles(case):
    res = _run("parity", case=case, tiles=SMALL_TILES, steps=4)
    assert res["vec_packs"] >= 1 and res["scalar_packs"] >= 1, res  # both index-math variants ran
    for name, err in res["errs"].items():
        assert err <= 1e-6, (name, err)


@pytest.mark.parametrize("case", ["lars", "lars_torch", "lars_torch_nesterov_clip"])
def test_fused_lars_momentum_conventions_across_an_lr_drop(case):
    # The two conventions differ only once the LR changes: drop it 10x halfway (0.7 -> 0.07) and
    # the fused kernel must still follow the foreach path (itself checked against float64
    # references of both conventions in test_optim_conventions.py).
    res = _run("parity", case=case, tiles=SMALL_TILES, steps=6, lr_drop_at=3)
    for name, err in res["errs"].items():
        assert err <= 1e-6, (name, err)


@pytest.mark.parametrize("case", FUSED)
def test_fused_matches_foreach_real_tiles(case):
    res = _run("parity", case=case, tiles={}, steps=2, big=True)
    for name, err in res["errs"].items():
        assert err <= 1e-6, (name, err)


@pytest.mark.parametrize("algo", FUSED)
def test_fused_nonfinite_skip_and_raise_leave_state_untouched(algo):
    res = _run("nonfinite", algo=algo, tiles=SMALL_TILES)
    assert res["raised"] and res["skipped_steps"] == 1, res
    assert res["unchanged"], res
    for name, err in res["errs"].items():  # and the run goes on exactly like the reference
        assert err <= 1e-6, (name, err)


@pytest.mark.parametrize("which", ["row", "vector", "mixed"])
def test_fused_merit_subnormal_momentum_gives_finite_exact_step(which):
    # test_optim_reference's dead-unit cases on the fused kernel: a subnormal momentum row must not
    # make the trust ratio overflow (0 · inf = NaN); the step equals the float64 equations.
    # "mixed": a 37 x 21 matrix over 10 x 3 small tiles, one dead row and one dead column, so tiles
    # with rescaled (tiny) denominators and tiles without them run in one launch.
    res = _run("subnormal", shape=which, tiles=SMALL_TILES if which == "mixed" else {})
    assert res["finite"], res
    # Subnormal u carries ~1e-5 relative precision in float32, so against the float64 equations a
    # dead row's step (up to lr = 0.1) agrees to ~1e-6; against the float32 foreach path, closer.
    assert res["err"] <= 2e-6, res
    assert res["err_foreach"] <= 5e-7, res


def test_fused_fsdp2_step_equals_unsharded_step():
    """FSDP2 (``fully_shard``, 2 gloo processes): the fused kernels on the local shards, with the
    per-tensor sums / maxima all-reduced between the passes, equal the unsharded step. Shards are
    uneven and one is empty; unsupported placements fall back to foreach with a warning."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    res = _run("fsdp", tiles=SMALL_TILES)
    assert res["fused_packs_sharded"] >= len(FUSED), res  # the fused path really ran on the shards
    assert res["fallback_warned"] and res["fused_true_refused"], res
    for name, err in res["errs"].items():
        assert err <= 1e-6, (name, err)


# ------------------------------------------------------------------------------ subprocess side
# Shapes: rows × cols not multiples of the tiles; (37, 21) spans 10 × 3 small tiles, so its
# column maxima fold 10 partials in 3 reduce chunks. The second group is "vector-friendly" (rows
# of a multiple of 4, 16-byte aligned): it runs the VEC variant. ZERO_W starts at 0, ZERO_G's
# gradient is always 0 (both: trust ratio 1).
GROUPS = [
    [(37, 21), (5,), (9, 4, 3), (3, 2, 2, 2), (130,), (6, 7)],
    [(24, 16), (44,), (13, 8)],
    [(11,), (3,)],  # adapt=False, no weight decay (how param_groups treats 1-D parameters)
]
BIG = [[(300, 200), (70, 260), (1000,)], [(5, 3)], [(130,)]]
ZERO_W, ZERO_G = (0, 2), (1, 2)


def _make(groups, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for gi, shapes in enumerate(groups):
        ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        out.append(ps)
    if len(groups[0]) > ZERO_W[1]:
        with torch.no_grad():
            out[ZERO_W[0]][ZERO_W[1]].zero_()
    return out


def _param_groups(pss):
    gs = [{"params": ps} for ps in pss]
    gs[-1].update(adapt=False, weight_decay=0.0)
    return gs


def _set_grads(pa, pb, gen, bad=None):
    import torch

    for gi, (ga, gb) in enumerate(zip(pa, pb)):
        for k, (a, b) in enumerate(zip(ga, gb)):
            g = torch.randn(a.shape, generator=gen)
            if (gi, k) == ZERO_G:
                g.zero_()
            if bad is not None and (gi, k) == (0, 0):
                g.view(-1)[7] = bad
            a.grad, b.grad = g, g.clone()


def _errs(pa, pb, oa, ob):
    out = {}
    for gi, (ga, gb) in enumerate(zip(pa, pb)):
        for k, (a, b) in enumerate(zip(ga, gb)):
            pairs = [("w", a, b)] + [(key, oa.state[a][key], ob.state[b][key]) for key in ob.state[b] if key != "step"]
            for key, x, y in pairs:
                out[f"{gi}.{k}{tuple(a.shape)}.{key}"] = ((x - y).norm() / y.norm().clamp_min(1e-30)).item()
            assert float(oa.state[a]["step"]) == float(ob.state[b]["step"])
    return out


def _optimizers(algo, kw, pa, pb):
    from bigbatch.optim import optimizer_info

    cls = optimizer_info(algo).build
    return cls(_param_groups(pa), **kw, fused=True), cls(_param_groups(pb), **kw, foreach=True)


def _parity(case, steps, big=False, lr_drop_at=None):
    import torch

    algo, kw = CASES[case]
    groups = BIG if big else GROUPS
    pa, pb = _make(groups, 0), _make(groups, 0)
    oa, ob = _optimizers(algo, kw, pa, pb)
    gen = torch.Generator().manual_seed(3)
    for t in range(steps):
        if t == lr_drop_at:
            for o in (oa, ob):
                for g in o.param_groups:
                    g["lr"] *= 0.1
        _set_grads(pa, pb, gen)
        oa.step()
        ob.step()
    vec = scalar = 0  # launches of the VEC and of the plain variant in one step
    for _, pack in oa._fused.packs["plan"][1]:
        aligned = pack.vec_shape and pack.g_aligned
        if pack.spec.tables == "tiles":
            vec += aligned and pack.n_vec_tiles > 0
            scalar += pack.n_tiles > (pack.n_vec_tiles if aligned else 0)
        else:
            vec, scalar = vec + aligned, scalar + (not aligned)
    return {"errs": _errs(pa, pb, oa, ob), "vec_packs": vec, "scalar_packs": scalar}


def _nonfinite(algo):
    import copy

    import torch

    kw = NONFINITE.get(algo) or CASES[algo][1]
    pa, pb = _make(GROUPS, 0), _make(GROUPS, 0)
    oa, ob = _optimizers(algo, kw, pa, pb)
    gen = torch.Generator().manual_seed(3)
    _set_grads(pa, pb, gen)
    oa.step()
    ob.step()
    flat = [p for ps in pa for p in ps]
    snap = [p.detach().clone() for p in flat], copy.deepcopy(oa.state_dict())
    _set_grads(pa, pb, gen, bad=float("nan"))
    raised = False
    try:
        oa.step()
    except FloatingPointError:
        raised = True
    oa.nonfinite = "skip"
    _set_grads(pa, pb, gen, bad=float("-inf"))
    oa.step()
    unchanged = all(torch.equal(p, q) for p, q in zip(flat, snap[0]))
    for k, v in oa.state_dict()["state"].items():
        for key, t in v.items():
            unchanged &= bool(torch.equal(t, snap[1]["state"][k][key]))
    for _ in range(2):  # the reference saw neither bad step
        _set_grads(pa, pb, gen)
        oa.step()
        ob.step()
    return {"raised": raised, "skipped_steps": oa.skipped_steps, "unchanged": unchanged,
            "errs": _errs(pa, pb, oa, ob)}


def _fsdp_model():
    import torch

    torch.manual_seed(0)
    # Odd row counts: uneven shards (11 rows → 6 + 5, 3 → 2 + 1); Linear(5, 1): rank 1's shard is empty.
    return torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.LayerNorm(11), torch.nn.Tanh(), torch.nn.Linear(11, 3),
                               torch.nn.Tanh(), torch.nn.Linear(3, 5), torch.nn.Linear(5, 1, bias=False))


def _fsdp_opt(name, model, **kw):
    from bigbatch.optim import optimizer_info, param_groups

    groups = param_groups(model, 0.01)
    for g in groups:  # 1-D parameters adapt too here, so every kernel path sees a shard
        g["adapt"] = True
    return optimizer_info(name).build(groups, **(FSDP.get(name) or CASES[name][1]), **kw)


def _fsdp_steps(model, opt, n=3):
    import torch

    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 6, generator=g)
        y = torch.randn(16, 1, generator=g)
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _fsdp_worker(rank, tiles):
    import warnings

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from bigbatch.optim._fused import kernels as K

    register_extensions()  # a fresh (spawned) interpreter
    for k, v in tiles.items():
        setattr(K, k, v)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    errs, sharded_packs = {}, 0
    for name in FUSED:
        ref = _fsdp_model()
        ref_opt = _fsdp_opt(name, ref, foreach=True)
        _fsdp_steps(ref, ref_opt)
        model = _fsdp_model()
        fully_shard(model, mesh=mesh)
        opt = _fsdp_opt(name, model, fused=True)
        _fsdp_steps(model, opt)
        sharded_packs += sum(pk.pg is not None for _, pk in opt._fused.packs["plan"][1])
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            full = a.full_tensor()
            errs[f"{name}.{n}"] = ((full - b).abs().max() / b.abs().max()).item()
            for key, t in opt.state[a].items():
                if key != "step":
                    r = ref_opt.state[b][key]
                    errs[f"{name}.{n}.{key}"] = ((t.full_tensor() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fsdp_opt("merit", torch.nn.ParameterList([w]))
    warned = any("Shard(dim=1)" in str(c.message) for c in caught)
    try:
        _fsdp_opt("merit", torch.nn.ParameterList([w]), fused=True)
        refused = False
    except ValueError:
        refused = True
    return {"errs": errs, "fused_packs_sharded": sharded_packs, "fallback_warned": warned, "fused_true_refused": refused}


def _fsdp(tiles):
    from _dist import spawn_gloo  # tests/ is sys.path[0]: this file runs as a script here

    results = spawn_gloo(_fsdp_worker, tiles, timeout=300)
    out = results[0]
    out["fused_packs_sharded"] = min(r["fused_packs_sharded"] for r in results)
    for r in results[1:]:
        out["errs"].update({k: max(v, out["errs"][k]) for k, v in r["errs"].items()})
    return out


def _subnormal(shape):
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    import test_optim_reference as R

    if shape == "row":
        w = np.array([[0.5, 0.1, -0.2, 0.3], [0.3, -0.7, 0.2, 0.4], [-0.6, 0.2, 0.9, -0.1]], dtype=np.float32)
        m = np.array([[2e-40, 0.0, -1e-40, 0.0], [0.02, -0.01, 0.03, 0.005], [-0.01, 0.02, 0.01, 0.03]],
                     dtype=np.float32)
        v = np.ones_like(w) * np.float32(1e-4)
        v[0] = 1.0
    elif shape == "vector":
        w = np.array([1.0, -0.5, 0.25, 0.125], dtype=np.float32)
        m = np.array([1e-40, 0.0, -3e-41, 0.0], dtype=np.float32)
        v = np.ones_like(w)
    else:
        rng = np.random.default_rng(0)
        w = rng.standard_normal((37, 21)).astype(np.float32)
        m = (rng.standard_normal((37, 21)) * 1e-2).astype(np.float32)
        v = np.full_like(w, 1e-4)
        m[5] = rng.standard_normal(21).astype(np.float32) * np.float32(1e-40)  # dead row
        m[:, 17] = np.float32(3e-41)  # dead column
        v[5], v[:, 17] = 1.0, 1.0
    got, want = R._merit_dead_unit_step(w, m, v, "cpu", dict(fused=True))
    ref, _ = R._merit_dead_unit_step(w, m, v, "cpu", dict(foreach=True))
    return {"finite": bool(np.isfinite(got).all()), "err": float(np.abs(got - want).max()),
            "err_foreach": float(np.abs(got - ref).max())}


def _main(case: str, kw: dict) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    torch.set_num_threads(1)
    from bigbatch.optim._fused import kernels as K

    register_extensions()

    for name, value in kw["tiles"].items():
        setattr(K, name, value)
    if case != "fsdp":  # the FSDP workers set the tiles in their own processes
        kw.pop("tiles")
    fn = {"parity": _parity, "nonfinite": _nonfinite, "fsdp": _fsdp, "subnormal": _subnormal}[case]
    print(json.dumps(fn(**kw)))


if __name__ == "__main__":
    _main(sys.argv[1], json.loads(sys.argv[2]))
