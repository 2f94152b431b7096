"""Would a routing feature from deeper backbone stages tell look-alike products apart better? TRAINING images only.

    python benchmarks/routing_features.py --data ../shared/datasets --json benchmarks/results/routing_features.json

docs/decisions.md §8 found that the statistic over the patches is not what limits routing of defective look-alike
parts: the features are. The router's prototype reads the median of the stride-8/16 patch tokens (EfficientNet-Lite0
stages 2 and 3, 40 + 112 channels, 3x3 means). This compares, on the settings and images of
`benchmarks/routing_stress.py` (same seed, same splits, same pasted defects), Gaussian prototypes of other image
features of the same tiles, each the coordinate-wise median over the grid unless said otherwise:
* `tokens`: today's feature (152-d);
* `b4`: stage 4's output (112 channels at stride 16, before any pooling);
* `b6`: the last stage's output (320 channels at stride 32);
* `head`: the 1x1 head after it (1,280 channels at stride 32, what ImageNet classification pools);
* `pixels`: the 10/25/50/75/90 % quantiles of each normalised colour channel (15-d; a low-level control);
* `tokens*F`: the geometric mean of the `tokens` and `F` prototype distances (scale-free, so neither feature's units
  dominate, as the evidence weighs its terms).
Each enters the default router (gated evidence, weight 2, gate 0.2: the nearest prototype unless the runner-up is
within a factor 1.2, then log(prototype distance) + 2 log(patch misfit)) in place of today's prototype distance; the
prototype alone is reported too.

The rule, fixed before this script first ran:
1. under the evidence router, the shared four products' good parts and parts with defects up to 10 % must route
   100 % right;
2. among those, the highest mean routing of look-alike parts with defects of 2, 5, 10 % (every look-alike setting
   weighted equally), with look-alike good parts no more than 0.5 points below today's;
3. it replaces today's feature only if it gains at least 1.0 point there AND loses no more than 0.5 points on the
   separable settings (those where today's prototype routes >= 95 % of good parts right: the hidden pair's
   situation), good or defective. Otherwise today's feature stays.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from moleflow.backbones import lite_state_dict
from moleflow.scoring import lower_median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_choice import adopt_by_rule, choose, router_summary, rule_main, separable_settings  # noqa: E402

DEEP = ("b4", "b6", "head", "pixels")
ROUTER = "evidence_2_0.2"


def grid_median(maps: torch.Tensor) -> torch.Tensor:
    """(M, C, H, W) -> (M, C): the lower median over the grid of each channel."""
    return lower_median(maps.flatten(2), 2)


def deep_features(name: str = "tf_efficientnet_lite0") -> dict[str, callable]:
    """Feature functions of normalised tiles (M, 3, S, S) from the whole ImageNet network (stem, 7 stages, head)."""
    import timm

    net = timm.create_model(name, pretrained=False)
    net.load_state_dict(lite_state_dict(name))
    net.eval()
    cache: dict = {}

    @torch.no_grad()
    def stages(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if cache.get("key") is not pixels:  # one forward serves the three deep features of the same tiles
            x = net.bn1(net.conv_stem(pixels))
            out = {}
            for i, block in enumerate(net.blocks):
                x = block(x)
                if i == 4:
                    out["b4"] = grid_median(x)
            out["b6"] = grid_median(x)
            out["head"] = grid_median(net.bn2(net.conv_head(x)))
            cache.update(key=pixels, out=out)
        return cache["out"]

    def pixel_quantiles(pixels: torch.Tensor) -> torch.Tensor:
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        return torch.quantile(pixels.flatten(2).float(), q, dim=2).permute(1, 2, 0).flatten(1)  # (M, 3 * 5)

    fns = {k: (lambda p, k=k: stages(p)[k]) for k in ("b4", "b6", "head")}
    fns["pixels"] = pixel_quantiles
    return fns


def with_prototype(table: dict, kind: str) -> dict:
    """`table` with its prototype distances replaced by those of feature `kind` (see the module doc)."""
    if kind == "tokens":
        return table
    if kind.startswith("tokens*"):
        proto = (table["prototype"] * table[f"prototype_{kind[7:]}"]).sqrt()
    else:
        proto = table[f"prototype_{kind}"]
    return {**table, "prototype": proto}


def summarise(saved: dict) -> dict:
    kinds = ["tokens", *DEEP, *(f"tokens*{k}" for k in DEEP)]
    separable = separable_settings(saved)
    summary = {f"{kind} {router}": router_summary(
        saved, lambda table, kind=kind, router=router: choose(with_prototype(table, kind), router)[0], separable)
        for kind in kinds for router in ("prototype", ROUTER)}
    best, chosen = adopt_by_rule({k: summary[f"{k} {ROUTER}"] for k in kinds}, "tokens")
    return {"rule": __doc__, "summary": summary, "separable_settings": separable, "best": best, "chosen": chosen}


if __name__ == "__main__":
    rule_main(__doc__, summarise, lambda model: deep_features(model.config.backbone.name))
