"""Dense training Jacobian of the paper recipe: tjac's dense path vs JAX ``jacfwd`` + SVD, side by side.

The JAX side is written here from the paper's description (float64, the same data, batch order,
theta_0, schedule and optimizer), independently of tjac's code. Both sides form all P = 4810
columns of J and take its full SVD; the script checks that the two Js agree (a full-size oracle
for tjac) before it reports times. JAX is an optional benchmark dependency, never a runtime one:

    python -m pip install jax   # CPU wheels from the registry
    python benchmarks/bench_jax.py [--epochs 25] [--block 256]

Writes benchmarks/results/jax-dense.json (with the environment).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import torch  # noqa: E402

import tjac  # noqa: E402
from tjac.linalg import small_svd  # noqa: E402
from tjac.linalg.dense import materialize  # noqa: E402
from tjac.trajectory import Problem  # noqa: E402


def jax_training(prob):
    """theta_0 -> theta_T in JAX (x64), from the paper's description."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    o, T = prob.recipe.optim, prob.num_steps
    nb = prob.order.per_epoch
    xs = jnp.asarray(np.stack([prob.batch(b)[0].numpy() for b in range(nb)]))
    ys = jnp.asarray(np.stack([prob.batch(b)[1].numpy() for b in range(nb)]))
    shapes = [tuple(p.shape) for p in prob.layout]
    sizes = [int(np.prod(s)) for s in shapes]
    c = np.sqrt(2.0 / np.pi)

    def gelu(x):
        return 0.5 * x * (1.0 + jnp.tanh(c * (x + 0.044715 * x ** 3)))

    def loss(theta, x, y):
        ps, off = [], 0
        for s, n in zip(shapes, sizes):
            ps.append(theta[off:off + n].reshape(s))
            off += n
        h = x
        for i in range(0, len(ps) - 2, 2):
            h = gelu(h @ ps[i].T + ps[i + 1])
        z = h @ ps[-2].T + ps[-1]
        return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0])

    g = jax.grad(loss)

    def step(carry, t):
        theta, m = carry
        b = t % nb
        lr = o.lr * 0.5 * (1 + jnp.cos(jnp.pi * t / T))
        m = o.momentum * m + g(theta, xs[b], ys[b])
        return (theta - lr * m, m), None

    def train(theta0):
        (thetaT, _), _ = jax.lax.scan(step, (theta0, jnp.zeros_like(theta0)), jnp.arange(T))
        return thetaT

    return jax, jnp, train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--block", type=int, default=256, help="tjac's replay width for the dense path")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "jax-dense.json"))
    a = ap.parse_args()
    recipe = tjac.Recipe.paper(epochs=a.epochs)
    prob = Problem(recipe)
    res = {"recipe": recipe.to_dict(), "P": prob.num_params, "T": prob.num_steps}

    # tjac: trajectory + P JVPs in blocks, then LAPACK gesdd
    t0 = time.perf_counter()
    op = tjac.TrainingJacobian(prob)
    J_t = materialize(op, block=a.block)
    t1 = time.perf_counter()
    _, S_t, _ = small_svd(J_t)
    t2 = time.perf_counter()
    res["tjac"] = {"backend": op.backend, "block": a.block, "jacobian_s": t1 - t0, "svd_s": t2 - t1,
                   "total_s": t2 - t0}
    print(f"tjac ({op.backend}, block {a.block}): J {t1 - t0:.1f} s + SVD {t2 - t1:.1f} s", flush=True)

    jax, jnp, train = jax_training(prob)
    import jaxlib

    res["jax_version"] = jax.__version__
    res["jaxlib_version"] = jaxlib.__version__
    theta0 = jnp.asarray(op.theta0.numpy())
    thetaT = np.asarray(jax.jit(train)(theta0))
    res["thetaT_rel_diff"] = float(np.abs(thetaT - op.thetaT.numpy()).max() / np.abs(thetaT).max())
    jac = jax.jit(jax.jacfwd(train))
    t0 = time.perf_counter()
    compiled = jac.lower(theta0).compile()
    t1 = time.perf_counter()
    J_j = np.asarray(compiled(theta0).block_until_ready())
    t2 = time.perf_counter()
    S_j = np.asarray(jnp.linalg.svd(jnp.asarray(J_j), compute_uv=True)[1].block_until_ready())
    t3 = time.perf_counter()
    res["jax"] = {"compile_s": t1 - t0, "jacobian_s": t2 - t1, "svd_s": t3 - t2,
                  "total_s": t3 - t0}
    print(f"jax: compile {t1 - t0:.1f} s + jacfwd {t2 - t1:.1f} s + SVD {t3 - t2:.1f} s", flush=True)
    Jt = J_t.numpy()
    res["J_rel_diff"] = float(np.linalg.norm(Jt - J_j) / np.linalg.norm(J_j))
    res["sigma_max_rel_diff"] = float(np.abs(S_t.numpy() - S_j).max() / S_j[0])
    res["ratio_tjac_over_jax_total"] = res["tjac"]["total_s"] / res["jax"]["total_s"]
    print(f"thetaT diff {res['thetaT_rel_diff']:.1e}, J diff {res['J_rel_diff']:.1e}, "
          f"sigma diff {res['sigma_max_rel_diff']:.1e}; tjac / jax = "
          f"{res['ratio_tjac_over_jax_total']:.2f}", flush=True)
    _env.write(a.out, {"results": res})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
