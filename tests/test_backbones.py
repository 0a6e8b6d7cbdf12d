"""The real ImageNet MobileNetV2 weights, and weights resolution."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torchvision
from rasterio.windows import Window

from settlements.config import RasterInput
from settlements.embedding.backbones import build_backbone, resolve_layer, resolve_weights
from settlements.embedding.infer import to_model_input
from settlements.errors import BackboneError, WeightsError
from settlements.rasters import compute_scaling, inspect_raster, read_tile

from .conftest import scene


@pytest.fixture(scope="module")
def mobilenet():
    return build_backbone("mobilenet_v2", allow_download=False)


def test_packaged_imagenet_weights_load_with_no_missing_or_unexpected_keys(mobilenet) -> None:
    assert mobilenet.weights.path.name == "mobilenet_v2-b0353104.pth"
    assert mobilenet.weights.sha256.startswith("b0353104")  # torchvision names files by their hash
    state = torch.load(mobilenet.weights.path, map_location="cpu", weights_only=True)
    result = torchvision.models.mobilenet_v2(weights=None).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_default_cut_is_the_measured_layer_and_final_names_the_last_feature_map(mobilenet) -> None:
    """layer null: MobileNetV2 cut at features.15 (160-d), the measured default; 'final': its 1280-d last map."""
    assert (mobilenet.layer, mobilenet.dim) == ("features.15", 160)
    final = build_backbone("mobilenet_v2", layer="final", allow_download=False)
    assert (final.layer, final.dim) == ("features", 1280)
    assert resolve_layer("mobilenet_v2", None) == "features.15" and resolve_layer("resnet18", None) == "layer4"
    assert resolve_layer("resnet18", "final") == "layer4" and resolve_layer("vgg16", "final") == "features"
    lower = build_backbone("mobilenet_v2", layer="features.13", allow_download=False)
    assert lower.dim == 96


def test_overlapping_crops_are_closer_than_water_and_town(mobilenet) -> None:
    path = scene("olinda_brazil", "L7_ETMs.tif")
    spec = RasterInput(path=path, bands=[3, 2, 1])
    info = compute_scaling(inspect_raster(path, spec), spec)

    def embed(col: int, row: int) -> np.ndarray:
        with rasterio.open(path) as src:
            px, _ = read_tile(src, info, Window(col, row, 24, 24))
        with torch.inference_mode():
            return mobilenet.model(to_model_input(px, 96)[None]).numpy()[0]

    town_a, town_b = embed(250, 180), embed(256, 186)  # dense Olinda, shifted by a quarter tile
    water = embed(320, 300)  # Atlantic
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(town_a, town_b) > cos(town_a, water) + 0.05
    assert np.linalg.norm(town_a - town_b) < np.linalg.norm(town_a - water)


def test_unknown_backbone() -> None:
    with pytest.raises(BackboneError, match=r"unknown backbone 'mobilenet_v9'"):
        build_backbone("mobilenet_v9", allow_download=False)


def test_unknown_layer_lists_real_ones() -> None:
    with pytest.raises(BackboneError, match=r"no layer 'features\.99'.*features\."):
        build_backbone("mobilenet_v2", layer="features.99", allow_download=False)


def test_no_weights_anywhere_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsError, match=r"no pretrained weights for resnet18: searched .*resnet18-f37072fd\.pth"):
        resolve_weights("resnet18", allow_download=False)


def test_hub_cache_is_searched_before_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mobilenet) -> None:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "mobilenet_v2-b0353104.pth").symlink_to(mobilenet.weights.path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert resolve_weights("mobilenet_v2", allow_download=False).source == "hub-cache"


def test_explicit_file_wins_and_wrong_architecture_is_named(tmp_path: Path, mobilenet) -> None:
    with pytest.raises(WeightsError, match=r"weights do not fit resnet18 .*missing"):
        build_backbone("resnet18", weights=mobilenet.weights.path, allow_download=False)


def test_corrupt_weights_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(WeightsError, match=r"broken\.pth: corrupt or unreadable weights file"):
        build_backbone("mobilenet_v2", weights=bad, allow_download=False)


def test_the_config_knows_torchvisions_classifiers_without_torch() -> None:
    """``validate --no-weights`` checks the backbone's name against a static list (no torch imported): it must be
    torchvision's own registry of classification models."""
    import torchvision

    from settlements.config import BACKBONES

    assert list(BACKBONES) == sorted(torchvision.models.list_models(module=torchvision.models))
    assert "mobilenet_v2" in BACKBONES and "resnet50" in BACKBONES
