r"""Products of J spread over the ranks of a ``torch.distributed`` process group (``torchrun``).

The columns of a block ``J V`` (or ``J^T W``) are independent training replays. Rank 0 runs the
solver and owns the store; every other rank is a *worker* that builds the same recipe itself (a
user's model by import path: nothing is pickled), replays its slice of each block and sends the
result back. Per block, rank 0 sends each worker its columns (``n_r x P`` numbers), replays its own
slice, then receives the workers' slices: ``2 (k - n_0) P`` numbers cross the wire per block, all
of them through rank 0 (point-to-point, so a rank that dies is named).

Why rank 0 holds the solver state (instead of every rank running the same solver): the solver's
arithmetic then need not agree bit for bit across ranks (other BLAS builds, thread counts or GPUs
would otherwise steer the ranks into different iterations and a hang), the bases live once, and a
resume is independent of the world size. The workers idle during rank 0's linear algebra, which is
a small share of a solve (the replays dominate; see ``benchmarks/bench_distributed.py``).

Why every rank trains its own trajectory (instead of receiving it): training is one primal pass,
cheaper than one replay of a block, whereas shipping the trajectory moves ``T x P`` numbers; the
ranks then compare SHA-256 digests of theta_0 and theta_T and refuse to go on when they differ.

Messages (all from or to rank 0): a header ``int64[4] = (command, n, 0, 0)``, then the payload.
Workers answer every product with ``int64[2] = (status, n)`` then the slice (status 0) or an
error message of ``n`` UTF-8 bytes (status 1). Settings travel as JSON bytes, never pickles.
A worker only ever sends in answer to a request that rank 0 receives at once (a gloo send
completes only when its receive is posted): rank 0 collects every answer it asked for before it
stops or aborts the others, so a failure on any rank never leaves two ranks sending to each other.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time

import torch

log = logging.getLogger(__name__)

GO, ABORT, STOP, JVP, VJP, TUNE, WORK, CHECK, FETCH = range(1, 10)
_WHAT = {JVP: "J V", VJP: "J^T W"}


class DistributedSetupError(ValueError):
    """The process group cannot be set up, or the ranks were started differently (bad input)."""


class RankFailedError(RuntimeError):
    """A rank died or failed during the job; the message names it."""


class RanksDisagreeError(RuntimeError):
    """The ranks trained to different states: they cannot share one J."""


_KINDS = {"setup": DistributedSetupError, "failed": RankFailedError, "disagree": RanksDisagreeError}


def _plain(o):  # numpy scalars and arrays in a JSON message
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def launched() -> bool:
    """Whether this process was started by a launcher that sets ``RANK``/``WORLD_SIZE`` (torchrun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


class Group:
    """This process's place in a process group: ``rank``, ``world_size``, ``backend``.

    Build it with :func:`init` (from torchrun's environment, or around a group you initialised
    yourself). ``comm_device`` is where messages live: the CPU under gloo, this rank's GPU under
    NCCL."""

    def __init__(self, rank: int, world_size: int, backend: str, *, local_rank: int = 0,
                 owned: bool = False):
        self.rank, self.world_size, self.backend = int(rank), int(world_size), str(backend)
        self.local_rank = int(local_rank)
        self.owned = owned
        self.comm_device = (torch.device("cuda", self.local_rank) if self.backend == "nccl"
                            else torch.device("cpu"))
        self.bytes_moved = 0
        self.seconds_waiting = 0.0
        self.blocks = 0
        self.dead: set[int] = set()  # ranks whose connection failed (never messaged again)
        self.released: set[int] = set()  # workers sent STOP or ABORT (never messaged again)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}

    def traffic(self) -> dict:
        """Counters of the products spread so far (subtract two of these for one job's share)."""
        return {"bytes_moved": self.bytes_moved, "blocks": self.blocks,
                "seconds_waiting": self.seconds_waiting}

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"

    # -- point-to-point with names ----------------------------------------------------------------
    def _send(self, t: torch.Tensor, dst: int, what: str) -> None:
        import torch.distributed as dist

        try:
            dist.send(t.to(self.comm_device), dst)
        except RuntimeError as e:
            raise self._lost(dst, what, e) from None

    def _recv(self, shape, dtype, src: int, what: str) -> torch.Tensor:
        import torch.distributed as dist

        buf = torch.empty(shape, dtype=dtype, device=self.comm_device)
        try:
            dist.recv(buf, src)
        except RuntimeError as e:
            raise self._lost(src, what, e) from None
        return buf

    def _lost(self, peer: int, what: str, e: BaseException) -> RankFailedError:
        self.dead.add(peer)
        return RankFailedError(f"rank {peer} of {self.world_size} failed during {what} (its "
                               f"{self.backend} connection: {_first_line(e)[:200]}); a run "
                               f"resumes with --resume at any world size")

    def _header(self, dst: int, cmd: int, n: int = 0, what: str = "a message") -> None:
        self._send(torch.tensor([cmd, n, 0, 0], dtype=torch.int64), dst, what)

    def _send_bytes(self, dst: int, payload: bytes, what: str) -> None:
        if payload:
            self._send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), dst, what)

    def _recv_bytes(self, src: int, n: int, what: str) -> bytes:
        return bytes(self._recv((n,), torch.uint8, src, what).cpu().numpy().tobytes()) if n else b""

    def _command(self, what: str = "a command") -> tuple[int, int]:
        h = self._recv((4,), torch.int64, 0, what).cpu()
        return int(h[0]), int(h[1])

    # -- agreement, tuning, shutdown (rank 0 drives) ----------------------------------------------
    def agree(self, what: dict, stage: str, *, kind: str = "setup") -> bool:
        """Every rank passes its view of ``what``; rank 0 asks each worker for its SHA-256 digest,
        compares, and either lets every rank go on (True) or stops them all with an error naming
        the ranks that differ (``kind``: ``setup`` is bad input, ``disagree`` a computation that
        differs). A worker returns False when rank 0 has finished without needing it (STOP)."""
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).digest()
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
        if self.world_size == 1:
            return True
        if not self.is_driver:
            if not self._expect(CHECK, f"the {stage} check"):
                return False
            self._send(mine, 0, f"the {stage} check")
            return self._expect(GO, f"the {stage} check")
        self.released.clear()  # every check opens a new phase: the workers listen again
        bad = []
        try:
            for r in self.alive():
                self._header(r, CHECK, what=f"the {stage} check")
                got = self._recv((32,), torch.uint8, r, f"the {stage} check").cpu()
                if not torch.equal(got, mine):
                    bad.append(r)
        except RankFailedError as e:  # a rank died: the others hear why
            self.abort(str(e))
            raise
        if bad:
            names = ", ".join(map(str, bad))
            msg = (f"rank{'s' if len(bad) > 1 else ''} {names} of {self.world_size} "
                   f"{'were' if len(bad) > 1 else 'was'} started with other {stage} than rank 0"
                   + (" (every rank needs the same command line and inputs)" if kind == "setup"
                      else ""))
            self.abort(msg, kind=kind)
            raise _KINDS[kind](msg)
        for r in self.alive():
            self._header(r, GO, what=f"the {stage} check")
        return True

    def _expect(self, cmd: int, what: str) -> bool:
        """A worker: the next command must be ``cmd`` (True); STOP is False; ABORT raises rank
        0's error."""
        got, n = self._command(what)
        if got == cmd:
            return True
        if got == STOP:
            return False
        if got == ABORT:
            raise self._abort_error(n)
        raise RankFailedError(f"rank {self.rank}: unexpected command {got} from rank 0 during "
                              f"{what}")

    def alive(self) -> list[int]:
        """The workers neither dead nor released."""
        return [r for r in range(1, self.world_size)
                if r not in self.dead and r not in self.released]

    def _abort_error(self, n: int) -> Exception:
        body = json.loads(self._recv_bytes(0, n, "rank 0's error").decode())
        cls = _KINDS.get(body.get("kind"), RankFailedError)
        return cls(f"rank 0 stopped the job: {body.get('message')}")

    def abort(self, message: str, *, kind: str = "failed") -> None:
        """Rank 0: tell every worker the job failed (best effort; dead ranks are skipped)."""
        payload = json.dumps({"kind": kind, "message": str(message)}).encode()
        for r in self.alive():
            self.released.add(r)
            try:
                self._header(r, ABORT, len(payload))
                self._send_bytes(r, payload, "the error message")
            except RankFailedError:
                pass

    def fail(self, e: BaseException) -> None:
        """Rank 0 failed with ``e``: abort every worker with its message, of the kind that makes
        them exit as rank 0 does (bad input 2; ranks that disagree or a failure 1)."""
        kind = ("disagree" if isinstance(e, RanksDisagreeError) else
                "setup" if isinstance(e, (ValueError, MemoryError)) else "failed")
        self.abort(str(e) or type(e).__name__, kind=kind)

    def stop(self) -> None:
        """Rank 0: release every worker (they return from :func:`serve`)."""
        for r in self.alive():
            self.released.add(r)
            try:
                self._header(r, STOP)
            except RankFailedError:
                pass

    def tune(self, tuned: dict) -> None:
        """Rank 0: every worker replays with the same backend and block width as rank 0."""
        payload = json.dumps(tuned, default=str).encode()
        for r in range(1, self.world_size):
            self._header(r, TUNE, len(payload))
            self._send_bytes(r, payload, "the tuning")

    # -- whole pieces of work (a sweep's runs) ----------------------------------------------------
    def send_json(self, dst: int, obj, what: str = "a message") -> None:
        payload = json.dumps(obj, default=_plain).encode()
        self._send(torch.tensor([len(payload)], dtype=torch.int64), dst, what)
        self._send_bytes(dst, payload, what)

    def recv_json(self, src: int, what: str = "a message"):
        n = int(self._recv((1,), torch.int64, src, what).cpu()[0])
        return json.loads(self._recv_bytes(src, n, what).decode())

    def send_array(self, dst: int, x, what: str = "an array") -> None:
        """The raw bytes of a numpy array (its dtype and shape travel in a JSON message)."""
        import numpy as np

        raw = np.ascontiguousarray(x).tobytes()
        self._send(torch.tensor([len(raw)], dtype=torch.int64), dst, what)
        self._send_bytes(dst, raw, what)

    def recv_raw(self, src: int, what: str = "an array") -> bytes:
        """The bytes :meth:`send_array` sent (length first)."""
        n = int(self._recv((1,), torch.int64, src, what).cpu()[0])
        return self._recv_bytes(src, n, what)

    # -- products ---------------------------------------------------------------------------------
    def split(self, k: int) -> list[int]:
        """Columns per rank: contiguous, as even as possible, rank 0 first."""
        q, rem = divmod(k, self.world_size)
        return [q + (r < rem) for r in range(self.world_size)]

    def products(self, local, X: torch.Tensor, kind: int) -> torch.Tensor:
        """Rank 0: ``local(X[:, own])`` here and every worker's slice there, gathered in order."""
        import torch.distributed as dist

        P, k = X.shape
        sizes = self.split(k)
        starts = [sum(sizes[:r]) for r in range(self.world_size)]
        what = f"a {_WHAT[kind]} block"
        pending, failure = [], None
        for r in range(1, self.world_size):
            if not sizes[r]:
                continue
            try:
                blk = X[:, starts[r]:starts[r] + sizes[r]].T.contiguous().to(self.comm_device)
                self._header(r, kind, sizes[r], what)
                try:
                    pending.append((r, dist.isend(blk, r), blk))
                except RuntimeError as e:
                    raise self._lost(r, what, e) from None
            except BaseException as e:  # noqa: BLE001 - raised below, once every answer is in
                failure = e
                break
        out = [None] * self.world_size
        try:
            if failure is None:
                out[0] = local(X[:, :sizes[0]])
        except BaseException as e:  # noqa: BLE001 - raised below, once every answer is in
            failure = e
        t = time.perf_counter()
        for r, h, _ in pending:  # every answer asked for is collected, whatever failed
            try:
                try:
                    h.wait()
                except RuntimeError as e:
                    raise self._lost(r, what, e) from None
                status, n = (int(x) for x in self._recv((2,), torch.int64, r, what).cpu())
                if status:
                    msg = self._recv_bytes(r, n, what).decode(errors="replace")
                    raise RankFailedError(f"rank {r} of {self.world_size} failed during {what}: "
                                          f"{msg}")
                got = self._recv((sizes[r], P), X.dtype, r, what)
                out[r] = got.to(X.device).T
            except BaseException as e:  # noqa: BLE001 - the first failure wins, the rest drain
                failure = failure or e
        if failure is not None:
            raise failure
        self.seconds_waiting += time.perf_counter() - t
        self.bytes_moved += 2 * (k - sizes[0]) * P * X.element_size()
        self.blocks += 1
        return torch.cat([o for o in out if o is not None], dim=1)


def serve(op, group: Group) -> None:
    """A worker's loop: replay the slices rank 0 sends until it says STOP (return) or ABORT
    (raise its error). ``op`` is this rank's own :class:`tjac.TrainingJacobian` of the recipe."""
    P = op.shape[0]
    while True:
        cmd, n = group._command()
        if cmd == STOP:
            return
        if cmd == ABORT:
            raise group._abort_error(n)
        if cmd == TUNE:
            op.apply_tuning(json.loads(group._recv_bytes(0, n, "the tuning").decode()))
            continue
        if cmd not in _WHAT:
            raise RankFailedError(f"rank {group.rank}: unexpected command {cmd} from rank 0")
        X = group._recv((n, P), op.dtype, 0, f"a {_WHAT[cmd]} block").to(op.device).T
        try:
            Y = op.local_products(X, "jvp" if cmd == JVP else "vjp")
        except Exception as e:  # noqa: BLE001 - reported to rank 0, which stops the job
            msg = f"{type(e).__name__}: {_first_line(e)}".encode()
            group._send(torch.tensor([1, len(msg)], dtype=torch.int64), 0, "its answer")
            group._send_bytes(0, msg, "its answer")
            continue
        group._send(torch.tensor([0, n], dtype=torch.int64), 0, "its answer")
        group._send(Y.T.contiguous(), 0, "its answer")


_CURRENT: Group | None = None


def current() -> Group | None:
    """The process group this process is in (initialised by anyone), or None outside one. The
    same :class:`Group` (with its counters) for every call while that group lives."""
    global _CURRENT
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        _CURRENT = None
        return None
    rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    g = _CURRENT
    if g is None or (g.rank, g.world_size, g.backend) != (rank, world, str(backend)):
        _CURRENT = Group(rank, world, backend, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    return _CURRENT


OP_TIMEOUT = datetime.timedelta(days=7)  # a message may wait for a whole share of a sweep


def init(backend: str = "auto", *, timeout_s: float = 1800.0, required: bool = False) -> Group | None:
    """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or use the one already initialised.

    Outside a launcher returns None (nothing changes), or with ``required`` raises
    :class:`DistributedSetupError`. ``backend``: ``auto`` is NCCL when this machine has CUDA, else
    gloo. Under NCCL each rank takes GPU ``LOCAL_RANK`` (give the recipe ``device='cuda'``).
    A rendezvous that cannot be reached within ``timeout_s`` raises one clear error. Once joined,
    a message may wait as long as the work before it takes (``OP_TIMEOUT``, 7 days: a worker of a
    sweep waits for rank 0's whole share): under gloo a rank that dies is noticed at once by its
    closed connection, not by a timeout; NCCL's point-to-point calls do not notice a dead peer,
    and there torchrun's agent, which watches every rank, ends the job."""
    import torch.distributed as dist

    if backend not in ("auto", "gloo", "nccl"):
        raise DistributedSetupError(f"the process-group backend must be auto, gloo or nccl, "
                                    f"got {backend!r}")
    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed")
    got = current()
    if got is not None:
        return got
    if not launched():
        if required:
            raise DistributedSetupError(
                "--distributed needs a process group, and RANK/WORLD_SIZE are not set: launch "
                "with `torchrun --nproc_per_node N -m tjac ...`")
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise DistributedSetupError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if backend == "auto":  # NCCL when every rank of this node has a GPU of its own (the same
        # answer on every rank of a node: ranks that pick different backends could never meet)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        backend = "nccl" if torch.cuda.is_available() and per_node <= torch.cuda.device_count() \
            else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedSetupError("the nccl backend needs CUDA; use --dist-backend gloo")
        if local >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK {local} but this node has "
                                        f"{torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if rank != 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        _reach(where, rank, world, backend, timeout_s)  # a clear line instead of c10d's dumps
    try:
        op_timeout = max(OP_TIMEOUT, datetime.timedelta(seconds=timeout_s))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=op_timeout,
                                store=_store(rank, world, timeout_s))
    except Exception as e:  # noqa: BLE001 - the store's connect/timeout errors vary by version
        raise DistributedSetupError(
            f"rank {rank} of {world} could not join the process group at {where} ({backend}, "
            f"timeout {timeout_s:g} s): {_first_line(e)}") from None
    log.info("joined the process group: rank %d of %d (%s, local rank %d)", rank, world, backend,
             local)
    global _CURRENT
    _CURRENT = Group(rank, world, backend, local_rank=local, owned=True)
    return _CURRENT


def _store(rank: int, world: int, timeout_s: float):
    """The rendezvous store, under torchrun with keys of this restart only (torchrun may reuse one
    store across ``--max-restarts``: seen here, a restarted rank 0 read the dead rank's address
    from the last attempt and failed to join), else None (``env://``)."""
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts it
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=(not agent) and rank == 0,
                         timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"tjac/attempt_{attempt}", base)


def _reach(where: str, rank: int, world: int, backend: str, timeout_s: float) -> None:
    """Wait until rank 0's rendezvous port accepts a connection, or raise one clear error."""
    import socket

    host, _, port = where.rpartition(":")
    try:
        port = int(port)
    except ValueError:
        raise DistributedSetupError(f"MASTER_PORT must be an integer, got {port!r}") from None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, min(5.0, timeout_s))).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedSetupError(
                    f"rank {rank} of {world} could not reach the rendezvous at {where} within "
                    f"{timeout_s:g} s ({backend}): {e.strerror or e}; is rank 0 running, and "
                    f"are MASTER_ADDR/MASTER_PORT right?") from None
            time.sleep(0.2)


def close(group: Group | None) -> None:
    """Leave a process group that :func:`init` created (a user's own group is left alone)."""
    import torch.distributed as dist

    global _CURRENT
    if group is not None and group.owned and dist.is_initialized():
        dist.destroy_process_group()
        _CURRENT = None


def drive(op, fn, group: Group | None = None):
    """Run ``fn(op)`` on rank 0 with every product of ``op`` spread over the group, while the
    other ranks serve their slices; returns ``fn``'s result on rank 0 and None elsewhere.

    Every rank builds its own ``op`` from the same recipe first (a collective: the ranks check
    that theta_0 and theta_T agree)."""
    group = group or current()
    if group is None or group.world_size == 1:
        return fn(op)
    if not op.distribute(group):
        return None
    if not group.is_driver:
        serve(op, group)
        return None
    try:
        out = fn(op)
    except BaseException as e:
        group.fail(e)
        raise
    finally:
        op.distribute(None)
    group.stop()
    return out
