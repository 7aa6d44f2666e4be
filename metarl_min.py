"""metarl-min: meta-learning with the exact second-order MAML gradient, in NumPy.

What it implements, top to bottom
  1. An MLP with hand-written backprop, and exact Hessian-vector products by
     Pearlmutter's R-operator (Pearlmutter 1994, "Fast exact multiplication by
     the Hessian", eqs. 4-5): a forward and a backward pass of directional
     derivatives, never a Hessian matrix, never finite differences.
  2. Losses, each with its value, gradient and second-order product: "mse",
     "pg" (the REINFORCE surrogate of a categorical policy) and "gauss" (the
     same for a Gaussian policy).
  3. MAML (Finn, Abbeel & Levine 2017, Algorithm 1 and eq. 1) with the exact
     meta-gradient: the product of (I - inner_lr H_j) backwards through every
     inner step, batched over a leading task axis T; first-order MAML (sec.
     5.2); Meta-SGD (Li et al. 2017, eq. 2), whose learning rates get their
     gradient from the same backward pass; Reptile (Nichol, Achiam & Schulman
     2018, Algorithm 2); one optimiser, Adam (Kingma & Ba 2015, Algorithm 1).
  4. The sinusoid regression benchmark of the MAML paper (sec. 5.1, appendix C).
  5. The command line: ``python metarl_min.py --help``.

Shapes: a batch of tasks is ``x`` of shape (T, K, in): T tasks, K samples.
Params are a plain list ``[W1, b1, W2, b2, ...]`` with ``W`` of shape
(in, out) and ``b`` (out,), shared by all tasks; once tasks have diverged
(after an inner step) they carry a leading task axis, ``W`` (T, in, out) and
``b`` (T, out). Every function here accepts both.

What it leaves out: convolutional networks, batch norm, and any autograd.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

# ============================================================================
# 1. The model: an MLP, its backward pass, and its R-operator.
# ============================================================================
# Each activation comes with its first and second derivative, written as
# functions of the activation's *output* h = f(z), which the forward pass keeps.


def tanh(z):
    return np.tanh(z)


def tanh_d1(h):  # d tanh / dz = 1 - tanh^2
    return 1.0 - h * h


def tanh_d2(h):  # d^2 tanh / dz^2 = -2 tanh (1 - tanh^2)
    return -2.0 * h * (1.0 - h * h)


def relu(z):
    return np.maximum(z, 0.0)


def relu_d1(h):  # 1 where z > 0 (and h > 0), else 0
    return (h > 0).astype(h.dtype)


def relu_d2(h):  # 0 almost everywhere: a scalar, so the R-operator skips the term
    return 0.0


ACTIVATIONS = {"tanh": (tanh, tanh_d1, tanh_d2), "relu": (relu, relu_d1, relu_d2)}


def init_mlp(sizes, rng, activation="tanh", dtype=np.float32):
    """Params [W1, b1, ...] for layer sizes e.g. (1, 40, 40, 1).

    W and b uniform in +-1/sqrt(fan_in) (PyTorch's nn.Linear default), scaled
    by sqrt(2) for ReLU (He et al. 2015) so activations keep their scale."""
    _check_activation(activation)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be at least 2 positive integers, got {sizes!r}")
    gain = math.sqrt(2.0) if activation == "relu" else 1.0
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = gain / math.sqrt(n_in)
        params.append(rng.uniform(-bound, bound, size=(n_in, n_out)).astype(dtype))
        params.append(rng.uniform(-bound, bound, size=(n_out,)).astype(dtype) / gain)
    return params


def _T(W):  # transpose of the last two axes: (in, out) -> (out, in), (T, in, out) -> (T, out, in)
    return np.swapaxes(W, -1, -2)


def _mm(h, W):
    """h (T, K, in) @ W, with W shared (in, out) or per task (T, in, out).

    A shared W is one (T*K, in) @ (in, out) product: a single BLAS call
    instead of T small ones."""
    if h.shape[-1] == 1:  # a product over a length-1 axis is a broadcast multiply: no BLAS call per task
        return h * W[..., None, 0, :] if W.ndim == 3 else h * W[0]
    if W.ndim == 2 and h.ndim == 3:
        return (h.reshape(-1, h.shape[-1]) @ W).reshape(h.shape[:-1] + W.shape[-1:])
    return h @ W


def mlp_forward(params, x, activation="tanh"):
    """out (T, K, n_out) and hs, the inputs of each layer: hs[0] = x, hs[l] = f(z_{l-1}).

    z_l = h_l W_l + b_l;  h_{l+1} = f(z_l);  the last layer is linear."""
    f = ACTIVATIONS[activation][0]
    hs = [x]
    n_layers = len(params) // 2
    for l in range(n_layers):
        W, b = params[2 * l], params[2 * l + 1]
        z = _mm(hs[l], W) + b[..., None, :]  # (T, K, in) @ ((T,) in, out) -> (T, K, out)
        if l == n_layers - 1:
            return z, hs
        hs.append(f(z))


def mlp_backward(params, hs, d_out, activation="tanh"):
    """Per-task gradient of the loss, given d_out = dL/d out (T, K, n_out).

    Returns grads [(T, in, out), (T, out), ...] and the backward cache
    (deltas, ghs) that the R-operator needs: deltas[l] = dL/dz_l and
    ghs[l] = dL/dh_l."""
    d1 = ACTIVATIONS[activation][1]
    n_layers = len(params) // 2
    grads, deltas, ghs = [None] * len(params), [None] * n_layers, [None] * n_layers
    delta = d_out
    for l in reversed(range(n_layers)):
        deltas[l] = delta
        grads[2 * l] = _T(hs[l]) @ delta  # dL/dW_l = h_l^T delta_l:  (T, in, K) @ (T, K, out)
        grads[2 * l + 1] = delta.sum(axis=-2)  # dL/db_l = sum_k delta_l
        if l > 0:
            ghs[l] = _mm(delta, _T(params[2 * l]))  # dL/dh_l = delta_l W_l^T
            delta = ghs[l] * d1(hs[l])  # through h_l = f(z_{l-1}):  dL/dz_{l-1}
    return grads, (deltas, ghs)


def mlp_rop(params, hs, back, v, r_d_out_fn, activation="tanh"):
    """Pearlmutter's R-operator: the Hessian-vector product H v, per task.

    R{.} is the directional derivative d/dr (.)(theta + r v) at r = 0. A
    forward pass carries R{z_l}; the loss turns R{out} into R{dL/d out}; a
    backward pass carries R{delta_l} and yields R{grad} = H v.
      hs, back: the forward and backward caches at theta (mlp_forward/backward)
      v: a direction, a list shaped as the per-task grads
      r_d_out_fn: R{out} -> R{dL/d out}, the loss's Hessian times R{out}."""
    _, d1, d2 = ACTIVATIONS[activation]
    n_layers = len(params) // 2
    deltas, ghs = back
    # Forward:  R{z_l} = R{h_l} W_l + h_l V_l + Vb_l,   R{h_{l+1}} = f'(z_l) R{z_l}   (R{h_0} = R{x} = 0)
    r_hs, r_zs = [None] * n_layers, [None] * n_layers
    for l in range(n_layers):
        r_z = _mm(hs[l], v[2 * l]) + v[2 * l + 1][..., None, :]
        if l > 0:
            r_z += _mm(r_hs[l], params[2 * l])
        r_zs[l] = r_z
        if l < n_layers - 1:
            r_hs[l + 1] = d1(hs[l + 1]) * r_z
    # Backward:  R{delta_L} = (d^2 L / d out^2) R{out}
    r_delta = r_d_out_fn(r_zs[-1])
    hv = [None] * len(params)
    for l in reversed(range(n_layers)):
        # R{dL/dW_l} = h_l^T R{delta_l} + R{h_l}^T delta_l   (one matmul: [h_l, R{h_l}]^T [R{delta_l}; delta_l])
        if l == 0:
            hv[0] = _T(hs[0]) @ r_delta
        else:
            hv[2 * l] = _T(np.concatenate([hs[l], r_hs[l]], axis=-2)) @ np.concatenate([r_delta, deltas[l]], axis=-2)
        hv[2 * l + 1] = r_delta.sum(axis=-2)  # R{dL/db_l} = sum_k R{delta_l}
        if l > 0:
            # R{dL/dh_l} = R{delta_l} W_l^T + delta_l V_l^T
            r_gh = _mm(r_delta, _T(params[2 * l])) + deltas[l] @ _T(v[2 * l])
            # R{delta_{l-1}} = f''(z_{l-1}) R{z_{l-1}} dL/dh_l + f'(z_{l-1}) R{dL/dh_l}
            r_delta = d1(hs[l]) * r_gh
            curvature = d2(hs[l])
            if np.ndim(curvature) or curvature != 0:  # ReLU has none
                r_delta += curvature * r_zs[l - 1] * ghs[l]
    return hv


# ============================================================================
# 2. Losses: value per task (T,), gradient dL/d out, and Hessian product.
# ============================================================================
# "mse": L_t = mean over samples and outputs of (out - y)^2.


def mse_loss(out, y):
    return np.mean(np.square(out - y), axis=(-2, -1))


def mse_grad(out, y):  # 2 (out - y) / (K n_out)
    return (2.0 / (out.shape[-2] * out.shape[-1])) * (out - y)


def mse_hvp(out, y, r_out):  # the Hessian is 2 / (K n_out) I
    return (2.0 / (out.shape[-2] * out.shape[-1])) * r_out


# "pg": L_t = -sum_k w_k log softmax(out_k)[a_k], target = (actions (T, K) int, weights (T, K)).
# The weights carry advantages and any normalisation; a weight of 0 masks a sample.


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def pg_loss(out, target):
    actions, weights = target
    logp = np.take_along_axis(log_softmax(out), actions[..., None], axis=-1)[..., 0]  # (T, K)
    return -(weights * logp).sum(axis=-1)


def pg_grad(out, target):  # w_k (softmax(out_k) - onehot(a_k))
    actions, weights = target
    g = np.exp(log_softmax(out))
    np.put_along_axis(g, actions[..., None], np.take_along_axis(g, actions[..., None], axis=-1) - 1.0, axis=-1)
    return weights[..., None] * g


def pg_hvp(out, target, r_out):  # w_k (diag(p) - p p^T) r
    _, weights = target
    p = np.exp(log_softmax(out))
    return weights[..., None] * p * (r_out - (p * r_out).sum(axis=-1, keepdims=True))


# "gauss": a diagonal Gaussian policy whose network outputs [mean (d), log_std (d)]:
# L_t = -sum_k w_k log N(a_k; mu_k, sigma_k^2)
#     =  sum_k w_k sum_i [ (a - mu)^2 exp(-2 s) / 2 + s ] + const,   s = log sigma.
# target = (actions (T, K, d), weights (T, K)). The log-std is an output of the
# network (state-dependent), so it adapts in the inner loop like any weight.


def _gauss_parts(out, target):
    actions, weights = target
    d = out.shape[-1] // 2
    mu, s = out[..., :d], out[..., d:]
    return actions - mu, np.exp(-2.0 * s), s, weights[..., None]


def gauss_loss(out, target):
    diff, prec, s, w = _gauss_parts(out, target)
    return (w * (0.5 * diff * diff * prec + s + 0.5 * math.log(2 * math.pi))).sum(axis=(-2, -1))


def gauss_grad(out, target):  # dl/dmu = -(a - mu) e^{-2s};  dl/ds = 1 - (a - mu)^2 e^{-2s}
    diff, prec, _, w = _gauss_parts(out, target)
    return np.concatenate([-w * diff * prec, w * (1.0 - diff * diff * prec)], axis=-1)


def gauss_hvp(out, target, r_out):
    # d2l/dmu2 = e^{-2s};  d2l/dmu ds = 2 (a - mu) e^{-2s};  d2l/ds2 = 2 (a - mu)^2 e^{-2s}
    diff, prec, _, w = _gauss_parts(out, target)
    d = out.shape[-1] // 2
    r_mu, r_s = r_out[..., :d], r_out[..., d:]
    cross = 2.0 * diff * prec
    return np.concatenate([w * (prec * r_mu + cross * r_s), w * (cross * r_mu + cross * diff * r_s)], axis=-1)


LOSSES = {"mse": (mse_loss, mse_grad, mse_hvp), "pg": (pg_loss, pg_grad, pg_hvp),
          "gauss": (gauss_loss, gauss_grad, gauss_hvp)}


def loss_and_grad(params, batch, loss="mse", activation="tanh", scale=1.0):
    """Per-task loss (T,) and per-task gradients of scale * loss at params, plus
    the caches the R-operator needs."""
    x, target = batch
    value_fn, grad_fn, _ = LOSSES[loss]
    out, hs = mlp_forward(params, x, activation)
    d_out = grad_fn(out, target)
    grads, back = mlp_backward(params, hs, d_out if scale == 1.0 else scale * d_out, activation)
    return value_fn(out, target), grads, (out, hs, back)


def hvp(params, batch, v, loss="mse", activation="tanh", cache=None):
    """Exact per-task Hessian-vector product H_t v_t of the loss at params."""
    target = batch[1]
    if cache is None:
        _, _, cache = loss_and_grad(params, batch, loss, activation)
    out, hs, back = cache
    hess_fn = LOSSES[loss][2]
    return mlp_rop(params, hs, back, v, lambda r_out: hess_fn(out, target, r_out), activation)


# ============================================================================
# 3. Meta-learning: MAML (second- and first-order), Meta-SGD, Reptile, Adam.
# ============================================================================
def concat_batches(a, b):
    """One batch of the samples of a, then b, for each task: join along the K axis (targets may be pairs)."""
    join = lambda u, v: np.concatenate([u, v], axis=1)
    target = join(a[1], b[1]) if isinstance(a[1], np.ndarray) else tuple(map(join, a[1], b[1]))
    return join(a[0], b[0]), target


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")


def _check_params(params):
    if not isinstance(params, (list, tuple)) or len(params) < 2 or len(params) % 2:
        raise TypeError("params must be a list [W1, b1, W2, b2, ...] of arrays")
    for i, p in enumerate(params):
        if not isinstance(p, np.ndarray) or p.dtype not in (np.float32, np.float64):
            raise TypeError(f"params[{i}] must be a float32 or float64 numpy array")
        if not np.isfinite(p).all():
            raise ValueError(f"params[{i}] contains NaN or inf")


def _check_batch(params, batch, loss, name):
    """Validate a batch (x, target) against params and the loss; return it cast to the params' dtype."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{name} must be a pair (x, target)")
    dtype = params[0].dtype
    n_in, n_out = params[0].shape[-2], params[-1].shape[-1]
    x = np.asarray(batch[0], dtype=dtype)
    if x.ndim != 3 or x.shape[-1] != n_in:
        raise ValueError(f"{name} x must have shape (T, K, {n_in}), got {x.shape}")
    T, K = x.shape[:2]
    if not np.isfinite(x).all():
        raise ValueError(f"{name} x contains NaN or inf")
    if loss == "mse":
        y = np.asarray(batch[1], dtype=dtype)
        if y.shape != (T, K, n_out):
            raise ValueError(f"{name} y must have shape ({T}, {K}, {n_out}), got {y.shape}")
        finite = [y]
        target = y
    else:
        if not isinstance(batch[1], (tuple, list)) or len(batch[1]) != 2:
            raise TypeError(f"{name} target for loss {loss!r} must be a pair (actions, weights)")
        actions, weights = np.asarray(batch[1][0]), np.asarray(batch[1][1], dtype=dtype)
        if weights.shape != (T, K):
            raise ValueError(f"{name} weights must have shape ({T}, {K}), got {weights.shape}")
        if loss == "pg":
            if actions.shape != (T, K) or actions.dtype.kind not in "iu":
                raise ValueError(f"{name} actions must be integers of shape ({T}, {K}), got {actions.dtype} {actions.shape}")
            if actions.size and (actions.min() < 0 or actions.max() >= n_out):
                raise ValueError(f"{name} actions must be in [0, {n_out}), the network's outputs")
            finite = [weights]
        else:
            if n_out % 2:
                raise ValueError(f"loss 'gauss' needs an even number of outputs [mean, log_std], got {n_out}")
            actions = actions.astype(dtype)
            if actions.shape != (T, K, n_out // 2):
                raise ValueError(f"{name} actions must have shape ({T}, {K}, {n_out // 2}), got {actions.shape}")
            finite = [actions, weights]
        target = (actions, weights)
    for arr in finite:
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} target contains NaN or inf")
    return x, target


def _check_meta_args(params, support, query, loss, inner_steps, activation):
    _check_params(params)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    _check_activation(activation)
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, (int, np.integer)) or inner_steps < 0:
        raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps!r}")
    support = _check_batch(params, support, loss, "support")
    query = _check_batch(params, query, loss, "query")
    if support[0].shape[0] != query[0].shape[0]:
        raise ValueError(f"support and query must have the same number of tasks, got "
                         f"{support[0].shape[0]} and {query[0].shape[0]}")
    return support, query


def _per_param(inner_lr, params):
    """inner_lr as one rate per parameter array: a list (Meta-SGD) as it is, a float repeated."""
    return inner_lr if isinstance(inner_lr, list) else [inner_lr] * len(params)


def adapt(params, support, loss="mse", inner_lr=0.01, inner_steps=1, activation="tanh"):
    """The inner loop: theta_t <- theta_t - inner_lr * grad L_support,t(theta_t), inner_steps times.

    Returns per-task params (leading axis T) and, for the meta-backward, the
    params and caches at every step. inner_lr is a float, or a list shaped as
    params (Meta-SGD's per-parameter rates)."""
    lrs = _per_param(inner_lr, params)
    thetas, caches, inner_grads = [list(params)], [], []
    for _ in range(inner_steps):
        _, grads, cache = loss_and_grad(thetas[-1], support, loss, activation)
        thetas.append([p - lr * g for p, g, lr in zip(thetas[-1], grads, lrs)])  # (T, ...) from here on
        caches.append(cache)
        inner_grads.append(grads)
    return thetas, caches, inner_grads


def _maml(params, support, query, loss, inner_lr, inner_steps, first_order, activation):
    """Meta-loss and its gradient w.r.t. params (and w.r.t. inner_lr when it is a list)."""
    thetas, caches, inner_grads = adapt(params, support, loss, inner_lr, inner_steps, activation)
    # v = d meta_loss / d theta'_t, per task; meta_loss = mean_t L_query,t(theta'_t)
    losses, v, _ = loss_and_grad(thetas[-1], query, loss, activation, scale=1.0 / support[0].shape[0])
    meta_lr = isinstance(inner_lr, list)
    lrs = _per_param(inner_lr, params)
    lr_grads = [np.zeros_like(p) for p in params] if meta_lr else None

    # ===================== Differentiating through the inner update =====================
    # theta_{j+1} = theta_j - alpha * g_j(theta_j)   (alpha a scalar, or a vector for Meta-SGD)
    #   => d theta_{j+1} / d theta_j = I - diag(alpha) H_j,    H_j = Hessian of L_support at theta_j
    #   => dL/d theta_j = (I - H_j diag(alpha)) dL/d theta_{j+1}  (H_j symmetric):
    #        v <- v - H_j (alpha * v),  one exact Hessian-vector product per step, backwards.
    #   and for Meta-SGD:  dL/d alpha += -g_j * dL/d theta_{j+1}, summed over tasks.
    # First-order MAML drops H_j: v passes through unchanged.
    for j in reversed(range(inner_steps)):
        if meta_lr:
            for i, (g, vi) in enumerate(zip(inner_grads[j], v)):
                lr_grads[i] = lr_grads[i] - (g * vi).sum(axis=0)
        if not first_order:
            hv = hvp(thetas[j], support, [lr * vi for lr, vi in zip(lrs, v)], loss, activation, cache=caches[j])
            v = [vi - h for vi, h in zip(v, hv)]
    # ====================================================================================

    grads = [(vi.sum(axis=0) if vi.ndim > p.ndim else vi).astype(p.dtype, copy=False)  # shared: sum over tasks
             for vi, p in zip(v, params)]
    return float(losses.mean()), grads, lr_grads


def maml_grad(params, support, query, loss="mse", inner_lr=0.01, inner_steps=1, first_order=False,
              activation="tanh"):
    """MAML's meta-loss and its exact gradient w.r.t. params (never modified).

    support, query: (x (T, K, in), target) for T tasks; target is y
    (T, K, out) for "mse", (actions, weights) for "pg" and "gauss". Per task,
    theta'_t = theta - inner_lr grad L_support,t, inner_steps times; then
      meta_loss = mean_t L_query,t(theta'_t)
      grads     = d meta_loss / d theta  (through every inner step, Hessians included)
    first_order=True drops the Hessian terms (first-order MAML)."""
    support, query = _check_meta_args(params, support, query, loss, inner_steps, activation)
    if not isinstance(inner_lr, (int, float, np.floating)) or isinstance(inner_lr, bool) or not math.isfinite(inner_lr):
        raise ValueError(f"inner_lr must be a finite number, got {inner_lr!r}")
    meta_loss, grads, _ = _maml(params, support, query, loss, float(inner_lr), inner_steps, first_order, activation)
    return meta_loss, grads


def meta_sgd_grad(params, inner_lrs, support, query, loss="mse", inner_steps=1, first_order=False,
                  activation="tanh"):
    """Meta-SGD: MAML with a learned learning rate per parameter (inner_lrs, shaped as params).

    Returns (meta_loss, grads w.r.t. params, grads w.r.t. inner_lrs), both
    from the one backward pass of ``maml_grad``."""
    support, query = _check_meta_args(params, support, query, loss, inner_steps, activation)
    if not isinstance(inner_lrs, (list, tuple)) or len(inner_lrs) != len(params) or any(
            np.shape(a) != p.shape for a, p in zip(inner_lrs, params)):
        raise ValueError("inner_lrs must be a list of arrays shaped as params")
    lrs = [np.asarray(a, dtype=p.dtype) for a, p in zip(inner_lrs, params)]
    meta_loss, grads, lr_grads = _maml(params, support, query, loss, lrs, inner_steps, first_order, activation)
    return meta_loss, grads, [g.astype(p.dtype) for g, p in zip(lr_grads, params)]


def reptile_grad(params, support, query, loss="mse", inner_lr=0.01, inner_steps=5, activation="tanh"):
    """Reptile's direction as a gradient: theta - mean_t theta'_t, with theta'_t
    after inner_steps SGD steps on the task's support data, then its query
    data (Nichol et al. 2018, Algorithm 2, batched). Returns the mean query
    loss before adaptation (for monitoring) and the direction."""
    support, query = _check_meta_args(params, support, query, loss, inner_steps, activation)
    losses, _, _ = loss_and_grad(params, query, loss, activation)
    thetas, _, _ = adapt(params, concat_batches(support, query), loss, inner_lr, inner_steps, activation)
    return float(losses.mean()), [(p - t.mean(axis=0) if t.ndim > p.ndim else p - t).astype(p.dtype, copy=False)
                                  for p, t in zip(params, thetas[-1])]


def adam_init(params):
    """Adam's state: first and second moments, and the step count."""
    return {"m": [np.zeros_like(p) for p in params], "v": [np.zeros_like(p) for p in params], "t": 0}


def adam_step(params, grads, state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam step (Kingma & Ba 2015, Algorithm 1). Returns new params and state; the inputs stay as they are."""
    t = state["t"] + 1
    m = [beta1 * m + (1 - beta1) * g for m, g in zip(state["m"], grads)]
    v = [beta2 * v + (1 - beta2) * g * g for v, g in zip(state["v"], grads)]
    # theta <- theta - lr m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
    new = [(p - lr * (mi / (1 - beta1 ** t)) / (np.sqrt(vi / (1 - beta2 ** t)) + eps)).astype(p.dtype)
           for p, mi, vi in zip(params, m, v)]
    return new, {"m": m, "v": v, "t": t}



# ============================================================================
# 4. Tasks: the sinusoid regression of the MAML paper (sec. 5.1).
# ============================================================================
SINE_AMPLITUDE = (0.1, 5.0)  # A ~ U[0.1, 5]
SINE_PHASE = (0.0, math.pi)  # phase ~ U[0, pi]
SINE_X = (-5.0, 5.0)  # x ~ U[-5, 5]


def sample_sine_tasks(rng, n):
    """Amplitudes and phases of n tasks y = A sin(x - phase), each (n,)."""
    return rng.uniform(*SINE_AMPLITUDE, size=n), rng.uniform(*SINE_PHASE, size=n)


def sample_sine_points(rng, amplitude, phase, k, dtype=np.float32):
    """k points of each task: x (T, k, 1), y (T, k, 1)."""
    x = rng.uniform(*SINE_X, size=(amplitude.shape[0], k, 1))
    y = amplitude[:, None, None] * np.sin(x - phase[:, None, None])
    return x.astype(dtype), y.astype(dtype)


# ============================================================================
# 5. Experiments: hyperparameters, training loops with progress and
#    checkpoints, evaluation with confidence intervals.
# ============================================================================
def hparam(default, help, low=None, high=None, choices=None):
    """A hyperparameter: its default, meaning and allowed range, for the dataclass and its flag."""
    return dataclasses.field(default=default, metadata=dict(help=help, low=low, high=high, choices=choices))


def check_config(config):
    """Raise ValueError naming the flag and its allowed values for any field out of range."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        flag = "--" + f.name.replace("_", "-")
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ValueError(f"{flag} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and not value >= low) or (high is not None and not value <= high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{flag} must be {bounds}; got {value!r}")


@dataclasses.dataclass
class SineConfig:
    """Sinusoid regression, as in the MAML paper (sec. 5.1 and appendix C)."""
    shots: int = hparam(5, "K: points per task in the support set (the query set has K too)", 1)
    iterations: int = hparam(70000, "meta-training iterations (the total, also when resuming)", 1)
    meta_batch: int = hparam(25, "tasks per meta-iteration", 1)
    inner_lr: float = hparam(0.01, "alpha: inner-loop SGD step size", 0.0)
    inner_steps: int = hparam(1, "inner SGD steps during meta-training", 0, 20)
    meta_lr: float = hparam(1e-3, "beta: Adam step size of the outer loop", 0.0)
    hidden: int = hparam(40, "units in each of the two hidden ReLU layers", 1)
    first_order: bool = hparam(False, "first-order MAML: drop the second-order term")
    eval_tasks: int = hparam(600, "held-out tasks for the final evaluation", 2)
    eval_points: int = hparam(100, "fresh query points per held-out task", 1)
    seed: int = hparam(0, "seed of every random draw", 0)
    log_every: int = hparam(2000, "iterations between progress lines and checkpoints", 1)


class Progress:
    """Progress lines: iteration, metrics, elapsed time and ETA."""

    def __init__(self, total, start=0, stream=None):
        self.total, self.start, self.t0, self.stream = total, start, time.perf_counter(), stream

    def __call__(self, iteration, **metrics):
        elapsed = time.perf_counter() - self.t0
        done = iteration - self.start
        eta = elapsed / done * (self.total - iteration) if done > 0 else float("nan")
        shown = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        print(f"iter {iteration:>6}/{self.total}  {shown}  elapsed {elapsed:6.1f}s  ETA {eta:6.1f}s",
              file=self.stream or sys.stdout, flush=True)


def mean_ci95(values):
    """Mean and half-width of its 95% confidence interval (normal approximation)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def _atomic_write(path, write):
    """Write through write(file) into a temporary file beside path, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj):
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_checkpoint(path, config, iteration, rng, models, optimisers):
    """Save params, Adam states, RNG state, iteration and config to an .npz, atomically.

    models / optimisers: dicts name -> params list / name -> adam state."""
    arrays = {}
    for name, params in models.items():
        arrays.update({f"params/{name}/{i}": p for i, p in enumerate(params)})
    for name, state in optimisers.items():
        for key in ("m", "v"):
            arrays.update({f"adam/{name}/{key}/{i}": a for i, a in enumerate(state[key])})
    meta = dict(format="metarl-min checkpoint 1", config=dataclasses.asdict(config), iteration=iteration,
                rng=rng.bit_generator.state, adam_t={k: s["t"] for k, s in optimisers.items()},
                models={k: len(p) for k, p in models.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path, config):
    """Load a checkpoint written by save_checkpoint for the same config (iterations may differ).

    Returns (iteration, rng, models, optimisers); ValueError if the file is
    not such a checkpoint or was made with other hyperparameters."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != "metarl-min checkpoint 1":
                raise ValueError("unknown format")
            models = {k: [data[f"params/{k}/{i}"] for i in range(n)] for k, n in meta["models"].items()}
            optimisers = {k: {"m": [data[f"adam/{k}/m/{i}"] for i in range(n)],
                              "v": [data[f"adam/{k}/v/{i}"] for i in range(n)], "t": meta["adam_t"][k]}
                          for k, n in meta["models"].items() if k in meta["adam_t"]}
            rng = np.random.Generator(getattr(np.random, meta["rng"]["bit_generator"])())
            rng.bit_generator.state = meta["rng"]
    except FileNotFoundError:
        raise
    except Exception as e:  # a zip, npz or JSON error: say which file, and why
        raise ValueError(f"{path} is not a readable metarl-min checkpoint ({type(e).__name__}: {e})") from e
    saved = {k: v for k, v in meta["config"].items() if k not in ("iterations", "log_every")}
    wanted = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("iterations", "log_every")}
    if saved != wanted:
        diff = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {wanted.get(k)!r})"
                         for k in wanted if saved.get(k) != wanted.get(k))
        raise ValueError(f"{path} was made with other hyperparameters: {diff}")
    if meta["iteration"] > config.iterations:
        raise ValueError(f"{path} is at iteration {meta['iteration']}, past --iterations {config.iterations}")
    return meta["iteration"], rng, models, optimisers


def sine_train(config, save=None, load=None):
    """Meta-train MAML and, on the same tasks, the pretrained baseline (one network
    fit to all tasks jointly). Returns (maml_params, pretrained_params)."""
    sizes = (1, config.hidden, config.hidden, 1)
    if load:
        start, rng, models, opts = load_checkpoint(load, config)
    else:
        start, rng = 0, np.random.default_rng(config.seed)
        init = init_mlp(sizes, rng, "relu")
        models = {"maml": init, "pretrained": [p.copy() for p in init]}
        opts = {k: adam_init(p) for k, p in models.items()}
    progress = Progress(config.iterations, start)
    window = []
    for it in range(start, config.iterations):
        amplitude, phase = sample_sine_tasks(rng, config.meta_batch)
        support = sample_sine_points(rng, amplitude, phase, config.shots)
        query = sample_sine_points(rng, amplitude, phase, config.shots)
        meta_loss, grads = maml_grad(models["maml"], support, query, "mse", config.inner_lr, config.inner_steps,
                                     config.first_order, "relu")
        models["maml"], opts["maml"] = adam_step(models["maml"], grads, opts["maml"], config.meta_lr)
        # The baseline sees the same points, support and query alike, with no inner step.
        both = concat_batches(support, query)
        joint_loss, grads = maml_grad(models["pretrained"], both, both, "mse", inner_steps=0, activation="relu")
        models["pretrained"], opts["pretrained"] = adam_step(models["pretrained"], grads, opts["pretrained"],
                                                             config.meta_lr)
        window.append((meta_loss, joint_loss))
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            post, joint = np.mean(window, axis=0)
            progress(it + 1, post_update_mse=post, pretrained_mse=joint)
            window = []
            if save:
                save_checkpoint(save, config, it + 1, rng, models, opts)
    return models["maml"], models["pretrained"]


SINE_EVAL_STEPS = (0, 1, 5, 10)
# The MAML paper, appendix C, Table 2 (5-shot): MSE after 1, 5, 10 gradient steps.
SINE_PAPER_5SHOT = {"maml": {"1": 0.67, "5": 0.38, "10": 0.35}, "pretrained": {"1": 2.41, "5": 2.23, "10": 2.19}}


# The pretrained baseline fine-tunes with the best of these step sizes, chosen on
# validation tasks (the paper tuned its step size too); MAML uses inner_lr.
SINE_BASELINE_LRS = (0.001, 0.002, 0.005, 0.01, 0.02)


def sine_evaluate(params, config, rng, inner_lr, n_tasks):
    """MSE on fresh query points of n_tasks new tasks after 0, 1, 5 and 10 SGD
    steps of inner_lr on K support points: {steps: (mean, ci95)}."""
    amplitude, phase = sample_sine_tasks(rng, n_tasks)
    support = sample_sine_points(rng, amplitude, phase, config.shots)
    query = sample_sine_points(rng, amplitude, phase, config.eval_points)
    thetas, _, _ = adapt(params, support, "mse", inner_lr, max(SINE_EVAL_STEPS), "relu")
    return {str(s): mean_ci95(loss_and_grad(thetas[s], query, "mse", "relu")[0]) for s in SINE_EVAL_STEPS}


def _best_baseline_lr(params, config, rng):
    """The fine-tuning step size with the lowest MSE (mean over 1, 5, 10 steps) on 100 validation tasks."""
    state = rng.bit_generator.state
    scores = {}
    for lr in SINE_BASELINE_LRS:
        rng.bit_generator.state = state  # the same validation tasks for every step size
        mse = sine_evaluate(params, config, rng, lr, 100)
        scores[lr] = np.mean([mse[s][0] for s in ("1", "5", "10")])
    return min(scores, key=scores.get)


def run_sine(config, json_path=None, save=None, load=None):
    check_config(config)
    t0 = time.perf_counter()
    print(f"sine: {config.shots}-shot sinusoid regression, MAML {'first' if config.first_order else 'second'}"
          f"-order, {config.iterations} iterations x {config.meta_batch} tasks, seed {config.seed}")
    maml, pretrained = sine_train(config, save, load)
    # Evaluation streams of their own: resuming cannot change them; both models see the same tasks.
    baseline_lr = _best_baseline_lr(pretrained, config, np.random.default_rng([config.seed, 2]))
    ours = sine_evaluate(maml, config, np.random.default_rng([config.seed, 1]), config.inner_lr, config.eval_tasks)
    base = sine_evaluate(pretrained, config, np.random.default_rng([config.seed, 1]), baseline_lr, config.eval_tasks)
    seconds = time.perf_counter() - t0
    paper = SINE_PAPER_5SHOT if config.shots == 5 else None
    print(f"\n{config.shots}-shot sinusoid, MSE on {config.eval_tasks} held-out tasks (mean +- 95% CI), "
          f"{config.iterations} iterations, seed {config.seed}")
    print(f"{'steps':>5}  {'MAML (ours)':>17}  {'pretrained (ours)':>17}  {'MAML (paper)':>12}  {'pretr. (paper)':>14}")
    for s in map(str, SINE_EVAL_STEPS):
        cite = (f"{paper['maml'][s]:12.2f}  {paper['pretrained'][s]:14.2f}" if paper and s in paper["maml"]
                else f"{'-':>12}  {'-':>14}")
        print(f"{s:>5}  {ours[s][0]:9.3f} +- {ours[s][1]:5.3f}  {base[s][0]:9.3f} +- {base[s][1]:5.3f}  {cite}")
    print(f"(pretrained baseline fine-tuned with step size {baseline_lr}, the best of {SINE_BASELINE_LRS} "
          f"on validation tasks; {seconds:.0f} s)")
    result = {"shots": config.shots, "mse": {s: m for s, (m, _) in ours.items()},
              "mse_ci95": {s: c for s, (_, c) in ours.items()},
              "pretrained_mse": {s: m for s, (m, _) in base.items()},
              "pretrained_mse_ci95": {s: c for s, (_, c) in base.items()}, "pretrained_lr": baseline_lr,
              "seconds": seconds, "config": dataclasses.asdict(config)}
    if json_path:
        write_json(json_path, result)
    return result


@dataclasses.dataclass
class BenchConfig:
    """Speed, measured side by side in one run: env steps/s and meta-gradient time."""
    quick: bool = hparam(False, "small sizes and few repeats: seconds, for a smoke test")
    rounds: int = hparam(7, "timing rounds; each alternative's best round is reported", 1)
    seed: int = hparam(0, "seed of the random inputs", 0)


def _time_alternatives(fns, calls, rounds):
    """Seconds per call of each function, the best of `rounds` rounds; the
    alternatives take turns within each round, so machine noise hits all alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls[name])
    return best


def _optional(module):
    """Import an optional comparison library inside bench only; None if it is not installed."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def bench_env(config, rng):
    """Env steps per second: VecCartPole at several N, a Python loop of CartPoleEnv,
    and Gymnasium's CartPoleVectorEnv when it is installed. Random actions, so
    episodes end and autoreset is part of the figure."""
    import cartpole
    sizes = (256,) if config.quick else (1024, 16384)
    gym_cartpole = _optional("gymnasium.envs.classic_control.cartpole")
    fns, calls, steps = {}, {}, {}
    for n in sizes:
        actions = [rng.integers(0, 2, n) for _ in range(16)]
        envs = {f"VecCartPole N={n}": cartpole.VecCartPole(n)}
        if gym_cartpole is not None:
            envs[f"gymnasium CartPoleVectorEnv N={n}"] = gym_cartpole.CartPoleVectorEnv(num_envs=n)
        for name, env in envs.items():
            env.reset(seed=config.seed)
            counter = iter(range(1 << 62))
            fns[name] = lambda env=env, counter=counter, actions=actions: env.step(actions[next(counter) % 16])
            calls[name], steps[name] = (20 if config.quick else max(20, 2_000_000 // n // 4)), n
    singles = [cartpole.CartPoleEnv() for _ in range(64)]
    for i, env in enumerate(singles):
        env.reset(seed=config.seed + i)
    single_actions = rng.integers(0, 2, 64).tolist()

    def loop():  # the same work one env at a time: step, and reset when done
        for env, a in zip(singles, single_actions):
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()
    fns["Python loop of 64 CartPoleEnv"], calls["Python loop of 64 CartPoleEnv"] = loop, 5 if config.quick else 50
    steps["Python loop of 64 CartPoleEnv"] = 64
    seconds = _time_alternatives(fns, calls, config.rounds)
    return {name: steps[name] / s for name, s in seconds.items()}


def bench_meta_grad(config, rng):
    """Milliseconds per meta-gradient in the paper's sinusoid setting (T=25, K=10,
    1-40-40-1 ReLU, one inner step, float32): second-order batched, first-order
    batched, a per-task loop of maml_grad, and PyTorch when it is installed."""
    T, K = (5, 10) if config.quick else (25, 10)
    params = init_mlp((1, 40, 40, 1), rng, "relu")
    amplitude, phase = sample_sine_tasks(rng, T)
    support, query = sample_sine_points(rng, amplitude, phase, K), sample_sine_points(rng, amplitude, phase, K)
    one = lambda batch, t: (batch[0][t:t + 1], batch[1][t:t + 1])
    fns = {
        "maml_grad second-order, batched": lambda: maml_grad(params, support, query, "mse", 0.01, 1, False, "relu"),
        "maml_grad first-order, batched": lambda: maml_grad(params, support, query, "mse", 0.01, 1, True, "relu"),
        "maml_grad second-order, loop over tasks": lambda: [
            maml_grad(params, one(support, t), one(query, t), "mse", 0.01, 1, False, "relu") for t in range(T)],
    }
    torch = _optional("torch")
    if torch is not None:
        fns.update(_torch_maml(torch, params, support, query))
    calls = {name: 3 if config.quick else (10 if "torch" in name or "loop" in name else 100) for name in fns}
    return {name: 1e3 * s for name, s in _time_alternatives(fns, calls, config.rounds).items()}


def _torch_maml(torch, params, support, query):
    """The same second-order meta-gradient with PyTorch: torch.func over vmap, and
    the per-task autograd.grad(create_graph=True) loop most MAML libraries use."""
    from torch.func import grad, vmap
    torch.set_num_threads(1)
    tp = [torch.tensor(p) for p in params]
    xs, ys, xq, yq = (torch.tensor(a) for a in (*support, *query))

    def f(p, x):
        for l in range(0, len(p) - 2, 2):
            x = torch.relu(x @ p[l] + p[l + 1])
        return x @ p[-2] + p[-1]

    def task_loss(p, xs, ys, xq, yq):
        g = grad(lambda p: ((f(p, xs) - ys) ** 2).mean())(p)
        return ((f([a - 0.01 * b for a, b in zip(p, g)], xq) - yq) ** 2).mean()

    vmapped = grad(lambda p: vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean())

    def loop():
        ps = [a.clone().requires_grad_() for a in tp]
        total = 0.0
        for t in range(xs.shape[0]):
            g = torch.autograd.grad(((f(ps, xs[t]) - ys[t]) ** 2).mean(), ps, create_graph=True)
            total = total + ((f([a - 0.01 * b for a, b in zip(ps, g)], xq[t]) - yq[t]) ** 2).mean()
        return torch.autograd.grad(total / xs.shape[0], ps)
    return {"torch.func grad(vmap), second-order": lambda: vmapped(tp),
            "torch autograd loop over tasks, second-order": loop}


def run_bench(config, json_path=None):
    check_config(config)
    import platform
    rng = np.random.default_rng(config.seed)
    print(f"bench on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, NumPy {np.__version__}"
          f"{' (quick)' if config.quick else ''}; best of {config.rounds} interleaved rounds")
    env = bench_env(config, rng)
    print(f"\n{'CartPole env steps per second':48s} {'steps/s':>12}")
    for name, v in env.items():
        print(f"{name:48s} {v:12.3g}")
    meta = bench_meta_grad(config, rng)
    base = meta["maml_grad second-order, batched"]
    print(f"\n{'meta-gradient, sinusoid setting':48s} {'ms':>8} {'vs ours':>8}")
    for name, v in meta.items():
        print(f"{name:48s} {v:8.3f} {v / base:7.1f}x")
    result = {"env_steps_per_second": env, "meta_grad_ms": meta, "quick": config.quick}
    if json_path:
        write_json(json_path, result)
    return result


# ============================================================================
# 6. The command line.
# ============================================================================
class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_config_flags(parser, cls):
    for f in dataclasses.fields(cls):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            kind = type(f.default)
            parser.add_argument(flag, type=kind, default=f.default, choices=meta.get("choices"),
                                help=f"{meta['help']} (default: {f.default})")


EXPERIMENTS = {"sine": (SineConfig, run_sine), "bench": (BenchConfig, run_bench)}
TRAINED = ("sine",)  # the commands with checkpoints


def build_parser():
    parser = _Parser(prog="metarl_min.py", description="Meta-learning with exact second-order MAML, in NumPy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, _) in EXPERIMENTS.items():
        p = sub.add_parser(name, help=cls.__doc__.splitlines()[0], description=cls.__doc__)
        _add_config_flags(p, cls)
        p.add_argument("--json", metavar="PATH", help="write the final metrics to this JSON file")
        if name in TRAINED:
            p.add_argument("--save", metavar="PATH", help="write a checkpoint (.npz) here as training goes")
            p.add_argument("--load", metavar="PATH", help="resume from this checkpoint")
    return parser


def _tune_allocator():
    """Keep 64 MB of freed memory in the process (glibc's M_TOP_PAD).

    By default glibc gives freed memory back to the OS at once, so each new
    ~100 KB array (a (T, 40, 40) gradient) page-faults anew: measured here,
    maml_grad in the sinusoid setting spends a third of its time so. Only the
    command line does this; importing this file changes nothing."""
    import ctypes
    import platform
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).mallopt(-2, 64 << 20)  # M_TOP_PAD = -2


DEFAULT_COMMAND = "sine"  # what plain `python metarl_min.py [flags]` runs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT_COMMAND] + argv
    args = build_parser().parse_args(argv)
    command = args.command
    cls, run = EXPERIMENTS[command]
    config = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    _tune_allocator()
    try:
        files = dict(save=args.save, load=args.load) if command in TRAINED else {}
        run(config, json_path=args.json, **files)
    except (ValueError, OSError) as e:  # bad flags or files: one line, no traceback
        print(f"metarl_min.py {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
