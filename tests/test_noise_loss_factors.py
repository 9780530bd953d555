"""NoiseMonitor when the micro-batches of a step carry different loss factors (issue 26, A.1 and A.7).

A per-micro-batch mean loss over unequal counts scales micro-batch ``j``'s summed gradient ``S_j``
by ``a_j = 1/(n_j k)``; the accumulated gradient ``ĝ = Σ a_j S_j`` has
``E|ĝ|² = (Σ a_j n_j)²|G|² + (Σ a_j² n_j) tr Σ``. The references here are written from that
equation in float64 from per-micro-batch gradients; linreg's closed form checks that the result is
unbiased without reference to it.
"""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from bigbatch.noise import NoiseMonitor, split_batch, unbiased_estimates
from bigbatch.workloads.linreg import LinReg


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 5, generator=g), "y": torch.randn(n, 3, generator=g)}


def sum_loss(model, mb):
    return 0.5 * ((model(mb["x"]) - mb["y"]) ** 2).sum()


def chunks(batch, sizes):
    out, start = [], 0
    for s in sizes:
        out.append({k: v[start:start + s] for k, v in batch.items()})
        start += s
    return out


def mean_loss_step(mon, model, micro, *, pass_scale=True):
    """A per-micro-batch mean loss divided by the number of micro-batches (HF without
    num_items_in_batch, Lightning's reduction='mean'): factor 1/(n_j k) on micro-batch j's sum."""
    k = len(micro)
    mon.begin_step()
    for mb in micro:
        n = mb["x"].shape[0]
        c = 1.0 / (n * k)
        with mon.micro_batch(n, loss_scale=c if pass_scale else None):
            (sum_loss(model, mb) * c).backward()
    return mon.end_step()


def reference(model, micro, factors, source="micro"):
    """float64 (|G|², tr Σ, b, B) of one step from each micro-batch's summed gradient S_j."""
    m64 = copy.deepcopy(model).double()
    params = list(m64.parameters())
    S = [torch.autograd.grad(sum_loss(m64, {k: v.double() for k, v in mb.items()}), params) for mb in micro]
    n = [mb["x"].shape[0] for mb in micro]

    def sq(vecs):
        return sum(float(v.pow(2).sum()) for v in vecs)

    def part(js):  # Σ_j a_j S_j over js, with its two sums
        g = [sum(factors[j] * S[j][i] for j in js) for i in range(len(params))]
        return g, sum(factors[j] * n[j] for j in js), sum(factors[j] ** 2 * n[j] for j in js)

    k = len(micro)
    groups = [[j] for j in range(k)] if source == "micro" else [list(range(j + 1)) for j in range(k - 1)]
    smalls, inv = [], []
    for js in groups:
        g, a, q = part(js)
        smalls.append(sq(g) / a**2)
        inv.append(q / a**2)
    g, a, q = part(range(k))
    big, B = sq(g) / a**2, a * a / q
    b = len(groups) / sum(inv)
    return unbiased_estimates(sum(smalls) / len(smalls), big, b, B) + (b, B)


@pytest.mark.parametrize("mode,source", [("accumulation", "micro"), ("accumulation", "prefix"),
                                         ("split", "micro"), ("split", "prefix")])
def test_unequal_mean_losses_match_the_float64_reference(mode, source):
    model = mlp()
    mon = NoiseMonitor(model, mode=mode, source=source, splits=3, beta=0.9)
    batch = data(23)
    # split mode cuts 23 into 8, 8, 7: unequal too
    micro = mon.split_batch(batch) if mode == "split" else chunks(batch, [12, 3, 8])
    k = len(micro)
    factors = [1.0 / (mb["x"].shape[0] * k) for mb in micro]
    with pytest.warns(RuntimeWarning, match="weights their units unequally"):
        r = mean_loss_step(mon, model, micro)
        assert r.valid
    g2, tr, b, B = reference(model, micro, factors, source)
    assert r.b_small == pytest.approx(b, rel=1e-9) and r.b_big == pytest.approx(B, rel=1e-9)
    assert B < 23  # the effective batch of unequally weighted units
    assert r.grad_sqnorm_step == pytest.approx(g2, rel=1e-5)
    assert r.trace_sigma_step == pytest.approx(tr, rel=1e-5)
    assert r.b_simple == pytest.approx(tr / g2, rel=1e-5)


def test_unequal_factors_with_device_tensors():
    """The factors as 0-d tensors (what the framework taps pass): the same numbers, no host values needed."""
    micro = chunks(data(20), [4, 16])
    m1, m2 = mlp(), mlp()
    r1 = mean_loss_step(NoiseMonitor(m1), m1, micro)
    mon = NoiseMonitor(m2)
    mon.begin_step()
    for mb in micro:
        n = mb["x"].shape[0]
        c = torch.tensor(1.0 / (n * 2))
        with mon.micro_batch(torch.tensor(n), loss_scale=c):
            (sum_loss(m2, mb) * c).backward()
    r2 = mon.end_step()
    g2, tr, b, B = reference(mlp(), micro, [1 / 8, 1 / 32])
    # float32 gradients against float64 ones: |G|² is a difference of two close numbers here
    for r in (r1, r2):
        assert r.grad_sqnorm_step == pytest.approx(g2, rel=1e-4)
        assert r.trace_sigma_step == pytest.approx(tr, rel=1e-5)
        assert r.b_big == pytest.approx(B, rel=1e-6)
    assert r2.grad_sqnorm_step == pytest.approx(r1.grad_sqnorm_step, rel=1e-6)


def test_equal_factors_keep_the_count_as_big_batch():
    micro = chunks(data(24), [8, 8, 8])
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unequal-weights warning for equal factors
        r = mean_loss_step(NoiseMonitor(model), model, micro)
    assert r.valid and r.b_big == 24 and r.b_small == 8


def test_unequal_weights_warning_is_given_once():
    model = mlp()
    mon = NoiseMonitor(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(3):
            mean_loss_step(mon, model, chunks(data(20, seed=s), [5, 15])).valid  # noqa: B018
            model.zero_grad(set_to_none=True)
    assert sum("weights their units unequally" in str(w.message) for w in caught) == 1


def linreg_unequal(steps, sizes, source="micro", seed=0):
    wl = LinReg(dim=8, noise_std=0.5, init_distance=1.0, seed=seed)
    model = wl.build_model()  # frozen: the truth stays fixed
    mon = NoiseMonitor(model, beta=0.998, source=source)
    sampler = wl.sampler(seed)
    B, k = sum(sizes), len(sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the unequal-weights warning
        for _ in range(steps):
            micro = chunks(wl.fetch(sampler.next(B)), sizes)
            mon.begin_step()
            for mb in micro:
                c = 1.0 / (wl.count(mb) * k)
                with mon.micro_batch(wl.count(mb), loss_scale=c):
                    loss, _ = wl.loss(model, mb)
                    (loss * c).backward()
            r = mon.end_step()
            model.zero_grad(set_to_none=True)
    return r, wl.true_b_simple(model)


@pytest.mark.parametrize("source", ["micro", "prefix"])
def test_linreg_oracle_with_per_micro_batch_mean_losses(source):
    # Micro-batches of 8, 40 and 16 with a mean loss each: un-scaled by one factor, B_simple came
    # out far from the truth; with each micro-batch's own factor it is unbiased.
    r, truth = linreg_unequal(1500 if source == "micro" else 3000, [8, 40, 16], source)
    assert r.b_simple == pytest.approx(truth, rel=0.06)


def test_stale_gradient_is_detected_not_read():
    """A .grad left from the previous step (no zero_grad) gave a valid, negative b_simple."""
    model = mlp()
    mon = NoiseMonitor(model)
    micro = chunks(data(16), [8, 8])
    first = mean_loss_step(mon, model, micro)
    assert first.valid
    with pytest.warns(RuntimeWarning, match="already held a gradient"):
        r = mean_loss_step(mon, model, chunks(data(16, seed=5), [8, 8]))  # no zero_grad in between
        assert not r.valid
    assert mon.estimator.n_updates == 1
    # zeroed in place (set_to_none=False) is fine
    model.zero_grad(set_to_none=False)
    assert mean_loss_step(mon, model, micro).valid


def test_prefix_and_split_accept_unequal_factors_that_used_to_be_refused():
    micro = chunks(data(18), [6, 12])
    for source in ("prefix", "micro"):
        model = mlp()
        r = mean_loss_step(NoiseMonitor(model, source=source), model, micro)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert r.valid and math.isfinite(r.b_simple)


def test_split_batch_pieces_of_an_odd_batch_are_weighted_by_their_factors():
    # split_batch(7, 2) gives 4 + 3: with a mean per piece the factors differ.
    batch = data(7)
    model = mlp()
    r = mean_loss_step(NoiseMonitor(model, mode="split"), model, split_batch(batch, 2))
    g2, tr, _, B = reference(mlp(), split_batch(batch, 2), [1 / 8, 1 / 6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert r.trace_sigma_step == pytest.approx(tr, rel=1e-5) and r.b_big == pytest.approx(B)
