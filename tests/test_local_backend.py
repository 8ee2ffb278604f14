"""The in-process simulation backend (issue 18): the same run as on Ray, nodes that share nothing mutable,
a crashing node answered by an error reply, and backend names checked."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.simulations.backend import LOCAL_MAX_NODES, BackendError, choose_backend
from fedsafe.simulations.local import LocalGrid
from fedsafe.simulations.run import SimulationOptions, simulate

TIMINGS = {"seconds", "wait_seconds", "clientapp_startup_seconds"}  # wall clock, not the run's outcome


def _history(outcome) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in outcome.history]


@pytest.mark.slow
def test_local_and_ray_backends_give_the_same_run_for_the_same_seed(tmp_path):
    """Same seed: the same nodes sampled (the same node ids), the same seeded noise, the same metrics and
    the same ε in each node's ledger, whichever engine called the nodes."""
    runs = {}
    for backend in ("local", "ray"):
        cfg = RunConfig(num_rounds=2, model="mlp", dataset="breast-cancer", fraction_train=0.5, local_epochs=1,
                        seed=11, out_dir=str(tmp_path / backend))
        runs[backend] = simulate(cfg, SimulationOptions(num_nodes=4, backend=backend), progress=None)
    local, ray = (_history(runs[b]) for b in ("local", "ray"))
    assert local[-1]["sent"] == 2 and local[-1]["replies"] == 2
    assert local == ray
    assert runs["local"].node_epsilon == runs["ray"].node_epsilon
    final = {b: runs[b].arrays.to_numpy_ndarrays() for b in runs}
    assert all(np.array_equal(a, b) for a, b in zip(final["local"], final["ray"], strict=True))


def _draws_app(seeder: int) -> ClientApp:
    """Each node seeds its own global streams (7) on its first message and draws once per message; node
    `seeder` also reseeds them to 0 before every draw."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        if "seeded" not in context.state.config_records:
            torch.manual_seed(7)
            np.random.seed(7)
            random.seed(7)
            context.state["seeded"] = ConfigRecord({"yes": True})
        if context.node_id == seeder:
            torch.manual_seed(0)
            np.random.seed(0)
            random.seed(0)
        draws = ConfigRecord({"torch": float(torch.rand(1)), "numpy": float(np.random.rand()), "py": random.random()})
        return Message(RecordDict({"draws": draws}), reply_to=msg)

    return app


def _message(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_node_reseeding_the_global_random_streams_moves_neither_another_node_nor_the_driver(
        flower_task_identity, workers):
    grid = LocalGrid(_draws_app(seeder=1000), num_nodes=2, workers=workers)
    torch.manual_seed(123)
    other = [grid.send_and_receive([_message(1000), _message(1001)])[1].content["draws"] for _ in range(3)]
    driver_after = torch.rand(2)
    # Node 1001 draws what its own seed 7 gives, in order, though node 1000 reseeds to 0 before each draw.
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    assert [d["torch"] for d in other] == pytest.approx([float(torch.rand(1)) for _ in range(3)])
    assert [d["numpy"] for d in other] == pytest.approx([float(np.random.rand()) for _ in range(3)])
    assert [d["py"] for d in other] == pytest.approx([random.random() for _ in range(3)])
    # The driver's stream continues where it was, as if no node had run in its process.
    torch.manual_seed(123)
    assert torch.equal(driver_after, torch.rand(2))
    grid.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_node_mutating_its_message_or_reply_touches_no_other_copy(flower_task_identity, workers):
    """Messages travel as copies, both ways: a node writing into what it received, or into a reply it
    already sent, changes neither the server's objects nor another node's. Its Context is its own and
    survives its rounds, in this process or in the workers."""
    last_reply: dict[int, ConfigRecord] = {}
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        saw = str(config["model"])
        config["model"] = f"overwritten by {context.node_id}"  # in place, in what it received
        weights = msg.content["arrays"].to_numpy_ndarrays()[0]
        msg.content["arrays"]["0"] = ArrayRecord([weights + context.node_id]).popitem()[1]
        if context.node_id in last_reply:
            last_reply[context.node_id]["round"] = -1  # into the reply it sent last time
        calls = int(context.state.config_records.get("calls", ConfigRecord({"n": 0}))["n"]) + 1
        context.state["calls"] = ConfigRecord({"n": calls})
        reply = ConfigRecord({"round": calls, "saw": saw, "sum": float(weights.sum())})
        last_reply[context.node_id] = reply
        return Message(RecordDict({"result": reply}), reply_to=msg)

    grid = LocalGrid(app, num_nodes=2, workers=workers)
    content = RecordDict({"config": ConfigRecord({"model": "mlp"}), "arrays": ArrayRecord([np.ones(3)])})
    rounds = [(1000, 1001), (1000,), (1000, 1001), (1001, 1000)]
    replies = [grid.send_and_receive([Message(content, dst_node_id=n, message_type="train") for n in nodes])
               for nodes in rounds]
    grid.close()
    results = [[(int(r.metadata.src_node_id), dict(r.content["result"])) for r in round_] for round_ in replies]
    # Each node got the server's config and arrays as sent, and counted its own calls in its Context.
    assert results == [
        [(1000, {"round": 1, "saw": "mlp", "sum": 3.0}), (1001, {"round": 1, "saw": "mlp", "sum": 3.0})],
        [(1000, {"round": 2, "saw": "mlp", "sum": 3.0})],
        [(1000, {"round": 3, "saw": "mlp", "sum": 3.0}), (1001, {"round": 2, "saw": "mlp", "sum": 3.0})],
        [(1001, {"round": 3, "saw": "mlp", "sum": 3.0}), (1000, {"round": 4, "saw": "mlp", "sum": 3.0})],
    ]
    assert content["config"]["model"] == "mlp" and np.array_equal(content["arrays"].to_numpy_ndarrays()[0], np.ones(3))


def test_a_node_that_raises_is_an_error_reply_and_the_run_goes_on(tmp_path):
    from fed_harness import federation, run

    cfg, grid, strategy = federation(tmp_path, nodes=3, num_rounds=2, dataset="breast-cancer", model="mlp")
    real_app = grid.client_app
    crashing = sorted(grid.contexts)[0]

    def app(message: Message, context: Context) -> Message:
        if context.node_id == crashing:
            raise RuntimeError("disk on fire")
        return real_app(message, context)

    grid.client_app = app
    outcome = run(cfg, grid, strategy)
    trained = [h for h in outcome.history if h["round"] > 0]
    assert [h["replies"] for h in trained] == [2, 2] and [h["failures"] for h in trained] == [1, 1]
    errors = [r for r in grid.received if r.has_error()]
    assert len(errors) == 2 and all(int(r.metadata.src_node_id) == crashing for r in errors)
    assert errors[0].error.code == 2 and errors[0].error.reason == "ClientApp raised RuntimeError: disk on fire"
    assert outcome.history[-1]["eval"]["accuracy"] > 0.5  # the other nodes' updates were aggregated


def test_auto_runs_small_federations_in_process_and_ray_where_it_pays():
    assert choose_backend("auto", 10).name == "local"
    assert choose_backend("auto", LOCAL_MAX_NODES).name == "local"
    assert choose_backend("auto", LOCAL_MAX_NODES + 1).name == "ray"
    cluster = choose_backend("auto", 10, ray_address="auto")
    assert cluster.name == "ray" and "--ray-address" in cluster.reason
    assert choose_backend("auto", 10, client_gpus=0.5).name == "ray"
    assert choose_backend("ray", 3).name == "ray" and choose_backend("local", 5000).name == "local"
    assert "10 nodes" in choose_backend("auto", 10).line()


def test_unknown_backends_and_local_with_a_cluster_are_refused_in_one_line(capsys):
    from fedsafe.cli import main

    with pytest.raises(BackendError, match="unknown backend 'fast'; choose one of: auto, local, ray"):
        choose_backend("fast", 3)
    with pytest.raises(ConfigError, match="unknown backend 'Local'"):
        SimulationOptions(num_nodes=3, backend="Local")
    with pytest.raises(ConfigError, match="--ray-address need Ray"):
        SimulationOptions(num_nodes=3, backend="local", ray_address="10.0.0.1:6379")
    assert main(["simulate", "--backend", "fast", "--nodes", "2"]) != 0
    err = capsys.readouterr().err
    assert "invalid choice: 'fast'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["simulate", "--backend", "local", "--ray-address", "auto", "--nodes", "2"]) != 0
    err = capsys.readouterr().err
    assert "--backend local runs every node in this process" in err and "Traceback" not in err


@pytest.mark.slow
def test_ten_thousand_nodes_in_process_hold_only_what_is_sampled(tmp_path):
    """10,000 virtual nodes in one process: a Context each, and a model, random streams and a ledger only
    for the nodes sampled (here 10 per round)."""
    import resource

    from fedsafe.simulations import local

    grids = []
    original = local.LocalGrid.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        grids.append(self)

    cfg = RunConfig(num_rounds=2, model="mlp", dataset="synthetic", fraction_train=0.001, local_epochs=1,
                    out_dir=str(tmp_path / "run"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS so far (Linux: KiB)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local.LocalGrid, "__init__", keep)
        outcome = simulate(cfg, SimulationOptions(num_nodes=10_000, backend="local"), progress=None)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    trained = [h for h in outcome.history if h["round"] > 0]
    assert [h["replies"] for h in trained] == [10, 10] and all(h["failures"] == 0 for h in trained)
    assert len(grids[0].contexts) == 10_000
    assert len(grids[0].randomness._states) == len(outcome.node_epsilon) <= 20  # only sampled nodes
    assert len(list((tmp_path / "run" / "ledgers").glob("*.json"))) == len(outcome.node_epsilon)
    assert grown < 400 * 2**20, f"peak RSS grew {grown / 2**20:.0f} MiB"


def test_the_cli_says_which_backend_runs_and_why_before_anything_else(tmp_path, capsys):
    import ray

    from fedsafe.cli import main

    assert main(["simulate", "--nodes", "2", "--rounds", "1", "--local-epochs", "1", "--dataset", "breast-cancer",
                 "--out", str(tmp_path / "run")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("fedsafe: backend local (every node in this process): 2 nodes on one host")
    assert not ray.is_initialized()  # no Ray was started for an in-process run
    assert (tmp_path / "run" / "metrics.json").exists()


# ---- the local backend's worker processes (simulations/workers.py) --------------------------------------
@pytest.mark.slow
def test_worker_processes_give_the_same_run_as_one_process_for_the_same_seed(tmp_path):
    """Same seed: the same metrics, ε and final model whether the nodes train in this process or in two
    forked workers (a node's Context and random streams travel with its messages)."""
    runs = {}
    for workers in (1, 2):
        cfg = RunConfig(num_rounds=2, model="mlp", dataset="breast-cancer", fraction_train=1.0, local_epochs=1,
                        seed=5, out_dir=str(tmp_path / f"w{workers}"))
        runs[workers] = simulate(cfg, SimulationOptions(num_nodes=3, backend="local", local_workers=workers),
                                 progress=None)
    assert _history(runs[1])[-1]["replies"] == 3 and _history(runs[1])[-1]["failures"] == 0
    assert _history(runs[1]) == _history(runs[2])
    assert runs[1].node_epsilon == runs[2].node_epsilon
    final = {w: runs[w].arrays.to_numpy_ndarrays() for w in runs}
    assert all(np.array_equal(a, b) for a, b in zip(final[1], final[2], strict=True))


@pytest.mark.slow
def test_secagg_stages_run_in_worker_processes(tmp_path):
    """SecAgg+ with distributed DP across two workers: a node's protocol state between the stages lives in
    its Context, which travels with its messages, so every stage finds it whichever worker serves it. The
    masks' quantisation draws fresh randomness (not the seed), so the runs agree on ε and σ exactly and on
    the model up to that rounding."""
    runs = {}
    for workers in (1, 2):
        cfg = RunConfig(num_rounds=2, model="mlp", dataset="breast-cancer", fraction_train=1.0, local_epochs=1,
                        seed=5, secagg=True, distributed_dp=True, local_steps=1, out_dir=str(tmp_path / f"w{workers}"))
        runs[workers] = simulate(cfg, SimulationOptions(num_nodes=3, backend="local", local_workers=workers),
                                 progress=None)
    for workers, outcome in runs.items():
        last = outcome.history[-1]
        assert (last["replies"], last["failures"], last["secagg"]["summed"]) == (3, 0, 3), workers
    for key in ("node_epsilon", "node_noise", "epsilon_max"):
        assert [h.get(key) for h in runs[1].history] == [h.get(key) for h in runs[2].history]
    assert runs[2].history[-1]["eval"]["loss"] == pytest.approx(runs[1].history[-1]["eval"]["loss"], abs=1e-4)


def _counting_app(driver_pid: int, died, dies: int | None = None, raises: int | None = None) -> ClientApp:
    """Replies with the pid that served it and the node's call count (kept in its Context); node `dies`
    kills its worker process once (never the driver's; the file `died` remembers it), node `raises` raises."""
    import os

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        calls = int(context.state.config_records.get("calls", ConfigRecord({"n": 0}))["n"]) + 1
        context.state["calls"] = ConfigRecord({"n": calls})
        if context.node_id == dies and not died.exists() and os.getpid() != driver_pid:
            died.touch()
            os._exit(3)
        if context.node_id == raises:
            raise RuntimeError("disk on fire")
        return Message(RecordDict({"r": ConfigRecord({"pid": os.getpid(), "calls": calls})}), reply_to=msg)

    return app


def test_a_node_that_raises_or_kills_its_worker_is_an_error_reply_and_the_others_go_on(flower_task_identity,
                                                                                        tmp_path):
    import os

    nodes = (1000, 1001, 1002, 1003)
    grid = LocalGrid(_counting_app(os.getpid(), tmp_path / "died", dies=1002, raises=1003), num_nodes=4, workers=2)
    try:
        first = grid.send_and_receive([_message(n) for n in nodes])
        second = grid.send_and_receive([_message(n) for n in nodes])
    finally:
        grid.close()
    by_node = {int(r.metadata.src_node_id): r for r in first}
    assert not by_node[1000].has_error() and not by_node[1001].has_error()
    assert by_node[1002].has_error() and "worker process died (exit code 3)" in by_node[1002].error.reason
    assert by_node[1003].error.reason == "ClientApp raised RuntimeError: disk on fire"
    # A new worker took the dead one's place; node 1002's Context is as before the message it died with.
    again = {int(r.metadata.src_node_id): r for r in second}
    assert {n: again[n].content["r"]["calls"] for n in (1000, 1001, 1002)} == {1000: 2, 1001: 2, 1002: 1}
    assert again[1003].has_error()
    assert {again[n].content["r"]["pid"] for n in (1000, 1001, 1002)} - {os.getpid()}  # workers served them


def test_workers_killed_while_idle_are_replaced_before_they_cost_a_message(flower_task_identity, tmp_path):
    """Every worker killed between two rounds: the next round's messages go to new workers, every node is
    served, and its Context carries on (a worker that dies holding a message: the test above)."""
    import os
    import signal

    nodes = (1000, 1001)
    grid = LocalGrid(_counting_app(os.getpid(), tmp_path / "died"), num_nodes=2, workers=2)
    try:
        grid.send_and_receive([_message(n) for n in nodes])
        killed = [process for process, _ in grid._pool._workers]
        for process in killed:
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        after = [grid.send_and_receive([_message(n) for n in nodes]) for _ in range(2)]
    finally:
        grid.close()
    assert [[r.content["r"]["calls"] for r in replies] for replies in after] == [[2, 2], [3, 3]]
    assert not {r.content["r"]["pid"] for replies in after for r in replies} & {p.pid for p in killed}


def test_worker_processes_end_with_their_driver_even_when_it_is_killed(tmp_path):
    """A driver killed mid-round (SIGKILL: no clean-up runs) leaves no worker process behind."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.clientapp import ClientApp
        from fedsafe.simulations.local import LocalGrid

        app = ClientApp()

        @app.train()
        def _train(msg, context):
            if os.getpid() != DRIVER:
                print(os.getpid(), flush=True)
                time.sleep(600)
            return Message(RecordDict({}), reply_to=msg)

        DRIVER = os.getpid()
        grid = LocalGrid(app, num_nodes=3, workers=2)
        grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train")
                               for n in (1000, 1001, 1002)])
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    while len(workers) < 2:  # both workers hold a message
        line = driver.stdout.readline()
        assert line, "the driver ended before its workers took their messages"
        if line.strip().isdigit():
            workers.append(int(line))
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as stat:  # a zombie awaiting its reaper is gone too
            return stat.read().split()[2] != "Z"

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)


def test_bad_local_worker_counts_are_refused_in_one_line(capsys):
    from fedsafe.cli import main

    assert choose_backend("local", 10, local_workers=3).workers == 3
    assert choose_backend("local", 10, local_workers=1).line().endswith("asked for (--backend local)")
    assert "2 worker processes forked" in choose_backend("auto", 10, local_workers=2).line()
    assert choose_backend("auto", 1).workers == 1  # never more workers than nodes
    with pytest.raises(BackendError, match="--local-workers must be >= 1; got 0"):
        choose_backend("local", 3, local_workers=0)
    with pytest.raises(ConfigError, match="with --backend ray the nodes run on Ray"):
        SimulationOptions(num_nodes=3, backend="ray", local_workers=2)
    assert SimulationOptions(num_nodes=3, backend="ray").backend_choice().name == "ray"
    assert SimulationOptions(num_nodes=3, backend="local").backend_choice().workers == 1  # the API's default
    assert main(["simulate", "--local-workers", "-1", "--nodes", "2"]) != 0
    err = capsys.readouterr().err
    assert "--local-workers must be >= 1; got -1" in err and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_stops_a_run_in_worker_processes_and_leaves_none_behind(tmp_path):
    """Ctrl-C (SIGINT to the terminal's whole process group) mid-run: the driver stops the run as it always
    did (exit 130, its message), the workers ignore the signal and end with it, and the checkpoint of the
    last finished round is there to resume from."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedsafe", "simulate", "--nodes", "4", "--rounds", "200", "--local-epochs", "1",
               "--dataset", "breast-cancer", "--epsilon", "8", "--local-workers", "2", "--out", str(out)]
    def as_from_a_terminal() -> None:  # SIGINT handled and unblocked, whatever this test process inherited
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=as_from_a_terminal)
    try:
        for line in run.stdout:  # wait for the second round: the workers exist and have trained
            if line.startswith("round   2/"):
                break
        workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True,
                                                      text=True).stdout.split()]
        with open(f"/proc/{run.pid}/status") as status:  # said if the driver did not stop
            signals = [line.strip() for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, f"exit {run.returncode}; the driver's signals when interrupted: {signals}"
    assert "fedsafe: interrupted" in err and "Traceback" not in err
    assert len(workers) >= 2  # the two workers (and the plot helper) were children of the driver
    time.sleep(0.5)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}") and
                open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    assert (out / "checkpoint.pt").exists()
