"""Split a pool of labelled road-scene images into train/val/test list files, deterministically.

python tools/split_dataset.py --data_root ROOT [--split train | --list FILE] [--fractions 0.855,0.045,0.1]
    [--seed 0] [--by_subdir] [--out_dir ROOT/splits] [layout / suffix options]

The pool: every image (the folder layout's images/, every leftImg8bit/ folder of the
Cityscapes-style layout), or the --split list / leftImg8bit/SPLIT/ folder, or a list file; images
without a usable label (missing, unreadable, of another size, or all ignore) are left out and
counted, as the trainer and tools/select_subset.py leave them out. The demo's own splits are
never overwritten (its lists are the demo's; give --out_dir elsewhere).

--by_subdir keeps each immediate subdirectory (a drive, a city) in one split. Writes
OUT/{train,val,test}.txt with image paths relative to ROOT; the folder layout reads
ROOT/splits/SPLIT.txt as split SPLIT.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segjax.data import roads
from segjax.data.demo import demo_marker
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
                      help="pool only this: a leftImg8bit/ folder (Cityscapes-style) or a split list (folders); "
                           "default: every image")
    pool.add_argument("--list", default="", help="a list file of image paths relative to ROOT")
    parser.add_argument("--fractions", type=roads.three_numbers(sum_to_one=True), default=DEFAULT_FRACTIONS,
                        help="train,val,test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--by_subdir", action="store_true", help="keep each immediate subdirectory in one split")
    parser.add_argument("--out_dir", default="", help="default ROOT/splits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.out_dir or Path(args.data_root) / "splits")
    marker = demo_marker(out_dir)
    if marker is not None:
        raise DataError(f"{out_dir} is inside segjax's demo data ({marker}): its split lists are the demo's own; "
                        "give --out_dir elsewhere")
    report = SkipReport()
    layout = roads.layout_from_arguments(args).resolve(args.data_root)
    if args.list:
        images = roads.read_list(args.data_root, args.list)
    elif args.split is None and layout.kind == "cityscapes":  # every split folder: the whole pool
        folders = sorted(p.name for p in (Path(args.data_root) / "leftImg8bit").iterdir() if p.is_dir())
        images = sorted(image for folder in folders for image in layout.pool(args.data_root, folder))
    else:
        images = layout.pool(args.data_root, args.split or "")
    classes = roads.load_class_set(args.classes)
    # The labels are read as the trainer reads them: an all-ignore label is left out too.
    pairs = roads.scan_labels(roads.list_pairs(args.data_root, layout, images, report), len(classes.names),
                              label_ids=args.label_ids, unknown=args.unknown_labels, report=report).pairs
    report.log(logging.getLogger("split_dataset"), "pool")
    if not pairs:
        raise DataError(f"no image with a usable label in the pool; skipped: {report.as_dict()}")
    lists = split_pool([p.id for p in pairs], fractions=args.fractions, seed=args.seed, by_subdir=args.by_subdir)
    files = write_lists(lists, out_dir)
    skipped = {reason: entry["count"] for reason, entry in report.as_dict().items()}
    print(f"split {len(pairs)} images (skipped: {skipped or 'none'}): "
          + ", ".join(f"{name} {len(lists[name])} -> {files[name]}" for name in lists))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
