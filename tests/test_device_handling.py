"""Device handling without a GPU: every tensor a node creates while training takes its device from the
model, and every seeded generator lives on the device it draws for (issue 14 item 3).

A CPU-only machine cannot see the bug class directly (a CPU generator drawing for a CPU model works),
so the audit is stricter than CUDA: a factory call must *name* its device (``device=``; calls that
derive from a tensor take its device), and a generator passed to it must have been created with
``device=`` that device. A call that leaves it to PyTorch's default —
the CPU, whatever the model's device — is what breaks, or silently runs on the host, on a GPU node.
Host-side work by design is exempt: Opacus' Poisson sampler and PyTorch's data loader draw record
indices on the CPU, where the records are.
"""

from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fedsafe.client.data import ArrayDataset
from fedsafe.client.training import RandomStreams, TrainSettings, resolve_device, train
from fedsafe.models import DataSpec, build_model, preferred_grad_sample_mode, task_for

# Functions that create a tensor from no tensor: their device is whatever they are told, or the CPU.
FACTORIES = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.zeros, torch.ones,
    torch.empty, torch.full, torch.arange, torch.linspace, torch.eye, torch.tensor, torch.bernoulli,
}
# Host-side by design: record indices drawn where the records are, and the records themselves.
HOST_SIDE_FILES = ("opacus/utils/uniform_sampler.py", "torch/utils/data/")
HOST_SIDE_FUNCTIONS = ("_tensor_dataset",)  # client/training.py: the node's records as CPU tensors


class DeclaredGenerator(torch.Generator):
    """torch.Generator that remembers the device it was created for (None: left to the default)."""

    def __new__(cls, device=None):
        return super().__new__(cls, "cpu" if device is None else device)

    def __init__(self, device=None) -> None:
        self.declared = None if device is None else torch.device(device)


def _host_side(stack: list[traceback.FrameSummary]) -> bool:
    return any(any(marker in f.filename for marker in HOST_SIDE_FILES) or f.name in HOST_SIDE_FUNCTIONS
               for f in stack)


class DeviceAudit(TorchFunctionMode):
    """Records every factory call whose device is not stated as `device`, with where it was made."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.violations: list[str] = []
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and not any(isinstance(a, torch.Tensor) for a in args):
            self._check(func, kwargs)
        return func(*args, **kwargs)

    def _check(self, func, kwargs) -> None:
        stack = traceback.extract_stack()[:-3]
        if _host_side(stack):
            return
        self.checked += 1
        where = next((f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(stack)
                      if "test_device_handling" not in f.filename and "/torch/" not in f.filename), "?")
        generator = kwargs.get("generator")
        if generator is not None:
            declared = getattr(generator, "declared", "not audited")
            if declared is None or (declared != "not audited" and declared.type != self.device.type):
                self.violations.append(f"{func.__name__} at {where}: generator for {declared}, model on {self.device}")
        device = kwargs.get("device")
        if device is None:  # even with a generator: PyTorch draws on the CPU, and a CUDA generator raises
            self.violations.append(f"{func.__name__} at {where}: no device (PyTorch's default, the CPU)")
        elif device is not None and torch.device(device).type != self.device.type:
            self.violations.append(f"{func.__name__} at {where}: device {device}, model on {self.device}")


@pytest.fixture
def audited(monkeypatch):
    """A DeviceAudit to enter around the code under audit (models are built outside it)."""
    monkeypatch.setattr(torch, "Generator", DeclaredGenerator)
    return DeviceAudit(torch.device("cpu"))


def _family(family: str, n: int = 24):
    shapes = {"mlp": (6,), "cnn": (1, 8, 8), "gan": (6,)}
    task = {"gan": "generation"}.get(family, "classification")
    spec = DataSpec(input_shape=shapes[family], num_classes=2, task=task)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(n, *spec.input_shape)).astype(np.float32),
                        rng.integers(0, 2, n).astype(np.int64), spec)
    torch.manual_seed(0)
    return build_model(family, spec), task_for(task, 2), data


@pytest.mark.parametrize("family", ["mlp", "cnn", "gan"])
@pytest.mark.parametrize("private", [True, False])
def test_training_creates_every_tensor_on_the_models_device(audited, family, private):
    """The whole local round — loader, Opacus' clipping and noise (empty Poisson batches included),
    augmentation, GAN latents — with seeded streams, as a simulated node trains."""
    model, task, data = _family(family)
    settings = TrainSettings(local_epochs=2, batch_size=2, lr=0.05, noise_multiplier=1.0 if private else None,
                             grad_sample_mode=preferred_grad_sample_mode(family), augment=family == "cnn",
                             optimizer="adam" if family == "gan" else "sgd")
    with audited:
        outcome = train(model, task, data, settings, audited.device, seed=7)
    assert outcome.steps > 0
    if private or family in ("cnn", "gan"):
        assert audited.checked > 0  # the audit saw the noise / augmentation / latent draws
    assert audited.violations == []


def test_the_audit_catches_a_generator_made_for_the_default_device(audited):
    """The bug this guards against: a generator created without a device, handed to Opacus, which draws
    the noise on the parameters' device with it (torch.normal(device=cuda, generator=<cpu>) raises)."""
    from fedsafe.client.dp_modes import make_private

    model, task, data = _family("mlp")
    params = list(model.parameters())
    private = make_private(model, torch.optim.SGD(params, lr=0.1), task.per_sample_loss, "hooks",
                           noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                           generator=torch.Generator())
    x, y = torch.as_tensor(data.x[:4]), torch.as_tensor(data.y[:4])
    with audited:
        private.criterion(private.module(x), task.targets(x, y)).backward()
        private.optimizer.step()
    private.close()
    assert any("normal" in v and "generator for None" in v for v in audited.violations), audited.violations


def test_seeded_streams_live_where_they_draw():
    streams = RandomStreams.seeded(3, torch.device("cpu"))
    assert streams.sampling.device.type == "cpu" and streams.device.device.type == "cpu"
    # independent streams, not one seed twice (sampling and noise must not be correlated)
    assert not torch.equal(torch.rand(8, generator=streams.sampling), torch.rand(8, generator=streams.device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_asked_for_and_absent_is_one_clear_error(device):
    with pytest.raises(ValueError, match=f"device '{device}' asked for, but this machine has no CUDA GPU"):
        resolve_device(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_private_training_on_cuda_with_seeded_noise():
    """Where a GPU exists: the seeded DP round that used to raise at its first noise draw."""
    model, task, data = _family("mlp")
    outcome = train(model, task, data, TrainSettings(batch_size=4, noise_multiplier=1.0), torch.device("cuda"), seed=1)
    assert outcome.steps > 0 and next(model.parameters()).device.type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_client_gpus_without_cuda_is_refused_before_ray_waits_for_one():
    from fedsafe.server.config import ConfigError
    from fedsafe.simulations.run import SimulationOptions

    with pytest.raises(ConfigError, match="--client-gpus 0.25 asks for a GPU per node, but this machine has no CUDA"):
        SimulationOptions(num_nodes=4, client_gpus=0.25)
    # On a cluster the GPUs are the cluster's, not this machine's.
    assert SimulationOptions(num_nodes=4, client_gpus=0.25, ray_address="10.0.0.1:6379").client_gpus == 0.25


# ---- where the coordinator evaluates (run setting server-device) -------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_server_device_cuda_absent_is_one_config_error_before_the_run(tmp_path, device):
    from fedsafe.server.app import global_model_setup
    from fedsafe.server.config import ConfigError, RunConfig

    cfg = RunConfig(dataset="breast-cancer", server_device=device, out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=f"^server-device: device '{device}' asked for, but this machine has no "
                                          "CUDA GPU") as caught:
        global_model_setup(cfg)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "CPU"])
def test_server_device_names_are_checked_where_the_config_enters(name):
    from fedsafe.server.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=f"server-device: device must be auto, cpu, cuda or cuda:N; got '{name}'"):
        RunConfig(server_device=name)


def _evaluation_setup(tmp_path, server_device: str):
    from fedsafe.server.app import central_data
    from fedsafe.server.config import RunConfig
    from fedsafe.server.evaluation import build_global_model, make_evaluator, server_device as resolve

    cfg = RunConfig(dataset="breast-cancer", server_device=server_device, out_dir=str(tmp_path))
    spec, split = central_data(cfg)
    built = build_global_model(cfg, spec)
    return built, make_evaluator(built, split, validation=False, device=resolve(cfg))


def test_the_evaluator_judges_its_own_copy_on_the_server_device(tmp_path):
    """The evaluator holds its own copy of the model on the server device: the global model the run
    sends out (and checkpoints) stays on the CPU, whatever the coordinator evaluates on."""
    from flwr.app import ArrayRecord

    built, evaluator = _evaluation_setup(tmp_path, "auto")
    arrays = ArrayRecord(built.model.state_dict())
    first = evaluator(arrays)
    assert 0.0 <= first["accuracy"] <= 1.0 and evaluator(arrays) == first
    assert {p.device.type for p in built.model.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluation_on_cuda_gives_the_cpus_metrics(tmp_path):
    from flwr.app import ArrayRecord

    built, on_cpu = _evaluation_setup(tmp_path / "cpu", "cpu")
    _, on_cuda = _evaluation_setup(tmp_path / "cuda", "cuda")
    arrays = ArrayRecord(built.model.state_dict())
    cpu_metrics, cuda_metrics = on_cpu(arrays), on_cuda(arrays)
    assert cuda_metrics.keys() == cpu_metrics.keys()
    assert all(cuda_metrics[k] == pytest.approx(cpu_metrics[k], abs=1e-4) for k in cpu_metrics)


# ---- simulated nodes on a shared GPU (--client-gpus) ------------------------------------------------

def test_client_gpus_become_each_actors_ray_resources_and_its_training_device():
    from fedsafe.simulations.run import SimulationOptions

    shared = SimulationOptions(num_nodes=4, client_gpus=0.25, ray_address="10.0.0.1:6379")
    assert shared.backend_config() == {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.25},
                                       "init_args": {"address": "10.0.0.1:6379"}}
    assert shared.node_device == "cuda"  # the GPU Ray assigned is the actor's only visible one
    alone = SimulationOptions(num_nodes=4)
    assert alone.backend_config() == {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}, "init_args": {}}
    assert alone.node_device == "cpu"  # not "auto": Ray leaves a GPU visible to actors that reserved none


@pytest.mark.parametrize("client_gpus, asked", [(0.0, "cpu"), (0.5, "cuda")])
def test_virtual_nodes_train_on_the_device_their_gpu_share_gives(tmp_path, monkeypatch, client_gpus, asked):
    """The whole path, in process: each simulated node's ClientApp resolves the device the options say
    (resolved here to the CPU, which this machine has)."""
    from fedsafe.client import app
    from fedsafe.server.config import RunConfig
    from fedsafe.simulations.run import SimulationOptions, simulate_in_process

    names: list[str] = []

    def recording(policy) -> torch.device:
        names.append(policy.device)
        return torch.device("cpu")

    monkeypatch.setattr(app, "node_device", recording)
    cfg = RunConfig(num_rounds=1, dataset="breast-cancer", local_epochs=1, out_dir=str(tmp_path))
    # A cluster address: the GPU check is the cluster's, so this CPU machine may ask for a GPU share.
    options = SimulationOptions(num_nodes=2, client_gpus=client_gpus, ray_address="10.0.0.1:6379")
    outcome = simulate_in_process(cfg, options)
    assert outcome.history[-1]["eval"]["accuracy"] > 0.5
    assert names == [asked, asked]  # each node's one round


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_refuses_cuda_it_lacks_in_one_line(capsys):
    from fedsafe.cli import main

    for argv, message in [
        (["simulate", "--server-device", "cuda:0", "--rounds", "1"],
         "server-device: device 'cuda:0' asked for, but this machine has no CUDA GPU"),
        (["simulate", "--client-gpus", "0.25", "--rounds", "1"],
         "--client-gpus 0.25 asks for a GPU per node, but this machine has no CUDA GPU"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
