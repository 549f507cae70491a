"""Rank a pool of labelled road-scene images and keep the most informative ones.

python tools/select_subset.py --data_root ROOT (--split train | --list FILE) --num 1500 --out_dir OUT
    [--weights 0.4,0.4,0.2] [--min_pixels 1] [--workers N] [layout / suffix / class-set options]

score = a*CDS/max CDS + b*RCS/max RCS + g*ICS/max ICS (see segjax/data/subset.py), top --num by
score, ties by path. Writes OUT/subset.txt (image paths relative to ROOT, in rank order; train on
it with --set data.train_list=OUT/subset.txt), OUT/scores.csv (path,cds,rcs,ics,score for the
whole pool, in rank order) and OUT/class_frequency.png (per class, the share of images holding
it in the pool and in the subset).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from segjax.data import roads, subset
from segjax.data.demo import demo_marker
from segjax.data.errors import DataError, SkipReport
from segjax.errors import ArgumentParser, guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    # A one-line usage: a command-line mistake reads as two short lines, not a page.
    parser = ArgumentParser(
        usage="%(prog)s --data_root ROOT (--split S | --list FILE) --out_dir OUT [options; see --help]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roads.add_data_arguments(parser)
    pool = parser.add_mutually_exclusive_group()
    pool.add_argument("--split", default="train",
                      help="ROOT/splits/SPLIT.txt when it exists (tools/split_dataset.py), else the folder: "
                           "leftImg8bit/SPLIT/ (Cityscapes-style) or all of images/ (folders); '' = all images")
    pool.add_argument("--list", default="", help="a list file of image paths relative to ROOT (instead of --split)")
    parser.add_argument("--num", type=int, default=1500, help="how many images to keep")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--weights", type=roads.three_numbers(), default=subset.DEFAULT_WEIGHTS,
                        help="alpha,beta,gamma")
    parser.add_argument("--min_pixels", type=int, default=1, help="pixels a class needs to count as present")
    parser.add_argument("--workers", type=int, default=0, help="threads reading labels (0: one per core, up to 16)")
    args = parser.parse_args(argv)
    if args.num < 1 or args.min_pixels < 1 or args.workers < 0:
        parser.error("--num and --min_pixels must be >= 1 and --workers >= 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    marker = demo_marker(args.out_dir)
    if marker is not None:
        raise DataError(f"{args.out_dir} is inside segjax's demo data ({marker}): its subset is the demo's own; "
                        "give --out_dir elsewhere")
    layout = roads.layout_from_arguments(args).resolve(args.data_root)
    split_list = Path(args.data_root) / "splits" / f"{args.split}.txt"
    list_file, split = args.list, args.split
    if not list_file and split and split_list.is_file():  # the split tool's list wins over the folder
        list_file = str(split_list)
    elif not list_file and layout.kind == "folders":
        split = ""  # no split lists: every image of images/
    report = SkipReport()
    classes = roads.load_class_set(args.classes)
    start = time.perf_counter()
    scan = roads.load_road_data(
        args.data_root, layout=layout, split=split, list_file=list_file,
        num_classes=len(classes.names), label_ids=args.label_ids, unknown=args.unknown_labels, report=report,
        workers=args.workers, progress=True)
    seconds = time.perf_counter() - start
    paths = [pair.id for pair in scan.pairs]
    files = subset.write_selection(paths, scan.class_pixels, args.out_dir, num=args.num, names=classes.names,
                                   colours=classes.colours, min_pixels=args.min_pixels, weights=args.weights)
    skipped = {reason: entry["count"] for reason, entry in report.as_dict().items()}
    source = list_file or (f"leftImg8bit/{split}/" if layout.kind == "cityscapes" else "images/")
    print(f"ranked {len(paths)} images of {source} ({len(paths) / seconds:.0f} labels/s, {seconds:.1f} s; skipped: "
          f"{skipped or 'none'}); kept {min(args.num, len(paths))} in {files['subset']}, scores in "
          f"{files['scores']}, chart {files['chart']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
