"""Write a person-only, crowd-free COCO annotation file (optionally a subset) and ROI class stats.

python tools/prepare_coco_person.py --ann A --img_dir D --out_dir O [--num_images N] [--seed S] [--stats]
"""
from __future__ import annotations

import argparse
import json
import logging

from segjax.data.coco import load_person_index
from segjax.data.prepare import compute_roi_class_stats, person_only_subset, write_stats
from segjax.errors import ArgumentParser, guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", required=True, help="COCO instances JSON, e.g. instances_train2017.json")
    parser.add_argument("--img_dir", required=True, help="folder with the images of --ann")
    parser.add_argument("--out_dir", required=True, help="where the new annotation file (and stats) go")
    parser.add_argument("--num_images", type=int, default=None, help="keep a random subset of this many images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset")
    parser.add_argument("--stats", action="store_true", help="also write ROI target class statistics")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("prepare_coco_person")

    out_path = person_only_subset(args.ann, args.out_dir, num_images=args.num_images, seed=args.seed)
    images, report = load_person_index(out_path, args.img_dir)
    report.log(log, out_path.name)
    print(f"wrote {out_path}")
    print(f"usable: {len(images)} images, {sum(len(im.persons) for im in images)} persons, {report.total} skipped")
    if args.stats:
        stats = compute_roi_class_stats(images)
        stats_path = write_stats(stats, out_path.with_name(f"{out_path.stem}_roi_stats.json"))
        print(f"wrote {stats_path}")
        print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
