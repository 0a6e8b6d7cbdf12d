from pathlib import Path

import pytest

from settlements.config import DEFAULT_LAYERS, load_config
from settlements.errors import ConfigError

MINIMAL = """
rasters:
  - path: scene.tif
regions:
  path: regions.gpkg
"""


def write(tmp_path: Path, text: str, name: str = "demo.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path: Path) -> None:
    sub = tmp_path / "pipelines"
    sub.mkdir()
    cfg = load_config(write(sub, MINIMAL))
    assert cfg.rasters[0].path == sub / "scene.tif"
    assert cfg.regions[0].path == sub / "regions.gpkg"
    assert cfg.name == "demo"
    assert cfg.labels_path == sub / "demo.labels.yaml"
    assert cfg.output_dir == tmp_path / "outputs" / "demo"  # pipelines/ sits in the project root
    assert cfg.work_dir == tmp_path / "work" / "demo"


def test_defaults_and_lengths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + "tiling:\n  tile_size: 240m\n  stride: 120 m\n"))
    assert (cfg.tiling.tile_size.value, cfg.tiling.tile_size.unit) == (240, "m")
    assert cfg.tiling.stride_length.value == 120
    assert cfg.embedding.backbone == "mobilenet_v2"
    assert cfg.output.crs == "EPSG:4326"
    # the settings measured on the Mumbai patches (make quality): the backbone's default cut, L2, 10 restarts
    assert cfg.embedding.layer is None and DEFAULT_LAYERS["mobilenet_v2"] == "features.15"
    assert (cfg.clustering.l2_normalize, cfg.clustering.nredo) == (True, 10)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour_mode: fancy\n", r"colour_mode: unknown key"),
        ("clustering:\n  k: many\n", r"clustering\.k: Input should be a valid integer"),
        ("clustering:\n  k: 1\n", r"clustering\.k: Input should be greater than or equal to 2"),
        ("tiling:\n  tile_size: big\n", r"tiling\.tile_size: .*expected a length such as '240m'"),
        ("tiling:\n  tile_size: 10px\n  stride: 20px\n", r"stride must not exceed tile_size"),
        ("tiling:\n  tile_size: 15\n", r"tiling\.tile_size: 15 has no unit: write '15px' \(pixels\) or '15m' \(ground "
         r"metres\)$"),
        ("tiling:\n  tile_size: 8px\n  stride: 2.5\n", r"tiling\.stride: 2\.5 has no unit: write '2\.5px'"),
        ("embedding:\n  device: tpu\n", r"embedding\.device: Input should be 'auto', 'cpu' or 'cuda'"),
        ("embedding:\n  bakbone: resnet50\n", r"embedding\.bakbone: unknown key"),
        ("embedding:\n  layer: 'features 15'\n",
         r"embedding\.layer: expected null \(the backbone's default\), 'final' or a layer name such as 'features\.14', "
         r"got 'features 15'"),
    ],
)
def test_invalid_keys_and_types_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rasters: required key is missing"):
        load_config(write(tmp_path, "regions:\n  path: r.gpkg\n"))


@pytest.mark.parametrize("regions", ["", "regions:\n", "regions: []\n"])
def test_regions_may_be_left_out(tmp_path: Path, regions: str) -> None:
    """Without regions, each raster's extent is a region (the tile stage makes them: tests/test_geometry.py)."""
    assert load_config(write(tmp_path, "rasters:\n  - path: a.tif\n" + regions)).regions == []


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"demo\.yaml: malformed YAML at line 3"):
        load_config(write(tmp_path, "rasters:\n  - path: a.tif\n  bands: [1, 2\nregions: {}\n"))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_regions_need_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give exactly one of 'path' or 'wkt'"):
        load_config(write(tmp_path, "rasters:\n  - path: a.tif\nregions:\n  crs: EPSG:4326\n"))
