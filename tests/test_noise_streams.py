"""Seeded DP noise in simulation is never reused for a second release on the same records (issue 10
item 6, node side): a run's noise is reproducible from fresh ledgers, and a second run with the same seed
on the same ledgers draws fresh noise — identical noise would cancel in the difference of the two
updates while the ledger composes them as independent releases."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import optimizer as opacus_optimizer

from fedsafe.server.config import RunConfig
from fedsafe.simulations.run import SimulationOptions, simulate_in_process


@pytest.fixture
def noise_draws(monkeypatch):
    """The noise Opacus draws in this process (the in-process simulation's nodes), by stream: the
    seed of the generator it was drawn with (the same seed on the same device is the same stream)."""
    draws: list[tuple[int, torch.Tensor]] = []
    original = opacus_optimizer._generate_noise

    def recording(std, reference, generator=None, secure_mode=False):
        noise = original(std, reference, generator, secure_mode)
        if generator is not None:  # None: the coordinator's check that the model can be privatised
            draws.append((generator.initial_seed(), noise.detach().clone().flatten() / std))
        return noise

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", recording)
    return draws


def _run(tmp_path, name: str, ledgers, draws) -> dict[int, torch.Tensor]:
    """Run one round over two nodes; the standard-normal noise each stream drew, by stream. The nodes'
    lifetime cap (20) funds several such runs on one ledger, each at the σ of a full grant."""
    first = len(draws)
    cfg = RunConfig(num_rounds=1, dataset="breast-cancer", model="mlp", epsilon=8.0, local_epochs=1,
                    seed=5, out_dir=str(tmp_path / name))
    outcome = simulate_in_process(cfg, SimulationOptions(num_nodes=2, ledger_dir=str(ledgers)), max_epsilon=20.0)
    assert outcome.history[-1]["replies"] == 2  # both nodes trained (and drew noise)
    streams: dict[int, list[torch.Tensor]] = {}
    for seed, noise in draws[first:]:
        streams.setdefault(seed, []).append(noise)
    assert len(streams) == 2  # one stream per node
    return {seed: torch.cat(parts) for seed, parts in streams.items()}


def test_same_seed_on_the_same_ledgers_draws_fresh_noise_and_fresh_ledgers_reproduce(tmp_path, noise_draws):
    first = _run(tmp_path, "first", tmp_path / "ledgers", noise_draws)
    second = _run(tmp_path, "second", tmp_path / "ledgers", noise_draws)
    assert not first.keys() & second.keys()  # no stream of the first run is drawn again
    for a, b in zip(first.values(), second.values()):
        n = min(len(a), len(b))
        assert abs(float(torch.corrcoef(torch.stack([a[:n], b[:n]]))[0, 1])) < 0.05

    again = _run(tmp_path, "again", tmp_path / "fresh-ledgers", noise_draws)
    assert again.keys() == first.keys()  # the same seed from fresh ledgers: the first run's noise exactly
    assert all(torch.equal(again[seed], first[seed]) for seed in first)
