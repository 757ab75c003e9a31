"""Have the K components become different? Weight-space distance between their updates, and whether their
validation losses can be told apart (issue 27).

Weight space, from the low-rank factors only (never a ``d_out x d_in`` product): component k's update in one layer is
``dW_k = s_k B_k A_k`` (:class:`~comlora_ds.comlora.layer.LoRAFactors`, which LoRA-Dash and LoRA-Pro components also
give), and ``<dW_i, dW_j>_F = s_i s_j sum((B_i^T B_j) * (A_i A_j^T))``, an ``r x r`` product. Summed over the layers
of one module type (``q_proj``, ...) or over all layers, these give each pair's relative distance
``||dW_i - dW_j|| / mean(||dW_i||, ||dW_j||)`` (0: twins; 2: opposite) and cosine ``<dW_i, dW_j> / (||dW_i|| ||dW_j||)``.

Validation: per row, the difference of the two components' losses; its mean, paired standard error and the share of
rows each component wins. The verdict "distinguishable on validation" is ``|mean| > 2 SE``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..methods._zero import gathered
from .layer import ComLoRALinear, LoRAFactors


def frobenius_inner(f: LoRAFactors, g: LoRAFactors) -> float:
    """``<f.delta(), g.delta()>_F`` from the factors: ``r_f x r_g`` products only."""
    a_f, b_f, a_g, b_g = (t.detach().double() for t in (f.A, f.B, g.A, g.B))
    return float(f.scaling * g.scaling * ((b_f.t() @ b_g) * (a_f @ a_g.t())).sum())


def _pair(inner: torch.Tensor, i: int, j: int) -> dict:
    norm_i, norm_j = math.sqrt(max(inner[i, i], 0.0)), math.sqrt(max(inner[j, j], 0.0))
    distance = math.sqrt(max(inner[i, i] + inner[j, j] - 2 * inner[i, j], 0.0))
    mean_norm = (norm_i + norm_j) / 2
    return {"relative_distance": distance / mean_norm if mean_norm > 0 else None,
            "cosine": float(inner[i, j]) / (norm_i * norm_j) if norm_i > 0 and norm_j > 0 else None,
            "norms": [norm_i, norm_j]}


def update_divergence(layers: Iterable[tuple[str, Sequence[LoRAFactors]]]) -> dict:
    """``layers``: (module type, the K components' factors) per adapted layer. Returns, per pair ``"i-j"``, the
    overall relative distance, cosine and update norms, and the same per module type."""
    totals: dict[str, torch.Tensor] = {}
    for module_type, factors in layers:
        k = len(factors)
        inner = torch.tensor([[frobenius_inner(factors[a], factors[b]) for b in range(k)] for a in range(k)],
                             dtype=torch.float64)
        for key in ("all", module_type):
            totals[key] = totals.get(key, torch.zeros(k, k, dtype=torch.float64)) + inner
    if not totals:
        return {}
    k = totals["all"].shape[0]
    pairs = {}
    for i in range(k):
        for j in range(i + 1, k):
            pairs[f"{i}-{j}"] = {**_pair(totals["all"], i, j),
                                 "by_module": {m: _pair(t, i, j) for m, t in sorted(totals.items()) if m != "all"}}
    return pairs


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, list[LoRAFactors]]]:
    """(module type, the K components' factors) of every adapter layer of a live model. Under ZeRO-3 each layer's
    factors are gathered while its item is being used (collective: every rank iterates in the same order)."""
    for name, module in model.named_modules():
        if isinstance(module, ComLoRALinear):
            with gathered(list(module.parameters(recurse=False))):
                yield name.rsplit(".", 1)[-1], [module.component_factors(k) for k in range(module.num_components)]


def loss_difference(losses: torch.Tensor) -> dict:
    """``losses`` [N, K] per-row validation losses. Per pair ``"i-j"``: mean and paired standard error of
    ``loss_i - loss_j`` over the rows, the share of rows each wins (a lower loss; ties count for neither), and whether
    the two are distinguishable (``|mean| > 2 SE``)."""
    n, k = losses.shape
    out = {}
    for i in range(k):
        for j in range(i + 1, k):
            d = (losses[:, i] - losses[:, j]).double()
            mean = float(d.mean()) if n else float("nan")
            se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
            out[f"{i}-{j}"] = {"mean": mean, "paired_se": se, "num_rows": n,
                               "wins": [float((d < 0).double().mean()) if n else None,
                                        float((d > 0).double().mean()) if n else None],
                               "distinguishable": bool(n > 1 and se == se and abs(mean) > 2 * se)}
    return out


def verdict(difference: dict) -> str:
    """One line for a report: which pairs are distinguishable on validation."""
    if not difference:
        return "one component: nothing to distinguish"
    parts = []
    for pair, d in difference.items():
        i, j = pair.split("-")
        word = "distinguishable" if d["distinguishable"] else "NOT distinguishable"
        parts.append(f"components {i} and {j} {word} on validation (mean loss difference {d['mean']:+.4f}, "
                     f"paired SE {d['paired_se']:.4f}, {d['num_rows']} rows)")
    return "; ".join(parts)
