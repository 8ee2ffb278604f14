"""A node's data larger than its memory: peak RSS of a DP node on an image folder 10x the size of an in-memory
data set.

Makes a synthetic image folder of `--images` RGB PNGs (four classes, one bright quadrant each, with noise)
and, as the baseline, an .npz holding every tenth of them as arrays (1/10 the records, all in memory). Each
is then trained on by a fresh process as a node does: load the data (fedsafe.client.data.load_file), hash its
records (the privacy ledger's key and overlap check), and one epoch of DP-SGD with Poisson sampling (batch 256,
one torch thread). The model is a small one on purpose (8x8 average pooling, then a linear layer): what is
measured is the memory the data takes, and one epoch over the 10x set must stay minutes on two cores. Each
process reports its peak resident set size (Linux: VmHWM of /proc/self/status, this process' own high-water
mark; ru_maxrss would also count the parent's RSS at the fork), the size its images would take as float32
arrays, and the ε its spend gives.

    python benchmarks/larger_than_memory.py [--images 20000] [--size 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES = ("north-east", "north-west", "south-east", "south-west")
BATCH = 256
POOL = 8
NOISE_MULTIPLIER = 1.0
DELTA = 1e-5


def make_folder(root: Path, images: int, size: int, seed: int = 0) -> Path:
    """`images` PNGs of size x size RGB under root/<class>/, with a schema fixing classes and normalisation."""
    from PIL import Image

    from fedsafe.client.data import schema_path

    rng = np.random.default_rng(seed)
    half = size // 2
    corners = {"north-east": (slice(0, half), slice(half, size)), "north-west": (slice(0, half), slice(0, half)),
               "south-east": (slice(half, size), slice(half, size)), "south-west": (slice(half, size), slice(0, half))}
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    for i in range(images):
        name = CLASSES[i % len(CLASSES)]
        pixels = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
        pixels[corners[name]] += 120
        Image.fromarray(pixels, mode="RGB").save(root / name / f"{i:06d}.png", compress_level=0)
    schema = {"classes": list(CLASSES), "size": [size, size], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    schema_path(root).write_text(json.dumps(schema))
    return root


def make_baseline(folder: Path, path: Path) -> Path:
    """Every tenth image of `folder`, decoded and normalised as the folder's nodes see it, in one .npz."""
    from fedsafe.client.data import load_file

    data = load_file(folder)
    tenth = data.subset(np.arange(0, len(data), 10))
    np.savez(path, x=tenth.x[:], y=tenth.y)
    return path


def train_as_a_node(path: str) -> dict:
    """What a node does with its data in a round, in this (fresh) process; its peak RSS."""
    import torch

    from fedsafe.client.accounting import epsilon
    from fedsafe.client.data import load_file, record_hashes, records_digest
    from fedsafe.client.training import TrainSettings, train
    from fedsafe.models import task_for
    from torch import nn

    torch.set_num_threads(1)
    before = _peak_rss_mb()
    start = time.perf_counter()
    data = load_file(path)
    records_digest(data), record_hashes(data)  # the ledger's key and overlap check, as a node computes them
    channels, height, width = data.spec.input_shape
    model = nn.Sequential(nn.AvgPool2d(POOL), nn.Flatten(),
                          nn.Linear(channels * (height // POOL) * (width // POOL), len(CLASSES)))
    settings = TrainSettings(local_epochs=1, batch_size=BATCH, lr=0.5, noise_multiplier=NOISE_MULTIPLIER,
                             max_grad_norm=1.0, grad_sample_mode="hooks")
    outcome = train(model, task_for("classification", len(CLASSES)), data, settings, torch.device("cpu"), seed=0)
    return {"records": len(data), "accuracy": _accuracy(model, data), "array_mb": len(data) * int(np.prod(data.spec.input_shape)) * 4 / 2**20,
            "rss_after_imports_mb": before, "peak_rss_mb": _peak_rss_mb(), "seconds": time.perf_counter() - start,
            "steps": outcome.steps, "epsilon": epsilon(list(outcome.dp_spend), DELTA), "loss": outcome.mean_loss}


def _accuracy(model, data, batch: int = 1024) -> float:
    """Accuracy on the node's own records after the epoch (loaded batch by batch): it learnt something."""
    import torch

    with torch.no_grad():
        hits = sum(int((model(torch.as_tensor(data.x[i:i + batch])).argmax(1).numpy() == data.y[i:i + batch]).sum())
                   for i in range(0, len(data), batch))
    return hits / len(data)


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):  # not Linux: getrusage (macOS: bytes; it counts the parent's RSS too)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _run_child(path: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--node", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the node process failed on {path}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="images in the folder (the baseline holds 1/10)")
    parser.add_argument("--size", type=int, default=64, help="image height and width, pixels")
    parser.add_argument("--keep", type=Path, default=None, help="make the data here and keep it")
    parser.add_argument("--node", help=argparse.SUPPRESS)  # internal: one node process
    args = parser.parse_args()
    if args.node:
        print(json.dumps(train_as_a_node(args.node)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        started = time.perf_counter()
        folder = make_folder(work / "images", args.images, args.size)
        baseline = make_baseline(folder, work / "baseline.npz")
        print(f"made {args.images} {args.size}x{args.size} RGB PNGs and a 1/10 in-memory baseline "
              f"in {time.perf_counter() - started:.0f} s")
        rows = [("in memory (.npz), 1x", _run_child(baseline)), ("image folder, lazy, 10x", _run_child(folder))]
    print(f"{'data':<26}{'records':>9}{'as arrays MB':>14}{'RSS after imports MB':>22}{'peak RSS MB':>13}"
          f"{'seconds':>9}{'DP steps':>10}{'epsilon':>9}{'accuracy':>10}")
    for name, r in rows:
        print(f"{name:<26}{r['records']:>9}{r['array_mb']:>14.0f}{r['rss_after_imports_mb']:>22.0f}"
              f"{r['peak_rss_mb']:>13.0f}{r['seconds']:>9.1f}{r['steps']:>10}{r['epsilon']:>9.3f}{r['accuracy']:>10.3f}")
    memory, lazy = rows[0][1], rows[1][1]
    print(f"peak RSS, lazy 10x / in-memory 1x: {lazy['peak_rss_mb'] / memory['peak_rss_mb']:.2f} "
          f"(the 10x images as arrays would take {lazy['array_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
