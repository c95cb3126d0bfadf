"""How close reduced decoding (decode.py) comes to the full decode, on camera-size JPEGs made from real photos.

    python scripts/decode_check.py --weights ../shared/data/mobilenet_v2-7af39f22.pth [--out decode_check.json]

The photos are the real photographs that ship with installed packages (scikit-learn's `load_sample_images`:
china.jpg and flower.jpg, 640 x 427; matplotlib's sample grace_hopper.jpg, 512 x 600), each cropped or flipped
two ways and upscaled (Lanczos) to a 12-megapixel camera size (4000 x 3000, or 3000 x 4000 for the portrait),
saved at JPEG quality 90. An upscale from 640 px is smoother than a real camera photo, whose sensor noise and
fine detail reach the pixel level. So every image also comes in a `grain` version (unsharp mask and Gaussian
noise of sigma 4 added at camera size): more high-frequency energy than the smooth upscale. Neither is a real
camera file; the grain ones are the harder case.

For each image, its features (ImageNet MobileNetV2, the real weights, every tap, average pooled, --image-size
px, as `extract` computes them: read_image -> Preprocess.resize -> normalize -> folded backbone) from the full
decode are compared with those from reduced decoding at margin 1 (the decoded shorter side kept at least
image_size) and margin 2 (at least twice it), by cosine: at the `late` tap and at every tap, min and mean over
images and taps. The same file re-saved at JPEG quality 75 and fully decoded is given as a yardstick: a change
nobody would call a different image. Decode + resize time per image (one thread, best of --repeats) for each.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from fusion_cache import decode
from fusion_cache.backbone import PooledExtractor, build_model, load_weights, versions
from fusion_cache.backbones import resolve
from fusion_cache.extract import preprocess_for

CAMERA = (4000, 3000)  # 12 megapixels, 4:3 like most camera sensors
MARGINS = (1, 2)
# 224: the bench's size (margin 2: a 1/4 DCT decode, 750 px, resized 3.3x); 184: the worst case of margin 2 (a 1/8
# decode leaves 375 px, just over 2 x 184, resized only 2.04x); 128: the default (1/8, 375 px, 2.9x).
SIZES = (224, 184, 128)


def source_photos() -> dict[str, Path]:
    """The real photographs shipped with installed packages: {name: file}."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    photos = {Path(f).stem: Path(f) for f in load_sample_images().filenames}
    photos["grace_hopper"] = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return photos


def variants(im: Image.Image) -> list[tuple[str, Image.Image]]:
    """Two framings of one photo at the camera's aspect ratio: the largest centred crop, and a tighter
    off-centre crop mirrored left to right."""
    w, h = im.size
    portrait = h > w
    aspect = CAMERA[1] / CAMERA[0] if not portrait else CAMERA[0] / CAMERA[1]  # height / width
    cw, ch = (w, round(w * aspect)) if w * aspect <= h else (round(h / aspect), h)
    left, top = (w - cw) // 2, (h - ch) // 2
    full = im.crop((left, top, left + cw, top + ch))
    tw, th = round(cw * 0.8), round(ch * 0.8)
    tight = im.crop((w - tw, 0, w, th)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return [("centre", full), ("tight-flipped", tight)]


def camera_jpegs(folder: Path, seed: int = 0) -> list[dict]:
    """Write the camera-size JPEGs; return one record per file."""
    rng = np.random.default_rng(seed)
    out = []
    for name, path in source_photos().items():
        with Image.open(path) as src:
            src = src.convert("RGB")
            for framing, im in variants(src):
                size = CAMERA if im.width >= im.height else CAMERA[::-1]
                big = im.resize(size, Image.Resampling.LANCZOS)
                for kind in ("smooth", "grain"):
                    pixels = big
                    if kind == "grain":
                        sharp = np.asarray(big.filter(ImageFilter.UnsharpMask(radius=2, percent=80, threshold=0)),
                                           np.float32)
                        noisy = sharp + rng.normal(0, 4, sharp.shape).astype(np.float32)
                        pixels = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
                    f = folder / f"{name}-{framing}-{kind}.jpg"
                    pixels.save(f, quality=90)
                    pixels.save(f.with_suffix(".q75.jpg"), quality=75)
                    out.append({"file": f, "photo": name, "framing": framing, "kind": kind, "size": size,
                                "bytes": f.stat().st_size})
    return out


def decoded(path: Path, reduce_to: int | None, margin: int, pre) -> tuple[torch.Tensor, tuple[int, int]]:
    """The network's uint8 input for one file, as extract makes it, and the decoded size before the resize."""
    saved = decode.REDUCE_MARGIN
    decode.REDUCE_MARGIN = margin
    try:
        t = decode.read_image(path, reduce_to=reduce_to)
    finally:
        decode.REDUCE_MARGIN = saved
    return pre.resize(t), (t.shape[2], t.shape[1])


def best_time(path: Path, reduce_to: int | None, margin: int, pre, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        decoded(path, reduce_to, margin, pre)
        best = min(best, time.perf_counter() - start)
    return best


def cosines(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{tap: (n,) cosine between the rows of a[tap] and b[tap]}, in float64."""
    out = {}
    for t in a:
        x, y = a[t].astype(np.float64), b[t].astype(np.float64)
        out[t] = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, help="ImageNet MobileNetV2 weights (a .pth state_dict)")
    ap.add_argument("--image-size", type=int, action="append",
                    help="the network's input size; repeat for several (default: 224, 184 and 128)")
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds per image and mode (best is kept)")
    ap.add_argument("--out", type=Path, default=Path("decode_check.json"))
    a = ap.parse_args()
    sizes = a.image_size or list(SIZES)
    bb = resolve("mobilenet_v2")
    weights = load_weights(a.weights, backbone=bb)
    table = bb.tap_table()
    taps = list(table.names)
    late = table.views["late"][0]
    extractor = PooledExtractor(build_model(weights).to(memory_format=torch.channels_last), taps, None, table).eval()
    threads = torch.get_num_threads()
    res: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                             "cpus": os.cpu_count()},
                 "versions": versions(), "weights": str(a.weights), "weights_sha256": weights.sha256,
                 "camera_size": list(CAMERA), "jpeg_quality": 90, "by_size": {}}

    def features(images: list[torch.Tensor]) -> dict[str, np.ndarray]:
        x = pre.normalize(torch.stack(images)).contiguous(memory_format=torch.channels_last)
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return {t: v.numpy() for t, v in extractor(x).items()}

    with tempfile.TemporaryDirectory(prefix="fc-decode-") as tmp:
        start = time.perf_counter()
        files = camera_jpegs(Path(tmp))
        print(f"wrote {len(files)} camera-size JPEGs in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        res["images"] = [{k: (str(v.name) if k == "file" else v) for k, v in r.items()} for r in files]
        for size in sizes:
            pre = preprocess_for(bb, weights.name, size)
            modes = {"full": (None, decode.REDUCE_MARGIN), **{f"margin{m}": (size, m) for m in MARGINS},
                     "full_q75": (None, decode.REDUCE_MARGIN)}
            inputs, decoded_size, seconds = {m: [] for m in modes}, {m: [] for m in modes}, {m: [] for m in modes}
            torch.set_num_threads(1)  # what one DataLoader worker spends per image
            for r in files:
                for m, (reduce_to, margin) in modes.items():
                    f = r["file"].with_suffix(".q75.jpg") if m == "full_q75" else r["file"]
                    image, dsize = decoded(f, reduce_to, margin, pre)
                    inputs[m].append(image)
                    decoded_size[m].append(dsize)
                    seconds[m].append(best_time(f, reduce_to, margin, pre, a.repeats))
            torch.set_num_threads(threads)
            feats = {m: features(v) for m, v in inputs.items()}
            row: dict = {}
            for m in modes:
                if m == "full":
                    row[m] = {"decode_resize_ms": 1000 * float(np.mean(seconds[m])),
                              "decoded_size": decoded_size[m][0]}
                    continue
                cos = cosines(feats["full"], feats[m])
                every = np.stack([cos[t] for t in taps])  # (taps, images)
                grain = np.array([r["kind"] == "grain" for r in files])
                ms = 1000 * np.asarray(seconds[m])
                row[m] = {"late_min": float(cos[late].min()), "late_mean": float(cos[late].mean()),
                          "all_taps_min": float(every.min()), "all_taps_mean": float(every.mean()),
                          "worst_tap": taps[int(every.min(axis=1).argmin())],
                          "all_taps_min_smooth": float(every[:, ~grain].min()),
                          "all_taps_min_grain": float(every[:, grain].min()),
                          "per_tap_min": {t: float(cos[t].min()) for t in taps},
                          "decode_resize_ms": float(ms.mean()),
                          "decode_resize_ms_smooth": float(ms[~grain].mean()),
                          "decode_resize_ms_grain": float(ms[grain].mean()),
                          "decoded_sizes": sorted({tuple(s) for s in decoded_size[m]})}
            res["by_size"][str(size)] = row
    torch.set_num_threads(threads)
    res["chosen_margin"] = choose(res)
    res["decode_margin_in_code"] = decode.REDUCE_MARGIN
    a.out.write_text(json.dumps(res, indent=2, default=list))
    print(report(res, late))
    return 0


# The rule: the smallest margin whose worst cosine (every image, every tap, every size measured) is at least
# FLOOR. A full decode of the same file re-saved at quality 75 is printed beside it as a yardstick.
FLOOR = 0.99


def choose(res: dict) -> int:
    for m in MARGINS:
        if all(row[f"margin{m}"]["all_taps_min"] >= FLOOR for row in res["by_size"].values()):
            return m
    return max(MARGINS)


def report(res: dict, late: str) -> str:
    lines = [f"{len(res['images'])} camera-size JPEGs ({res['camera_size'][0]}x{res['camera_size'][1]}, q90) from "
             f"real photos, upscaled (smoother than a real camera photo; half with grain added)",
             f"{'size':>4} {'decode':<9} {'decoded':>11} {'ms/img':>7} {'late min':>9} {'late mean':>9} "
             f"{'all min':>8} {'all mean':>8} {'smooth':>7} {'grain':>7}  worst tap"]
    for size, row in res["by_size"].items():
        for m, r in row.items():
            dsize = "x".join(map(str, r["decoded_size"] if m == "full" else max(r["decoded_sizes"])))
            if m == "full":
                lines.append(f"{size:>4} {m:<9} {dsize:>11} {r['decode_resize_ms']:>7.1f}")
                continue
            lines.append(f"{size:>4} {m:<9} {dsize:>11} {r['decode_resize_ms']:>7.1f} {r['late_min']:>9.5f} "
                         f"{r['late_mean']:>9.5f} {r['all_taps_min']:>8.5f} {r['all_taps_mean']:>8.5f} "
                         f"{r['all_taps_min_smooth']:>7.4f} {r['all_taps_min_grain']:>7.4f}  {r['worst_tap']}")
    lines.append(f"cosine against the full decode, {late} = the late tap; full_q75: the same photo at JPEG quality "
                 f"75, fully decoded (a yardstick). Chosen margin (smallest with every cosine >= {FLOOR}): "
                 f"{res['chosen_margin']}; decode.REDUCE_MARGIN = {res['decode_margin_in_code']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
