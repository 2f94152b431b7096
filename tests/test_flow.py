"""The flow: exact invertibility, log-det equal to the autograd Jacobian, LoRA no-op, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from moleflow import Config
from moleflow.config import ModelConfig
from moleflow.model import ExpertFlow
from moleflow.nn.adapters import sinusoidal_position_encoding
from moleflow.nn.lora import LoRALinear


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (zero-initialised ones included) a random value so nothing is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("scale_context", [True, False])
@pytest.mark.parametrize("dia_blocks", [0, 2])
def test_flow_is_exactly_invertible(scale_context, dia_blocks):
    cfg = ModelConfig(num_coupling_blocks=3, lora_rank=2, use_scale_context=scale_context, dia_blocks=dia_blocks)
    model = ExpertFlow(cfg, dim=8, seed=1).double()
    model.add_task()
    model.add_task()
    _randomise(model)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    for task in (0, 1):
        z, _ = model.flow_forward(x, task)
        assert not torch.allclose(z, x)
        torch.testing.assert_close(model.flow_inverse(z, task), x, atol=1e-12, rtol=0)


def _logdet_and_jacobian(cfg: ModelConfig, dim: int, grid: tuple[int, int], seed: int):
    """(summed flow log-det, slogdet of the autograd Jacobian of the whole map) for a random model."""
    model = ExpertFlow(cfg, dim=dim, seed=seed).double()
    model.add_task()
    _randomise(model, seed=seed + 1)
    x = torch.randn(1, *grid, dim, dtype=torch.float64)
    _, logdet = model.flow_forward(x, 0)
    jac = jacobian(lambda v: model.flow_forward(v.view_as(x), 0)[0].reshape(-1), x.reshape(-1))
    return logdet.sum(), torch.linalg.slogdet(jac)


@pytest.mark.parametrize("scale_context", [True, False])
def test_logdet_equals_autograd_jacobian(scale_context):
    """The summed per-patch log-det equals log|det J| of the whole map (context conv mixes patches)."""
    cfg = ModelConfig(num_coupling_blocks=2, lora_rank=2, use_scale_context=scale_context, dia_blocks=2,
                      scale_context_kernel=3)
    logdet, (sign, logabs) = _logdet_and_jacobian(cfg, 8, (3, 3), seed=2)
    assert sign > 0
    torch.testing.assert_close(logdet, logabs, atol=1e-9, rtol=0)


def test_per_patch_logdet_of_a_single_patch():
    """With a 1x1 grid each patch is its own Jacobian block."""
    cfg = ModelConfig(num_coupling_blocks=2, lora_rank=2, dia_blocks=1)
    logdet, (_, logabs) = _logdet_and_jacobian(cfg, 12, (1, 1), seed=4)
    torch.testing.assert_close(logdet, logabs, atol=1e-10, rtol=0)


def test_nll_is_gaussian_negative_log_likelihood():
    model = ExpertFlow(ModelConfig(num_coupling_blocks=1, lora_rank=2, dia_blocks=1), dim=8).double()
    model.add_task()
    x = torch.randn(2, 2, 2, 8, dtype=torch.float64)
    out = model(x, 0)
    expected = 0.5 * out.z.pow(2).sum(-1) + 4 * math.log(2 * math.pi) - out.logdet
    torch.testing.assert_close(out.nll, expected)


def test_new_lora_expert_starts_as_a_no_op():
    layer = LoRALinear(6, 5, torch.Generator().manual_seed(0))
    x = torch.randn(4, 6)
    base = layer(x, None)
    layer.add_task(0, rank=3, alpha=None, use_bias=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(layer(x, 0), base)
    assert layer.lora_A["0"].abs().sum() > 0  # A is random, B is zero
    assert torch.count_nonzero(layer.lora_B["0"]) == 0
    with torch.no_grad():
        layer.lora_B["0"].fill_(0.1)
    assert not torch.allclose(layer(x, 0), base)
    assert torch.equal(layer(x, None), base)  # no task: plain base layer


def test_lora_scaling_follows_alpha():
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(4, 4, g)
    layer.add_task(0, rank=8, alpha=1.0, use_bias=False, generator=g)
    layer.add_task(1, rank=8, alpha=None, use_bias=False, generator=g)
    assert layer.scaling == {"0": 1 / 8, "1": 1.0}


def test_main_preset_parameter_counts():
    """Spec §2.10: MAIN at D=768 adds 3,706,368 parameters per task."""
    cfg = Config.from_preset("main")
    model = ExpertFlow(cfg.model, dim=768)
    model.add_task()
    model.add_task()
    counts = model.parameter_counts()
    for task in (0, 1):
        per = counts["per_task"][task]
        assert per["lora"] == 1_916_928
        assert per["task_bias"] == 13_824
        assert per["adapter"] == 1_536
        assert per["dia"] == 1_774_080
        assert per["total"] == 3_706_368
    # 6 blocks x (base linears 1,476,864 + 5x5 context conv 9,984 + theta) + SCM 7,681
    assert counts["shared"] == 6 * (1_476_864 + 9_984 + 1) + 7_681


def test_positional_encoding_layout():
    pe = sinusoidal_position_encoding(3, 5, 8)
    assert pe.shape == (3, 5, 8)
    # channel 0 = sin(col * 1), channel 1 = cos(col * 1), channel 2 = sin(col * 10000^(-2/4))
    torch.testing.assert_close(pe[1, 4, 0], torch.tensor(math.sin(4.0)))
    torch.testing.assert_close(pe[1, 4, 1], torch.tensor(math.cos(4.0)))
    torch.testing.assert_close(pe[1, 4, 2], torch.tensor(math.sin(4 * 10000 ** -0.5)))
    torch.testing.assert_close(pe[2, 0, 4], torch.tensor(math.sin(2.0)))  # rows start at D/2
    torch.testing.assert_close(pe[2, 0, 5], torch.tensor(math.cos(2.0)))


def test_whitening_adapter_init():
    model = ExpertFlow(ModelConfig(num_coupling_blocks=1, dia_blocks=0), dim=8)
    model.add_task()
    model.add_task()
    gamma = lambda t: 0.5 + 1.5 * torch.sigmoid(model.adapters[str(t)].gamma_raw)  # noqa: E731
    torch.testing.assert_close(gamma(0), torch.full((8,), 0.5 + 1.5 * torch.sigmoid(torch.tensor(-0.7)).item()))
    torch.testing.assert_close(gamma(1), torch.ones(8))
    repo = ExpertFlow(ModelConfig(num_coupling_blocks=1, dia_blocks=0, whitening_identity_init=False), dim=8)
    repo.add_task()
    repo.add_task()
    torch.testing.assert_close(0.5 + 1.5 * torch.sigmoid(repo.adapters["1"].gamma_raw), torch.full((8,), 1.25))


def test_layout_is_passed_not_global():
    """Two different grids in turn give the same per-patch results as each alone (no shared layout state)."""
    model = ExpertFlow(ModelConfig(num_coupling_blocks=2, lora_rank=2, dia_blocks=1), dim=8)
    model.add_task()
    _randomise(model)
    a, b = torch.randn(1, 4, 6, 8), torch.randn(2, 5, 3, 8)
    out_a = model(a, 0).nll
    model(b, 0)
    assert torch.equal(model(a, 0).nll, out_a)
