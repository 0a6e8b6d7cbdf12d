#!/usr/bin/env bash
# Prepare, here, what benchmarks/gpu_check.sh needs on the GPU machine (Python 3.12, x86-64, no network):
# wheels of the packages its image lacks, and the source photo of the mosaic, all under .whl/ (git ignores
# it). The image has torch, torchvision, numpy, pandas, pyarrow, scikit-learn, tqdm, pyyaml, typer,
# matplotlib, filelock, click, attrs, certifi, pyparsing and psutil.
# A device call carries at most 64 MiB, so: rasterio 1.3.10 (22 MB; 1.4.x is 36 MB), no pyogrio (33 MB;
# the check writes no GeoPackage) and no MobileNetV2 weights package (13 MB; the check says it runs
# random-init weights unless the torch hub cache there holds real ones).
# Usage: benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PIP="${PIP:-python3 -m pip}"
PLATFORMS=()
for n in 39 35 34 31 28 27 24 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(
  rasterio==1.3.10 affine==2.4.0 cligj==0.7.2 click-plugins==1.1.1.2 snuggs==1.4.7
  faiss-cpu==1.15.1
  geopandas==1.2.0 shapely==2.2.0 pyproj==3.7.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
for w in "${WHEELS[@]}"; do
  name="$(echo "${w%%==*}" | tr - _)"
  version="${w##*==}"
  if ls "$DEST/$name-$version-"*.whl >/dev/null 2>&1; then continue; fi
  rm -f "$DEST/$name-"*.whl  # one version of each: two would stop the whole install
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$w"
done
cp -f data/swellendam_za/3420B_2010_328_RGB_LATLNG.tif "$DEST/source.tif"
ls -la "$DEST"
du -sh "$DEST"
