"""Photo-like image folders, made reproducibly from a real data set: the one maker of the benchmark folders.

Each image of a seeded, class-balanced subset of the set (Fashion-MNIST by default) is upscaled to --size with an
antialiased resize, tinted into RGB and saved as a JPEG (tests/mnist_made.py::to_photo, the one way to make a photo
from a real image): `train/<class>/` from the set's training split, `val/<class>/` from its test split. The
defaults make the photo folder of the benchmarks (3,000 training JPEGs of 500x375 and 1,000 held out, 10 classes);
`--train 200 --val 0 --size 4000x3000` makes the phone-photo variant. A finished folder holds `made.json` with its
parameters; asked again with the same ones, the maker returns it as it is.

  python benchmarks/make_photo_folder.py --out DIR [--train 3000] [--val 1000] [--size 500x375] [--seed 0]
                                         [--data fashion-mnist] [--data-dir /work/shared/data] [--quality 90]

Other benchmarks import `make_photo_folder(out, ...)`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

PHOTO_SIZE = (500, 375)  # width, height: a web photo
PHONE_SIZE = (4000, 3000)  # a 12-megapixel phone photo
MARKER = "made.json"


def parse_size(text: str) -> tuple[int, int]:
    """'500x375' -> (500, 375): width, height."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, such as 500x375") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"--size {text!r}: both sides must be positive")
    return width, height


def make_photo_folder(out: str | Path, *, train: int = 3000, val: int = 1000, size: tuple[int, int] = PHOTO_SIZE,
                      seed: int = 0, data: str = "fashion-mnist", data_dir: str | None = None,
                      quality: int = 90) -> Path:
    """The folder `out` with `train` photos in train/ and `val` in val/ (none: no val/), made once per parameters."""
    import mnist_made

    from trainforge.data import load_data

    out = Path(out)
    params = {"train": train, "val": val, "size": list(size), "seed": seed, "data": data, "quality": quality}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return out
    if out.exists():
        shutil.rmtree(out)
    bundle = load_data(data, data_dir)
    made = mnist_made.subset(bundle, train, val, seed)
    mnist_made.write_folder(out / "train", made.train, "jpeg", size, quality)
    if val:
        mnist_made.write_folder(out / "val", made.test, "jpeg", size, quality)
    marker.write_text(json.dumps(params))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder to make (replaced unless made with these options)")
    parser.add_argument("--train", type=int, default=3000, help="training photos, balanced over the classes")
    parser.add_argument("--val", type=int, default=1000, help="held-out photos from the test split (0: no val/)")
    parser.add_argument("--size", type=parse_size, default=PHOTO_SIZE, help="WIDTHxHEIGHT (default 500x375)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="fashion-mnist", help="the built-in set the photos are made from")
    parser.add_argument("--data-dir", default=None, help="its data root (default: trainforge's search)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = parser.parse_args(argv)
    folder = make_photo_folder(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                               data=args.data, data_dir=args.data_dir, quality=args.quality)
    print(folder)


if __name__ == "__main__":
    main()
