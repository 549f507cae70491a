"""Prepare P3M-10k (+ Supervisely Person) as fixed-size train/val memmaps with JSON sidecars.

python tools/prepare_p3m.py --p3m_root DIR [--supervisely_root DIR] --out_dir DIR [--size 640]
    [--dtype uint8|float16] [--mask_threshold 128] [--resize letterbox|stretch]
"""
from __future__ import annotations

import argparse
import logging

from segjax.data.errors import DataError
from segjax.data.prepare import prepare_memmaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p3m_root", required=True, help="P3M-10k folder (or its parent)")
    parser.add_argument("--supervisely_root", default=None, help="searched for images/ + masks/ folder pairs (train)")
    parser.add_argument("--out_dir", required=True, help="where the .mmap files and their .json sidecars go")
    parser.add_argument("--size", type=int, default=640, help="records are size x size")
    parser.add_argument("--dtype", choices=["uint8", "float16"], default="uint8",
                        help="float16 writes the original PyTorch pipeline's NCHW *_fp16_* files")
    parser.add_argument("--mask_threshold", type=int, default=128, help="mask value >= this is foreground")
    parser.add_argument("--resize", choices=["letterbox", "stretch"], default="letterbox")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        summary = prepare_memmaps(args.p3m_root, args.out_dir, supervisely_root=args.supervisely_root,
                                  size=args.size, dtype=args.dtype, mask_threshold=args.mask_threshold,
                                  resize=args.resize)
    except (DataError, ValueError) as err:
        logging.getLogger("prepare_p3m").error("%s", err)
        return 2
    for split, info in summary["splits"].items():
        files = f": {info['images']} {info['masks']}" if info["count"] else " (no files written)"
        print(f"{split}: {info['count']} records{files}")
        for reason, skipped in info["skipped"].items():
            print(f"  skipped {reason}: {skipped['count']} (e.g. {', '.join(skipped['examples'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
