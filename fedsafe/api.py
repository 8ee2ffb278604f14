"""fedsafe as a library: the public Python API (also importable as ``fedsafe.simulate``, …).

* ``simulate(model, data, …)`` runs a federated DP-SGD simulation from Python and returns the trained
  model, the per-round history and every node's ε.
* ``PrivateTrainer`` is the node side for a Flower user's *own* ClientApp: one call per train message
  reserves ε in the node's ledger, trains with DP-SGD at exactly that noise, settles the steps taken and
  builds the reply (arrays + public metrics) — fedsafe's privacy gate (client/gate.py), without
  fedsafe's coordinator or CLI. A stock Flower ServerApp (e.g. FedAvg) on the other side works.

Everything a user names here is public; the modules behind it (fedsafe.client.…, fedsafe.server.…)
may change.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedsafe.client.policy import NodePolicy, PolicyError
from fedsafe.models.registry import DataSpec, ModelConfigError

__all__ = ["DataSpec", "NodePolicy", "PrivateTrainer", "SimulationResult", "simulate"]

ModelFactory = Callable[..., Any]  # (spec, options) -> nn.Module, or (spec) -> nn.Module


@dataclass
class SimulationResult:
    """What a simulation returns: the final global model, its held-out metrics, per-round history
    (round 0 is the initial model) and each node's ε spent (by Flower node id)."""

    model: Any  # torch.nn.Module holding the final global weights
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    node_epsilon: dict[int, float]
    out_dir: Path

    @property
    def epsilon(self) -> float | None:
        """The largest ε any node spent (None for a non-private run)."""
        return max(self.node_epsilon.values()) if self.node_epsilon else None


def simulate(model: str | ModelFactory, data: str | Path | tuple[np.ndarray, np.ndarray], *, nodes: int = 3,
             rounds: int = 3, epsilon: float = 3.0, engine: str = "local", out_dir: str | Path | None = None,
             progress: bool = False, **settings: Any) -> SimulationResult:
    """Federated DP-SGD over `nodes` virtual nodes; returns a SimulationResult.

    `model`: a family name ("mlp", "cnn", …), a factory reference "package.module:function", or the
    factory itself (``f(spec, options) -> nn.Module``; with engine="ray" it must be importable by its
    module and name, since Ray's workers import it). `data`: a built-in dataset name, a .csv/.npz file,
    or arrays ``(x, y)`` (integer labels: classification; floats: regression). `engine`: "local" (every
    node in this process, no Ray: fastest for small federations) or "ray" (Flower's simulation engine).
    `settings`: any other run setting by its Python name (lr=0.1, batch_size=32, model_options="…", …;
    fedsafe.settings.RUN_SETTINGS lists them).
    """
    from fedsafe.server.config import RunConfig
    from fedsafe.simulations.run import SimulationOptions, simulate_in_process
    from fedsafe.simulations.run import simulate as simulate_on_ray

    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray'; got {engine!r}")
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="fedsafe-"))
    out.mkdir(parents=True, exist_ok=True)
    model_name = _model_name(model, engine)
    dataset = _dataset(data, out)
    cfg = RunConfig(model=model_name, dataset=dataset, num_rounds=rounds, epsilon=epsilon, out_dir=str(out),
                    **settings)
    options = SimulationOptions(num_nodes=nodes, backend=engine)  # simulate_on_ray would otherwise pick one
    sink = None
    if progress:
        from fedsafe.server.loop import print_progress as sink
    outcome = (simulate_in_process(cfg, options, sink) if engine == "local"
               else simulate_on_ray(cfg, options, sink))
    return SimulationResult(_final_model(cfg, outcome), outcome.history[-1].get("eval", {}), outcome.history,
                            dict(outcome.node_epsilon), out)


def _model_name(model: str | ModelFactory, engine: str) -> str:
    """The run-config name of `model`: as given, the factory's import reference when it has one, or (local
    engine only) a name for it in this process' registry."""
    from fedsafe.models import registry

    if isinstance(model, str):
        return model
    if not callable(model):
        raise ModelConfigError(f"model must be a name, 'package.module:function' or a factory; got {model!r}")
    reference = f"{model.__module__}:{model.__qualname__}"
    try:
        if registry.import_reference(reference) is model:
            return reference
    except registry.UserModelError:
        pass
    if engine != "local":
        raise ModelConfigError(f"engine='ray' imports the model in other processes: define {model.__qualname__} "
                               f"at the top level of an importable module (it is {reference})")
    name = f"python-object-{model.__qualname__}-{id(model):x}"
    registry._FAMILIES.setdefault(name, registry._user_family(name, model))
    return name


def _dataset(data: str | Path | tuple[np.ndarray, np.ndarray], out: Path) -> str:
    """A run-config dataset for `data`: arrays are written once, as an .npz, into the run's directory."""
    if isinstance(data, (str, Path)):
        return str(data)
    x, y = data
    path = out / "data.npz"
    np.savez(path, x=np.asarray(x, dtype=np.float32), y=np.asarray(y))
    return str(path)


def _final_model(cfg, outcome):
    """The run's model (as the coordinator built it) holding the final global weights."""
    from fedsafe.server.app import central_data
    from fedsafe.server.evaluation import build_global_model

    spec, _ = central_data(cfg)
    model = build_global_model(cfg, spec).model
    model.load_state_dict(outcome.arrays.to_torch_state_dict(), strict=False)  # frozen tensors: the initial ones
    return model


@dataclass
class PrivateTrainer:
    """DP-SGD with an honest ledger for your own Flower ClientApp.

    ``trainer.train(msg, context)`` answers one Flower train message: the message's ArrayRecord
    ("arrays") is the global model's state dict; the reply holds the trained state dict and the public
    metrics (num-examples, epsilon, delta, dp-steps, …). The node's ledger (policy.state_dir) is keyed by
    a hash of the training records, so the same records are charged together across runs and apps;
    a round the ledger cannot afford is refused (code 4001), as is anything else that goes wrong
    (fixed codes, no exception text leaves the node).

    The privacy terms are the node's: `epsilon` for the run (granted up to policy.max_epsilon, the
    lifetime cap), `rounds` the run's planned rounds (σ is calibrated once so the last lands at ε).
    """

    model: ModelFactory  # () -> nn.Module, the same architecture as the server's global model
    data: tuple[np.ndarray, np.ndarray]  # (x, y): the node's training records
    policy: NodePolicy = field(default_factory=NodePolicy)
    epsilon: float = 3.0
    rounds: int = 3
    task: str = "classification"
    num_classes: int | None = None  # default: max(y) + 1 for classification, 1 for regression
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    grad_sample_mode: str = "hooks"
    dataset: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from fedsafe.client.data import ArrayDataset

        x, y = (np.asarray(a) for a in self.data)
        y = y.astype(np.int64) if self.task == "classification" else y.astype(np.float32)
        if len(x) != len(y) or not len(y):
            raise ValueError(f"data: x has {len(x)} records, y {len(y)}; both must be the same, non-zero")
        classes = self.num_classes or (int(y.max()) + 1 if self.task == "classification" else 1)
        self.dataset = ArrayDataset(x.astype(np.float32), y, DataSpec(tuple(x.shape[1:]), classes, self.task))

    @property
    def data_key(self) -> str:
        """What the ledger protects: these records, by content — the key a fedsafe node gives the same
        records loaded from a file (fedsafe.client.data.records_digest)."""
        from fedsafe.client.data import records_digest

        return "records:" + records_digest(self.dataset)

    def train(self, msg, context=None):
        """reserve → DP-SGD → settle → reply, or a refusal with a fixed code (client/gate.py)."""
        from fedsafe.client.gate import refuse

        try:
            return self._round(msg)
        except Exception as err:  # noqa: BLE001 - the detail stays on the node; the reply is a fixed code
            return refuse(msg, err)

    def _round(self, msg):
        from fedsafe.client.data import record_hashes
        from fedsafe.client.dp_modes import check_no_batchnorm
        from fedsafe.client.gate import PrivacyGate
        from fedsafe.client.policy import resolve_terms
        from fedsafe.client.precision import grad_sample_mode
        from fedsafe.client.replay import request_digest
        from fedsafe.client.training import TrainSettings, resolve_device
        from fedsafe.client.training import train as dp_train
        from fedsafe.models import task_for

        request = self._request(msg)
        terms = resolve_terms(self.policy, request)
        gate = PrivacyGate(msg, self.policy, request, terms, self.data_key, records=record_hashes(self.dataset))
        arrays = msg.content["arrays"]
        digest = request_digest(dict(msg.content["config"].items()) if "config" in msg.content else {},
                                {k: v.numpy() for k, v in arrays.items()})
        if (replayed := gate.replay(digest)) is not None:
            return replayed
        model = self.model()
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        check_no_batchnorm(model)
        dp_mode = grad_sample_mode(self.grad_sample_mode, request.precision, self.task)  # before ε is reserved
        plan = gate.reserve(len(self.dataset))
        settings = TrainSettings.of(request, grad_sample_mode=dp_mode,
                                    noise_multiplier=plan.noise_multiplier)
        outcome = dp_train(model, task_for(self.task, self.dataset.spec.num_classes), self.dataset, settings,
                           resolve_device(self.policy.device), None)
        figures = gate.settle(plan, outcome)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        from fedsafe import protocol

        return gate.release(digest, state, {protocol.NUM_EXAMPLES: len(self.dataset), **figures})

    def _request(self, msg):
        """The round as fedsafe's node reads it: the trainer's settings, Flower's run id and the round the
        server's strategy numbers (config "server-round", set by Flower's strategies)."""
        from fedsafe import protocol
        from fedsafe.client.policy import TrainRequest
        from fedsafe.settings import RUN_SETTINGS

        config = msg.content["config"] if "config" in msg.content else {}
        server_round = config.get(protocol.SERVER_ROUND)
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
            raise PolicyError(f"the train message's config has no valid {protocol.SERVER_ROUND!r}; got {server_round!r}")
        from fedsafe.picked_defaults import FIXED_ROUNDS

        # the declared defaults, and for those the coordinator would pick, its picks for a run with set rounds
        sent = {**{s.name: s.default for s in RUN_SETTINGS if s.sent}, **FIXED_ROUNDS}
        mine = dict(epsilon=self.epsilon, num_rounds=self.rounds, local_epochs=self.local_epochs,
                    batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer, dp=True,
                    delta=self.policy.delta)
        known = {f.name for f in fields(TrainRequest)}
        return TrainRequest(**{k: v for k, v in {**sent, **mine}.items() if k in known},
                            run_id=f"flower-run-{msg.metadata.run_id}", server_round=server_round,
                            input_shape=self.dataset.spec.input_shape, num_classes=self.dataset.spec.num_classes,
                            task=self.task)
