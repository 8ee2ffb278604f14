"""DP-SGD overhead per model family and Opacus grad_sample_mode, on CPU, one thread (or on a CUDA GPU).

For every registered family: the median time of a plain training step and of a DP training step
(Opacus wrapper + DP optimizer, noise on, no Poisson sampling) at batch 64, after warm-up, for
each grad_sample_mode (hooks, functorch, ew, ghost). Times are this thread's CPU time (wall-clock
ratios alongside); steps of all variants of a family are interleaved in rounds, so drift in a
shared machine's load hits them alike. Before timing, each
mode's per-sample gradients (ghost: per-sample norms and the clipped sum) are checked against
gradients computed one sample at a time; a mode that fails or disagrees is reported, not timed.
The fastest correct mode of each family is marked with '*', and the family's declared mode
(models.preferred_grad_sample_mode) with '<' .

With `--device cuda` the same runs on the GPU; there a step's CPU time says little (the work is queued),
so the device is synchronised around every step and wall-clock time ranks the modes.

    python benchmarks/dp_overhead.py [--rounds 25] [--families lstm,gru] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsafe.client.data import load_builtin  # noqa: E402
from fedsafe.client.dp_modes import make_private  # noqa: E402
from fedsafe.models import GRAD_SAMPLE_MODES, DataSpec, build_model, default_task, model_names, task_for  # noqa: E402
from fedsafe.models import preferred_grad_sample_mode  # noqa: E402
from fedsafe.models.gan import train_step  # noqa: E402

warnings.filterwarnings("ignore")  # Opacus' "full backward hook" and functorch notices
BATCH = 64
SEQUENCE_FAMILIES = {"lstm", "gru", "transformer"}
GAN_OPTIONS = {"output_activation": "sigmoid"}


@dataclass
class Setup:
    """One family's model factory, data and loss."""

    family: str
    spec: DataSpec
    options: dict
    x: torch.Tensor
    targets: torch.Tensor
    task: object
    device: torch.device = torch.device("cpu")

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(self.family, self.spec, self.options).to(self.device)

    @property
    def is_gan(self) -> bool:
        return self.task.name == "generation"


def setup_for(family: str, device: torch.device = torch.device("cpu")) -> Setup:
    digits = load_builtin("digits").train
    x = torch.as_tensor(digits.x[:BATCH]).to(device)
    y = torch.as_tensor(digits.y[:BATCH]).to(device)
    spec = replace(digits.spec, task=default_task(family))
    if family in SEQUENCE_FAMILIES:
        x = x.reshape(BATCH, 8, 8)  # 8 rows as 8 steps of 8 features
        spec = replace(spec, input_shape=(8, 8))
    task = task_for(spec.task, spec.num_classes)
    options = GAN_OPTIONS if family == "gan" else {}
    return Setup(family, spec, options, x, task.targets(x, y), task, device)


def private_part(model: nn.Module) -> nn.Module:
    """What DP-SGD wraps: a GAN's discriminator (only it sees real records), else the model."""
    return getattr(model, "discriminator", model)


def private_targets(setup: Setup, x: torch.Tensor) -> torch.Tensor:
    return torch.ones(len(x), device=x.device) if setup.is_gan else setup.targets[: len(x)]


# ---- correctness ------------------------------------------------------------------------------


def reference_grads(setup: Setup, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample gradients, one sample at a time: list over parameters of (n, *shape)."""
    part = private_part(model)
    params = [p for p in part.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        loss = setup.task.per_sample_loss(part(x[i : i + 1]), targets[i : i + 1]).mean()
        rows.append(torch.autograd.grad(loss, params, allow_unused=True))
    return [
        torch.stack([r[j] if r[j] is not None else torch.zeros_like(params[j]) for r in rows])
        for j in range(len(params))
    ]


def check_mode(setup: Setup, mode: str, n: int = 8) -> str | None:
    """None if `mode` computes correct per-sample gradients for the family, else what went wrong."""
    x, targets = setup.x[:n], private_targets(setup, setup.x[:n])
    reference = reference_grads(setup, setup.model(), x, targets)
    norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in reference], dim=1).norm(dim=1)
    clip = float(norms.median())  # clipping active for half the samples
    model = setup.model()
    part = private_part(model)
    params = [p for p in part.parameters() if p.requires_grad]
    private = make_private(
        part, torch.optim.SGD(params, lr=0.0), setup.task.per_sample_loss, mode,
        noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=n,
    )
    try:
        private.optimizer.zero_grad()
        private.criterion(private.module(x), targets).backward()
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        if mode == "ghost":
            got = [p.grad for p in params]  # the clipped sum, before noise
            want = [torch.einsum("i,i...->...", factor, g) for g in reference]
            got_norms = private.module.per_sample_gradient_norms
            if not torch.allclose(got_norms, norms, rtol=1e-4, atol=1e-6):
                return f"per-sample norms differ by {float((got_norms - norms).abs().max()):.2e}"
        else:
            got = [p.grad_sample for p in params]
            want = reference
        for p_got, p_want in zip(got, want):
            # float rounding scales with the tensor: sums (ghost) and large models land above a fixed 1e-6
            atol = max(1e-6, 1e-5 * float(p_want.abs().max())) if p_want.numel() else 1e-6
            if p_got is None or p_got.shape != p_want.shape or not torch.allclose(p_got, p_want, rtol=1e-4, atol=atol):
                diff = "missing" if p_got is None else f"{float((p_got - p_want).abs().max()):.2e} off"
                return f"per-sample gradients wrong ({diff})"
        return None
    finally:
        private.close()


# ---- timing -----------------------------------------------------------------------------------


def plain_stepper(setup: Setup):
    model = setup.model()
    if setup.is_gan:
        d_opt = torch.optim.Adam(model.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        g_opt = torch.optim.Adam(model.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        return lambda: train_step(model, setup.x, d_opt, g_opt, fake_count=BATCH), None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def step():
        optimizer.zero_grad(set_to_none=True)
        setup.task.loss(model(setup.x), setup.targets).backward()
        optimizer.step()

    return step, None


def dp_stepper(setup: Setup, mode: str):
    model = setup.model()
    if setup.is_gan:
        d_opt = torch.optim.Adam(model.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        g_opt = torch.optim.Adam(model.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        private = make_private(
            model.discriminator, d_opt, setup.task.per_sample_loss, mode,
            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2 * BATCH,
        )
        return (
            lambda: train_step(model, setup.x, private.optimizer, g_opt, discriminator=private.module,
                               d_criterion=private.criterion, fake_count=BATCH),
            private,
        )
    private = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.05), setup.task.per_sample_loss, mode,
        noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=BATCH,
    )

    def step():
        private.optimizer.zero_grad(set_to_none=True)
        private.criterion(private.module(setup.x), setup.targets).backward()
        private.optimizer.step()

    return step, private


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    steppers: dict[str, object], rounds: int, per_round: int = 2, warmup: int = 5,
    device: torch.device = torch.device("cpu"),
) -> dict[str, tuple[float, float]]:
    """(median thread CPU ms, median wall ms) per step of each stepper, steps interleaved in rounds.

    CPU time of this (only) thread leaves out time spent descheduled, which on a shared machine is
    most of the noise; wall time is reported next to it. On a GPU the device is synchronised before
    and after each step, so wall time is the step's.
    """
    for step in steppers.values():
        for _ in range(warmup):
            step()
    cpu: dict[str, list[float]] = {name: [] for name in steppers}
    wall: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            for _ in range(per_round):
                _synchronize(device)
                start_wall, start_cpu = time.perf_counter(), time.thread_time()
                step()
                _synchronize(device)
                cpu[name].append(time.thread_time() - start_cpu)
                wall[name].append(time.perf_counter() - start_wall)
    return {name: (1e3 * statistics.median(cpu[name]), 1e3 * statistics.median(wall[name])) for name in steppers}


Row = tuple[str, str, tuple[float, float], tuple[float, float] | None, str]


def benchmark_family(family: str, rounds: int, device: torch.device = torch.device("cpu")) -> list[Row]:
    setup = setup_for(family, device)
    notes: dict[str, str] = {}
    steppers = {"plain": plain_stepper(setup)[0]}
    privates = []
    for mode in GRAD_SAMPLE_MODES:
        try:
            problem = check_mode(setup, mode)
            if problem is not None:
                notes[mode] = f"INCORRECT: {problem}"
                continue
            step, private = dp_stepper(setup, mode)
            step()  # fails here rather than mid-timing
            steppers[mode] = step
            privates.append(private)
        except Exception as err:  # noqa: BLE001  (report, don't crash)
            notes[mode] = f"FAILS: {type(err).__name__}: {str(err).splitlines()[0][:70]}"
            if "--verbose" in sys.argv:
                traceback.print_exc()
    timings = time_variants(steppers, rounds, device=device)
    for private in privates:
        private.close()
    plain = timings.pop("plain")
    ranked_by = 1 if device.type == "cuda" else 0  # wall on a GPU, this thread's CPU time on a CPU
    fastest = min(timings, key=lambda mode: timings[mode][ranked_by]) if timings else None
    rows = []
    for mode in GRAD_SAMPLE_MODES:
        if mode in timings:
            marks = ("*" if mode == fastest else "") + ("<" if mode == preferred_grad_sample_mode(family) else "")
            rows.append((family, mode, plain, timings[mode], marks))
        else:
            rows.append((family, mode, plain, None, notes[mode]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds of 2 timed steps per variant")
    parser.add_argument("--families", default=",".join(model_names()))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"dp_overhead: no CUDA device (torch {torch.__version__} sees none); nothing measured")
        return
    torch.set_num_threads(1)
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, 1 thread"
    print(f"torch {torch.__version__}, {on}, batch {BATCH}, median of {2 * args.rounds} steps after warm-up;")
    if device.type == "cuda":
        print("ms = wall-clock time per step, the device synchronised around it")
        column = 1
    else:
        print("ms = thread CPU time per step (wall-clock ratio alongside)")
        column = 0
    print(f"{'family':<12} {'mode':<10} {'plain ms':>9} {'DP ms':>9} {'ratio':>7} {'wall':>7}  note")
    for family in args.families.split(","):
        for fam, mode, plain, dp, note in benchmark_family(family, args.rounds, device):
            if dp is None:
                print(f"{fam:<12} {mode:<10} {plain[column]:>9.2f} {'-':>9} {'-':>7} {'-':>7}  {note}")
            else:
                print(f"{fam:<12} {mode:<10} {plain[column]:>9.2f} {dp[column]:>9.2f} "
                      f"{dp[column] / plain[column]:>6.2f}x {dp[1] / plain[1]:>6.2f}x  {note}")
        sys.stdout.flush()
    ranked = "wall time" if device.type == "cuda" else "CPU time"
    print(f"* fastest correct mode ({ranked})   < mode the family declares (models.preferred_grad_sample_mode)")
    print("target: DP/plain <= 1.5x")


if __name__ == "__main__":
    main()
