"""The GPU check (issue 14 item 2): does fedsafe's DP training run on CUDA, and what does DP cost there?

Prints, on one GPU, in under 5 minutes by construction (fixed small sizes, and a time budget that skips
what would not fit, saying so):

1. DP-SGD step time ÷ plain step time for a ResNet-18-sized image model (11 M parameters, GroupNorm —
   DP-SGD has no BatchNorm —, 32×32×3 synthetic batches of 256), in each Opacus grad-sample mode whose
   per-sample gradients are correct for it (checked first against one-sample-at-a-time gradients, as
   benchmarks/dp_overhead.py does); the fastest is marked '*', and its ratio is compared with the
   issue's target (≤ 1.3×). Also bf16 (run setting precision=bf16: autocast forward, fp32 per-sample
   clipping) in hooks mode. Peak GPU memory of each variant.
2. Every built-in model family training 2 DP rounds in simulation on cuda: 4 virtual nodes sharing the
   GPU (--client-gpus 0.25), the coordinator evaluating on cuda (--server-device cuda), with the
   headline metric before and after and the nodes' ε; the cnn also at precision=bf16.

    python benchmarks/gpu_check.py [--json results.json]
    python benchmarks/gpu_check.py --device cpu --quick    # tiny sizes: exercises the code on a CPU
    python benchmarks/gpu_check.py --backend in-process     # nodes in this process: where Ray is missing
    bash benchmarks/gpu_check_on_device.sh                  # on a lent GPU machine: CUDA tests, then this

Without a CUDA device (and --device cuda, the default) it prints one line, "gpu_check: no CUDA device:
…", and exits 0: nothing was checked, nothing failed. Exit 1: a check failed (a family did not
train, or no DP mode was correct).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dp_overhead import Setup, check_mode  # noqa: E402
from fedsafe.client.dp_modes import make_private  # noqa: E402
from fedsafe.client.precision import autocast, fp32_outputs  # noqa: E402
from fedsafe.models import GRAD_SAMPLE_MODES, DataSpec, headline_metric, task_for  # noqa: E402

warnings.filterwarnings("ignore")  # Opacus' "full backward hook" and functorch notices
TARGET_RATIO = 1.3  # the target: DP step ≤ 1.3 × plain step for this model
EXIT_FAILED = 1


@dataclass(frozen=True)
class Sizes:
    """What one run of the check measures; `full` on a GPU, `quick` to exercise the code on a CPU."""

    width: int  # ResNet-18's first stage width (64 is ResNet-18)
    image: int  # side of the square RGB images (the 32)
    batch: int
    warmup: int
    steps: int  # timed steps per variant
    nodes: int
    client_gpus: float
    rounds: int
    local_epochs: int
    budget_s: float  # the whole check; a family that would start later is skipped, and says so


FULL = Sizes(width=64, image=32, batch=256, warmup=3, steps=10, nodes=4, client_gpus=0.25, rounds=2, local_epochs=1,
             budget_s=270.0)
QUICK = Sizes(width=8, image=16, batch=4, warmup=1, steps=1, nodes=2, client_gpus=0.0, rounds=1, local_epochs=1,
              budget_s=600.0)

# The built-in families as tests/test_families_federated.py trains them (digits-sized data).
FAMILY_RUNS = {
    "mlp": dict(model="mlp", dataset="digits"),
    "cnn": dict(model="cnn", dataset="digits"),
    "lstm": dict(model="lstm", dataset="digits"),
    "gru": dict(model="gru", dataset="digits"),
    "transformer": dict(model="transformer", dataset="digits", model_options="hidden=32,layers=1"),
    "autoencoder": dict(model="autoencoder", dataset="digits-anomaly", optimizer="adam", lr=0.01),
    "gan": dict(model="gan", dataset="digits", optimizer="adam", lr=0.002,
                model_options="output_activation=sigmoid,hidden=64,layers=1"),
    "cnn bf16": dict(model="cnn", dataset="digits", precision="bf16"),
}


# ---- a ResNet-18-sized image model -------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    # 8 channels a group (32 groups at 512): enough values per group for well-conditioned gradients even
    # in the quick check's narrow model on small images
    return nn.GroupNorm(min(32, max(1, channels // 8)), channels)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.norm1 = _norm(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.norm2 = _norm(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), _norm(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 images (3×3 stem, no max-pool), GroupNorm for BatchNorm: 11.2 M parameters."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), _norm(width), nn.ReLU())
        blocks, inputs = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            outputs = width * 2**stage
            blocks += [BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)]
            inputs = outputs
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(inputs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class ResNetSetup(Setup):
    """benchmarks/dp_overhead.py's Setup for the ResNet, on `device`: its per-sample gradient check as is."""

    def __init__(self, sizes: Sizes, device: torch.device) -> None:
        task = task_for("classification", 10)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(sizes.batch, 3, sizes.image, sizes.image, generator=generator).to(device)
        y = torch.randint(0, 10, (sizes.batch,), generator=generator).to(device)
        spec = DataSpec((3, sizes.image, sizes.image), 10, "classification")
        super().__init__("resnet18", spec, {}, x, task.targets(x, y), task)
        self.width, self.device = sizes.width, device

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return ResNet18(self.width).to(self.device)


# ---- 1. DP step ÷ plain step -------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stepper(setup: ResNetSetup, mode: str | None, precision: str):
    """One training step of a fresh model: plain (mode None) or DP-SGD in `mode`; and what to close."""
    model = setup.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if mode is None:
        def plain():
            optimizer.zero_grad(set_to_none=True)
            with autocast(setup.device, precision):
                outputs = model(setup.x)
            setup.task.loss(outputs.float(), setup.targets).backward()
            optimizer.step()

        return plain, None
    boundary = fp32_outputs(model) if precision == "bf16" else None
    if boundary is not None:
        boundary.__enter__()
    private = make_private(model, optimizer, setup.task.per_sample_loss, mode, noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=len(setup.x))

    def private_step():
        private.optimizer.zero_grad(set_to_none=True)
        with autocast(setup.device, precision):
            outputs = private.module(setup.x)
        private.criterion(outputs.float(), setup.targets).backward()
        private.optimizer.step()

    def close():
        private.close()
        if boundary is not None:
            boundary.__exit__(None, None, None)

    return private_step, close


def _measure(setup: ResNetSetup, sizes: Sizes, mode: str | None, precision: str) -> dict:
    """Median step time (ms, wall clock, the device synchronised) and peak device memory (MiB)."""
    device = setup.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, close = _stepper(setup, mode, precision)
    try:
        for _ in range(sizes.warmup):
            step()
        times = []
        for _ in range(sizes.steps):
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        if close is not None:
            close()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak}


def _correct(setup: ResNetSetup, mode: str) -> str | None:
    """None if `mode`'s per-sample gradients match one-sample-at-a-time ones on 4 samples (fp32, no TF32)."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return check_mode(setup, mode, n=4)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _variant(setup: ResNetSetup, sizes: Sizes, mode: str | None, precision: str) -> dict:
    """One row: the variant's timing and memory, or why it was not timed (incorrect, or failing)."""
    name = ("plain" if mode is None else f"DP {mode}") + (" bf16" if precision == "bf16" else "")
    row = {"variant": name, "mode": mode, "precision": precision}
    try:
        problem = None if mode is None or precision == "bf16" else _correct(setup, mode)
        if problem is not None:
            row["note"] = f"INCORRECT: {problem}"
        else:
            row.update(_measure(setup, sizes, mode, precision))
    except Exception as err:  # noqa: BLE001 - report the variant, measure the others
        row["note"] = f"FAILS: {type(err).__name__}: {str(err).splitlines()[0][:90] if str(err) else ''}"
        if "--verbose" in sys.argv:
            traceback.print_exc()
    return row


def dp_step_ratios(sizes: Sizes, device: torch.device) -> list[dict]:
    setup = ResNetSetup(sizes, device)
    params = sum(p.numel() for p in setup.model().parameters())
    print(f"\n1. ResNet-18-sized model ({params / 1e6:.2f} M parameters), {sizes.image}x{sizes.image}x3 synthetic "
          f"batches of {sizes.batch}, on {device}: median of {sizes.steps} steps after {sizes.warmup} warm-up")
    plain = _variant(setup, sizes, None, "fp32")
    private = [_variant(setup, sizes, mode, "fp32") for mode in GRAD_SAMPLE_MODES]
    plain16, private16 = _variant(setup, sizes, None, "bf16"), _variant(setup, sizes, "hooks", "bf16")
    # each DP variant against the plain step of its precision; plain bf16 against plain fp32
    for row, base in [(plain, plain), *[(r, plain) for r in private], (plain16, plain), (private16, plain16)]:
        if "ms" in row and "ms" in base:
            row["ratio"] = row["ms"] / base["ms"]
    timed = [r for r in private if "ratio" in r]
    fastest = min(timed, key=lambda r: r["ms"]) if timed else None
    print(f"   {'variant':<15} {'ms/step':>9} {'ratio':>8} {'peak MiB':>9}  note")
    for row in [plain, *private, plain16, private16]:
        if "ms" not in row:
            print(f"   {row['variant']:<15} {'-':>9} {'-':>8} {'-':>9}  {row.get('note', '')}")
            continue
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        mark = "* fastest correct DP mode" if row is fastest else ""
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
        print(f"   {row['variant']:<15} {row['ms']:>9.1f} {ratio:>8} {peak:>9}  {mark}")
    print("   ratio: DP ÷ plain at the same precision; plain bf16 ÷ plain fp32")
    if fastest is not None:
        verdict = "met" if fastest["ratio"] <= TARGET_RATIO else "NOT met"
        print(f"   fastest correct DP mode: {fastest['mode']}, {fastest['ratio']:.2f}x plain "
              f"(target <= {TARGET_RATIO}x: {verdict})")
    else:
        print("   no DP mode computed correct per-sample gradients for this model")
    return [plain, *private, plain16, private16]


# ---- 2. the built-in families in a simulated federation on the GPU ----------------------------------


def federation_check(sizes: Sizes, device: torch.device, families: list[str], deadline: float,
                     backend: str = "ray") -> list[dict]:
    """`backend` ray: each node a Ray actor holding its GPU share (the issue's check); in-process: the
    nodes' ClientApp called in this process (fedsafe.simulations.run.simulate_in_process), still on
    `cuda` — for a machine without Ray, which then checks the nodes' CUDA path but not Ray's GPU sharing."""
    from fedsafe.server.config import RunConfig
    from fedsafe.simulations.run import SimulationOptions, simulate, simulate_in_process

    def run(cfg, options):
        if backend == "ray":
            return simulate(cfg, options, progress=None)
        return simulate_in_process(cfg, options)

    share = f"{sizes.client_gpus:g} GPU each" if sizes.client_gpus else "on the CPU"
    print(f"\n2. Each family, {sizes.rounds} DP round(s) in simulation ({backend}): {sizes.nodes} virtual nodes "
          f"({share}), coordinator evaluating on {device}, ε = 3 per node")
    print(f"   {'family':<12} {'metric':<17} {'before':>8} {'after':>8} {'ε max':>6} {'seconds':>8}  note")
    rows = []
    for name in families:
        row = {"family": name}
        if time.perf_counter() > deadline:
            row["note"] = "skipped: the check's time budget is spent"
        else:
            started = time.perf_counter()
            try:
                with tempfile.TemporaryDirectory() as out:
                    cfg = RunConfig(num_rounds=sizes.rounds, local_epochs=sizes.local_epochs, epsilon=3.0,
                                    server_device=str(device), out_dir=out, **FAMILY_RUNS[name])
                    outcome = run(cfg, SimulationOptions(num_nodes=sizes.nodes, client_gpus=sizes.client_gpus))
                before, after = outcome.history[0]["eval"], outcome.history[-1]["eval"]
                metric = headline_metric(after)
                row.update(metric=metric, before=before[metric], after=after[metric],
                           epsilon=outcome.history[-1].get("epsilon_max"),
                           replies=outcome.history[-1].get("replies"))
                if row["replies"] != sizes.nodes:
                    row["note"] = f"FAILED: {row['replies']} of {sizes.nodes} nodes replied"
            except Exception as err:  # noqa: BLE001 - report the family, check the others
                row["note"] = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:90] if str(err) else ''}"
                if "--verbose" in sys.argv:
                    traceback.print_exc()
            row["seconds"] = time.perf_counter() - started
        rows.append(row)
        if "metric" in row:
            eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
            print(f"   {name:<12} {row['metric']:<17} {row['before']:>8.3f} {row['after']:>8.3f} {eps:>6} "
                  f"{row['seconds']:>8.1f}  {row.get('note', '')}")
        else:
            print(f"   {name:<12} {'-':<17} {'-':>8} {'-':>8} {'-':>6} {row.get('seconds', 0):>8.1f}  {row['note']}")
    return rows


# ---- the check ---------------------------------------------------------------------------------


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check on CUDA; None if it can."""
    if torch.cuda.is_available():
        return None
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"torch {torch.__version__} ({build}) sees none (torch.cuda.is_available() is False)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU can run it): the code path only")
    parser.add_argument("--families", default=",".join(FAMILY_RUNS),
                        help="comma list of the federation check's runs (default: all: "
                             f"{', '.join(FAMILY_RUNS)})")
    parser.add_argument("--skip-federation", action="store_true")
    parser.add_argument("--backend", default="ray", choices=("ray", "in-process"),
                        help="the federation check's simulation backend (in-process: where Ray is not installed)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and (reason := no_cuda_reason()) is not None:
        print(f"gpu_check: no CUDA device: {reason}; nothing checked (--device cpu --quick exercises the script)")
        return 0
    unknown = sorted(set(args.families.split(",")) - set(FAMILY_RUNS))
    if unknown:
        print(f"gpu_check: unknown --families {', '.join(unknown)}; choose from: {', '.join(FAMILY_RUNS)}",
              file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    device = torch.device(args.device)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}: torch {torch.__version__}, {'quick' if args.quick else 'full'} sizes, "
          f"budget {sizes.budget_s:.0f} s")
    results = {"device": name, "torch": torch.__version__, "quick": args.quick}
    results["dp_step"] = dp_step_ratios(sizes, device)
    if not args.skip_federation:
        results["federation"] = federation_check(sizes, device, args.families.split(","),
                                                 deadline=started + sizes.budget_s, backend=args.backend)
    results["seconds"] = time.perf_counter() - started
    print(f"\ngpu_check: {results['seconds']:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    failed = any(r.get("note", "").startswith("FAILED") for r in results.get("federation", []))
    no_mode = not any("ratio" in r and r["mode"] is not None and r["precision"] == "fp32" for r in results["dp_step"])
    return EXIT_FAILED if failed or no_mode else 0


if __name__ == "__main__":
    sys.exit(main())
