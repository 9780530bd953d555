"""Properties every registered optimizer must have (one table, PyTorch's test_optim habit)."""

import copy
import io

import pytest
import torch
import torch._dynamo.testing
from torch import nn

from bigbatch.optim import LAMB, LARS, MERIT, OPTIMIZERS, create_optimizer, optimizer_info, param_groups

NAMES = sorted(OPTIMIZERS)
LR = {"sgd": 0.05, "adam": 0.01, "adamw": 0.01, "lars": 0.2, "lamb": 0.02, "merit": 0.02}


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def _data(seed=1, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    return x, y


def _loss(model, x, y):
    return ((model(x.to(next(model.parameters()).dtype)).float() - y) ** 2).mean()


def _make(name, model, **kw):
    extra = {"momentum": 0.9} if optimizer_info(name).takes("momentum") else {}
    if name == "lars":
        extra["trust_coefficient"] = 0.05  # a 16-unit toy net needs larger layer steps than ResNet
    return create_optimizer(name, model, lr=LR[name], weight_decay=1e-4, **extra, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_registry_record_is_frozen_and_unknown_names_help(name):
    info = OPTIMIZERS[name]
    with pytest.raises(Exception):
        info.name = "x"  # frozen dataclass
    with pytest.raises(ValueError, match="did you mean lamb"):
        create_optimizer("lamd", _model(), lr=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_converges(name):
    model, (x, y) = _model(), _data()
    opt = _make(name, model)
    first = _loss(model, x, y).item()
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        opt.step()
    assert _loss(model, x, y).item() < 0.3 * first


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_mid_run_is_exact(name):
    x, y = _data()

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            _loss(model, x, y).backward()
            opt.step()

    model = _model()
    opt = _make(name, model)
    run(model, opt, 5)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    run(model, opt, 5)

    buf.seek(0)
    blob = torch.load(buf, weights_only=False)
    model2 = _model(seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(blob["m"])
    opt2 = _make(name, model2)
    opt2.load_state_dict(blob["o"])
    run(model2, opt2, 5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_kept_and_grad_not_mutated(name, dtype):
    model, (x, y) = _model(dtype=dtype), _data()
    opt = _make(name, model)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        before = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), before):
            assert p.dtype == dtype and p.grad.dtype == dtype
            assert torch.equal(p.grad, g), "step() changed .grad"


@pytest.mark.parametrize("name", NAMES)
def test_accumulation_equivalence(name):
    # Two half-batch gradients summed with weight 1/2 give the full-batch step.
    x, y = _data(n=128)
    m1, m2 = _model(), _model()
    o1, o2 = _make(name, m1), _make(name, m2)
    for _ in range(3):
        o1.zero_grad(set_to_none=True)
        o2.zero_grad(set_to_none=True)
        _loss(m1, x, y).backward()
        for xs, ys in ((x[:64], y[:64]), (x[64:], y[64:])):
            (0.5 * _loss(m2, xs, ys)).backward()
        o1.step()
        o2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [LARS, LAMB, MERIT])
def test_nonfinite_gradient_raises_or_skips_without_touching_state(cls):
    model, (x, y) = _model(), _data()
    opt = cls(param_groups(model, 1e-4), lr=0.01)
    _loss(model, x, y).backward()
    opt.step()
    snap = copy.deepcopy((model.state_dict(), opt.state_dict()))
    opt.zero_grad()
    _loss(model, x, y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    opt.nonfinite = "skip"
    list(model.parameters())[-1].grad[0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[0][k])
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, snap[1]["state"][i][k]), (i, k)


@pytest.mark.parametrize(
    "cls, kw, match",
    [
        (LAMB, dict(lr=-1.0), "lr must be > 0"),
        (LAMB, dict(lr=0.1, betas=(1.0, 0.9)), r"betas\[0\] must be in \[0.0, 1.0\)"),
        (LAMB, dict(lr=0.1, eps=0.0), "eps must be > 0"),
        (LAMB, dict(lr=0.1, trust_clip=(2.0, 1.0)), "trust_clip"),
        (LAMB, dict(lr=0.1, grad_prenorm=0.0), "grad_prenorm must be > 0"),
        (LARS, dict(lr=0.1, momentum=1.5), r"momentum must be in \[0.0, 1.0\)"),
        (LARS, dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
        (LARS, dict(lr=0.1, trust_coefficient=0.0), "trust_coefficient must be > 0"),
        (LARS, dict(lr=0.1, weight_decay=-1.0), "weight_decay must be >= 0"),
        (MERIT, dict(lr=0.1, betas=(0.9, -0.1)), r"betas\[1\]"),
        (MERIT, dict(lr=0.1, nonfinite="ignore"), "nonfinite"),
        (MERIT, dict(lr=0.1, foreach=True, fused=True), "foreach and fused"),
    ],
)
def test_constructor_validation_names_the_parameter(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(_model().parameters(), **kw)


def test_fused_true_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="fused=True needs"):
        LAMB(_model().parameters(), fused=True)


def test_param_groups_rule():
    model = _model()
    groups = param_groups(model, 0.1)
    by_adapt = {g["adapt"]: g for g in groups}
    assert by_adapt[True]["weight_decay"] == 0.1 and by_adapt[False]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in by_adapt[True]["params"])
    assert all(p.dim() == 1 for p in by_adapt[False]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # Name patterns: decay everything except biases, adapt everything.
    g2 = param_groups(model, 0.1, no_decay=["bias"], no_adapt=lambda n, p: False)
    assert {(g["weight_decay"] > 0, g["adapt"]) for g in g2} == {(True, True), (False, True)}
    assert any("1.weight" in g["names"] for g in g2 if g["weight_decay"] > 0)  # LayerNorm gain decayed
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


def test_create_optimizer_applies_param_groups_for_layerwise_only():
    model = _model()
    assert len(_make("lamb", model).param_groups) == 2
    assert len(_make("adamw", model).param_groups) == 1
    opt = create_optimizer("lars", list(model.parameters()), lr=0.1, momentum=0.8)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["momentum"] == 0.8


@pytest.mark.parametrize("cls", [LARS, LAMB, MERIT])
def test_torch_compile_step_no_recompile(cls):
    torch._dynamo.reset()
    model, (x, y) = _model(), _data()
    opt = cls(param_groups(model, 1e-4), lr=0.01)
    eager_model = copy.deepcopy(model)
    eager_opt = cls(param_groups(eager_model, 1e-4), lr=0.01)
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter)
    def step():
        opt.step()

    frames = []
    for _ in range(4):
        for m in (model, eager_model):
            # The NaN guard reads one flag on the host (a graph break); the resumed frame guards
            # on the .grad tensors, so keep them alive across steps (set_to_none=False).
            m.zero_grad(set_to_none=False)
            _loss(m, x, y).backward()
        step()
        eager_opt.step()
        frames.append(counter.frame_count)
    # Step 1 creates the state (its own trace); from step 2 on nothing new may be compiled.
    assert frames[1] > 0 and frames[1] == frames[2] == frames[3], f"frames compiled per step: {frames}"
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_step_never_imports_the_fused_kernels():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from bigbatch.optim import LAMB, MERIT, LARS\n"
        "for cls in (LAMB, MERIT, LARS):\n"
        "    p = torch.nn.Parameter(torch.randn(3, 4)); p.grad = torch.randn(3, 4)\n"
        "    cls([p], lr=0.1).step()\n"
        # (torch.optim.Optimizer itself imports torch._dynamo, which imports triton when it is installed)
        "assert 'bigbatch.optim._fused' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
