"""Worker processes for the in-process backend: the virtual nodes of a round trained on every core.

Without workers the local backend's nodes train one after another on one core (simulations/local.py). A
`NodeWorkers` pool forks worker processes from the driver once the training stack is imported (so they start in
milliseconds, not the seconds a fresh Python needs to import PyTorch, Opacus and Flower), and hands each of them
the next message as soon as it is free. Each worker runs the very ClientApp the driver holds, with one thread.

What a node owns travels with each of its messages and comes back with its reply, so any worker can serve
any node and the pool keeps no node's state: its Context (Flower's serialisation: the node's `state`
survives its rounds as in-process) and its global random streams (`NodeRandomness`). Messages cross as
Flower's protobuf bytes, as a real transport carries them: copies both ways. A worker that dies (killed,
out of memory, a crash in native code) becomes an error reply for the message it held, and is replaced.

Linux only (fork); never after CUDA is initialised in the driver (a forked child cannot use it).
"""

from __future__ import annotations

import contextlib
import gc
import io
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

@dataclass
class Delivery:
    """One message on its way to a node, with what the node owns (its Context, its random streams)."""

    node: int
    message: Message
    context: Context
    random_state: tuple | None  # None: the node has never run (fresh OS randomness, as a new process)


@dataclass
class Served:
    reply: Message
    context: Context | None  # None when the worker died: the node's state is what it was before the message
    random_state: tuple | None


class NodeWorkers:
    """`count` forked processes serving deliveries with `serve(client_app, message, context, random_state, quiet)`
    (see simulations/local.py); `serve_all` returns one `Served` per delivery, in order."""

    def __init__(self, client_app, count: int, quiet: bool, serve: Callable) -> None:
        self._client_app, self._quiet, self._serve = client_app, quiet, serve
        self._context = multiprocessing.get_context("fork")
        self._workers: list[tuple[multiprocessing.Process, Connection]] = []
        for _ in range(count):
            self._workers.append(self._start())

    def _start(self) -> tuple[multiprocessing.Process, Connection]:
        driver_end, worker_end = self._context.Pipe()
        # The driver's ends of every pipe, this one's and the other workers': a fork inherits them, and a
        # worker must hold none, or it would never see its driver go away (EOF) if the driver is killed.
        driver_ends = [driver_end, *(connection for _, connection in self._workers)]
        process = self._context.Process(target=_worker_loop, daemon=True, name="fedsafe-node-worker",
                                        args=(worker_end, driver_ends, os.getpid(), self._client_app, self._quiet,
                                              self._serve))
        # The driver's objects (the training stack's ~350,000), inherited by the worker, frozen for its garbage
        # collector: its collections neither scan them nor write to their pages, which would copy each page.
        # The driver's own collector gets back what was not frozen before (the fedsafe command freezes its
        # imports for good: fedsafe.cli), so a program forking workers keeps collecting its own objects.
        frozen_before = gc.get_freeze_count() > 0
        gc.freeze()
        try:
            process.start()
        finally:
            if not frozen_before:
                gc.unfreeze()
        worker_end.close()
        return process, driver_end

    def serve_all(self, deliveries: list[Delivery]) -> list[Served]:
        served: list[Served | None] = [None] * len(deliveries)
        pending = list(range(len(deliveries)))
        busy: dict[int, int] = {}  # a worker's slot -> the delivery it holds
        idle = list(range(len(self._workers)))
        while pending or busy:
            while pending and idle:
                slot, index = idle.pop(), pending.pop(0)
                if not self._workers[slot][0].is_alive():  # died while idle: replaced before it costs a message
                    self._replace(slot)
                try:
                    self._workers[slot][1].send_bytes(_encode(deliveries[index]))
                except OSError:  # the worker died between two messages
                    served[index] = self._died(slot, deliveries[index])
                    idle.append(slot)
                else:
                    busy[slot] = index
            if not busy:  # every message left was answered as a dead worker's: nothing to wait for
                continue
            ready = wait([self._workers[slot][1] for slot in busy])
            for slot in [slot for slot in busy if self._workers[slot][1] in ready]:
                index = busy.pop(slot)
                try:
                    served[index] = _decode(self._workers[slot][1].recv_bytes())
                except (EOFError, OSError):
                    served[index] = self._died(slot, deliveries[index])
                idle.append(slot)
        return served  # type: ignore[return-value]

    def _died(self, slot: int, delivery: Delivery) -> Served:
        """The reply of a node whose worker process died holding its message; a new worker takes the slot."""
        exit_code = self._replace(slot)
        reason = f"the virtual node's worker process died (exit code {exit_code}) while serving this message"
        error = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=delivery.message)
        return Served(error, None, delivery.random_state)

    def _replace(self, slot: int) -> int | None:
        """A new worker in a dead one's slot; the dead one's exit code."""
        process, connection = self._workers[slot]
        process.join(timeout=5)
        connection.close()
        self._workers[slot] = self._start()
        return process.exitcode

    def close(self) -> None:
        """Stop the workers: an idle one ends at once; one still serving a message (the run was interrupted
        or failed mid-round) is killed after a second, as a crashed node process would be."""
        for _, connection in self._workers:
            with contextlib.suppress(OSError):
                connection.send_bytes(b"")  # stop
            connection.close()
        for process, _ in self._workers:
            process.join(timeout=1)
            if process.is_alive():
                process.kill()
                process.join()
        self._workers = []


def _worker_loop(connection: Connection, driver_ends: list[Connection], driver_pid: int, client_app, quiet: bool,
                 serve: Callable) -> None:
    """A worker: serve one delivery at a time until the driver sends an empty frame or goes away."""
    for driver_end in driver_ends:
        driver_end.close()
    _end_with_driver(driver_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the driver decides
    import torch

    torch.set_num_threads(1)  # one thread per worker, as each node trains in process and on Ray
    while True:
        try:
            frame = connection.recv_bytes()
        except (EOFError, OSError):
            return
        if not frame:
            return
        delivery = _decode_delivery(frame)
        try:
            reply, random_state = serve(client_app, delivery.message, delivery.context, delivery.random_state, quiet)
            answer = _encode(Served(reply, delivery.context, random_state))
        except Exception:  # noqa: BLE001 - `serve` turns a ClientApp's errors into replies; these are the worker's
            failed = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                   reason=f"the virtual node's worker failed: {traceback.format_exc(limit=1)}"),
                             reply_to=delivery.message)
            answer = _encode(Served(failed, None, delivery.random_state))
        try:
            connection.send_bytes(answer)
        except OSError:  # the driver stopped the run (Ctrl-C, an error) while this worker was serving
            return


def _end_with_driver(driver_pid: int) -> None:
    """Have the kernel kill this worker when its driver dies, even mid-message (a driver killed with SIGKILL
    runs no clean-up, and a node training for minutes would not see its pipe close until it is done)."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != driver_pid:  # the driver died before the request above took effect
        os._exit(0)


# ---- the bytes between driver and workers: Flower's protobufs for messages and contexts ---------------
def _encode(item: Delivery | Served) -> bytes:
    import pickle

    from flwr.common.serde import context_to_proto, message_to_proto

    message = item.message if isinstance(item, Delivery) else item.reply
    context = None if item.context is None else context_to_proto(item.context).SerializeToString()
    node = item.node if isinstance(item, Delivery) else None
    return pickle.dumps((node, message_to_proto(message).SerializeToString(), context, item.random_state),
                        protocol=pickle.HIGHEST_PROTOCOL)


def _unpack(frame: bytes):
    import pickle

    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    node, message, context, random_state = pickle.loads(frame)
    return (node, message_from_proto(ProtoMessage.FromString(message)),
            None if context is None else context_from_proto(ProtoContext.FromString(context)), random_state)


def _decode_delivery(frame: bytes) -> Delivery:
    return Delivery(*_unpack(frame))


def _decode(frame: bytes) -> Served:
    _, reply, context, random_state = _unpack(frame)
    return Served(reply, context, random_state)


def quiet_output(quiet: bool):
    """A node's stderr dropped when `quiet` (as Ray drops its actors' unless verbose)."""
    return contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
