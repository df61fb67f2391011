"""Products of J over several processes (``tjac.distributed``): speed-up, traffic and a cost model.

Every rank trains the same recipe and builds its own operator (``--backend``, the same on every
rank); rank 0 then measures, side by side in the same processes and interleaved (alternating which
goes first), the same work on 1 process (``op.local_products``: rank 0 alone while the other ranks
wait in :func:`tjac.distributed.serve`) and spread over all of them (``op.matmat`` under
:func:`tjac.distributed.drive`):

* a ``--k``-column block J V and J^T W (issue target: >= 1.6x with 2 ranks of one thread each);
  whether the spread J V and J^T W equal the 1-process ones bit for bit;
* the cost of one replay of 1, 2, 4, ..., k columns on one process (fixed + per-column cost), and
  the ceiling the host allows: every rank replaying its slice at the same moment, no messages;
* a ping-pong between ranks 0 and 1 (gloo: TCP loopback here) of 1 number up to 64 x P numbers:
  latency and bandwidth, and the pure transfer time of one block's slice;
* ``Group.bytes_moved``/``blocks``/``seconds_waiting`` per block (waiting includes the part of a
  worker's replay that outlasts rank 0's);
* a top-``--k-top`` solve (``tjac.svd``, default method) on 1 process and spread; whether the sigma
  agree, and the share of the 1-process solve spent in blocks of more than one column;
* a cost model for N ranks from those measurements (its assumptions are printed and stored);
* the CPU seconds a waiting worker burns (so the 1-process numbers are not slowed by it).

Each process runs ``--threads`` (default 1) threads. Without a launcher the script starts
``--world`` copies of itself (``RANK``/``WORLD_SIZE``/``MASTER_*`` set as torchrun sets them);
under ``torchrun --nproc_per_node N`` it runs as the rank torchrun made it.

    python benchmarks/bench_distributed.py [--quick] [--width 64] [--epochs 25] [--world 2]
        [--device cpu|cuda] [--backend fused] [--dist-backend auto|gloo|nccl] [--k 32]
        [--repeats 7] [--svd-repeats 3] [--threads 1] [--out PATH]

Writes benchmarks/results/distributed.json (``--quick``: distributed-quick.json; ``--device cuda``:
distributed-cuda.json) with the environment. ``--dist-backend auto`` is NCCL when every rank has
a GPU of its own, else gloo (several ranks sharing one GPU exchange their slices through the CPU).
"""
import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import torch  # noqa: E402

import tjac  # noqa: E402
from tjac import distributed  # noqa: E402

MESSAGES_PER_WORKER = 4  # per block: command header, the slice out, the status, the slice back
PINGPONG_COLUMNS = (0, 1, 4, 16, 64)  # 0: a single number (the latency)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test (< 1 min): 2 epochs, 2 repeats, 1 solve each way")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=None, help="default 25 (the paper's); --quick 2")
    ap.add_argument("--world", type=int, default=2, help="ranks to start (without a launcher)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="fused", help="replay backend (the same on every rank)")
    ap.add_argument("--dist-backend", choices=["auto", "gloo", "nccl"], default="auto")
    ap.add_argument("--k", type=int, default=32, help="columns of the timed block")
    ap.add_argument("--k-top", type=int, default=16, help="triplets of the timed solve")
    ap.add_argument("--repeats", type=int, default=None, help="timed blocks each way (default 7)")
    ap.add_argument("--svd-repeats", type=int, default=None, help="solves each way (default 3)")
    ap.add_argument("--timeout", type=float, default=900.0, help="process-group timeout, seconds")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.epochs is None:
        a.epochs = 2 if a.quick else 25
    if a.repeats is None:
        a.repeats = 2 if a.quick else 7
    if a.svd_repeats is None:
        a.svd_repeats = 1 if a.quick else 3
    if a.world < 2:
        ap.error("--world must be at least 2 (the 1-process numbers are measured beside them)")
    if a.k < 2:
        ap.error("--k must be at least 2 (a single column is never spread)")
    if a.out is None:
        name = "distributed" + ("-quick" if a.quick else "") + (
            "" if a.device == "cpu" else f"-{a.device.split(':')[0]}")
        a.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name + ".json")
    return a


# -- launching ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(a) -> int:
    """Start ``--world`` copies of this script as torchrun would; the exit code is the worst."""
    port = free_port()
    os.environ["BENCH_LOADAVG"] = json.dumps(list(os.getloadavg()))  # before our ranks add to it
    procs = []
    for r in range(a.world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(a.world), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(a.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
                   PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
                                      env=env))
    print(f"started {a.world} ranks (pids {[p.pid for p in procs]}), rendezvous 127.0.0.1:{port}",
          flush=True)
    rcs = [None] * a.world

    def stop(signum, frame):  # a time limit (timeout, the device tool) ends the ranks too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while None in rcs:
            for i, p in enumerate(procs):
                rcs[i] = p.poll()
            if any(rc not in (None, 0) for rc in rcs):  # one rank failed: stop the others
                time.sleep(5.0)  # (after its error has reached them, if it can)
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                rcs = [p.wait() for p in procs]
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        rcs = [p.wait() for p in procs] + [130]
    if any(rcs):
        print(f"ranks exited with {rcs}", file=sys.stderr, flush=True)
    return max(abs(rc) for rc in rcs)


# -- helpers --------------------------------------------------------------------------------------
class Timed(tjac.TrainingJacobian):
    """The operator, logging each local product (kind, columns, seconds) while ``log`` is a list."""

    log = None

    def local_products(self, X, kind):
        t = time.perf_counter()
        Y = super().local_products(X, kind)  # (ends with a finiteness check: synchronised)
        if self.log is not None:
            self.log.append((kind, int(X.shape[1]), time.perf_counter() - t))
        return Y


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(f, device):
    sync(device)
    t = time.perf_counter()
    out = f()
    sync(device)
    return time.perf_counter() - t, out


def med(xs):
    return float(statistics.median(xs)) if xs else None


def fit_line(xs, ys):
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def counters(group):
    return group.bytes_moved, group.blocks, group.seconds_waiting


def pingpong(group, P, reps):
    """Ranks 0 and 1 bounce float64 messages of c x P numbers (c = 0: one number); one-way
    seconds (half the median round trip). Other ranks wait."""
    import torch.distributed as dist

    if group.rank > 1:
        return None
    peer = 1 - group.rank
    rows = []
    for c in PINGPONG_COLUMNS:
        n = max(1, c * P)
        buf = torch.zeros(n, dtype=torch.float64, device=group.comm_device)
        times = []
        for i in range(reps + 2):  # two warm-up round trips
            sync(group.comm_device)
            t = time.perf_counter()
            if group.rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)
            sync(group.comm_device)
            if i >= 2:
                times.append(time.perf_counter() - t)
        rows.append({"columns": c, "bytes": n * 8, "one_way_s": med(times) / 2,
                     "one_way_min_s": min(times) / 2})
    return rows


# -- one rank -------------------------------------------------------------------------------------
def rank_main(a) -> int:
    torch.set_num_threads(a.threads)
    world = int(os.environ["WORLD_SIZE"])
    backend = a.dist_backend
    if backend == "auto":
        cuda = torch.device(a.device).type == "cuda"
        backend = "nccl" if cuda and torch.cuda.device_count() >= world else "gloo"
    group = distributed.init(backend, timeout_s=a.timeout, required=True)
    try:
        return run(a, group)
    finally:
        distributed.close(group)


def run(a, group) -> int:
    driver = group.is_driver
    say = (lambda *s: print(*s, flush=True)) if driver else (lambda *s: None)
    dev = a.device
    recipe = tjac.Recipe.paper(width=a.width, epochs=a.epochs, device=dev)
    t = time.perf_counter()
    op = Timed(recipe, backend=a.backend)
    train_s = time.perf_counter() - t
    P, k = op.shape[0], a.k
    say(f"P = {P}, T = {op.num_steps} steps, backend {op.backend}, {group.world_size} ranks "
        f"({group.backend}), {torch.get_num_threads()} thread(s) each; trained in {train_s:.1f} s")
    phases = []  # this rank's CPU and wall seconds and local products per phase
    loadavg_start = json.loads(os.environ.get("BENCH_LOADAVG", "null")) or list(os.getloadavg())

    def phase(name, fn):
        op.log = []
        c0, w0 = time.process_time(), time.perf_counter()
        out = distributed.drive(op, fn, group)
        phases.append({"phase": name, "cpu_s": time.process_time() - c0,
                       "wall_s": time.perf_counter() - w0,
                       "compute_s": sum(x[2] for x in op.log), "products": len(op.log)})
        op.log = None
        return out

    gen = torch.Generator().manual_seed(0)
    V = torch.randn(P, k, dtype=op.dtype, generator=gen).to(dev)
    W = torch.randn(P, k, dtype=op.dtype, generator=gen).to(dev)

    # 1. the k-column block, 1 process against all of them, interleaved
    def blocks(op):
        res = {}
        for kind, X, spread in (("jvp", V, op.matmat), ("vjp", W, op.rmatmat)):
            solo = lambda: op.local_products(X, kind)  # noqa: E731
            ref = timed(solo, dev)[1]  # warm-up of both (caches, allocator, gloo buffers)
            got = timed(lambda: spread(X), dev)[1]
            t1, tn, ratios, comm = [], [], [], []
            for i in range(a.repeats):
                order = ("1", "N") if i % 2 == 0 else ("N", "1")
                for who in order:
                    if who == "1":
                        t1.append(timed(solo, dev)[0])
                    else:
                        b0, n0, s0 = counters(group)
                        tn.append(timed(lambda: spread(X), dev)[0])
                        b1, n1, s1 = counters(group)
                        comm.append({"bytes": b1 - b0, "blocks": n1 - n0, "waiting_s": s1 - s0})
                ratios.append(t1[-1] / tn[-1])
            res[kind] = {
                "columns": k, "split": group.split(k), "seconds_1": t1, "seconds_N": tn,
                "median_1_s": med(t1), "median_N_s": med(tn), "speedup_median_of_ratios":
                med(ratios), "speedup_ratio_of_medians": med(t1) / med(tn),
                "bitwise_equal": bool(torch.equal(ref, got)),
                "max_abs_diff": float((ref - got).abs().max()),
                "bytes_per_block": med([c["bytes"] / c["blocks"] for c in comm]),
                "waiting_per_block_s": med([c["waiting_s"] / c["blocks"] for c in comm])}
            say(f"block {k} {kind}: 1 process {med(t1):.3f} s, {group.world_size} processes "
                f"{med(tn):.3f} s, speed-up {med(ratios):.2f}x (median of {a.repeats} pairs); "
                f"bitwise equal {res[kind]['bitwise_equal']}; rank 0 waited "
                f"{res[kind]['waiting_per_block_s'] * 1e3:.1f} ms per block for "
                f"{res[kind]['bytes_per_block'] / 1e6:.2f} MB")
        return res

    block_res = phase("block", blocks)

    # 2. one replay of c columns on one process (the other ranks wait)
    cols = sorted({c for c in (1, 2, 4, 8, 16, 32, k) if c <= k})

    def sweep(op):
        rows = []
        for c in cols:
            ts = [timed(lambda: op.local_products(V[:, :c], "jvp"), dev)[0]
                  for _ in range(max(2, a.repeats // 2) + 1)][1:]
            rows.append({"columns": c, "seconds": ts, "median_s": med(ts)})
        fixed, per_col = fit_line([r["columns"] for r in rows], [r["median_s"] for r in rows])
        say("replay (1 process): " + ", ".join(f"{r['columns']}: {r['median_s'] * 1e3:.0f} ms"
                                              for r in rows)
            + f"; fit {fixed * 1e3:.1f} ms + {per_col * 1e3:.2f} ms/column")
        return {"rows": rows, "fixed_s": fixed, "per_column_s": per_col}

    sweep_res = phase("replay-sweep (1 process)", sweep)

    # 2b. the ceiling this machine allows: every rank replays its own slice at the same moment,
    # with no messages (on a shared or busy host the ranks do not get a core each)
    import torch.distributed as dist

    mine = group.split(k)[group.rank]
    conc = []
    for i in range(a.repeats + 1):
        dist.all_reduce(torch.zeros(1, device=group.comm_device))  # start together
        sec = timed(lambda: op.local_products(V[:, :mine], "jvp"), dev)[0]
        if i:
            conc.append(sec)

    # 3. pure transfer between ranks 0 and 1
    c0, w0 = time.process_time(), time.perf_counter()
    pp = pingpong(group, P, 6 if a.quick else 20)
    phases.append({"phase": "ping-pong", "cpu_s": time.process_time() - c0,
                   "wall_s": time.perf_counter() - w0, "compute_s": 0.0, "products": 0})

    # 4. the top-k solve, 1 process against all of them (a fresh drive per solve)
    def solve(spread):
        def fn(op):
            if not spread:
                op.distribute(None)  # rank 0 alone; the workers wait in serve()
            before, c = op.counters(), counters(group)
            sec, r = timed(lambda: tjac.svd(op, a.k_top, which="top"), dev)
            after, c2 = op.counters(), counters(group)
            widths = {}
            for kind, n, s in op.log:
                w = widths.setdefault(f"{kind}:{n}", [0, 0.0])
                w[0] += 1
                w[1] += s
            return {"seconds": sec, "S": r.S.tolist(), "method": r.method,
                    "certified": bool(r.all_converged),
                    "max_certificate": float(r.certificate.max()),
                    "products": r.num_matvecs + r.num_rmatvecs,
                    "replays_rank0": after["num_replays"] - before["num_replays"],
                    "product_seconds": (after["time_matvec"] + after["time_rmatvec"]
                                        - before["time_matvec"] - before["time_rmatvec"]),
                    "local_products": {w: {"count": v[0], "seconds": v[1]}
                                       for w, v in sorted(widths.items())},
                    "bytes": c2[0] - c[0], "blocks": c2[1] - c[1], "waiting_s": c2[2] - c[2]}
        return fn

    svd_1, svd_n = [], []
    for i in range(a.svd_repeats):
        for spread in ((False, True) if i % 2 == 0 else (True, False)):
            out = phase("svd-N" if spread else "svd-1 (1 process)", solve(spread))
            if driver:
                (svd_n if spread else svd_1).append(out)
                say(f"top-{a.k_top} on {group.world_size if spread else 1} process(es): "
                    f"{out['seconds']:.1f} s, {out['products']} products, certified "
                    f"{out['certified']}")

    # 5. the workers' records to rank 0
    if not driver:
        group.send_json(0, {"rank": group.rank, "train_s": train_s, "phases": phases,
                            "threads": torch.get_num_threads(), "concurrent_s": conc},
                        "its records")
        return 0
    ranks = [{"rank": 0, "train_s": train_s, "phases": phases, "loadavg_start": loadavg_start,
              "threads": torch.get_num_threads(), "concurrent_s": conc}]
    ranks += [group.recv_json(r, "its records") for r in range(1, group.world_size)]
    report(a, group, op, recipe, block_res, sweep_res, pp, svd_1, svd_n, ranks)
    return 0


# -- rank 0's summary -----------------------------------------------------------------------------
def report(a, group, op, recipe, block_res, sweep_res, pp, svd_1, svd_n, ranks):
    P, k, N0 = op.shape[0], a.k, group.world_size
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    # latency: the one-way time of one number; bandwidth: the largest message, less the latency
    lat = pp[0]["one_way_s"]
    bw = pp[-1]["bytes"] / max(pp[-1]["one_way_s"] - lat, 1e-9)
    slice_bytes = group.split(k)[1] * P * itemsize
    transfer_block = 2 * (k - group.split(k)[0]) * P * itemsize / bw + MESSAGES_PER_WORKER * (
        N0 - 1) * lat
    fixed, per_col = sweep_res["fixed_s"], sweep_res["per_column_s"]
    t_rep = {r["columns"]: r["median_s"] for r in sweep_res["rows"]}
    t1_model = fixed + per_col * k

    def predict(N, kk):
        comp = fixed + per_col * math.ceil(kk / N)
        comm = 2 * (kk - kk / N) * P * itemsize / bw + lat * (N - 1) * MESSAGES_PER_WORKER
        return comp + comm, comp, comm

    # the solve: the share of the 1-process solve spent in blocks of > 1 column (spread), the rest
    # (rank 0's linear algebra and single-column products) stays serial
    solve_model = None
    if svd_1:
        s = svd_1[0]
        multi = sum(v["seconds"] for w, v in s["local_products"].items()
                    if int(w.split(":")[1]) > 1)
        widths = {int(w.split(":")[1]): v["count"] for w, v in s["local_products"].items()}
        kb = max((w for w in widths if w > 1), key=lambda w: widths[w], default=k)
        f = multi / s["seconds"]
        solve_model = {"spread_share_1_process": f, "typical_block": kb, "predicted_speedup": {}}
        for N in (2, 4, 8):
            tN, _, _ = predict(N, kb)
            sb = (fixed + per_col * kb) / tN
            solve_model["predicted_speedup"][str(N)] = 1.0 / ((1 - f) + f / sb)
    model = {"formula": "time(k, N) = fixed + per_column * ceil(k/N) + 2 (k - k/N) P * itemsize "
                        f"/ bandwidth + latency * (N - 1) * {MESSAGES_PER_WORKER}",
             "fixed_s": fixed, "per_column_s": per_col, "bandwidth_Bps": bw, "latency_s": lat,
             "itemsize": itemsize, "P": P, "k": k, "predicted": {}}
    for N in (2, 4, 8):
        tN, comp, comm = predict(N, k)
        model["predicted"][str(N)] = {"seconds": tN, "compute_s": comp, "communication_s": comm,
                                      "speedup": t1_model / tN,
                                      "speedup_vs_measured_1": block_res["jvp"]["median_1_s"] / tN}
    model["assumptions"] = [
        "one rank per core or GPU, each replaying at the per-column and fixed cost measured here "
        "on one process with one thread (no contention between ranks for memory bandwidth or "
        "caches)",
        "every slice goes through rank 0 point-to-point, out and back, one transfer at a time at "
        "the ping-pong bandwidth (no overlap of transfers with each other; rank 0's own replay "
        "overlaps its sends), plus the small-message latency for the "
        f"{MESSAGES_PER_WORKER} messages per worker and block",
        "bandwidth and latency of the link measured here (gloo over TCP loopback on CPU; NCCL or "
        "another link has other numbers)",
        "the solve: only blocks of more than one column are spread; rank 0's linear algebra and "
        "single-column products stay serial (Amdahl over the measured 1-process share)",
        f"measured at N = {N0} on {os.cpu_count()} cores"
        + (f" and {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "")
        + ": every other N is an extrapolation"]
    sigma_diff = sigma_equal = None
    if svd_1 and svd_n:
        s1, sn = torch.tensor(svd_1[0]["S"]), torch.tensor(svd_n[0]["S"])
        sigma_diff = float(((s1 - sn).abs() / s1.abs()).max())
        sigma_equal = bool(torch.equal(s1, sn))
    # the machine's ceiling: 1-process block against the slowest rank's concurrent slice replay
    conc = [max(r["concurrent_s"][i] for r in ranks) for i in range(len(ranks[0]["concurrent_s"]))]
    ceiling = {"seconds_slowest_rank": conc, "median_s": med(conc),
               "speedup_ceiling": block_res["jvp"]["median_1_s"] / med(conc),
               "note": "every rank replays its own slice of the block at the same moment, no "
                       "messages: the speed-up this host allows without communication"}
    load = {"start": ranks[0]["loadavg_start"], "end": list(os.getloadavg())}
    t_svd1 = med([s["seconds"] for s in svd_1])
    t_svdn = med([s["seconds"] for s in svd_n])
    svd_pairs = [s1["seconds"] / sn["seconds"] for s1, sn in zip(svd_1, svd_n)]
    idle = [p for r in ranks[1:] for p in r["phases"] if "1 process" in p["phase"]]
    jvp = block_res["jvp"]
    res = {
        "config": {"width": a.width, "epochs": a.epochs, "P": P, "T": op.num_steps,
                   "device": a.device, "backend": op.backend, "block_size": op.block_size,
                   "world_size": N0, "dist_backend": group.backend, "threads_per_rank": a.threads,
                   "k": k, "k_top": a.k_top, "repeats": a.repeats, "svd_repeats": a.svd_repeats,
                   "quick": a.quick, "recipe_hash": recipe.hash(),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "block": block_res, "replay_sweep": sweep_res,
        "pingpong": {"rows": pp, "latency_s": lat, "bandwidth_Bps": bw,
                     "slice_bytes": slice_bytes,
                     "slice_one_way_s": lat + slice_bytes / bw,
                     "block_transfer_model_s": transfer_block},
        "svd": {"seconds_1": [s["seconds"] for s in svd_1],
                "seconds_N": [s["seconds"] for s in svd_n],
                "median_1_s": t_svd1, "median_N_s": t_svdn,
                "speedup_median_of_ratios": med(svd_pairs),
                "speedup_ratio_of_medians": (t_svd1 / t_svdn) if t_svd1 and t_svdn else None,
                "sigma_max_rel_diff": sigma_diff, "sigma_bitwise_equal": sigma_equal,
                "runs_1": svd_1, "runs_N": svd_n},
        "concurrency_ceiling": ceiling, "loadavg": load,
        "model": model, "solve_model": solve_model, "ranks": ranks,
        "worker_cpu_while_waiting": {"cpu_s": sum(p["cpu_s"] for p in idle),
                                     "wall_s": sum(p["wall_s"] for p in idle)},
        "targets": {"block_speedup_target": 1.6,
                    "block_speedup": jvp["speedup_median_of_ratios"],
                    "block_target_met": (jvp["speedup_median_of_ratios"] >= 1.6
                                         if N0 == 2 else None),
                    "bitwise_equal_jvp": jvp["bitwise_equal"],
                    "bitwise_equal_vjp": block_res["vjp"]["bitwise_equal"]},
        "note": "ratios measured side by side in the same processes, interleaved; 1 process = "
                "rank 0 alone (op.local_products) while the other ranks wait in serve()",
    }
    _env.write(a.out, {"environment": _env.environment(), **res})
    ms = 1e3
    print("\nsummary")
    print(f"  block {k} J V:   1 process {jvp['median_1_s']:.3f} s, {N0} processes "
          f"{jvp['median_N_s']:.3f} s -> {jvp['speedup_median_of_ratios']:.2f}x "
          f"(target >= 1.6x with 2: "
          f"{'met' if res['targets']['block_target_met'] else 'NOT met' if N0 == 2 else 'n/a'})")
    v = block_res["vjp"]
    print(f"  block {k} J^T W: 1 process {v['median_1_s']:.3f} s, {N0} processes "
          f"{v['median_N_s']:.3f} s -> {v['speedup_median_of_ratios']:.2f}x")
    print(f"  bitwise equal to 1 process: J V {jvp['bitwise_equal']} (max |diff| "
          f"{jvp['max_abs_diff']:.1e}), J^T W {v['bitwise_equal']} ({v['max_abs_diff']:.1e})")
    if t_svd1 and t_svdn:
        print(f"  top-{a.k_top}: 1 process {t_svd1:.1f} s, {N0} processes {t_svdn:.1f} s -> "
              f"{med(svd_pairs):.2f}x; max relative sigma difference {sigma_diff:.1e}")
    print(f"  per block: {jvp['bytes_per_block'] / 1e6:.2f} MB moved, rank 0 waited "
          f"{jvp['waiting_per_block_s'] * ms:.1f} ms (incl. the worker's replay beyond rank 0's); "
          f"pure transfer of one {slice_bytes / 1e6:.2f} MB slice "
          f"{res['pingpong']['slice_one_way_s'] * ms:.1f} ms one way")
    print(f"  ceiling without messages ({N0} slices replayed at once): "
          f"{ceiling['speedup_ceiling']:.2f}x; model at N={N0}: "
          f"{block_res['jvp']['median_1_s'] / predict(N0, k)[0]:.2f}x predicted vs "
          f"{jvp['speedup_median_of_ratios']:.2f}x measured; 1-min load average before the "
          f"start {load['start'][0]:.2f}")
    if ceiling["speedup_ceiling"] < 0.8 * t1_model / (fixed + per_col * math.ceil(k / N0)):
        print("  WARNING: the ranks did not get a core each (other work on this host?): the "
              "speed-ups above are the host's, not tjac's; rerun on a quiet machine")
    print(f"  link: latency {lat * 1e6:.0f} us, bandwidth {bw / 1e9:.2f} GB/s (ping-pong, "
          f"{group.backend})")
    print(f"  replay: {fixed * ms:.1f} ms + {per_col * ms:.2f} ms per column (measured "
          f"{', '.join(f'{c}: {t * ms:.0f}' for c, t in t_rep.items())} ms)")
    print("  model: " + model["formula"])
    print("    predicted block-%d speed-up: " % k + ", ".join(
        f"N={N}: {model['predicted'][str(N)]['speedup']:.2f}x" for N in (2, 4, 8)))
    if solve_model:
        print(f"    predicted top-{a.k_top} speed-up (blocks of {solve_model['typical_block']}, "
              f"{solve_model['spread_share_1_process']:.0%} of the 1-process solve spread): "
              + ", ".join(f"N={N}: {solve_model['predicted_speedup'][str(N)]:.2f}x"
                          for N in (2, 4, 8)))
    print("    assumptions:")
    for line in model["assumptions"]:
        print("    - " + line)
    w = res["worker_cpu_while_waiting"]
    print(f"  workers' CPU while rank 0 worked alone: {w['cpu_s']:.2f} s in {w['wall_s']:.1f} s")
    print("wrote", a.out, flush=True)


def main():
    a = parse()
    if not distributed.launched():
        return launch(a)
    return rank_main(a)


if __name__ == "__main__":
    sys.exit(main())
