"""Jigsaw-solver attack on EtC: time and accuracy for 64-196+ blocks on the bundled photos.

    python benchmarks/bench_jigsaw.py [--sizes 128,160,224] [--block-size 16] [--jpeg 90]
                                      [--jpeg-decoder nofancy|pillow] [--ridge 0] [--json FILE]

For each size and victim photo (astronaut, chelsea, flower): EtC-encrypt under a seeded
(insecure, benchmark-only) key, optionally JPEG-compress the cipher image (4:2:0, quality
--jpeg, decoded with --jpeg-decoder), solve with all 96 states per block, and report wall
time, direct / neighbour / largest-component accuracy, SSIM and SSIM up to a global
state. Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from etcjax import codec, etc, metrics
from etcjax.attacks import jigsaw, photos
from etcjax.keys import EtcKey


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="128,160,224")
  parser.add_argument("--block-size", type=int, default=16)
  parser.add_argument("--jpeg", type=int, default=0, help="JPEG quality (0: lossless)")
  parser.add_argument("--jpeg-decoder", choices=codec.JPEG_DECODERS, default="nofancy",
                      help="how the attacker decodes JPEG (default nofancy: Pillow's smooth "
                      "chroma upsampling mixes neighbouring cipher blocks into the edges)")
  parser.add_argument("--ridge", type=float, default=0.0,
                      help="jigsaw covariance noise floor (try 8 for JPEG)")
  parser.add_argument("--json", help="also write the rows as JSON")
  args = parser.parse_args()
  rows = []
  for size in (int(s) for s in args.sizes.split(",")):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      schedule = EtcKey.insecure_from_seed(1234).schedule(size, size, args.block_size)
    for name, plain in zip(photos.VICTIM_PHOTOS, photos.victim_images(size), strict=True):
      enc = np.asarray(etc.encrypt(plain, schedule))
      if args.jpeg:
        data = codec.encode(enc, "jpeg", quality=args.jpeg, subsampling="4:2:0")
        enc = codec.decode_jpeg(data, args.jpeg_decoder)
      start = time.perf_counter()
      result = jigsaw.solve(enc, args.block_size, ridge=args.ridge)
      seconds = time.perf_counter() - start
      acc = jigsaw.evaluate(result, enc, schedule)
      row = {"size": size, "blocks": schedule.num_blocks, "image": name, "jpeg": args.jpeg,
             "decoder": args.jpeg_decoder if args.jpeg else None, "ridge": args.ridge,
             "seconds": round(seconds, 2), **{k: round(v, 3) for k, v in acc.items()},
             "ssim": round(float(metrics.ssim(plain, result.image)), 3),
             "ssim_aligned": round(float(metrics.ssim_up_to_global_state(plain, result.image)),
                                   3)}
      rows.append(row)
      print(json.dumps(row))
  if args.json:
    from etcjax import fileio

    fileio.write_text(args.json, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
  main()
