#!/usr/bin/env python3
"""Reference side of `gigapath bench tiles`: openslide-python on the same tiles.

For each tile of the grid CSV written by `gigapath tile` (gx,gy,x0_level0,y0_level0,...):
read_region at the planned level -> RGB -> resize to 256 when needed (PIL bicubic) ->
center-crop 224 -> float32 / 255 -> ImageNet normalise (CHW). Prints one JSON line per run
({"workers": N, "tiles": T, "seconds": S, "tiles_per_s": R}).

Needs: pip install openslide-python openslide-bin numpy pillow
"""
import argparse
import json
import multiprocessing as mp
import time

import numpy as np
import openslide

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]

_slide = None
_args = None


def _init(path, level, read_px):
    global _slide, _args
    _slide = openslide.OpenSlide(path)
    _args = (level, read_px)


def _work(chunk):
    level, read_px = _args
    acc = 0.0
    for x0, y0 in chunk:
        img = _slide.read_region((x0, y0), level, (read_px, read_px)).convert("RGB")
        if read_px != 256:
            img = img.resize((256, 256), resample=3)  # PIL.Image.BICUBIC
        a = np.asarray(img)[16:240, 16:240].transpose(2, 0, 1).astype(np.float32) / 255.0
        a = (a - MEAN) / STD
        acc += float(a[0, 0, 0])  # keep the work observable
    return acc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slide", required=True)
    p.add_argument("--tiles", required=True, help="tiles.csv from gigapath tile")
    p.add_argument("--level", type=int, required=True)
    p.add_argument("--read-px", type=int, required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--max-tiles", type=int, default=0)
    a = p.parse_args()
    coords = []
    with open(a.tiles) as f:
        next(f)
        for line in f:
            gx, gy, x0, y0, *_ = line.strip().split(",")
            coords.append((int(x0), int(y0)))
    if a.max_tiles:
        coords = coords[: a.max_tiles]
    for workers in a.workers:
        chunks = [coords[i : i + 64] for i in range(0, len(coords), 64)]
        t = time.perf_counter()
        if workers == 1:
            _init(a.slide, a.level, a.read_px)
            for c in chunks:
                _work(c)
        else:
            with mp.Pool(workers, initializer=_init, initargs=(a.slide, a.level, a.read_px)) as pool:
                list(pool.imap(_work, chunks))
        s = time.perf_counter() - t
        print(json.dumps({"workers": workers, "tiles": len(coords), "seconds": s, "tiles_per_s": len(coords) / s}), flush=True)


if __name__ == "__main__":
    main()
