"""Write the small real-data folder that ``scripts/gpu_speed.sh`` reads on a machine without
``../shared/data``: a CIFAR-10 zip subset (40 train and 10 test images per class, the JPEGs of
the shared zip), an ImageFolder tree of the same images for the DeiT model (timm resizes them
to 224x224), and the ``.ts`` files of two UEA sets. Speed does not depend on which images are
used; the subset only makes the folder small enough to travel (about 6 MB).

Usage: python scripts/make_bench_data.py [OUT=.bench_data] [SHARED=../shared/data]
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

PER_CLASS = {"train": 40, "test": 10}
UEA = ("JapaneseVowels", "UWaveGestureLibrary")


def main(out: Path, shared: Path) -> None:
    source = shared / "cifar10" / "CIFAR-10-images" / "CIFAR-10-images.zip"
    cifar = out / "cifar10" / "CIFAR-10-images.zip"
    cifar.parent.mkdir(parents=True, exist_ok=True)
    taken: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(cifar, "w") as subset:
        for name in sorted(archive.namelist()):
            parts = Path(name).parts
            split, label = next(((p, parts[i + 1]) for i, p in enumerate(parts[:-1]) if p in PER_CLASS),
                                (None, None))
            if split is None or not name.endswith(".jpg") or taken.get((split, label), 0) >= PER_CLASS[split]:
                continue
            taken[(split, label)] = taken.get((split, label), 0) + 1
            data = archive.read(name)
            subset.writestr(name, data)
            folder = out / "imagefolder" / ("val" if split == "test" else "train") / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / Path(name).name).write_bytes(data)
    for dataset in UEA:
        shutil.copytree(shared / "uea" / dataset, out / "uea" / dataset, dirs_exist_ok=True)
    print(f"wrote {out}: {sum(taken.values())} images, 2 UEA sets")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".bench_data"),
         Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data"))
