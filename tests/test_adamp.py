"""moleflow's grouped AdamP against the `adamp` package's, step by step."""

import pytest
import torch

from moleflow.nn.adamp import AdamP

adamp = pytest.importorskip("adamp", reason="the reference AdamP (pip install adamp==0.3.0) is needed to compare")

SHAPES = [(16, 152), (16, 152), (152, 16), (76, 76), (76,), (3, 4, 5), ()]


def _gradient(p: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A gradient that is orthogonal to the weight per output channel, over the whole tensor only, or neither."""
    g = torch.randn(p.shape, generator=gen)
    if p.dim() < 2 or kind == "none":
        return g
    rows = p.shape[0] if kind == "channel" else 1
    pv, gv = p.reshape(rows, -1), g.reshape(rows, -1)
    gv = gv - pv * (gv * pv).sum(1, keepdim=True) / (pv * pv).sum(1, keepdim=True)
    return gv.reshape(p.shape)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_grouped_adamp_follows_the_package(weight_decay):
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    options = dict(lr=3e-2, betas=(0.9, 0.999), weight_decay=weight_decay, delta=0.1, wd_ratio=0.1)
    opt_ours = AdamP(ours, **options)
    opt_theirs = adamp.AdamP(theirs, nesterov=False, **options)
    kinds = ["channel", "layer", "none", "channel", "none", "layer", "none"]
    for step in range(25):
        for k, (a, b) in enumerate(zip(ours, theirs)):
            if k == 3 and step % 3 == 0:  # a tensor that sometimes has no gradient keeps its own step count
                a.grad = b.grad = None
                continue
            g = _gradient(b.detach(), kinds[(k + step) % len(kinds)], gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert opt_ours.state[ours[3]]["step"] == opt_theirs.state[theirs[3]]["step"] < 25


def test_projection_happens_in_the_test():
    """The comparison above exercises the projection: a gradient orthogonal to its weight changes the update."""
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(8, 5, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    g = _gradient(p.detach(), "channel", gen)
    p.grad = g.clone()
    q.grad = g.clone()
    AdamP([p], lr=0.1, delta=0.1).step()
    torch.optim.Adam([q], lr=0.1).step()
    assert not torch.allclose(p, q)
    # the projected update keeps each row's norm (to first order): it moves along the sphere
    assert torch.allclose(p.detach().norm(dim=1), q.detach().norm(dim=1), rtol=0.2)
