"""Split a pool of labelled road-scene images into train/val/test list files, deterministically.

python tools/split_dataset.py --data_root ROOT [--split train | --list FILE] [--fractions 0.855,0.045,0.1]
    [--seed 0] [--by_subdir] [--out_dir ROOT/splits] [layout / suffix options]

The pool: the folder layout's images/ (all of it unless --split names a list), a Cityscapes-style
leftImg8bit/SPLIT/ folder, or a list file; images without a usable label are left out and
counted. --by_subdir keeps each immediate subdirectory (a drive, a city) in one split. Writes
OUT/{train,val,test}.txt with image paths relative to ROOT; the folder layout reads
ROOT/splits/SPLIT.txt as split SPLIT.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segjax.data import roads
from segjax.data.errors import DataError, SkipReport
from segjax.data.prepare import DEFAULT_FRACTIONS, split_pool, write_lists
from segjax.errors import ArgumentParser, guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    # A one-line usage: a command-line mistake reads as two short lines, not a page.
    parser = ArgumentParser(
        usage="%(prog)s --data_root ROOT [--split S | --list FILE] [options; see --help]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roads.add_data_arguments(parser)
    pool = parser.add_mutually_exclusive_group()
    pool.add_argument("--split", default=None,
                      help="Cityscapes-style: the leftImg8bit/ folder to pool (default train); folders: a split list")
    pool.add_argument("--list", default="", help="a list file of image paths relative to ROOT")
    parser.add_argument("--fractions", type=roads.three_numbers(sum_to_one=True), default=DEFAULT_FRACTIONS,
                        help="train,val,test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--by_subdir", action="store_true", help="keep each immediate subdirectory in one split")
    parser.add_argument("--out_dir", default="", help="default ROOT/splits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = SkipReport()
    layout = roads.layout_from_arguments(args)
    split = args.split if args.split is not None else ("train" if layout.kind == "cityscapes" else "")
    images = roads.read_list(args.data_root, args.list) if args.list else layout.pool(args.data_root, split)
    pairs = roads.list_pairs(args.data_root, layout, images, report)
    report.log(logging.getLogger("split_dataset"), "pool")
    if not pairs:
        raise DataError(f"no image with a usable label in the pool; skipped: {report.as_dict()}")
    lists = split_pool([p.id for p in pairs], fractions=args.fractions, seed=args.seed, by_subdir=args.by_subdir)
    files = write_lists(lists, args.out_dir or Path(args.data_root) / "splits")
    skipped = {reason: entry["count"] for reason, entry in report.as_dict().items()}
    print(f"split {len(pairs)} images (skipped: {skipped or 'none'}): "
          + ", ".join(f"{name} {len(lists[name])} -> {files[name]}" for name in lists))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
