#!/usr/bin/env python3
"""Hard copy-detection evaluation of a running or freshly started sidecar, through its HTTP API.

Protects each photo of the evaluation set in its own profile, then scans light and hard edited
copies of it, and edited copies of distractor photos that are protected nowhere. Reports recall per
transform (the copy's own profile among the scan's matches) and the pairwise false-match rate
(matches of a query to a profile of a different photo, over every query-profile pair).

Two sets of photos, kept apart:

- `evaluation` (the default, for reports): photographs from Debian packages (wallpapers by
  photographers, each under a free licence), fetched with `apt-get download` on first use into
  .cache/eval-photos;
- `calibration` (for choosing a card's `match_threshold` and `verification`): the scikit-image
  photos of models/effnet_lite0/photos.py, which picked the default model's numbers; every other
  one is protected, the rest are distractors.

    .cache/venv/bin/python scripts/eval_copies.py                 # starts target/release/inferpool-sidecar
    .cache/venv/bin/python scripts/eval_copies.py --api http://127.0.0.1:8080 --mode global
    .cache/venv/bin/python scripts/eval_copies.py --set calibration
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["plasma-workspace-wallpapers", "mate-backgrounds", "ukui-wallpapers"]
# Photographs that are protected (each in its own profile).
PROTECTED = {
    "bythewater": "usr/share/wallpapers/BytheWater/contents/images/2560x1600.jpg",
    "coldripple": "usr/share/wallpapers/ColdRipple/contents/images/2560x1600.jpg",
    "colorfulcups": "usr/share/wallpapers/ColorfulCups/contents/images/2560x1600.jpg",
    "darkesthour": "usr/share/wallpapers/DarkestHour/contents/images/2560x1600.jpg",
    "eveningglow": "usr/share/wallpapers/EveningGlow/contents/images/2560x1600.jpg",
    "fallenleaf": "usr/share/wallpapers/FallenLeaf/contents/images/2560x1600.jpg",
    "grey": "usr/share/wallpapers/Grey/contents/images/2560x1600.jpg",
    "kite": "usr/share/wallpapers/Kite/contents/images/2560x1600.jpg",
    "onestandsout": "usr/share/wallpapers/OneStandsOut/contents/images/2560x1600.jpg",
    "path": "usr/share/wallpapers/Path/contents/images/2560x1600.jpg",
    "summer1am": "usr/share/wallpapers/summer_1am/contents/images/2560x1600.jpg",
    "aqua": "usr/share/backgrounds/mate/nature/Aqua.jpg",
    "dune": "usr/share/backgrounds/mate/nature/Dune.jpg",
    "freshflower": "usr/share/backgrounds/mate/nature/FreshFlower.jpg",
    "garden": "usr/share/backgrounds/mate/nature/Garden.jpg",
    "ladybird": "usr/share/backgrounds/mate/nature/LadyBird.jpg",
    "raindrops": "usr/share/backgrounds/mate/nature/RainDrops.jpg",
    "storm": "usr/share/backgrounds/mate/nature/Storm.jpg",
    "twowings": "usr/share/backgrounds/mate/nature/TwoWings.jpg",
    "yellowflower": "usr/share/backgrounds/mate/nature/YellowFlower.jpg",
}
# Photos and artwork protected nowhere: queries that must match nothing, and the pictures that
# copies are pasted into. Some look much like protected photos (leaves with drops, grass, sky).
DISTRACTORS = {
    "greenmeadow": "usr/share/backgrounds/mate/nature/GreenMeadow.jpg",
    "blinds": "usr/share/backgrounds/mate/nature/Blinds.jpg",
    "wood": "usr/share/backgrounds/mate/nature/Wood.jpg",
    "pastelhills": "usr/share/wallpapers/PastelHills/contents/images/3200x2000.jpg",
    "autumn": "usr/share/wallpapers/Autumn/contents/images/2560x1600.jpg",
    "opal": "usr/share/wallpapers/Opal/contents/images/3840x2160.png",
    "canopee": "usr/share/wallpapers/Canopee/contents/images/3840x2160.png",
    "cascade": "usr/share/wallpapers/Cascade/contents/images/3840x2160.png",
    "flow": "usr/share/wallpapers/Flow/contents/images/5120x2880.jpg",
    "honeywave": "usr/share/wallpapers/Honeywave/contents/images/5120x2880.jpg",
    "kokkini": "usr/share/wallpapers/Kokkini/contents/images/3840x2160.png",
    "volna": "usr/share/wallpapers/Volna/contents/images/5120x2880.jpg",
    "icecold": "usr/share/wallpapers/IceCold/contents/images/5120x2880.png",
    "calla": "usr/share/backgrounds/calla.png",
    "goldfish": "usr/share/backgrounds/goldfish.png",
    "rhythm": "usr/share/backgrounds/rhythm.jpg",
    "string": "usr/share/backgrounds/string.jpg",
    "themouse": "usr/share/backgrounds/the-mouse.jpg",
}
LONG_SIDE = 1600  # photos are stored at this size: a typical upload, and quick to edit


def fetch_photos(dest: Path) -> None:
    """Downloads the packages and keeps the chosen files as JPEG quality 95 at LONG_SIDE."""
    wanted = {**PROTECTED, **DISTRACTORS}
    if all((dest / f"{name}.jpg").exists() for name in wanted):
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"fetching {', '.join(PACKAGES)} (about 200 MB, once) into {dest}")
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True, capture_output=True)
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        Image.MAX_IMAGE_PIXELS = None
        for name, path in wanted.items():
            image = Image.open(Path(tmp) / "x" / path).convert("RGB")
            image.thumbnail((LONG_SIDE, LONG_SIDE), Image.Resampling.LANCZOS)
            image.save(dest / f"{name}.jpg", quality=95)


def log(message: str) -> None:
    print(f"eval: {message}", file=sys.stderr, flush=True)


# --- transforms ------------------------------------------------------------------------------


def jpeg(image: Image.Image, quality: int = 85) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def crop_area(image: Image.Image, rng: random.Random, fraction: float) -> Image.Image:
    """A crop of `fraction` of the area at a random place, aspect within 0.75..1.33 of the photo's."""
    w, h = image.size
    aspect = rng.uniform(0.75, 1.33)
    cw = min(w, int(w * math.sqrt(fraction * aspect)))
    ch = min(h, int(w * h * fraction / cw))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.crop((x, y, x + cw, y + ch))


def rotate(image: Image.Image, degrees: float) -> Image.Image:
    """Rotated about the centre and cropped to the largest upright rectangle (no corners)."""
    w, h = image.size
    turned = image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False)
    a = math.radians(abs(degrees))
    # The largest axis-aligned rectangle inside the rotated one, same aspect.
    scale = 1 / (math.cos(a) + max(w / h, h / w) * math.sin(a))
    cw, ch = int(w * scale), int(h * scale)
    return turned.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2))


def perspective(image: Image.Image, rng: random.Random, _background: Image.Image) -> Image.Image:
    """A camera-like warp: each corner moved inwards by up to 12% of the side."""
    w, h = image.size
    d = lambda n: rng.uniform(0.03, 0.12) * n  # noqa: E731
    quad = (d(w), d(h), d(w), h - d(h), w - d(w), h - d(h), w - d(w), d(h))
    return image.transform((w, h), Image.Transform.QUAD, quad, Image.Resampling.BICUBIC)


def paste_into(image: Image.Image, background: Image.Image, rng: random.Random, scale: float) -> Image.Image:
    """The photo at `scale` of the background's width, at a random place in it."""
    canvas = background.copy()
    w = int(canvas.width * scale)
    small = image.resize((w, int(w * image.height / image.width)), Image.Resampling.LANCZOS)
    x = rng.randint(0, canvas.width - small.width)
    y = rng.randint(0, max(0, canvas.height - small.height))
    canvas.paste(small, (x, y))
    return canvas


def screenshot(image: Image.Image, rng: random.Random) -> Image.Image:
    """A phone screenshot of a social post: status bar, header, text lines, the photo, buttons."""
    page = Image.new("RGB", (1080, 1920), "white")
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, 1080, 70), fill=(20, 20, 20))
    draw.ellipse((40, 110, 150, 220), fill=(rng.randrange(256), 120, 200))
    draw.text((175, 130), "someone_posted  ·  2h", fill="black", font_size=40)
    for i in range(rng.randint(2, 4)):
        draw.rectangle((40, 260 + i * 60, 40 + rng.randint(500, 1000), 295 + i * 60), fill=(200, 200, 200))
    top = 260 + 4 * 60 + 20
    photo = image.resize((1080, int(1080 * image.height / image.width)), Image.Resampling.LANCZOS)
    page.paste(photo, (0, top))
    bottom = top + photo.height + 30
    for i in range(4):
        draw.ellipse((40 + i * 140, bottom, 120 + i * 140, bottom + 80), outline="black", width=6)
    return page


def meme(image: Image.Image) -> Image.Image:
    """White bands above and below (18% of the height each) with black caption text."""
    w, h = image.size
    band = int(h * 0.18)
    page = Image.new("RGB", (w, h + 2 * band), "white")
    page.paste(image, (0, band))
    draw = ImageDraw.Draw(page)
    size = band // 3
    draw.text((w // 12, band // 3), "WHEN THE PHOTO IS NOT YOURS", fill="black", font_size=size)
    draw.text((w // 12, h + band + band // 3), "BUT YOU POST IT ANYWAY", fill="black", font_size=size)
    return page


def stickers(image: Image.Image, rng: random.Random, _background: Image.Image) -> Image.Image:
    """Four to six opaque shapes covering about a fifth of the picture."""
    page = image.copy()
    draw = ImageDraw.Draw(page)
    w, h = page.size
    for _ in range(rng.randint(4, 6)):
        r = int(min(w, h) * rng.uniform(0.08, 0.14))
        x, y = rng.randint(0, w - 2 * r), rng.randint(0, h - 2 * r)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + 2 * r, y + 2 * r), fill=colour)
        else:
            draw.rectangle((x, y, x + 2 * r, y + 2 * r), fill=colour)
    return page


def combo(image: Image.Image, rng: random.Random, _background: Image.Image) -> Image.Image:
    """Crop to 60% of the area, mirror, colour shift and a 6-degree rotation."""
    out = ImageOps.mirror(crop_area(image, rng, 0.6))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.5, 1.5))
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    return rotate(out, rng.choice([-6, 6]))


def caption(image: Image.Image) -> Image.Image:
    page = image.copy()
    draw = ImageDraw.Draw(page)
    w, h = page.size
    draw.text((w // 20, h - h // 8), "© not the owner", fill="white", font_size=h // 14)
    return page


def noise(image: Image.Image, rng: random.Random, _background: Image.Image) -> Image.Image:
    import numpy as np

    pixels = np.asarray(image, dtype=np.float32)
    pixels += np.random.default_rng(rng.randrange(1 << 30)).normal(0, 10, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


LIGHT = {
    "downscale50": lambda im, rng, bg: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "jpeg30": lambda im, rng, bg: Image.open(io.BytesIO(jpeg(im, 30))),
    "crop10": lambda im, rng, bg: im.crop((im.width // 10, im.height // 10, im.width * 9 // 10, im.height * 9 // 10)),
    "brightness": lambda im, rng, bg: ImageEnhance.Brightness(im).enhance(1.3),
    "mirror": lambda im, rng, bg: ImageOps.mirror(im),
    "rotate5": lambda im, rng, bg: rotate(im, 5),
    "caption": lambda im, rng, bg: caption(im),
    "grey": lambda im, rng, bg: ImageOps.grayscale(im).convert("RGB"),
    "noise": noise,
    "border": lambda im, rng, bg: ImageOps.expand(im, border=im.width // 25, fill=(30, 30, 30)),
}
HARD = {
    "crop50": lambda im, rng, bg: crop_area(im, rng, 0.5),
    "crop30": lambda im, rng, bg: crop_area(im, rng, 0.3),
    "rotate15": lambda im, rng, bg: rotate(im, rng.choice([-15, 15])),
    "rotate90": lambda im, rng, bg: im.transpose(rng.choice([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270])),
    "perspective": perspective,
    "pasted": lambda im, rng, bg: paste_into(im, bg, rng, 0.5),
    "screenshot": lambda im, rng, bg: screenshot(im, rng),
    "meme": lambda im, rng, bg: meme(im),
    "stickers": stickers,
    "combo": combo,
}
TRANSFORMS = {**LIGHT, **HARD}


# --- the service -----------------------------------------------------------------------------


def call(url: str, method: str = "GET", body: bytes | None = None, content_type: str | None = None) -> dict:
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    for attempt in range(20):
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code in (429, 503) and attempt < 19:
                time.sleep(float(error.headers.get("Retry-After") or 0.2))
                continue
            raise SystemExit(f"eval: {method} {url} -> {error.code}: {error.read()[:300]!r}") from None
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sidecar(binary: Path, data_dir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port, admin = free_port(), free_port()
    api = f"http://127.0.0.1:{port}"
    command = [str(binary), "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
               "--data-dir", str(data_dir), "--memory-entries", "0", "--disk-mb", "0", *extra]
    log(f"starting {' '.join(command)}")
    process = subprocess.Popen(command, stderr=open(data_dir / "sidecar.log", "wb"))
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{api}/readyz", timeout=2).close()
            return process, api
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"eval: the sidecar exited; see {data_dir / 'sidecar.log'}") from None
            time.sleep(0.2)
    raise SystemExit("eval: the sidecar was not ready within 120 s")


def photo_sets(which: str, photos: Path) -> tuple[dict, dict]:
    """(protected, distractors) of the named set, as RGB images by name."""
    if which == "calibration":
        sys.path.insert(0, str(ROOT / "models/effnet_lite0"))
        from photos import PHOTO_NAMES, load_photo

        images = {name: load_photo(name) for name in PHOTO_NAMES}
        names = list(images)
        return {n: images[n] for n in names[::2]}, {n: images[n] for n in names[1::2]}
    fetch_photos(photos)
    load = lambda name: Image.open(photos / f"{name}.jpg").convert("RGB")  # noqa: E731
    return {name: load(name) for name in PROTECTED}, {name: load(name) for name in DISTRACTORS}


def evaluate(api: str, originals: dict, distractors: dict, seed: int, mode: str | None) -> dict:
    rng = random.Random(seed)
    backgrounds = list(distractors.values())
    for name, image in originals.items():
        body = {"references": [{"id": name, "image_b64": base64.b64encode(jpeg(image, 90)).decode()}]}
        call(f"{api}/api/v1/profiles/eval-{name}", "PUT", json.dumps(body).encode(), "application/json")
    log(f"protected {len(originals)} photos, one profile each")

    suffix = f"&mode={mode}" if mode else ""
    hits: dict[str, list[int]] = defaultdict(list)
    false_matches: list[str] = []
    queries = 0
    sample: list[bytes] = []
    total = (len(originals) + len(distractors)) * len(TRANSFORMS)
    started = time.monotonic()
    for kind, source in (("copy", originals), ("distractor", distractors)):
        for name, image in source.items():
            for transform, make in TRANSFORMS.items():
                query = jpeg(make(image, rng, rng.choice(backgrounds)), 85)
                sample.append(query)
                answer = call(f"{api}/api/v1/scan?top_k=100{suffix}", "POST", query, "image/jpeg")
                matched = {m["profile"].removeprefix("eval-") for m in answer["matches"]}
                queries += 1
                if kind == "copy":
                    hits[transform].append(int(name in matched))
                    matched.discard(name)
                false_matches += [f"{kind} {name}/{transform} -> {m}" for m in sorted(matched)]
                if queries % 100 == 0:
                    log(f"{queries} of {total} queries scanned, {len(false_matches)} false matches so far")
    elapsed = time.monotonic() - started
    speed = throughput(api, sample)
    pairs = queries * len(originals)
    per_transform = {t: sum(v) / len(v) for t, v in hits.items()}
    return {
        "photos": {"protected": sorted(originals), "distractors": sorted(distractors)},
        "mode": mode or "default",
        "queries": queries,
        "pairs": pairs,
        "recall": {t: round(r, 4) for t, r in per_transform.items()},
        "recall_light": round(sum(sum(hits[t]) for t in LIGHT) / sum(len(hits[t]) for t in LIGHT), 4),
        "recall_hard": round(sum(sum(hits[t]) for t in HARD) / sum(len(hits[t]) for t in HARD), 4),
        "recall_overall": round(sum(map(sum, hits.values())) / sum(map(len, hits.values())), 4),
        "false_match_rate": round(len(false_matches) / pairs, 5),
        "false_matches": false_matches,
        "queries_per_second": round(queries / elapsed, 1),
        "throughput": speed,
    }


def throughput(api: str, images: list[bytes], clients: int = 4) -> dict:
    """Requests per second of embed, robust scan and global scan over the same images, with
    `clients` concurrent callers (the service's caches are off, so every request is computed)."""
    from concurrent.futures import ThreadPoolExecutor

    routes = {"embed": "/api/v1/embed", "scan_robust": "/api/v1/scan?mode=robust", "scan_global": "/api/v1/scan?mode=global"}
    out = {}
    for name, path in routes.items():
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda body: call(f"{api}{path}", "POST", body, "image/jpeg"), images))
        out[name] = round(len(images) / (time.monotonic() - started), 1)
        log(f"throughput {name}: {out[name]} requests/s ({clients} clients, {len(images)} images)")
    out["scan_robust_vs_embed"] = round(out["scan_robust"] / out["embed"], 2)
    out["scan_global_vs_embed"] = round(out["scan_global"] / out["embed"], 2)
    return out


def report(result: dict) -> str:
    rows = [f"| transform | kind | recall ({result['mode']}) |", "|---|---|---|"]
    rows += [f"| {t} | {'light' if t in LIGHT else 'hard'} | {r:.2f} |" for t, r in result["recall"].items()]
    rows.append(
        f"\nrecall light {result['recall_light']:.3f}, hard {result['recall_hard']:.3f}, overall "
        f"{result['recall_overall']:.3f}; false-match rate {result['false_match_rate']:.4f} "
        f"({len(result['false_matches'])} of {result['pairs']} query-profile pairs); "
        f"{result['queries_per_second']} scans/s one at a time"
    )
    t = result["throughput"]
    rows.append(
        f"throughput, 4 clients, same images: embed {t['embed']}/s, robust scan {t['scan_robust']}/s "
        f"({t['scan_robust_vs_embed']}x), global scan {t['scan_global']}/s ({t['scan_global_vs_embed']}x)"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", help="a running sidecar's API URL (default: start one)")
    parser.add_argument("--sidecar", type=Path, default=ROOT / "target/release/inferpool-sidecar")
    parser.add_argument("--photos", type=Path, default=ROOT / ".cache/eval-photos")
    parser.add_argument("--set", choices=["evaluation", "calibration"], default="evaluation", dest="photo_set",
                        help="which photos (default: evaluation)")
    parser.add_argument("--mode", choices=["robust", "global"], help="matching mode per request (default: the service's)")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", type=Path, help="write the full result as JSON here")
    parser.add_argument("sidecar_args", nargs="*", help="extra sidecar flags (after --)")
    args = parser.parse_args()
    originals, distractors = photo_sets(args.photo_set, args.photos)
    process = None
    data_dir = Path(tempfile.mkdtemp(prefix="inferpool-eval-"))
    try:
        if args.api:
            api = args.api
        else:
            if not args.sidecar.exists():
                raise SystemExit(f"eval: {args.sidecar} is missing: cargo build --release -p inferpool-sidecar")
            process, api = start_sidecar(args.sidecar, data_dir, args.sidecar_args)
        result = evaluate(api, originals, distractors, args.seed, args.mode)
        result["set"] = args.photo_set
    finally:
        if process:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    for line in result["false_matches"][:20]:
        print("  false match:", line)


if __name__ == "__main__":
    main()
