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

Whole pieces of work (a sweep's runs, :mod:`tjac.scale`) are dealt by a :class:`Collector` on
rank 0: ``WORK`` and the worker's share of indices, then one receiving thread per worker that
listens for the whole share. A worker sends each piece as soon as it finishes (:func:`deliver`:
``int64[4] = (PIECE, index, 1, 0)``, JSON, raw arrays; a failed piece ``(PIECE, index, 0, n)``
and its message, :func:`report_failure`) and waits for rank 0's answer, ``GO`` once
rank 0 has kept the piece (or ``ABORT`` when the job failed meanwhile), so here too no two ranks
ever send to each other: a failure anywhere loses no piece that a worker finished before it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

GO, ABORT, STOP, JVP, VJP, TUNE, WORK, CHECK, PIECE = range(1, 10)
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

    def abort(self, message: str, *, kind: str = "failed", ranks=None) -> None:
        """Rank 0: tell every worker (or those of ``ranks``) the job failed (best effort; dead
        ranks are skipped)."""
        payload = json.dumps({"kind": kind, "message": str(message)}).encode()
        for r in (self.alive() if ranks is None else ranks):
            if r in self.dead:
                continue
            self.released.add(r)
            try:
                self._header(r, ABORT, len(payload))
                self._send_bytes(r, payload, "the error message")
            except RankFailedError:
                pass

    def fail(self, e: BaseException, ranks=None) -> None:
        """Rank 0 failed with ``e``: abort every worker (or those of ``ranks``) with its message,
        of the kind that makes them exit as rank 0 does (bad input 2; ranks that disagree or a
        failure 1)."""
        kind = ("disagree" if isinstance(e, RanksDisagreeError) else
                "setup" if isinstance(e, (ValueError, MemoryError)) else "failed")
        self.abort(str(e) or type(e).__name__, kind=kind, ranks=ranks)

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

    # -- messages of any length -------------------------------------------------------------------
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


# -- whole pieces of work (a sweep's runs): rank 0 deals, workers deliver each as it finishes ------
_ARRAY_KINDS = "biufcSU"  # numeric, boolean and fixed-width text arrays: never objects


@dataclass(frozen=True)
class Piece:
    """One finished piece of a worker's share: the ``rank`` that computed it, its ``index`` in the
    work dealt, its JSON ``meta`` and its numpy ``arrays`` (read-only)."""

    rank: int
    index: int
    meta: dict
    arrays: tuple


def assignment(group: Group) -> list[int] | None:
    """A worker: the indices rank 0's :class:`Collector` dealt it, or None when rank 0 released it
    without work (it finished or failed before dealing)."""
    if not group._expect(WORK, "the assignment of work"):
        return None
    return [int(i) for i in group.recv_json(0, "the assignment of work")]


def deliver(group: Group, index: int, meta: dict, arrays=()) -> None:
    """A worker: send finished piece ``index`` (JSON ``meta``, numpy ``arrays``) to rank 0 now,
    and return once rank 0 has kept it; raises rank 0's error when the job stopped meanwhile.
    ``meta`` travels as JSON and the arrays as raw bytes with their dtype and shape (no
    pickles)."""
    import numpy as np

    arrays = [np.ascontiguousarray(x) for x in arrays]
    what = f"piece {index}"
    group._send(torch.tensor([PIECE, int(index), 1, 0], dtype=torch.int64), 0, what)
    group.send_json(0, {"meta": meta, "arrays": [[x.dtype.str, list(x.shape)] for x in arrays]},
                    what)
    for x in arrays:
        group.send_array(0, x, what)
    group._expect(GO, f"rank 0's receipt of {what}")


def report_failure(group: Group, index: int, message: str) -> None:
    """A worker: piece ``index`` failed with ``message``; rank 0 stops the job (wait for it with
    :func:`released`, which raises rank 0's error)."""
    msg = str(message).encode()[:2000]
    group._send(torch.tensor([PIECE, int(index), 0, len(msg)], dtype=torch.int64), 0,
                f"piece {index}")
    group._send_bytes(0, msg, f"piece {index}")


def released(group: Group) -> None:
    """A worker whose share is done (or failed): wait until rank 0 says STOP (return) or ABORT
    (raise its error)."""
    got, n = group._command("the end of the job")
    if got == ABORT:
        raise group._abort_error(n)
    if got != STOP:
        raise RankFailedError(f"rank {group.rank}: unexpected command {got} from rank 0 at the "
                              f"end of the job")


class Collector:
    """Rank 0: deal pieces of work to the workers and keep each piece as soon as it finishes.

    ``shares`` maps each worker's rank to the indices it computes (every worker needs an entry,
    empty for none); ``keep(piece)`` makes a finished :class:`Piece` durable. It runs in the
    receiving thread of that worker, while rank 0 goes on with its own work: it must not touch
    what rank 0's own work writes. The worker waits until ``keep`` returns; when ``keep``
    raises, the job fails. :meth:`take` hands rank 0's thread the pieces kept so far.

    The first failure (a worker's error, a lost connection, ``keep``'s error or rank 0's own,
    :meth:`fail`) is :attr:`failure`; every worker still computing then finishes its current
    piece, which is kept, and is aborted. :meth:`close` waits for the receiving threads, then
    releases every worker (STOP, or ABORT with the failure)."""

    def __init__(self, group: Group, shares: dict, keep: Callable[[Piece], None]):
        self.group, self.keep = group, keep
        self.shares = {r: [int(i) for i in shares.get(r, [])] for r in range(1, group.world_size)}
        self.failure: BaseException | None = None
        self._kept: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def start(self) -> "Collector":
        """Send every worker its share and start listening for its pieces at once (a worker
        that has its share may deliver before the next worker has its own)."""
        for r, share in self.shares.items():
            self.group._header(r, WORK, what="the assignment of work")
            self.group.send_json(r, share, "the assignment of work")
            if share:
                t = threading.Thread(target=self._receive, args=(r, share), daemon=True,
                                     name=f"tjac-collect-rank{r}")
                t.start()
                self._threads.append(t)
        return self

    def fail(self, e: BaseException) -> None:
        """Record a failure (the first one wins): the workers are aborted after their current
        piece."""
        with self._lock:
            if self.failure is None:
                self.failure = e

    def busy(self) -> bool:
        """Whether some worker may still deliver a piece."""
        return any(t.is_alive() for t in self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a piece is kept (True) or no worker can deliver one any more (False, at
        once when :meth:`take` has pieces left)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._kept.empty():
                return True
            if not self.busy():
                return not self._kept.empty()
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def take(self) -> list[Piece]:
        """The pieces kept since the last call, in the order they arrived."""
        out = []
        while True:
            try:
                out.append(self._kept.get_nowait())
            except queue.Empty:
                return out

    def join(self) -> None:
        """Wait until no worker can deliver a piece any more: each has delivered its share, or
        failed, or (after a failure) finished its current piece and been aborted."""
        for t in self._threads:
            t.join()

    def close(self) -> None:
        """:meth:`join`, then STOP every worker (no failure) or ABORT them with the failure's
        message. Idempotent."""
        self.join()
        if self._closed:
            return
        self._closed = True
        if self.failure is None:
            self.group.stop()
        else:
            self.group.fail(self.failure)

    def _receive(self, r: int, share: list[int]) -> None:
        g, n = self.group, self.group.world_size
        for _ in share:
            try:
                h = g._recv((4,), torch.int64, r, "its next piece").cpu()
                cmd, index, ok, size = (int(x) for x in h)
                what = f"piece {index}"
                if cmd != PIECE or index not in share:
                    raise RankFailedError(f"rank {r} of {n} sent command {cmd} for piece {index}, "
                                          f"not one of its pieces")
                if not ok:
                    msg = g._recv_bytes(r, size, what).decode(errors="replace")
                    raise RankFailedError(f"rank {r} of {n} failed on {what}: {msg}")
                piece = self._piece(r, index, what)
            except BaseException as e:  # noqa: BLE001 - the job fails; close() tells the others
                self.fail(e)
                return
            try:
                self.keep(piece)
                self._kept.put(piece)
            except BaseException as e:  # noqa: BLE001 - rank 0 could not keep it: the job fails
                self.fail(e)
            if self.failure is not None:  # this worker waits for an answer: it is the abort
                g.fail(self.failure, ranks=[r])
                return
            try:
                g._header(r, GO, what=f"the receipt of {what}")
            except BaseException as e:  # noqa: BLE001
                self.fail(e)
                return

    def _piece(self, r: int, index: int, what: str) -> Piece:
        import numpy as np

        head = self.group.recv_json(r, what)
        specs = head.get("arrays") if isinstance(head, dict) else None
        if not isinstance(specs, list):
            raise RankFailedError(f"rank {r} sent a malformed {what}")
        raws = [self.group.recv_raw(r, what) for _ in specs]  # all in before any is checked
        arrays = []
        for spec, raw in zip(specs, raws):
            try:
                dtype, shape = np.dtype(str(spec[0])), [int(x) for x in spec[1]]
                if dtype.kind not in _ARRAY_KINDS:
                    raise ValueError(f"dtype {dtype} is not plain data")
                arrays.append(np.frombuffer(raw, dtype=dtype).reshape(shape))
            except (TypeError, ValueError, IndexError) as e:
                raise RankFailedError(f"rank {r} sent a malformed {what}: {e}") from None
        return Piece(rank=r, index=index, meta=head.get("meta"), arrays=tuple(arrays))


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
