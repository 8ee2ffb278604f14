"""fedsafe against Apple's pfl on one machine: the same workload run back to back, each as a fresh process,
wall time from process start to its results (imports, data, training and evaluation all counted).

    pip install -e '.[pfl]' && pip install --no-deps pfl==0.6.0   # never a dependency of fedsafe (pyproject)
    python benchmarks/vs_pfl.py [--nodes 10] [--rounds 5] [--epsilon 3] [--repeats 2] [--backend local]

Workload (issue 18): scikit-learn's digits split over 10 nodes (IID), 5 rounds, every node every round,
one local epoch at batch size 32, the same MLP (fedsafe's built-in: 64 → 64 tanh → 10), (ε = 3, δ = 1e-5).
The privacy differs in kind, as the two libraries do: fedsafe runs DP-SGD on every node (each record's
gradient clipped, Gaussian noise per step, each node's own ledger enforcing ε); pfl adds its central
Gaussian mechanism to the nodes' summed updates (each node's update clipped, noise calibrated to ε by its
PLD accountant) — pfl has no per-record DP-SGD. Target: fedsafe's wall time <= pfl's. Figures are printed,
never asserted; pfl missing is said in one line and fedsafe's figures printed alone.

Both are timed as installed: pip byte-compiles an installed package (pfl, PyTorch, every dependency), so the
benchmark byte-compiles fedsafe's source tree first — an editable checkout run with PYTHONDONTWRITEBYTECODE=1
would otherwise compile the ~70 modules a run imports from source in every timed run (importing them took
0.26-0.28 s of CPU from source against 0.08-0.11 s from byte-code, on this project's 2-core machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
BATCH_SIZE = 32
LR = 0.5  # fedsafe's default local learning rate; pfl's nodes use the same


def compile_fedsafe() -> None:
    """Byte-code for every module of fedsafe's source tree (its install's package-dir folders), as pip writes
    it for an installed package; Python reads it even under PYTHONDONTWRITEBYTECODE=1."""
    import compileall

    for folder in ("fedsafe", "client", "server", "models", "strategies", "simulations"):
        compileall.compile_dir(ROOT / folder, quiet=1)


def run_pfl(nodes: int, rounds: int, epsilon: float, seed: int) -> dict:
    """One pfl run of the workload in this process; its final central accuracy."""
    import numpy as np
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism, PLDPrivacyAccountant
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y.astype(np.int64), test_size=0.2, random_state=seed,
                                                        stratify=y)
    shares = np.array_split(np.random.default_rng(seed).permutation(len(x_train)), nodes)
    users = {i: [x_train[idx], y_train[idx]] for i, idx in enumerate(shares)}
    train_data = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse", list(users)))
    central_data = Dataset(raw_data=[x_test, y_test])

    class MLP(torch.nn.Module):  # fedsafe's built-in MLP on digits, with the loss and metrics pfl calls
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                           torch.nn.Linear(64, 10))

        def forward(self, inputs):
            return self.net(inputs)

        def loss(self, inputs, labels, eval=False):  # noqa: A002 (pfl's keyword)
            self.eval() if eval else self.train()
            return torch.nn.functional.cross_entropy(self(torch.as_tensor(inputs)), torch.as_tensor(labels).long())

        @torch.no_grad()
        def metrics(self, inputs, labels, eval=False):  # noqa: A002
            self.eval()
            logits = self(torch.as_tensor(inputs))
            labels = torch.as_tensor(labels).long()
            n = len(labels)
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            return {"loss": Weighted(loss, n), "accuracy": Weighted((logits.argmax(1) == labels).sum().item(), n)}

    module = MLP()
    model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    accountant = PLDPrivacyAccountant(num_compositions=rounds, sampling_probability=1.0, mechanism="gaussian",
                                      epsilon=epsilon, delta=DELTA)
    privacy = CentrallyAppliedPrivacyMechanism(GaussianMechanism.from_privacy_accountant(accountant,
                                                                                         clipping_bound=1.0))
    backend = SimulatedBackend(training_data=train_data, val_data=None, postprocessors=[privacy])
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds,
                                           train_cohort_size=nodes, val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=LR, local_num_epochs=1,
                                              local_batch_size=BATCH_SIZE),
        model_eval_params=NNEvalHyperParams(local_batch_size=256))
    final = model.evaluate(central_data, eval_params=NNEvalHyperParams(local_batch_size=256))
    accuracy = next(value for name, value in final if str(name) == "accuracy")
    return {"accuracy": float(accuracy.overall_value), "sigma": float(accountant.cohort_noise_parameter)}


def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall and CPU (user + system, the process and its children) seconds of `command` as a fresh process,
    and its standard output; RuntimeError if it fails. On a shared machine the CPU time is the steadier."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(command[:4])}… failed: " + " | ".join(tail))
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stdout


def fedsafe_command(args, out: str) -> list[str]:
    return [sys.executable, "-m", "fedsafe", "simulate", "--model", "mlp", "--dataset", "digits",
            "--nodes", str(args.nodes), "--rounds", str(args.rounds), "--local-epochs", "1",
            "--batch-size", str(BATCH_SIZE), "--lr", str(LR), "--epsilon", str(args.epsilon), "--delta", str(DELTA),
            "--seed", str(args.seed), "--backend", args.backend, "--out", out]


def fedsafe_accuracy(out: str) -> float:
    return float(json.loads((Path(out) / "metrics.json").read_text())["rounds"][-1]["eval"]["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=2, help="back-to-back pairs; the median is reported")
    parser.add_argument("--backend", default="auto", choices=("auto", "local", "ray"))
    parser.add_argument("--pfl-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pfl_child:
        print(json.dumps(run_pfl(args.nodes, args.rounds, args.epsilon, args.seed)))
        return

    has_pfl = importlib.util.find_spec("pfl") is not None
    if not has_pfl:
        print("pfl is not installed (pip install -e '.[pfl]' && pip install --no-deps pfl==0.6.0): fedsafe's "
              "figures alone")
    compile_fedsafe()
    load = os.getloadavg()
    fedsafe_walls, pfl_walls, fedsafe_cpus, pfl_cpus, accuracies, pfl_results = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            out = f"{tmp}/fedsafe-{repeat}"
            wall, cpu, _ = timed(fedsafe_command(args, out))
            fedsafe_walls.append(wall)
            fedsafe_cpus.append(cpu)
            accuracies.append(fedsafe_accuracy(out))
            if has_pfl:
                wall, cpu, stdout = timed([sys.executable, __file__, "--pfl-child", "--nodes", str(args.nodes),
                                      "--rounds", str(args.rounds), "--epsilon", str(args.epsilon),
                                      "--seed", str(args.seed)])
                pfl_walls.append(wall)
                pfl_cpus.append(cpu)
                pfl_results.append(json.loads(stdout.strip().splitlines()[-1]))
    print(f"workload: digits, {args.nodes} nodes, {args.rounds} rounds, 1 local epoch, MLP, (ε={args.epsilon:g}, "
          f"δ={DELTA:g}); {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    fedsafe_wall = statistics.median(fedsafe_walls)
    print(f"fedsafe simulate --backend {args.backend} {fedsafe_wall:6.1f} s wall (runs: "
          f"{', '.join(f'{w:.1f}' for w in fedsafe_walls)}), CPU {statistics.median(fedsafe_cpus):.1f} s, final accuracy {statistics.median(accuracies):.3f} "
          "(DP-SGD on every node)")
    if has_pfl:
        pfl_wall = statistics.median(pfl_walls)
        print(f"pfl 0.6.0 {' ' * (len(args.backend) + 19)}{pfl_wall:6.1f} s wall (runs: "
              f"{', '.join(f'{w:.1f}' for w in pfl_walls)}), CPU {statistics.median(pfl_cpus):.1f} s, final accuracy "
              f"{statistics.median(r['accuracy'] for r in pfl_results):.3f} (central Gaussian mechanism, "
              f"σ={pfl_results[0]['sigma']:.2f})")
        print(f"ratio fedsafe / pfl {fedsafe_wall / pfl_wall:6.2f}x wall (target <= 1.00), "
              f"{statistics.median(fedsafe_cpus) / statistics.median(pfl_cpus):.2f}x CPU")
    end = os.getloadavg()
    print(f"load average at the end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")


if __name__ == "__main__":
    main()
