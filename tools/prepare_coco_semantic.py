"""Write one class-index PNG mask per image of a COCO instances file, for semantic segmentation.

python tools/prepare_coco_semantic.py --ann A --img_dir D --out_dir O [--visualize N] [--crowd skip|ignore]
    [--link_images] [--class_priority a,b,c] [--seed S]

Masks go to O/masks/ (0 background, 1..K the categories in id order, 255 ignore), the index ->
name map to O/classes.json and the counts of what was written and skipped to O/summary.json.
"""
from __future__ import annotations

import argparse
import logging

from segjax.data.prepare import CROWD_MODES, prepare_coco_semantic
from segjax.errors import ArgumentParser, guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", required=True, help="COCO instances JSON, e.g. instances_train2017.json")
    parser.add_argument("--img_dir", required=True, help="folder with the images of --ann")
    parser.add_argument("--out_dir", required=True, help="where masks/, classes.json (and images/) go")
    parser.add_argument("--crowd", choices=CROWD_MODES, default="skip",
                        help="crowd annotations: leave out, or paint as 255 (ignored in training)")
    parser.add_argument("--class_priority", default="",
                        help="comma-separated category names painted last, the last one on top "
                             "(default: smaller objects on top of larger ones)")
    parser.add_argument("--visualize", type=int, default=0, help="save this many image|mask|overlay PNGs")
    parser.add_argument("--link_images", action="store_true",
                        help="symlink (or copy) the used images into OUT_DIR/images/ beside masks/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --visualize choice")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Names may contain spaces ("dining table"), so only commas separate them.
    priority = [name.strip() for name in args.class_priority.split(",") if name.strip()] or None
    summary = prepare_coco_semantic(args.ann, args.img_dir, args.out_dir, crowd=args.crowd,
                                    class_priority=priority, visualize=args.visualize,
                                    link_images=args.link_images, seed=args.seed)
    skipped = {reason: entry["count"] for reason, entry in summary["skipped_images"].items()}
    print(f"wrote {summary['written']} of {summary['images']} masks into {summary['masks_dir']} "
          f"({summary['num_classes']} classes incl. background); skipped images: {skipped or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
