#!/usr/bin/env bash
# Fill .gpucheck/ (git-ignored) with what bench/gpu_check.py needs on the GPU machine, which has no
# network and no faiss: the packages the project pins that its image lacks or may hold in older
# versions (faiss-cpu, grpcio and its health/reflection packages, protobuf 7 for the generated
# code), downloaded as Python 3.12 manylinux wheels and packed unzipped into one site.tar.xz, and
# the CIFAR-10 archive. The wheels as they are (27 MB) would not fit beside the tree (26 MB) and
# CIFAR-10 (20 MB) in the 64 MiB that travels with a call; xz-packed they take 15 MB.
# GPU FAISS is carried only if its wheel fits too; the manifest says why not otherwise.
#
#   bash scripts/gpu_check_prepare.sh      # then, on the GPU machine: bash scripts/gpu_check.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpucheck
ARCHIVE=${CIFAR_ARCHIVE:-../shared/datasets/cifar10-jpg.tar.gz}
CIFAR_SHA256=92ec47c0fb90c8dd415b76d1cfbdfeb0127274f6431cbbbb646d37a40c97c7ad
PY=${PYTHON:-python3}
PACKAGES=(faiss-cpu==1.15.1 grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 "protobuf>=7.35.1,<8")
GPU_FAISS=faiss-gpu-cu12
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DEST"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
download() {  # download DIR SPEC...: wheels for the GPU machine's python3 (3.12, x86-64)
  local dir=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$dir" "$@"
}
echo "downloading ${PACKAGES[*]}"
download "$stage/wheels" "${PACKAGES[@]}"
echo "looking up $GPU_FAISS"
download "$stage/gpu" "$GPU_FAISS" || echo "  no $GPU_FAISS wheel for python 3.12 manylinux"

echo "checking $ARCHIVE"
echo "$CIFAR_SHA256  $ARCHIVE" | sha256sum -c --quiet
install -m 0644 "$ARCHIVE" "$DEST/cifar10-jpg.tar.gz"

"$PY" - "$DEST" "$stage" <<'PY'
"""Pack the wheels unzipped into DEST/site.tar.xz (GPU FAISS in place of faiss-cpu when it fits)
and write DEST/manifest.json: what travels, its size against the 64 MiB limit, and why not GPU FAISS."""
import json
import lzma
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

LIMIT = 64 * 2**20  # the working tree plus carried paths, per call
dest, stage = Path(sys.argv[1]), Path(sys.argv[2])


def tree_bytes() -> int:
    """What travels without carry: tracked files and untracked ones git does not ignore."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum(Path(n.decode()).stat().st_size for n in names if n and Path(n.decode()).is_file())


def pack(wheels: list[Path], out: Path) -> int:
    site = stage / f"site-{out.stem}"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    with tarfile.open(out, "w:xz", preset=9) as tar:
        for path in sorted(site.iterdir()):
            tar.add(path, arcname=path.name)
    return out.stat().st_size


wheels = sorted((stage / "wheels").glob("*.whl"))
gpu = sorted((stage / "gpu").glob("*.whl"))
tree, cifar = tree_bytes(), (dest / "cifar10-jpg.tar.gz").stat().st_size
for old in dest.glob("*.whl"):
    old.unlink()
site_bytes = pack(wheels, dest / "site.tar.xz")
total = tree + cifar + site_bytes
faiss_gpu = {"package": "faiss-gpu-cu12", "carried": False}
if not gpu:
    faiss_gpu["why"] = "no wheel found for python 3.12 manylinux x86-64"
else:
    wheel = gpu[0]
    faiss_gpu.update(wheel=wheel.name, wheel_bytes=wheel.stat().st_size)
    # It would replace faiss-cpu (one `faiss` package); it also needs the CUDA 12 runtime wheels
    # (nvidia-*-cu12), which the machine's CUDA 13 image does not have and which weigh far more.
    faiss_cpu = next(w for w in wheels if w.name.startswith("faiss_cpu"))
    if tree + cifar + wheel.stat().st_size <= LIMIT:  # else it cannot fit even before the others
        trial = stage / "site_gpu.tar.xz"
        trial_bytes = pack([w for w in wheels if w != faiss_cpu] + [wheel], trial)
        if tree + cifar + trial_bytes <= LIMIT:
            trial.replace(dest / "site.tar.xz")
            site_bytes, total = trial_bytes, tree + cifar + trial_bytes
            faiss_gpu.update(carried=True, why="fits (its CUDA 12 runtime wheels are not carried)")
    if not faiss_gpu["carried"]:
        faiss_gpu["why"] = (
            f"does not fit: the tree ({tree / 2**20:.1f} MiB), CIFAR-10 ({cifar / 2**20:.1f} MiB) and this wheel "
            f"({wheel.stat().st_size / 2**20:.1f} MiB, before the CUDA 12 runtime wheels it needs) exceed the "
            f"{LIMIT // 2**20} MiB a call carries; the GPU FAISS test skips and the server searches on the CPU"
        )
manifest = {
    "packages": [w.name for w in wheels if faiss_gpu["carried"] is False or not w.name.startswith("faiss_cpu")],
    "site_tar_xz_bytes": site_bytes,
    "cifar_bytes": cifar,
    "tree_bytes": tree,
    "total_bytes": total,
    "limit_bytes": LIMIT,
    "fits": total <= LIMIT,
    "faiss_gpu": faiss_gpu,
}
(dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
print(json.dumps(manifest, indent=2))
if not manifest["fits"]:
    sys.exit(f"{total / 2**20:.1f} MiB would travel, over the {LIMIT // 2**20} MiB limit")
PY
echo "ready: carry $DEST, then on the GPU machine run: bash scripts/gpu_check.sh OUT_DIR"
