"""Your own model and your own data in a federated DP-SGD simulation, from Python.

    python examples/own_model_simulation.py            # 3 nodes, 3 rounds, ε = 3 per node

The model is a plain PyTorch factory; the data are NumPy arrays (here scikit-learn's bundled digits,
8×8 images). fedsafe partitions them over the nodes, trains with DP-SGD on each and reports ε.
"""

from __future__ import annotations

import sys

from torch import nn

import fedsafe


def build_model(spec, options):
    """A small CNN for one-channel images shaped spec.input_shape, GroupNorm (not BatchNorm) for DP-SGD."""
    channels, height, width = spec.input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * (height // 2) * (width // 2), spec.num_classes),
    )


def main(rounds: int = 3, nodes: int = 3, records: int = 0) -> fedsafe.SimulationResult:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).reshape(-1, 1, 8, 8)  # (n, channels, height, width) in [0, 1]
    labels = digits.target
    if records:  # a smaller run (the tests)
        images, labels = images[:records], labels[:records]
    result = fedsafe.simulate(build_model, (images, labels), nodes=nodes, rounds=rounds, epsilon=3.0,
                              lr=0.5, batch_size=32)
    print(f"accuracy {result.metrics['accuracy']:.3f} at ε {result.epsilon:.2f} (δ = 1e-5) per node")
    return result


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
