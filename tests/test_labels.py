from pathlib import Path

import pytest

from settlements.errors import ConfigError
from settlements.labels import ClusterLabels, read_labels, write_labels
from settlements.palette import KNOWN_COLOURS, UNLABELLED_COLOUR, build_legend


def test_template_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.labels.yaml"
    labels = read_labels(path, 3)
    assert labels.names == {0: "cluster 0", 1: "cluster 1", 2: "cluster 2"}
    write_labels(path, "x", labels, {0: 10, 1: 5, 2: 1})
    text = path.read_text()
    assert "size: 10" in text and text.startswith("# Cluster names for pipeline 'x'")
    edited = text.replace("name: cluster 0", "name: water").replace("name: cluster 2", "name: water")
    edited = edited.replace("colour: null\n    size: 5", "colour: '#123456'\n    size: 5")
    assert "#123456" in edited
    path.write_text(edited)
    again = read_labels(path, 3)
    assert again.names == {0: "water", 1: "cluster 1", 2: "water"}
    assert again.colours[1] == "#123456"
    write_labels(path, "x", again, {0: 10, 1: 5, 2: 1})
    assert read_labels(path, 3) == again


def test_shared_names_get_one_colour_from_one_palette() -> None:
    labels = ClusterLabels({0: "vegetation", 1: "town", 2: "vegetation", 3: "unlabelled"},
                           {0: None, 1: None, 2: "#ff0000", 3: None})
    pal = labels.legend()
    assert pal.labels == ("vegetation", "town", "unlabelled")
    assert pal.colour("vegetation") == "#ff0000"  # explicit colour of any of its clusters wins
    assert pal.colour("unlabelled") == UNLABELLED_COLOUR
    assert len(set(pal.colours)) == 3
    assert build_legend({0: "water"}, {}).colour("water") == KNOWN_COLOURS["water"]


@pytest.mark.parametrize(("text", "message"), [
    ("clusters:\n  0: {name: water, colour: blue}\n", r"clusters\.0\.colour: expected '#rrggbb'"),
    ("clusters:\n  zero: {name: water}\n", r"clusters\.zero: cluster ids must be integers"),
    ("clusters:\n  0: {name: ''}\n", r"clusters\.0\.name: must be a non-empty string"),
    ("clusters:\n  0: {nom: water}\n", r"clusters\.0\.nom: unknown key"),
    ("clusters: [1, 2\n", r"malformed YAML"),
])
def test_bad_labels_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.labels.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_labels(path, 3)


def test_naming_clusters_never_moves_another_clusters_colour() -> None:
    """Automatic colours went to labels in order, so naming clusters 0 and 1 (water takes its known colour)
    recoloured every unnamed cluster after them: maps before and after naming could not be compared."""
    k = 12
    unnamed = ClusterLabels({i: f"cluster {i}" for i in range(k)}, {i: None for i in range(k)})
    named = ClusterLabels({**unnamed.names, 0: "water", 1: "forest", 2: "town", 3: "town", 7: "slum"},
                          {**unnamed.colours, 9: "#123456"})
    before, after = unnamed.legend(), named.legend()
    for cid in (4, 5, 6, 8, 10, 11):
        assert after.colour(named.names[cid]) == before.colour(unnamed.names[cid]), cid
    assert after.colour("town") == before.colour("cluster 2")  # an unknown name keeps its lowest id's colour
    assert after.colour("slum") == before.colour("cluster 7")
    assert after.colour("water") == KNOWN_COLOURS["water"] and after.colour("cluster 9") == "#123456"
    assert len(set(after.colours)) == len(after.labels)  # still one colour per label


def test_labels_header_names_the_real_output_folder(tmp_path: Path) -> None:
    """The header said outputs/<name>/atlas.png whatever output.dir was."""
    out = tmp_path / "elsewhere" / "maps"
    path = tmp_path / "pipelines" / "x.labels.yaml"
    path.parent.mkdir()
    write_labels(path, "x", read_labels(path, 2), {0: 1, 1: 1}, out_dir=out)
    header = path.read_text().splitlines()[1]
    assert "../elsewhere/maps/atlas.png (from this file's folder)" in header
    assert (path.parent / "../elsewhere/maps/atlas.png").resolve() == (out / "atlas.png").resolve()
