"""Guards of fedsafe/flower/: each adapter's patched path, run against the installed Flower.

A Flower upgrade that moves or changes a piece fedsafe replaces fails here, with a message naming the
piece, before it fails in a simulation or on a node. Nothing here starts Ray or a network connection:
each test drives Flower's own code (its engine loop, its LinkState, its SuperNode loop, its Message)
with the adapter in place.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from fedsafe.flower import FlowerMoved, flower_attribute, replaced
from fedsafe.flower.task_identity import current, ensure_task_identity, set_identity, task_identity


# ------------------------------------------------------------------------------- the LinkState
def _link_state_factory():
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    # As flwr.simulation.run_simulation makes it.
    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())


def _register_nodes(num_nodes: int) -> list[int]:
    """Node ids of a fresh in-memory LinkState, registered as Flower's simulation engine registers them."""
    from flwr.server.superlink.fleet.vce import vce_api

    return list(vce_api._register_nodes(num_nodes, _link_state_factory()))


def test_seeded_node_ids_are_the_ids_a_real_link_state_gives_its_nodes():
    from fedsafe.flower.linkstate import deterministic_node_ids

    with deterministic_node_ids(3):
        first = _register_nodes(5)
    with deterministic_node_ids(3):
        again = _register_nodes(5)
    with deterministic_node_ids(4):
        other = _register_nodes(5)
    rng = random.Random(3)
    assert first == again == [rng.getrandbits(64) for _ in range(5)], (
        "Flower's in-memory LinkState no longer draws node ids from "
        "in_memory_linkstate.generate_rand_int_from_bytes(8 bytes): fedsafe/flower/linkstate.py")
    assert not set(first) & set(other)
    assert _register_nodes(5) != _register_nodes(5)  # Flower's own ids: fresh entropy each time


# ------------------------------------------------------------------------------- the simulation engine
def _dispatch_round(num_nodes: int, addressed: int) -> tuple[set[int], set[int], set[int]]:
    """Flower's own engine loop (`vce_api.run_api`) on a real in-memory LinkState, with a backend that
    answers each message with its node's id: (nodes addressed, nodes that answered, nodes polled)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend.backend import Backend
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.superlink.grid import InMemoryGrid

    class AnswerWithNodeId(Backend):
        def __init__(self) -> None:  # noqa: D107 - no config
            pass

        def build(self, app_fn) -> None:
            pass

        @property
        def num_workers(self) -> int:
            return 1

        def is_worker_idle(self) -> bool:
            return True

        def terminate(self) -> None:
            pass

        def process_message(self, message, context):
            return Message(RecordDict({"r": ConfigRecord({"node": context.node_id})}), reply_to=message), context

    factory = _link_state_factory()
    nodes = vce_api._register_nodes(num_nodes, factory)
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, "serverapp")
    (run,) = state.get_run_info(run_ids=[run_id])
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    polled = set()
    get_message_ins = state.get_message_ins

    def polling(node_id, limit, **kwargs):
        polled.add(node_id)
        return get_message_ins(node_id=node_id, limit=limit, **kwargs)

    state.get_message_ins = polling
    targets = set(list(nodes)[:addressed])
    answered = set()
    stop = threading.Event()
    with task_identity(run_id=run_id, node_id=SUPERLINK_NODE_ID):
        ids = list(grid.push_messages([Message(RecordDict(), dst_node_id=node, message_type="query", group_id="1")
                                       for node in targets]))
        engine = threading.Thread(target=vce_api.run_api, args=(
            lambda: None, AnswerWithNodeId, nodes, factory, vce_api._register_node_info_stores(nodes, run),
            stop, VceMetrics()))
        engine.start()
        try:
            deadline = time.monotonic() + 30
            while len(answered) < len(targets) and time.monotonic() < deadline:
                answered |= {reply.content["r"]["node"] for reply in grid.pull_messages(ids)}
                time.sleep(0.02)
        finally:
            stop.set()
            engine.join()
    return targets, answered, polled


def test_the_engine_dispatches_through_fedsafes_dispatcher_polling_only_addressed_nodes():
    from fedsafe.flower.simulation import scalable_engine

    with scalable_engine():
        addressed, answered, polled = _dispatch_round(num_nodes=40, addressed=3)
    assert answered == addressed, "Flower's run_api did not deliver the messages through fedsafe's dispatcher"
    assert polled <= addressed, (
        "Flower's simulation engine (vce_api.run_api) no longer dispatches through vce_api.add_messages_to_queue: "
        f"{len(polled)} of 40 nodes polled; fedsafe/flower/simulation.py")
    # Flower's own dispatcher, which fedsafe replaces: every registered node polled for 3 messages.
    addressed, answered, polled = _dispatch_round(num_nodes=40, addressed=3)
    assert answered == addressed and len(polled) == 40, (
        "Flower's own dispatcher no longer polls every node: is fedsafe/flower/simulation.py's still needed?")


def test_ray_actors_that_flowers_backend_makes_get_fedsafes_warm_up(monkeypatch):
    """A real RayBackend (Ray reported as already started, so none is started here) and Flower's real
    actor class: the backend's actor arguments carry the warm-up, and the actor runs it when created."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor

    from fedsafe.flower.simulation import warm_actors

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    warmed = []
    config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {}}
    assert RayBackend(config).actor_kwargs == {}  # Flower's own: no init function but TensorFlow's
    with warm_actors(lambda: warmed.append(True)):
        backend = RayBackend(config)
    assert set(backend.actor_kwargs) == {"on_actor_init_fn"}, (
        "Flower's RayBackend no longer takes its actors' arguments from "
        "RayBackend._validate_actor_arguments: fedsafe/flower/simulation.py")
    ClientAppActor.__ray_metadata__.modified_class(**backend.actor_kwargs)
    assert warmed == [True], "Flower's ClientAppActor no longer calls on_actor_init_fn when it starts"


# ------------------------------------------------------------------------------- the SuperNode
class _Stop(Exception):
    pass


@pytest.fixture
def supernode_loop(monkeypatch):
    """Flower's SuperNode loop module, with the pieces fedsafe's adapter replaces put back after the test."""
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)
    return loop


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    """Every sleep, recorded; each one ends what called it (by raising _Stop)."""
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        raise _Stop

    monkeypatch.setattr(time, "sleep", sleep)
    return slept


def _idle_wait(loop, slept) -> float:
    """The wait of Flower's real SuperNode loop (`start_client_internal`) when the SuperLink has no message:
    connected through a stand-in connection whose pull always comes back empty."""
    import contextlib

    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    @contextlib.contextmanager
    def connection(**_):
        def nothing(*_args, **_kwargs):
            raise AssertionError("the loop used the connection for more than a pull")

        yield 7, lambda: None, nothing, nothing, nothing, nothing, nothing, nothing

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)}
    try:
        with replaced(f"{loop.__name__}:_init_connection", connection, "a SuperNode loop without a SuperLink"):
            with pytest.raises(_Stop):
                loop.start_client_internal(state_factory=NodeStateFactory(ObjectStoreFactory()),
                                           server_address="127.0.0.1:9", node_config={}, isolation="process")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return slept.pop()


def _reply_wait(loop, slept) -> float:
    """The wait of Flower's real `_push_messages` while the ClientApp's reply is not there yet."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    store = ObjectStoreFactory().store()
    with pytest.raises(_Stop):
        loop._push_messages(state=InMemoryNodeState(store), object_store=store, send=None, push_object=None)
    return slept.pop()


def test_the_supernode_loop_waits_the_paced_interval(supernode_loop, slept):
    from fedsafe.flower.supernode import IDLE_POLL_SECONDS, REPLY_POLL_FAST, REPLY_POLL_SECONDS, pace

    loop = supernode_loop
    assert (_idle_wait(loop, slept), _reply_wait(loop, slept)) == (IDLE_POLL_SECONDS, REPLY_POLL_SECONDS), (
        "Flower's SuperNode loop (flwr.supernode.start_client_internal) no longer waits 3 s when idle and "
        "0.5 s for a reply: fedsafe/flower/supernode.py paces those two waits")
    pace(0.05)
    assert (_idle_wait(loop, slept), _reply_wait(loop, slept)) == (0.05, REPLY_POLL_FAST)
    assert not slept
    with pytest.raises(_Stop):
        loop.time.sleep(7)  # any other wait is Flower's own
    assert slept == [7] and loop.time.time is time.time and loop.time.monotonic is time.monotonic
    with pytest.raises(ValueError, match="poll interval must be > 0"):
        pace(0)


def _app_package(body: bytes) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        fab.writestr("pyproject.toml", '[project]\nname = "app"\nversion = "1.0.0"\n[tool.flwr.app]\n'
                     'publisher = "p"\n[tool.flwr.app.components]\nserverapp = "app:server"\n'
                     'clientapp = "app:client"\n[tool.flwr.app.config]\nk = 1\n')
        fab.writestr("app.py", body)
    return buffer.getvalue()


def test_the_supernode_runs_only_pinned_app_packages(supernode_loop, flower_task_identity, capsys):
    """Flower's own SuperNode step (`_pull_and_store_message`) with its in-memory NodeState, fed a train
    message of a run whose app is one byte off, then of the approved one."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import ErrorCode
    from flwr.supercore.fab import Fab
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from fedsafe.flower.supernode import app_digest, pin_apps

    loop = supernode_loop
    approved, tampered = _app_package(b"def client(): pass\n"), _app_package(b"def client(): pass\n#")
    assert len(approved) == len(tampered) - 1
    pin_apps([app_digest(approved)])
    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)
    state.set_node_id(7)

    def deliver(run_id: int, content: bytes, claimed_hash: str | None = None) -> tuple[int | None, list[str]]:
        message = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=7, message_type="train")
        message.metadata.__dict__["_run_id"] = run_id
        message.metadata.__dict__["_message_id"] = message.object_id
        tree = get_object_tree(message)
        objects = {key: obj.deflate() for key, obj in get_all_nested_objects(message).items()}
        run = Run.create_empty(run_id)
        run.fab_hash = claimed_hash or app_digest(content)
        fetched = []
        result = loop._pull_and_store_message(
            state=state, object_store=store, node_config={}, receive=lambda: (message, tree),
            get_run=lambda _: run, get_fab=lambda h, _: fetched.append(h) or Fab(h, content, {}),
            pull_object=lambda _, key: objects[key], confirm_message_received=lambda *_: None, trusted_entities=None)
        return result, fetched

    # One byte changed: refused before anything is stored; an error reply is queued for the coordinator.
    assert deliver(1, tampered) == (1, [app_digest(tampered)])
    assert state.get_run(1) is None and state.get_fab(app_digest(tampered)) is None
    (reply,) = state.get_messages_legacy(run_ids=[1], is_reply=True)
    assert reply.error.code == ErrorCode.INVALID_FAB and app_digest(tampered) in reply.error.reason
    assert f"REFUSED run 1: its app package (sha256 {app_digest(tampered)})" in capsys.readouterr().err
    # A SuperLink that names the approved hash but ships other bytes is refused too (the content is hashed).
    assert deliver(2, tampered, claimed_hash=app_digest(approved))[0] == 2 and state.get_run(2) is None
    # The approved package: stored once, fetched once (Flower stores the very bytes that were hashed).
    assert deliver(3, approved) == (3, [app_digest(approved)])
    assert state.get_run(3) is not None and state.get_fab(app_digest(approved)).content == approved
    assert not state.get_messages_legacy(run_ids=[3], is_reply=True)
    with pytest.raises(ValueError, match="SHA-256 in hex"):
        pin_apps([])


def test_the_node_entry_point_applies_both_supernode_adapters_then_runs_flowers_supernode(
        supernode_loop, slept, monkeypatch):
    import sys

    from flwr.supernode import cli

    from fedsafe.supernode import main

    ran = []
    monkeypatch.setattr(cli, "flower_supernode", lambda: ran.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", sys.argv)
    pull_and_store = supernode_loop._pull_and_store_message
    main(["--fedsafe-poll-interval", "0.25", "--fedsafe-allow-app", "a" * 64, "--superlink", "h:1", "--insecure"])
    assert ran == [["flower-supernode", "--superlink", "h:1", "--insecure"]]  # fedsafe's options taken out
    assert supernode_loop._pull_and_store_message is not pull_and_store
    with pytest.raises(_Stop):
        supernode_loop.time.sleep(3.0)  # Flower's idle wait
    assert slept == [0.25]
    with pytest.raises(SystemExit, match="fedsafe node: error: --allow-app takes a SHA-256 in hex"):
        main(["--fedsafe-allow-app", "abc"])
    assert len(ran) == 1


# ------------------------------------------------------------------------------- the task identity
def test_a_message_is_built_outside_a_flower_runtime_with_the_identity_fedsafe_sets():
    from flwr.app import Message, RecordDict

    def build() -> Message:
        return Message(RecordDict(), dst_node_id=5, message_type="train")

    previous = current()
    set_identity(task_id=None, run_id=None, node_id=None)
    try:
        with pytest.raises(RuntimeError, match="TaskIdentity"):
            build()  # what fedsafe's adapter is for: Flower refuses without an identity
        ensure_task_identity(run_id=3)
        built = build()
        assert (built.metadata.run_id, built.metadata.src_node_id, built.metadata.dst_node_id) == (3, 0, 5)
        set_identity(run_id=9)
        ensure_task_identity(run_id=3)  # an identity a Flower runtime set is kept
        assert build().metadata.run_id == 9
        with task_identity(run_id=4, node_id=2):
            assert (build().metadata.run_id, build().metadata.src_node_id) == (4, 2)
        assert current() == {"task_id": 1, "run_id": 9, "node_id": 0}
    finally:
        set_identity(**previous)


# ------------------------------------------------------------------------------- a piece that moved
def test_a_flower_piece_that_moved_is_named():
    with pytest.raises(FlowerMoved, match=r"no flwr\.server\.superlink\.fleet\.vce\.vce_api:add_messages_to_pool"
                                          r".*for dispatching.*Flower 1\.41\.0"):
        flower_attribute("flwr.server.superlink.fleet.vce.vce_api:add_messages_to_pool", "dispatching")
    with pytest.raises(FlowerMoved, match="no flwr.supernode.gone:time"):
        with replaced("flwr.supernode.gone:time", None, "pacing"):
            pass
