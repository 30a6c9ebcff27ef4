"""Rebuild data/demo/ (the bundled demo sample) from ../shared/datasets/cifar10-jpg.tar.gz.

The sample is the first 160 training and first 40 test images of each CIFAR-10 class
(Krizhevsky, 2009), copied byte for byte: 2,000 JPEGs, about 1.8 MB.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PER_CLASS = {"train": 160, "test": 40}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archive", type=Path, default=REPO.parent / "shared/datasets/cifar10-jpg.tar.gz")
    parser.add_argument("--out", type=Path, default=REPO / "data/demo")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    pattern = re.compile(r"(?:^|/)(train|test)/([a-z]+)/(\d+)\.jpg$")
    with tarfile.open(args.archive) as tar:
        for member in tar:
            m = pattern.search(member.name)
            if not m or int(m.group(3)) >= PER_CLASS[m.group(1)]:
                continue
            dest = args.out / m.group(1) / m.group(2) / f"{m.group(3)}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
    print(f"wrote {sum(1 for _ in args.out.rglob('*.jpg'))} images to {args.out}")


if __name__ == "__main__":
    main()
