"""Write a pickle of road-scene records (e.g. the original data/raw/data.pkl) into the folder layout.

python tools/convert_pickle.py --pickle data/raw/data.pkl --out_dir ROOT --trust_pickle [--subdir pool]

The pickle holds a sequence of records, each an image and a segmentation map (numpy arrays or PIL
images) under common keys (image/img/pixel_values, label/mask/annotation/segmentation_map), or an
(image, label) pair; optional file_name/name and subdir/folder keys name the files. Writes
ROOT/images/SUBDIR/STEM.png and ROOT/labels/SUBDIR/STEM.png; unusable records are counted.
Unpickling runs code named in the file, so nothing is read without --trust_pickle.
"""
from __future__ import annotations

import argparse
import logging

from segjax.data.prepare import convert_records, load_pickle
from segjax.errors import ArgumentParser, guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    # A one-line usage: a command-line mistake reads as two short lines, not a page.
    parser = ArgumentParser(
        usage="%(prog)s --pickle FILE --out_dir ROOT --trust_pickle [--subdir NAME]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pickle", required=True, help="the pickle file, e.g. data/raw/data.pkl")
    parser.add_argument("--out_dir", required=True, help="ROOT of the folder layout to write")
    parser.add_argument("--subdir", default="pool", help="subdirectory for records that name none")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="allow unpickling (it runs code the file names): only for files you trust")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = convert_records(load_pickle(args.pickle, trust=args.trust_pickle), args.out_dir, subdir=args.subdir)
    skipped = {reason: entry["count"] for reason, entry in summary["skipped"].items()}
    print(f"wrote {summary['written']} of {summary['records']} records into {summary['images_dir']} and "
          f"{summary['labels_dir']}; skipped: {skipped or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
