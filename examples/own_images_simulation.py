"""Your own model on your own folder of images, in a federated DP-SGD simulation.

    python examples/own_images_simulation.py [FOLDER]     # 3 nodes, 3 rounds, ε = 3 per node

FOLDER holds one sub-folder per class of PNG/JPEG images; FOLDER.schema.json beside it (optional) names the
classes and says how images become inputs (size, channels, normalisation). The images are read when a batch
draws them, never all at once. Without FOLDER, a folder is made here from scikit-learn's bundled digits.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from torch import nn

import fedsafe

SCHEMA = {"classes": [str(d) for d in range(10)], "size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.5]}


def build_model(spec, options):
    """A small CNN for the images shaped spec.input_shape, GroupNorm (not BatchNorm) for DP-SGD."""
    channels, height, width = spec.input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(8 * (height // 4) * (width // 4), spec.num_classes),
    )


def digits_folder(root: Path, records: int = 0) -> Path:
    """scikit-learn's 8x8 digits as PNGs under root/<digit>/ (the schema resizes them to 16x16)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images[:records or None], digits.target)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype("uint8"), mode="L").save(root / str(label) / f"{i:04d}.png")
    (root.parent / f"{root.name}.schema.json").write_text(json.dumps(SCHEMA))
    return root


def main(folder: str | None = None, rounds: int = 3, nodes: int = 3, records: int = 0) -> fedsafe.SimulationResult:
    if folder is None:  # no folder of your own: make one (records: a smaller one, for the tests)
        folder = str(digits_folder(Path(tempfile.mkdtemp(prefix="digits-")) / "digits", records))
    result = fedsafe.simulate(build_model, folder, nodes=nodes, rounds=rounds, epsilon=3.0, lr=0.5, batch_size=32)
    print(f"accuracy {result.metrics['accuracy']:.3f} at ε {result.epsilon:.2f} (δ = 1e-5) per node")
    return result


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(a) for a in sys.argv[2:]))
