"""metarl-min: meta-learning with the exact second-order MAML gradient, in NumPy.

The file reads as a book in three parts, top to bottom.

Part I, the core, copyable alone (it needs nothing but NumPy, and ends at the
banner "The end of the core"):
  - an MLP with hand-written backprop, and exact Hessian-vector products by
    Pearlmutter's R-operator (Pearlmutter 1994, "Fast exact multiplication by
    the Hessian", eqs. 4-5): never a Hessian matrix, never finite differences;
  - losses, each with its value, gradient and Hessian product: "mse"; "pg" and
    "gauss", the REINFORCE surrogates of a categorical and a Gaussian policy;
    "pg_lvc" and "gauss_lvc", ProMP's low-variance curvature surrogate
    (Rothfuss et al. 2019, sec. 5);
  - MAML (Finn, Abbeel & Levine 2017, Algorithm 1 and eq. 1) with the exact
    meta-gradient, the product of (I - inner_lr H_j) backwards through every
    inner step, batched over a leading task axis T; first-order MAML (sec.
    5.2); Meta-SGD (Li et al. 2017, eq. 2); Reptile (Nichol, Achiam & Schulman
    2018, Algorithm 2); Adam (Kingma & Ba 2015, Algorithm 1);
  - all of it written on the plain dense path first; then the core's fast
    paths (the rank-K inner update), which plug themselves in; then the input
    checks of its entry points.

Part II, one chapter per family, each contiguous: the idea and the paper's
equations, the functions, the training loop, the evaluation, the settings.
  II.0 what the chapters share: the run's machinery (settings, progress, random
       streams, checkpoints, JSON), the TaskFamily every meta-RL trainer takes,
       the RL pieces (rollouts, returns, a baseline, GAE, KL, conjugate
       gradient), two task families, CartPole and the MAML paper's 2D
       navigation, and any registered Gymnasium env as one (gymnasium_family);
  II.1 gradient-based meta-RL: MAML with TRPO as its outer step (Schulman et
       al. 2015, appendix C), first-order MAML and Reptile;
  II.2 memory: RL^2 (Duan et al. 2016) with a GRU and backprop through time;
  II.3 evolution: ES-MAML (Song et al. 2020);
  II.4 value-based learning from a meta-learned start: Q-learning with tables
       and kernel features;
  II.5 model-based: an LSTM that learns how to update the learner (Ravi &
       Larochelle 2017), its meta-gradient first-order and exact;
  II.6 few-shot regression: the sinusoid of the MAML paper, by MAML, Meta-SGD
       and the LSTM;
  II.7 metric-based: Prototypical Networks (Snell et al. 2017), on a few-shot
       benchmark with an oracle, and for meta-RL, a policy that reads the
       task's prototype of the transitions it has seen.

Part III, the harness: the commands' settings, the backend switch
(``use_device("gpu")`` computes with CuPy, here and in cartpole.py) with
CuPy's fast paths, bench, and the command line (``python metarl_min.py --help``).

Shapes: a batch of tasks is ``x`` of shape (T, K, in): T tasks, K samples.
Params are a plain list ``[W1, b1, W2, b2, ...]`` with ``W`` of shape
(in, out) and ``b`` (out,), shared by all tasks; once tasks have diverged
(after an inner step) they carry a leading task axis, ``W`` (T, in, out) and
``b`` (T, out). Every function here accepts both.

Randomness comes only from a ``numpy.random.Generator`` passed in. cartpole.py is
imported only by the parts that use CartPole, Gymnasium only by gymnasium_family.

What it leaves out: convolutional networks, batch norm, and any autograd.
"""


import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shlex
import signal
import stat
import sys
import tempfile
import threading
import time
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import numpy as np

xp = np  # the array module every function computes with: NumPy, or CuPy after use_device("gpu") (Part III)


# ============================================================================
# PART I. THE CORE: an MLP with backprop and the R-operator, the losses, MAML,
# first-order MAML, Meta-SGD, Reptile and Adam. It uses nothing below it, and
# copied alone it needs nothing but NumPy.
# ============================================================================
# ----------------------------------------------------------------------------
# I.1 The model: an MLP, its backward pass, and its R-operator.
# ----------------------------------------------------------------------------
# Each activation comes with its first and second derivative, written as
# functions of the activation's *output* h = f(z), which the forward pass keeps.


def tanh(z):
    return xp.tanh(z)


def tanh_d1(h):  # d tanh / dz = 1 - tanh^2
    return 1.0 - h * h


def tanh_d2(h):  # d^2 tanh / dz^2 = -2 tanh (1 - tanh^2)
    return -2.0 * h * (1.0 - h * h)


def relu(z):  # max(z, 0), against a zero of z's dtype: a Python 0 would make NumPy cast, and slow it
    return xp.maximum(z, z.dtype.type(0))


def relu_d1(h):  # 1 where z > 0 (and h > 0), else 0
    return (h > 0).astype(h.dtype)


def relu_d2(h):  # 0 almost everywhere: a scalar, so the R-operator skips the term
    return 0.0


ACTIVATIONS = {"tanh": (tanh, tanh_d1, tanh_d2), "relu": (relu, relu_d1, relu_d2)}


def init_mlp(sizes, rng, activation="tanh", dtype=np.float32, bias_outputs=0):
    """The params [W1, b1, W2, b2, ...] of an MLP with layer sizes e.g. (1, 40, 40, 1).

      sizes: the widths, input first; rng: a numpy.random.Generator; activation: a key of
        ACTIVATIONS; dtype: float32 or float64
      bias_outputs > 0: the last that many outputs bias-only, the same for every input and
        starting at 0 (the last W has that many fewer columns than its b): a Gaussian policy's
        state-independent log-std, as in rllab
    Returns the list, W (in, out) and b (out,), uniform in +-1/sqrt(fan_in) (PyTorch's
    nn.Linear default), W scaled by sqrt(2) for ReLU so activations keep their scale.
    He et al. 2015, sec. 2.2."""
    _check_mlp_args(sizes, rng, activation, bias_outputs)
    gain = math.sqrt(2.0) if activation == "relu" else 1.0
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = gain / math.sqrt(n_in)
        params.append(rng.uniform(-bound, bound, size=(n_in, n_out)).astype(dtype))
        params.append(rng.uniform(-bound, bound, size=(n_out,)).astype(dtype) / gain)
    if bias_outputs:
        params[-2] = params[-2][:, :-bias_outputs].copy()
        params[-1][-bias_outputs:] = 0.0
    return [xp.asarray(p) for p in params]  # drawn on the host: the same start on every device


def _T(W):  # transpose of the last two axes: (in, out) -> (out, in), (T, in, out) -> (T, out, in)
    return W.swapaxes(-1, -2)


def _matmul(a, b):
    """a @ b for per-task stacks, (T, m, k) @ (T, k, n), where either side may be 2-D (shared
    by all tasks). On CuPy, set_array_module (Part III) puts one cuBLAS call in its place."""
    return a @ b


def _mm(h, W):
    """h (T, K, in) @ W, with W shared by all tasks (in, out) or per task (T, in, out)."""
    return _matmul(h, W)


def _outer(h, delta, W):
    """sum_k h_k^T delta_k per task, (T, K, in) x (T, K, out) -> (T, in, out): the gradient of the
    weight W, whose layer has the inputs h and the errors delta (the fast paths, I.5, look at W)."""
    return _matmul(_T(h), delta)


@functools.lru_cache(maxsize=64)
def _ones_row(k, dtype, module):  # (1, k) ones, made once per size: at small sizes, making it costs as much as the sum
    return module.ones((1, k), dtype)


def _sum_k(delta):
    """sum_k delta[..., k, :], the sum over the samples axis of (T, K, n), as the product
    1^T delta: one matmul, many times faster than NumPy's sum over a middle axis."""
    return _matmul(_ones_row(delta.shape[-2], delta.dtype, xp), delta)[..., 0, :]


def _affine(h, W, b):
    """z = h W + b. Where b is longer than W has columns (the output layer of
    init_mlp(bias_outputs=...)), the extra outputs are b's alone: (T, K, len(b))."""
    n_w = W.shape[-1]
    z = _mm(h, W) + b[..., None, :n_w]  # (T, K, in) @ ((T,) in, out) -> (T, K, out)
    if b.shape[-1] == n_w:
        return z
    return xp.concatenate([z, xp.broadcast_to(b[..., None, n_w:], z.shape[:-1] + (b.shape[-1] - n_w,))], axis=-1)


def mlp_forward(params, x, activation="tanh"):
    """out (T, K, n_out) and hs, the inputs of each layer: hs[0] = x, hs[l] = f(z_{l-1}).

    z_l = h_l W_l + b_l;  h_{l+1} = f(z_l);  the last layer is linear."""
    f = ACTIVATIONS[activation][0]
    hs = [x]
    n_layers = len(params) // 2
    for l in range(n_layers):
        W, b = params[2 * l], params[2 * l + 1]
        z = _affine(hs[l], W, b)
        if l == n_layers - 1:
            return z, hs
        hs.append(f(z))


def mlp_slopes(hs, activation="tanh"):
    """slopes[l] = f'(z_{l-1}), the activation's slope at each hidden layer's output h_l (none at the input)."""
    d1 = ACTIVATIONS[activation][1]
    return [None] + [d1(h) for h in hs[1:]]


class Backward(NamedTuple):
    """What mlp_backward leaves for the R-operator, per layer l."""
    deltas: list  # dL/dz_l
    ghs: list  # dL/dh_l (None at the input)
    slopes: list  # f'(z_{l-1}) at h_l, mlp_slopes(hs)


def mlp_backward(params, hs, d_out, activation="tanh", slopes=None):
    """Per-task gradient of the loss, given d_out = dL/d out (T, K, n_out).

    Returns grads [(T, in, out), (T, out), ...] and the Backward cache that the
    R-operator needs, computing slopes = mlp_slopes(hs) unless given."""
    n_layers = len(params) // 2
    slopes = mlp_slopes(hs, activation) if slopes is None else slopes
    grads, deltas, ghs = [None] * len(params), [None] * n_layers, [None] * n_layers
    delta = d_out
    for l in reversed(range(n_layers)):
        deltas[l] = delta
        delta_w = delta[..., :params[2 * l].shape[-1]]  # the outputs that W_l reaches (all but bias-only ones)
        grads[2 * l] = _outer(hs[l], delta_w, params[2 * l])  # dL/dW_l = h_l^T delta_l:  (T, in, K) @ (T, K, out)
        grads[2 * l + 1] = _sum_k(delta)  # dL/db_l = sum_k delta_l
        if l > 0:
            ghs[l] = _mm(delta_w, _T(params[2 * l]))  # dL/dh_l = delta_l W_l^T
            delta = ghs[l] * slopes[l]  # through h_l = f(z_{l-1}):  dL/dz_{l-1}
    return grads, Backward(deltas, ghs, slopes)


def mlp_jvp(params, hs, slopes, v):
    """The R-operator's forward pass: the directional derivatives R{h_l}, R{z_l}
    of every layer along v (R{out} = R{z_L} is the network's Jacobian times v).
    slopes = mlp_slopes(hs), as mlp_backward caches them."""
    n_layers = len(params) // 2
    # R{z_l} = R{h_l} W_l + h_l V_l + Vb_l,   R{h_{l+1}} = f'(z_l) R{z_l}   (R{h_0} = R{x} = 0)
    r_hs, r_zs = [None] * n_layers, [None] * n_layers
    for l in range(n_layers):
        r_z = _affine(hs[l], v[2 * l], v[2 * l + 1])
        if l > 0:
            r_z[..., :params[2 * l].shape[-1]] += _mm(r_hs[l], params[2 * l])
        r_zs[l] = r_z
        if l < n_layers - 1:
            r_hs[l + 1] = slopes[l + 1] * r_z
    return r_hs, r_zs


def mlp_rop(params, hs, back, v, r_d_out_fn, activation="tanh"):
    """Pearlmutter's R-operator: the Hessian-vector product H v, per task.

    R{.} is the directional derivative d/dr (.)(theta + r v) at r = 0. A
    forward pass carries R{z_l}; the loss turns R{out} into R{dL/d out}; a
    backward pass carries R{delta_l} and yields R{grad} = H v.
      hs, back: the forward cache and the Backward cache at theta (mlp_forward, mlp_backward)
      v: a direction, a list shaped as the per-task grads
      r_d_out_fn: R{out} -> R{dL/d out}, the loss's Hessian times R{out}."""
    d2 = ACTIVATIONS[activation][2]
    n_layers = len(params) // 2
    deltas, ghs, slopes = back.deltas, back.ghs, back.slopes
    r_hs, r_zs = mlp_jvp(params, hs, slopes, v)
    # Backward:  R{delta_L} = (d^2 L / d out^2) R{out}
    r_delta = r_d_out_fn(r_zs[-1])
    hv = [None] * len(params)
    for l in reversed(range(n_layers)):
        n_w = params[2 * l].shape[-1]  # the outputs that W_l reaches
        r_delta_w, delta_w = r_delta[..., :n_w], deltas[l][..., :n_w]
        # R{dL/dW_l} = h_l^T R{delta_l} + R{h_l}^T delta_l   (one matmul: [h_l, R{h_l}]^T [R{delta_l}; delta_l])
        if l == 0:
            hv[0] = _outer(hs[0], r_delta_w, params[0])
        else:
            hv[2 * l] = _outer(xp.concatenate([hs[l], r_hs[l]], axis=-2), xp.concatenate([r_delta_w, delta_w], axis=-2),
                               params[2 * l])
        hv[2 * l + 1] = _sum_k(r_delta)  # R{dL/db_l} = sum_k R{delta_l}
        if l > 0:
            # R{dL/dh_l} = R{delta_l} W_l^T + delta_l V_l^T
            r_gh = _mm(r_delta_w, _T(params[2 * l]))
            r_gh += _mm(delta_w, _T(v[2 * l]))
            # R{delta_{l-1}} = f''(z_{l-1}) R{z_{l-1}} dL/dh_l + f'(z_{l-1}) R{dL/dh_l}
            r_delta = slopes[l] * r_gh
            curvature = d2(hs[l])
            if not isinstance(curvature, float):  # ReLU's is the scalar 0: no term
                r_delta += curvature * r_zs[l - 1] * ghs[l]
    return hv


def mlp_gnvp(params, hs, slopes, v, m_fn):
    """The Gauss-Newton product G v = J^T M J v, per task (Schraudolph 2002): J = d out / d theta
    and M = m_fn, a positive semi-definite product in the outputs. It is the Hessian of a loss whose
    gradient in out is 0, as a KL divergence's at its minimum: the R-operator less its delta terms.
    hs, slopes: mlp_forward's cache at params and mlp_slopes(hs), made once for many products."""
    r_out = mlp_jvp(params, hs, slopes, v)[1][-1]  # J v:  (T, K, n_out)
    return mlp_backward(params, hs, m_fn(r_out), slopes=slopes)[0]  # J^T (M J v)


# ----------------------------------------------------------------------------
# I.2 Losses: value per task (T,), gradient dL/d out, and Hessian product.
# ----------------------------------------------------------------------------
# "mse": L_t = mean over samples and outputs of (out - y)^2.


def mse_loss(out, y):
    return xp.square(out - y).sum(axis=(-2, -1)) / (out.shape[-2] * out.shape[-1])


def mse_grad(out, y):  # 2 (out - y) / (K n_out)
    return (2.0 / (out.shape[-2] * out.shape[-1])) * (out - y)


def mse_hvp(out, y, r_out):  # the Hessian is 2 / (K n_out) I
    return (2.0 / (out.shape[-2] * out.shape[-1])) * r_out


# Policies. A policy's network output out_k (n_out,) gives log pi(a_k | s_k). Each
# policy has its log-likelihood (T, K), its score u_k = d log pi(a_k) / d out_k
# (T, K, n_out), and the score's derivative along r_k, (du_k / d out_k) r_k:
#   categorical over softmax(out):      u = onehot(a) - p,   (du/dout) r = -(diag(p) - p p^T) r
#   Gaussian, out = [mu, s = log sigma] (d each),
#     log pi = -sum_i [(a - mu)^2 e^{-2s} / 2 + s + log(2 pi) / 2]
#     u = [(a - mu) e^{-2s},  (a - mu)^2 e^{-2s} - 1]
#     (du/dout) r = -[e^{-2s} r_mu + c r_s,  c r_mu + c (a - mu) r_s],   c = 2 (a - mu) e^{-2s}
# The log-std s is a network output: state-dependent, or the same in every state
# when it is a bias-only output (init_mlp's bias_outputs); either way it adapts
# in the inner loop like any weight.


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def categorical_logp(out, actions):
    return xp.take_along_axis(log_softmax(out), actions[..., None], axis=-1)[..., 0]


def categorical_score(out, actions):
    return (actions[..., None] == xp.arange(out.shape[-1])) - xp.exp(log_softmax(out))


def categorical_score_jvp(out, actions, r):
    p = xp.exp(log_softmax(out))
    return p * ((p * r).sum(axis=-1, keepdims=True) - r)


def _gaussian_parts(out, actions):  # a - mu, e^{-2s}, s
    d = out.shape[-1] // 2
    s = out[..., d:]
    return actions - out[..., :d], xp.exp(-2.0 * s), s


def gaussian_logp(out, actions):
    diff, prec, s = _gaussian_parts(out, actions)
    return -(0.5 * diff * diff * prec + s + 0.5 * math.log(2 * math.pi)).sum(axis=-1)


def gaussian_score(out, actions):
    diff, prec, _ = _gaussian_parts(out, actions)
    return xp.concatenate([diff * prec, diff * diff * prec - 1.0], axis=-1)


def gaussian_score_jvp(out, actions, r):
    diff, prec, _ = _gaussian_parts(out, actions)
    d = out.shape[-1] // 2
    r_mu, r_s = r[..., :d], r[..., d:]
    cross = 2.0 * diff * prec
    return -xp.concatenate([prec * r_mu + cross * r_s, cross * r_mu + cross * diff * r_s], axis=-1)


POLICIES = {"categorical": (categorical_logp, categorical_score, categorical_score_jvp),
            "gaussian": (gaussian_logp, gaussian_score, gaussian_score_jvp)}


# "pg", "gauss": the REINFORCE surrogate of a categorical or Gaussian policy,
#   L_t = -sum_k w_k log pi(a_k | s_k),   target = (actions, weights (T, K)).
# The weights carry advantages and any normalisation; a weight of 0 masks a sample.
#   dL/d out_k = -w_k u_k;    (d^2 L / d out_k^2) r_k = -w_k (du_k / d out_k) r_k
def reinforce_loss(policy):
    """(value, gradient, Hessian product) of the REINFORCE surrogate of a policy of POLICIES."""
    logp, score, score_jvp = POLICIES[policy]

    def value(out, target):
        actions, weights = target
        return -(weights * logp(out, actions)).sum(axis=-1)

    def grad(out, target):
        actions, weights = target
        return -weights[..., None] * score(out, actions)

    def hess(out, target, r_out):
        actions, weights = target
        return -weights[..., None] * score_jvp(out, actions, r_out)
    return value, grad, hess


# "pg_lvc", "gauss_lvc": ProMP's low-variance curvature surrogate (Rothfuss et al.
# 2019, "ProMP", sec. 5), for the inner step of meta-RL:
#   L_t = -sum_k w_k rho_k,   rho_k = pi(a_k | s_k) / pi_old(a_k | s_k) = exp(log pi - old_logp),
#   target = (actions, weights, old_logp (T, K)), old_logp from the policy that sampled.
# Where pi = pi_old (rho = 1) its gradient is REINFORCE's, and its Hessian has one
# more term, -sum_k w_k u_k u_k^T: the dependence of the pre-update episodes on
# theta, which the REINFORCE surrogate's Hessian drops.
#   dL/d out_k = -w_k rho_k u_k;   (d^2 L / d out_k^2) r_k = -w_k rho_k [(du_k / d out_k) r_k + u_k (u_k . r_k)]
def lvc_loss(policy):
    """(value, gradient, Hessian product) of the LVC surrogate of a policy of POLICIES."""
    logp, score, score_jvp = POLICIES[policy]

    def weighted_ratio(out, target):  # w_k rho_k (T, K)
        actions, weights, old_logp = target
        return weights * xp.exp(logp(out, actions) - old_logp)

    def value(out, target):
        return -weighted_ratio(out, target).sum(axis=-1)

    def grad(out, target):
        return -weighted_ratio(out, target)[..., None] * score(out, target[0])

    def hess(out, target, r_out):
        u = score(out, target[0])
        return -weighted_ratio(out, target)[..., None] * (
            score_jvp(out, target[0], r_out) + u * (u * r_out).sum(axis=-1, keepdims=True))
    return value, grad, hess


# A loss of your own is one more entry, LOSSES["name"] = (value, grad, hvp), the three functions of
# (out, target) and (out, target, r_out) as "mse"'s, its target one array of shape (T, K, ...).
LOSS_POLICY = {"pg": "categorical", "gauss": "gaussian", "pg_lvc": "categorical", "gauss_lvc": "gaussian"}
LOSSES = {"mse": (mse_loss, mse_grad, mse_hvp),
          **{name: (lvc_loss if name.endswith("_lvc") else reinforce_loss)(policy)
             for name, policy in LOSS_POLICY.items()}}


class Cache(NamedTuple):
    """What loss_and_grad leaves for the R-operator: the network's output, its forward and its backward caches."""
    out: object  # (T, K, n_out)
    hs: list  # mlp_forward's: the input of each layer
    back: Backward  # mlp_backward's


def loss_and_grad(params, batch, loss="mse", activation="tanh", scale=1.0):
    """A loss of LOSSES and its gradient at params, per task.

      params: shared, or per task (a leading axis T); batch: (x (T, K, in), target) as for maml_grad
      scale: a factor on the gradient (not on the loss)
    Returns (loss (T,), grads shaped as per-task params, the Cache the R-operator needs)."""
    x, target = batch
    value_fn, grad_fn, _ = LOSSES[loss]
    out, hs = mlp_forward(params, x, activation)
    d_out = grad_fn(out, target)
    grads, back = mlp_backward(params, hs, d_out if scale == 1.0 else scale * d_out, activation)
    return value_fn(out, target), grads, Cache(out, hs, back)


def hvp(params, batch, v, loss="mse", activation="tanh", cache=None):
    """The exact Hessian-vector product H_t v_t of the loss at params, per task.

      batch: as loss_and_grad's; v: a direction shaped as the per-task params
      cache: loss_and_grad's Cache at params on this batch, or None to compute it
    Returns H v, shaped as v. Pearlmutter 1994, eqs. 4-5 (mlp_rop)."""
    target = batch[1]
    if cache is None:
        _, _, cache = loss_and_grad(params, batch, loss, activation)
    hess_fn = LOSSES[loss][2]
    return mlp_rop(params, cache.hs, cache.back, v, lambda r_out: hess_fn(cache.out, target, r_out), activation)


# ----------------------------------------------------------------------------
# I.3 MAML (second- and first-order), Meta-SGD and Reptile.
# ----------------------------------------------------------------------------
def concat_batches(a, b):
    """One batch of the samples of a, then b, for each task: join along the K axis (targets may be pairs)."""
    join = lambda u, v: xp.concatenate([u, v], axis=1)
    target = join(a[1], b[1]) if isinstance(a[1], xp.ndarray) else tuple(map(join, a[1], b[1]))
    return join(a[0], b[0]), target


def _is_step_list(support):
    """Whether support is a list of batches, one per inner step (each batch is a tuple)."""
    return isinstance(support, list) and all(isinstance(b, tuple) for b in support)


def _step_batches(support, inner_steps):
    """The batch of each inner step: a list of batches as it is, or one batch for every step."""
    return support if _is_step_list(support) else [support] * inner_steps


def _per_param(inner_lr, params):
    """inner_lr as one rate per parameter array: a list (Meta-SGD) as it is, a float repeated."""
    return inner_lr if isinstance(inner_lr, list) else [inner_lr] * len(params)


class Adaptation(NamedTuple):
    """What the inner loop leaves: ``params``, the adapted per-task params (leading axis T),
    and for the meta-backward the params, caches and gradients of every step."""
    thetas: list  # thetas[j]: the params before step j; thetas[-1] the adapted ones
    caches: list  # caches[j]: loss_and_grad's cache at thetas[j] on step j's batch
    grads: list  # grads[j]: the per-task support gradient at thetas[j]

    @property
    def params(self):
        return self.thetas[-1]


def adapt(params, support, loss="mse", inner_lr=0.01, inner_steps=1, activation="tanh"):
    """The inner loop: theta_t <- theta_t - inner_lr * grad L_support,t(theta_t), inner_steps times.

      params: shared, or per task; support: one batch (x (T, K, in), target) for every step, or a
        list of inner_steps batches, the j-th for step j (meta-RL: fresh episodes of theta_j)
      inner_lr: a float, or a list shaped as params (Meta-SGD's per-parameter rates)
    Returns an Adaptation: ``adapt(...).params`` are the adapted params, (T, ...) each.
    Finn et al. 2017, eq. 1."""
    lrs = _per_param(inner_lr, params)
    thetas, caches, inner_grads = [list(params)], [], []
    for batch in _step_batches(support, inner_steps):
        _, grads, cache = loss_and_grad(thetas[-1], batch, loss, activation)
        thetas.append([p - lr * g for p, g, lr in zip(thetas[-1], grads, lrs)])  # (T, ...) from here on
        caches.append(cache)
        inner_grads.append(grads)
    return Adaptation(thetas, caches, inner_grads)


# ===================== Differentiating through the inner update =====================
# theta_{j+1} = theta_j - alpha * g_j(theta_j)   (alpha a scalar, or a vector for Meta-SGD)
#   => J_j = d theta_{j+1} / d theta_j = I - diag(alpha) H_j,    H_j = Hessian of L_support at theta_j
# Backwards, the meta-gradient:  dL/d theta_j = J_j^T dL/d theta_{j+1} = (I - H_j diag(alpha)) dL/d theta_{j+1}
#   (H_j symmetric):  v <- v - H_j (alpha * v),  one exact Hessian-vector product per step;
#   and for Meta-SGD:  dL/d alpha += -g_j * dL/d theta_{j+1}, summed over tasks.
# Forwards, for TRPO's metric:  J v = J_{n-1} ... J_0 v:  v <- v - alpha * (H_j v), step after step.
# First-order MAML drops H_j: v passes through unchanged.
def _sum_leading(a):
    """The sum over the first axis (tasks). On CuPy, set_array_module (Part III) puts a product in its place."""
    return a.sum(axis=0)


def _backprop_inner(v, adaptation, supports, inner_lr, loss, first_order, activation):
    """v = dL/d theta' (per task) -> dL/d theta (per task), and dL/d inner_lr when it is a list (Meta-SGD).
    adaptation: adapt's Adaptation; supports: the batch of each inner step (_step_batches)."""
    thetas, caches = adaptation.thetas, adaptation.caches
    meta_lr = isinstance(inner_lr, list)
    lrs = _per_param(inner_lr, thetas[0])
    lr_grads = [xp.zeros_like(p) for p in thetas[0]] if meta_lr else None
    for j in reversed(range(len(caches))):
        if meta_lr:
            for i, (g, vi) in enumerate(zip(adaptation.grads[j], v)):
                lr_grads[i] = lr_grads[i] - _sum_leading(g * vi)
        if not first_order:
            hv = hvp(thetas[j], supports[j], [lr * vi for lr, vi in zip(lrs, v)], loss, activation, cache=caches[j])
            v = [vi - h for vi, h in zip(v, hv)]
    return v, lr_grads


def _forward_inner(v, adaptation, supports, inner_lr, loss, activation):
    """J v: a direction v of theta (shared) -> the direction it moves each task's theta' (per task).
    adaptation: adapt's Adaptation (its grads unused); supports: the batch of each inner step."""
    thetas, caches = adaptation.thetas, adaptation.caches
    lrs = _per_param(inner_lr, thetas[0])
    for j in range(len(caches)):
        hv = hvp(thetas[j], supports[j], v, loss, activation, cache=caches[j])
        v = [vi - lr * h for vi, h, lr in zip(v, hv, lrs)]
    return v
# ====================================================================================


def _sum_tasks(v, params):
    """Per-task directions (T, ...) -> their sum over tasks, shaped and typed as the shared params."""
    total = [_sum_leading(vi) if vi.ndim > p.ndim else vi for vi, p in zip(v, params)]
    return [t.astype(p.dtype, copy=False) for t, p in zip(total, params)]


def _factored(params, supports, factored):
    """The params the inner loop starts from: params as they are. The fast paths (I.5) put in its
    place the rank-K form of the weights where it is the smaller (factored: maml_grad's)."""
    return list(params)


def _maml(params, supports, query, loss, inner_lr, first_order, activation, factored=None):
    """Meta-loss and its gradient w.r.t. params (and w.r.t. inner_lr when it is a list), in three
    steps: the inner loop forwards, the query gradient at the adapted params, the inner loop backwards.
    supports: the batch of each inner step (_step_batches); factored: as maml_grad's."""
    adaptation = adapt(_factored(params, supports, factored), supports, loss, inner_lr, len(supports), activation)
    # v = d meta_loss / d theta'_t, per task; meta_loss = mean_t L_query,t(theta'_t)
    losses, v, _ = loss_and_grad(adaptation.params, query, loss, activation, scale=1.0 / query[0].shape[0])
    v, lr_grads = _backprop_inner(v, adaptation, supports, inner_lr, loss, first_order, activation)
    return float(losses.sum()) / losses.shape[0], _sum_tasks(v, params), lr_grads


def maml_grad(params, support, query, loss="mse", inner_lr=0.01, inner_steps=1, first_order=False,
              activation="tanh", factored=None):
    """MAML's meta-loss and its exact gradient w.r.t. params (never modified).

      params: [W1, b1, ...], shared by the tasks
      support, query: (x (T, K, in), target) for T tasks; target is y (T, K, out) for "mse",
        (actions, weights) for "pg" and "gauss", (actions, weights, old_logp) for "pg_lvc" and
        "gauss_lvc"; support may also be a list of inner_steps such batches, the j-th for inner
        step j (meta-RL samples fresh episodes with each adapted policy)
      loss: a key of LOSSES; inner_lr, inner_steps: the inner loop's (adapt); activation: the MLP's
      first_order: drop the Hessian terms (first-order MAML, sec. 5.2)
      factored: how the fast paths (I.5) hold the adapted weights. None keeps a weight as its
        rank-K factors where the inner steps' samples, S K in all, are fewer than both its widths
        (few-shot regression), dense otherwise (meta-RL's thousands of steps); True or False forces
        one way for every weight; the two agree to rounding
    Per task, theta'_t = theta - inner_lr grad L_support,t, inner_steps times; then
      meta_loss = mean_t L_query,t(theta'_t),   grads = d meta_loss / d theta
    through every inner step, Hessians included ("Differentiating through the inner update", above).
    Returns (meta_loss, grads), grads shaped and typed as params.
    Finn et al. 2017, eq. 1 and Algorithm 1."""
    support, query = _check_meta_args(params, support, query, loss, inner_steps, activation, inner_lr)
    meta_loss, grads, _ = _maml(params, _step_batches(support, inner_steps), query, loss, float(inner_lr),
                                first_order, activation, factored)
    return meta_loss, grads


def meta_sgd_grad(params, inner_lrs, support, query, loss="mse", inner_steps=1, first_order=False,
                  activation="tanh"):
    """Meta-SGD: MAML with a learned step size per parameter, and the gradients of both.

      inner_lrs: the step sizes, a list shaped as params; the rest as maml_grad's
    Returns (meta_loss, grads w.r.t. params, grads w.r.t. inner_lrs), both from the one backward
    pass of maml_grad: d meta_loss / d alpha = -sum_j g_j * v_{j+1}. The weights stay dense
    (per-element rates have no low-rank form).
    Li et al. 2017, eq. 2."""
    support, query = _check_meta_args(params, support, query, loss, inner_steps, activation)
    lrs = _check_inner_lrs(inner_lrs, params)
    meta_loss, grads, lr_grads = _maml(params, _step_batches(support, inner_steps), query, loss, lrs, first_order,
                                       activation, factored=False)
    return meta_loss, grads, [g.astype(p.dtype) for g, p in zip(lr_grads, params)]


def reptile_grad(params, support, query, loss="mse", inner_lr=0.01, inner_steps=5, activation="tanh"):
    """Reptile's direction, as a gradient for the outer optimiser: theta - mean_t theta'_t.

      support, query: one batch each, as maml_grad's; theta'_t after inner_steps SGD steps of
        inner_lr on the task's support and query data together
    Returns (the mean query loss before adaptation, for monitoring; the direction, shaped as params).
    Nichol, Achiam & Schulman 2018, Algorithm 2, batched."""
    support, query = _check_meta_args(params, support, query, loss, inner_steps, activation, inner_lr, step_list=False)
    _check_int_at_least("inner_steps", inner_steps, 1)  # no steps, no direction
    losses, _, _ = loss_and_grad(params, query, loss, activation)
    adapted = adapt(params, concat_batches(support, query), loss, inner_lr, inner_steps, activation).params
    return float(losses.mean()), [(p - t.mean(axis=0) if t.ndim > p.ndim else p - t).astype(p.dtype, copy=False)
                                  for p, t in zip(params, adapted)]


# ----------------------------------------------------------------------------
# I.4 Adam, the one optimiser.
# ----------------------------------------------------------------------------
def adam_init(params):
    """Adam's state for params: the first and second moments (zeros shaped as params) and the step count."""
    return {"m": [xp.zeros_like(p) for p in params], "v": [xp.zeros_like(p) for p in params], "t": 0}


def adam_step(params, grads, state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam step on params along grads.

      params, grads: lists of arrays of the same shapes; state: adam_init's, or the last step's
      lr, beta1, beta2, eps: Adam's (the paper's defaults)
    Returns (new params, new state); the inputs stay as they are.
    Kingma & Ba 2015, Algorithm 1."""
    _check_adam_args(params, grads, state, lr, beta1, beta2, eps)
    t = state["t"] + 1
    m = [beta1 * m + (1 - beta1) * g for m, g in zip(state["m"], grads)]
    v = [beta2 * v + (1 - beta2) * g * g for v, g in zip(state["v"], grads)]
    # theta <- theta - lr m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
    new = [(p - lr * (mi / (1 - beta1 ** t)) / (xp.sqrt(vi / (1 - beta2 ** t)) + eps)).astype(p.dtype)
           for p, mi, vi in zip(params, m, v)]
    return new, {"m": m, "v": v, "t": t}


# ----------------------------------------------------------------------------
# I.5 The core's fast paths. The maths above is complete without them; they
#     compute the same numbers in fewer or cheaper operations, and plug
#     themselves in (the end of this section), as CuPy's do in Part III.
# ----------------------------------------------------------------------------
# The rank-K inner update.
# A weight's gradient on K samples is  sum_k h_k^T delta_k,  of rank K at most. So after S inner steps
#   W'_t = W - alpha sum_j H_j^T Delta_j = W + L_t^T R_t,
#   L_t = [H_0; H_1; ...] (S K, in),   R_t = -alpha [Delta_0; Delta_1; ...] (S K, out)
# and every product with W'_t goes through its factors:
#   h W'_t = h W + (h L_t^T) R_t,        delta W'_t^T = delta W^T + (delta R_t^T) L_t,
# (T, K, S K) products in place of (T, in, out) arrays. The meta-backward's directions are of low
# rank too: the query gradient has rank K_query, and each H v adds 2 K rows (the R-operator's
# [h, R{h}]^T [R{delta}; delta]). Their sum over tasks,  sum_t L_t^T R_t,  is one 2-D product over
# the (T r) stacked rows. A LowRank is that factored matrix; the inner loop keeps a weight so when it
# starts as one (_fast_factored), since each gradient of a LowRank weight is a LowRank (_fast_outer).
class LowRank:
    """The per-task matrix W + L_t^T R_t, kept as its factors: W (in, out) shared by all tasks, or
    None for 0; L (T, r, in) and R (T, r, out), or both None for rank 0. NumPy's operators defer to
    it, so the inner loop's  theta - lr * g  and the meta-backward's  v - H v  stay factored."""
    __array_ufunc__ = None

    def __init__(self, W, L, R):
        self.W, self.L, self.R = W, L, R

    @property
    def shape(self):
        n_in, n_out = self.W.shape if self.W is not None else (self.L.shape[-1], self.R.shape[-1])
        return (n_in, n_out) if self.L is None else (self.L.shape[0], n_in, n_out)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def dtype(self):
        return (self.W if self.W is not None else self.L).dtype

    def swapaxes(self, axis1, axis2):  # the transpose of the last two axes: (W + L^T R)^T = W^T + R^T L
        return LowRank(None if self.W is None else _T(self.W), self.R, self.L)

    def __mul__(self, c):  # c a number
        return LowRank(None if self.W is None else c * self.W, self.L, None if self.R is None else c * self.R)

    __rmul__ = __mul__

    def __sub__(self, other):  # (W + L^T R) - (W' + L'^T R') = (W - W') + [L; L']^T [R; -R']
        W = self.W if other.W is None else -other.W if self.W is None else self.W - other.W
        if other.L is None or self.L is None:
            return LowRank(W, self.L, self.R) if other.L is None else LowRank(W, other.L, -other.R)
        return LowRank(W, xp.concatenate([self.L, other.L], axis=-2), xp.concatenate([self.R, -other.R], axis=-2))

    def sum_tasks(self):
        """sum_t (W + L_t^T R_t): one (in, T r) @ (T r, out) product."""
        T, n_in, n_out = self.shape
        total = _T(self.L.reshape(-1, n_in)) @ self.R.reshape(-1, n_out)
        return total if self.W is None else total + T * self.W


def _fast_factored(params, supports, factored):
    """_factored: the params with the weights the inner loop keeps as LowRanks: every one (factored=True),
    none (False), or (None) those whose update rank, the samples of all inner steps, is below both
    their widths, where the factors are the smaller arrays."""
    rank = sum(batch[0].shape[1] for batch in supports)
    keep = lambda W: factored if factored is not None else 0 < rank < min(W.shape)
    return [LowRank(p, None, None) if i % 2 == 0 and keep(p) else p for i, p in enumerate(params)]


def _fast_mm(h, W):
    """_mm with three shortcuts: a LowRank W through its factors; a length-1 input axis (the sinusoid's
    x) as a broadcast multiply, no BLAS call per task; a shared W as one (T*K, in) @ (in, out)
    product, a single BLAS call instead of T small ones."""
    if isinstance(W, LowRank):  # h (W + L^T R) = h W + (h L^T) R: a (T, K, r) product, no (T, in, out) array
        shared = None if W.W is None else _mm(h, W.W)
        if W.L is None:  # rank 0: W alone
            return shared
        low = _matmul(_matmul(h, _T(W.L)), W.R)  # (T, K, r) @ (T, r, out)
        return low if shared is None else shared + low
    if h.shape[-1] == 1:
        return h * W[..., None, 0, :] if W.ndim == 3 else h * W[0]
    if W.ndim == 2 and h.ndim == 3:
        return (h.reshape(-1, h.shape[-1]) @ W).reshape(h.shape[:-1] + W.shape[-1:])
    return _matmul(h, W)


def _fast_outer(h, delta, W):
    """_outer, the gradient of a LowRank weight kept as its factors: a LowRank of rank K."""
    return LowRank(None, h, delta) if isinstance(W, LowRank) else _matmul(_T(h), delta)


def _fast_sum_tasks(v, params):
    """_sum_tasks, a LowRank's sum over tasks by its factors (LowRank.sum_tasks)."""
    total = [vi.sum_tasks() if isinstance(vi, LowRank) else _sum_leading(vi) if vi.ndim > p.ndim else vi
             for vi, p in zip(v, params)]
    return [t.astype(p.dtype, copy=False) for t, p in zip(total, params)]


# Plugged in: the core's functions above call these by their plain names. _DENSE_PATHS puts the
# plain ones back (a test compares the two).
_DENSE_PATHS = {"_mm": _mm, "_outer": _outer, "_sum_tasks": _sum_tasks, "_factored": _factored}
_FAST_PATHS = {"_mm": _fast_mm, "_outer": _fast_outer, "_sum_tasks": _fast_sum_tasks, "_factored": _fast_factored}
globals().update(_FAST_PATHS)


# ----------------------------------------------------------------------------
# I.6 The input checks of the entry points above.
# ----------------------------------------------------------------------------
def _check_mlp_args(sizes, rng, activation, bias_outputs):
    _check_activation(activation)
    _check_rng(rng)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be at least 2 positive integers, got {sizes!r}")
    if not 0 <= bias_outputs < sizes[-1]:
        raise ValueError(f"bias_outputs must be in [0, {sizes[-1]}), the outputs, got {bias_outputs!r}")


def _check_inner_lrs(inner_lrs, params):
    """Meta-SGD's rates, checked against params and cast to their dtypes."""
    if not isinstance(inner_lrs, (list, tuple)) or len(inner_lrs) != len(params) or any(
            xp.shape(a) != p.shape for a, p in zip(inner_lrs, params)):
        raise ValueError("inner_lrs must be a list of arrays shaped as params")
    return [xp.asarray(a, dtype=p.dtype) for a, p in zip(inner_lrs, params)]


def _check_adam_args(params, grads, state, lr, beta1, beta2, eps):
    for name, value, high in (("lr", lr, math.inf), ("beta1", beta1, 1.0), ("beta2", beta2, 1.0),
                              ("eps", eps, math.inf)):
        _check_interval(name, value, 0.0, high, high_open=True)
    if not len(grads) == len(state["m"]) == len(state["v"]) == len(params):
        raise ValueError(f"grads and state must hold one array per parameter array ({len(params)}), "
                         f"got {len(grads)} and {len(state['m'])}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if xp.shape(g) != p.shape:
            raise ValueError(f"grads[{i}] must have the shape of params[{i}], {p.shape}, got {xp.shape(g)}")
    _check_finite([(xp.asarray(g), f"grads[{i}]") for i, g in enumerate(grads)])


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")


def _check_int_at_least(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_interval(name, value, low, high, high_open=False):
    """value a finite number in [low, high], or [low, high) with high_open."""
    _check_number(name, value)
    if not (low <= value and (value < high if high_open else value <= high)):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _check_finite(checks):
    """checks: pairs (array, what). ValueError "<what> contains NaN or inf" for the first that does.
    All are checked in one pass over their concatenation: fewer NumPy calls, and one wait on a GPU."""
    if not xp.isfinite(xp.concatenate([a.ravel() for a, _ in checks])).all():
        what = next(what for a, what in checks if not xp.isfinite(a).all())
        raise ValueError(f"{what} contains NaN or inf")


def _check_params(params):
    """Validate the types of params; return the finiteness checks that they still need."""
    if not isinstance(params, (list, tuple)) or len(params) < 2 or len(params) % 2:
        raise TypeError("params must be a list [W1, b1, W2, b2, ...] of arrays")
    for i, p in enumerate(params):
        if not isinstance(p, xp.ndarray) or p.dtype not in (np.float32, np.float64):
            raise TypeError(f"params[{i}] must be a float32 or float64 array of the backend ({xp.__name__})")
    n_in = params[0].shape[0] if params[0].ndim == 2 else None
    for l in range(len(params) // 2):  # W (in, out), b (out,): b longer than W's columns in the last layer only
        W, b = params[2 * l], params[2 * l + 1]
        last = l == len(params) // 2 - 1
        if W.ndim != 2 or W.shape[0] != n_in:
            raise ValueError(f"params[{2 * l}] must be a weight of shape ({n_in}, out), got {W.shape}")
        if b.ndim != 1 or (b.shape[0] < W.shape[1] if last else b.shape[0] != W.shape[1]):
            raise ValueError(f"params[{2 * l + 1}] must be a bias of shape ({W.shape[1]},)"
                             f"{' or longer (bias-only outputs)' if last else ''}, got {b.shape}")
        n_in = b.shape[0]
    return [(p, f"params[{i}]") for i, p in enumerate(params)]


def _check_batch(params, batch, loss, name):
    """Validate a batch (x, target) against params and the loss; return it cast to the params'
    dtype, and the finiteness checks that it still needs."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{name} must be a pair (x, target)")
    dtype = params[0].dtype
    n_in, n_out = params[0].shape[-2], params[-1].shape[-1]
    x = xp.asarray(batch[0], dtype=dtype)
    if x.ndim != 3 or x.shape[-1] != n_in or 0 in x.shape:
        raise ValueError(f"{name} x must have shape (T, K, {n_in}) with T >= 1 tasks and K >= 1 samples, "
                         f"got {x.shape}")
    T, K = x.shape[:2]
    if loss == "mse":
        y = xp.asarray(batch[1], dtype=dtype)
        if y.shape != (T, K, n_out):
            raise ValueError(f"{name} y must have shape ({T}, {K}, {n_out}), got {y.shape}")
        finite = [y]
        target = y
    elif loss not in LOSS_POLICY:  # a loss of the user's: its target one array, (T, K, ...)
        target = xp.asarray(batch[1], dtype=dtype)
        if target.shape[:2] != (T, K):
            raise ValueError(f"{name} target for loss {loss!r} must be an array of shape ({T}, {K}, ...), got "
                             f"{target.shape}")
        finite = [target]
    else:
        lvc = loss.endswith("_lvc")
        fields = "a triple (actions, weights, old_logp)" if lvc else "a pair (actions, weights)"
        if not isinstance(batch[1], (tuple, list)) or len(batch[1]) != 2 + lvc:
            raise TypeError(f"{name} target for loss {loss!r} must be {fields}")
        actions, weights = xp.asarray(batch[1][0]), xp.asarray(batch[1][1], dtype=dtype)
        if weights.shape != (T, K):
            raise ValueError(f"{name} weights must have shape ({T}, {K}), got {weights.shape}")
        if LOSS_POLICY[loss] == "categorical":
            if actions.shape != (T, K) or actions.dtype.kind not in "iu":
                raise ValueError(f"{name} actions must be integers of shape ({T}, {K}), got {actions.dtype} "
                                 f"{actions.shape}")
            if actions.size and (actions.min() < 0 or actions.max() >= n_out):
                raise ValueError(f"{name} actions must be in [0, {n_out}), the network's outputs")
            finite = [weights]
        else:
            if n_out % 2:
                raise ValueError(f"loss {loss!r} needs an even number of outputs [mean, log_std], got {n_out}")
            actions = actions.astype(dtype)
            if actions.shape != (T, K, n_out // 2):
                raise ValueError(f"{name} actions must have shape ({T}, {K}, {n_out // 2}), got {actions.shape}")
            finite = [actions, weights]
        target = (actions, weights)
        if lvc:
            old_logp = xp.asarray(batch[1][2], dtype=dtype)
            if old_logp.shape != (T, K):
                raise ValueError(f"{name} old_logp must have shape ({T}, {K}), got {old_logp.shape}")
            finite.append(old_logp)
            target += (old_logp,)
    return (x, target), [(x, f"{name} x")] + [(arr, f"{name} target") for arr in finite]


def _check_meta_args(params, support, query, loss, inner_steps, activation, inner_lr=None, step_list=True):
    """Validate the arguments of a meta-gradient; return support and query cast to the params' dtype.
    support is one batch for every inner step, or (step_list) a list of inner_steps batches;
    inner_lr, a number (None: Meta-SGD's rates, checked by _check_inner_lrs)."""
    checks = _check_params(params)
    if inner_lr is not None:
        _check_number("inner_lr", inner_lr)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    _check_activation(activation)
    _check_int_at_least("inner_steps", inner_steps, 0)
    query, query_checks = _check_batch(params, query, loss, "query")
    is_list = _is_step_list(support)
    if is_list and not step_list:
        raise TypeError("support must be one batch (x, target) here, not a list of batches")
    if is_list:
        if len(support) != inner_steps:
            raise ValueError(f"support, a list of batches, must hold one per inner step ({inner_steps}), "
                             f"got {len(support)}")
        checked = [_check_batch(params, b, loss, f"support[{j}]") for j, b in enumerate(support)]
        support = batches = [b for b, _ in checked]
        support_checks = [c for _, cs in checked for c in cs]
    else:
        support, support_checks = _check_batch(params, support, loss, "support")
        batches = [support]
    for b in batches:
        if b[0].shape[0] != query[0].shape[0]:
            raise ValueError(f"support and query must have the same number of tasks, got "
                             f"{b[0].shape[0]} and {query[0].shape[0]}")
    _check_finite(checks + support_checks + query_checks)
    return support, query


# ============================================================================
# The end of the core. Below it: Part II, one chapter per family of
# meta-learning; Part III, the harness (the command line, bench, the backend).
# ============================================================================


# ============================================================================
# PART II. ONE CHAPTER PER FAMILY. First what every chapter shares (II.0): the
# run's machinery that each training loop uses (settings, progress, random
# streams, checkpoints, JSON), the TaskFamily every meta-RL trainer takes, the
# RL pieces (rollouts, returns, a baseline, GAE, KL, conjugate gradient), and two
# task families. Then gradient-based meta-RL (II.1, MAML-TRPO and Reptile),
# memory (II.2, RL^2), evolution (II.3, ES-MAML), value-based learning with a
# meta-learned start (II.4, Q-learning), a learned optimiser (II.5, the
# meta-learner LSTM), few-shot regression (II.6, the sinusoid), and metric-based
# meta-learning (II.7, Prototypical Networks).
# ============================================================================
# ----------------------------------------------------------------------------
# II.0.1 The run's machinery: the backend's arrays, settings, progress, random
#        streams, checkpoints and JSON.
# ----------------------------------------------------------------------------
def to_host(a):
    """A NumPy array of a backend array: an explicit copy off the GPU, a no-op on the CPU."""
    return xp.asnumpy(a) if hasattr(xp, "asnumpy") else np.asarray(a)


def device_rng(rng):
    """The generator for the draws inside hot loops (actions, exploration): rng itself on
    the CPU; on a GPU, a generator of the device seeded from rng, so that no draw
    crosses the bus and rng, which checkpoints save, still fixes every later draw."""
    return rng if xp is np else xp.random.default_rng(int(rng.integers(2 ** 63)))


def hparam(default, help, low=None, high=None, choices=None, above=None, only=None, per_algorithm=None):
    """A hyperparameter: its default, meaning and allowed values (low <= value <= high, value > above,
    or one of choices), for the dataclass and its flag; only: the algorithms that read it (None: all);
    per_algorithm: {algorithm: its own default}, which the command line takes where the flag is not given."""
    return dataclasses.field(default=default, metadata=dict(help=help, low=low, high=high, choices=choices,
                                                            above=above, only=only, per_algorithm=per_algorithm))


def check_config(config):
    """Raise ValueError naming the flag and its allowed values for any field out of range (a number
    must also be finite)."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        flag = "--" + f.name.replace("_", "-")
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ValueError(f"{flag} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number; got {value!r}")
        low, high, above = meta.get("low"), meta.get("high"), meta.get("above")
        if (low is not None and not value >= low) or (high is not None and not value <= high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{flag} must be {bounds}; got {value!r}")
        if above is not None and not value > above:
            raise ValueError(f"{flag} must be > {above}; got {value!r}")


RUN = {}  # where the run is: its last progress line's iteration and total, its last checkpoint (path, iteration)


class Progress:
    """Progress lines: iteration, metrics, elapsed time and ETA."""

    def __init__(self, total, start=0, stream=None):
        self.total, self.start, self.t0, self.stream = total, start, time.perf_counter(), stream

    def __call__(self, iteration, **metrics):
        RUN.update(iteration=iteration, total=self.total)
        elapsed = time.perf_counter() - self.t0
        done = iteration - self.start
        eta = elapsed / done * (self.total - iteration) if done > 0 else float("nan")
        shown = "  ".join(f"{k} {float(v):.3f}" for k, v in metrics.items())
        print(f"iter {iteration:>6}/{self.total}  {shown}  elapsed {elapsed:6.1f}s  ETA {eta:6.1f}s",
              file=self.stream or sys.stdout, flush=True)


# The random streams of a run. Training draws from default_rng(seed), which its checkpoints save.
# The evaluation draws from streams of its own, default_rng([seed, k]), so that resuming cannot
# change them; each k means the same in every command.
HELD_OUT_TASKS = 1  # the held-out tasks, with their data (the sinusoid's points)
VALIDATION_TASKS = 2  # the tasks on which test-time step sizes are chosen, with their data
RANDOM_INIT = 3  # the weights of the random-init baseline
VALIDATION_DRAWS = 4  # the rollouts on the validation tasks
HELD_OUT_DRAWS = 5  # what the learners draw on the held-out tasks: rollouts, exploration
LEARNER_INIT = 6  # a learned optimiser's initial weights: the tasks of training stay those of MAML's run


def stream(seed, k):
    """The evaluation stream k (one of the constants above) of the run with this seed."""
    return np.random.default_rng([seed, k])


def mean_ci95(values):
    """Mean and half-width of its 95% confidence interval (normal approximation)."""
    values = to_host(values).astype(np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"values must be a 1-D array of at least 2 numbers, got shape {values.shape}")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def _atomic_write(path, write):
    """Write through write(file) into a temporary file beside path, then rename it into place. A symbolic
    link is followed: its target is replaced, the link stays. The temporary file's name holds this
    process's id (.tmp-PID-...), so that a later run can tell one left by a killed run."""
    path = os.path.realpath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".tmp-{os.getpid()}-",
                               suffix=os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600); give it a new file's permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or an error: no temporary file stays (a signal after the rename finds none)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block has run, then arrive: a checkpoint and the record of it
    (RUN, which the stop line reads) are written whole. Outside the main thread, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def means_and_cis(stats):
    """{key: (mean, ci95)} -> ({key: mean}, {key: ci95}), the JSON's two dicts."""
    return {k: m for k, (m, _) in stats.items()}, {k: c for k, (_, c) in stats.items()}


def _json_safe(obj):
    """obj with every float that is not finite (a run that diverged) as None: JSON has no NaN or inf."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path, obj):
    """obj as JSON, written atomically; a number that is not finite is written null."""
    _atomic_write(path, lambda f: f.write((json.dumps(_json_safe(obj), indent=2) + "\n").encode()))


def save_checkpoint(path, config, iteration, rng, models, optimisers, extra=None):
    """Save params, Adam states, RNG state, iteration and config to an .npz, atomically.

    models / optimisers: dicts name -> params list / name -> adam state;
    extra: a JSON-able dict of whatever else the run needs to resume (counters, curves)."""
    arrays = {}
    for name, params in models.items():
        arrays.update({f"params/{name}/{i}": to_host(p) for i, p in enumerate(params)})
    for name, state in optimisers.items():
        for key in ("m", "v"):
            arrays.update({f"adam/{name}/{key}/{i}": to_host(a) for i, a in enumerate(state[key])})
    meta = dict(format="metarl-min checkpoint 1", command=config.command, config=dataclasses.asdict(config),
                iteration=iteration, rng=rng.bit_generator.state, adam_t={k: s["t"] for k, s in optimisers.items()},
                models={k: len(p) for k, p in models.items()}, extra=extra or {})
    arrays["meta"] = np.array(json.dumps(meta))
    with _signals_held():
        _atomic_write(path, lambda f: np.savez(f, **arrays))
        RUN["checkpoint"] = (path, iteration)


def load_checkpoint(path, config):
    """Load a checkpoint written by save_checkpoint for the same config (iterations may differ).

    Returns (iteration, rng, models, optimisers, extra); ValueError if the file is
    not such a checkpoint, is another command's, or was made with other hyperparameters."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != "metarl-min checkpoint 1":
                raise ValueError("unknown format")
            models = {k: [xp.asarray(data[f"params/{k}/{i}"]) for i in range(n)] for k, n in meta["models"].items()}
            optimisers = {k: {"m": [xp.asarray(data[f"adam/{k}/m/{i}"]) for i in range(n)],
                              "v": [xp.asarray(data[f"adam/{k}/v/{i}"]) for i in range(n)], "t": meta["adam_t"][k]}
                          for k, n in meta["models"].items() if k in meta["adam_t"]}
            rng = np.random.Generator(getattr(np.random, meta["rng"]["bit_generator"])())
            rng.bit_generator.state = meta["rng"]
    except FileNotFoundError:
        raise
    except Exception as e:  # a zip, npz or JSON error: say which file, and why
        raise ValueError(f"{path} is not a readable metarl-min checkpoint ({type(e).__name__}: {e})") from e
    if meta.get("command", config.command) != config.command:  # older checkpoints lack it: the settings tell
        raise ValueError(f"{path} is a checkpoint of the {meta['command']} command, not of {config.command}")
    foreign = [k for k in meta["config"] if k not in {f.name for f in dataclasses.fields(config)}]
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(f"{path} was made with settings that {config.command} does not have: {flags}")
    # The settings that leave training as it was.
    free = ("iterations", "log_every", "eval_tasks", "val_tasks", "baseline_lr_scale", "tune_first_lr", "eval_batch",
            "eval_min_steps")
    # A setting newer than the checkpoint had its default value when the checkpoint was made.
    saved = {**{f.name: f.default for f in dataclasses.fields(config)}, **meta["config"]}
    saved = {k: v for k, v in saved.items() if k not in free}
    wanted = {k: v for k, v in dataclasses.asdict(config).items() if k not in free}
    if saved != wanted:
        diff = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {wanted.get(k)!r})"
                         for k in wanted if saved.get(k) != wanted.get(k))
        raise ValueError(f"{path} was made with other hyperparameters: {diff}")
    if meta["iteration"] > config.iterations:
        raise ValueError(f"{path} is at iteration {meta['iteration']}, past --iterations {config.iterations}")
    return meta["iteration"], rng, models, optimisers, meta["extra"]


def best_step_size(score, step_sizes, rng):
    """The step size with the lowest score(step_size, rng): each is scored on the
    same validation draws (the generator restarts from its state for each). A
    step size that diverges (overflow, a NaN score) counts as the worst."""
    state = rng.bit_generator.state
    scores = {}
    for lr in step_sizes:
        rng.bit_generator.state = state
        with np.errstate(over="ignore", invalid="ignore"):
            scores[lr] = score(lr, rng)
        if not np.isfinite(scores[lr]):
            scores[lr] = np.inf
    return min(scores, key=scores.get)


def _check_finite_policy(params, iteration, flag):
    """Stop cleanly, in one line, where training has diverged (_check_finite: one pass, one wait on a GPU)."""
    try:
        _check_finite([(p, "a weight of the policy") for p in params])
    except ValueError as e:
        raise ValueError(f"training diverged at iteration {iteration}: {e}; a smaller {flag} may help") from None


@contextlib.contextmanager
def _diverging(iteration, flag):
    """Around a training step: overflow is let through, and a gradient of NaN or inf (adam_step refuses
    it) stops training in one line, as _check_finite_policy does after the step."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            yield
    except ValueError as e:
        if "NaN or inf" not in str(e):
            raise
        raise ValueError(f"training diverged at iteration {iteration}: {e}; a smaller {flag} may help") from None


def _check_plot(plot):
    """matplotlib for --plot, imported only now; a clear error (before any training) when it is absent."""
    if plot is None:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


# ----------------------------------------------------------------------------
# II.0.2 A task family: what every meta-RL trainer takes.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskFamily:
    """A distribution of RL tasks, and how to run them: what meta_rl_train, rl2_train and es_train take.

      sample_tasks(rng, n): n tasks, a dict of per-task arrays, each with a leading axis n
      make_env(tasks, episodes): a batched env of n * episodes envs with Gymnasium's vector API and
        same-step autoreset (as cartpole.VecCartPole and VecNav2D), env i of task i // episodes
      obs_dim: the observation's width; horizon: the most steps of an episode
      n_actions (a categorical policy) or action_dim (a Gaussian one, [mean, log_std] outputs, the
        log-std state-independent): exactly one of the two
      task_label(tasks) -> (n,) 0/1, optional: a label of each task that RL^2's task-inference loss
        learns to tell (None: that loss is off)
      obs_scale: a typical size of each observation variable (a number, or one per variable), by
        which the recurrent learners divide it"""
    name: str
    sample_tasks: Callable
    make_env: Callable
    obs_dim: int
    horizon: int
    n_actions: Optional[int] = None
    action_dim: Optional[int] = None
    task_label: Optional[Callable] = None
    obs_scale: Any = 1.0

    def __post_init__(self):
        if (self.n_actions is None) == (self.action_dim is None):
            raise ValueError(f"TaskFamily {self.name!r}: give exactly one of n_actions= (a categorical policy) "
                             f"and action_dim= (a Gaussian one), got n_actions={self.n_actions!r}, "
                             f"action_dim={self.action_dim!r}")
        for field in ("obs_dim", "horizon") + (("n_actions",) if self.n_actions is not None else ("action_dim",)):
            _check_int_at_least(field, getattr(self, field), 1)
        for field in ("sample_tasks", "make_env") + (("task_label",) if self.task_label is not None else ()):
            if not callable(getattr(self, field)):
                raise TypeError(f"TaskFamily {self.name!r}: {field} must be callable")

    @property
    def policy(self):  # the key of POLICIES and POLICY_KL
        return "categorical" if self.n_actions is not None else "gaussian"

    @property
    def loss(self):  # the policy-gradient loss of LOSSES
        return "pg" if self.n_actions is not None else "gauss"

    @property
    def n_out(self):  # the policy network's outputs: logits, or [mean, log_std]
        return self.n_actions if self.n_actions is not None else 2 * self.action_dim

    @property
    def bias_outputs(self):  # init_mlp's: the log-std, the same in every state
        return 0 if self.n_actions is not None else self.action_dim


def task_count(tasks):
    """The number of tasks in a dict of per-task arrays."""
    return len(next(iter(tasks.values())))


def repeat_tasks(tasks, episodes):
    """Each task `episodes` times in a row, task after task: the layout of make_env's envs."""
    return {k: np.repeat(v, episodes, axis=0) for k, v in tasks.items()}


def tile_tasks(tasks, copies):
    """All the tasks, then all of them again, `copies` times: one block per candidate policy."""
    return {k: np.tile(v, (copies,) + (1,) * (np.ndim(v) - 1)) for k, v in tasks.items()}


def init_policy(family, config, rng, extra_inputs=0):
    """The policy network of a family: (obs_dim + extra_inputs, hidden, hidden, n_out) with
    config.activation, its last-layer weights scaled by config.init_out_scale, a Gaussian policy's
    log-std starting at config.init_log_std. extra_inputs: what it reads beside the observation."""
    params = init_mlp((family.obs_dim + extra_inputs, config.hidden, config.hidden, family.n_out), rng,
                      config.activation, bias_outputs=family.bias_outputs)
    params[-2] = params[-2] * config.init_out_scale
    if family.bias_outputs:
        params[-1][-family.bias_outputs:] = config.init_log_std
    return params


# ----------------------------------------------------------------------------
# II.0.3 What the RL families share: rollouts, returns, a baseline, GAE, the
#        policies' KL and Fisher, conjugate gradient.
# ----------------------------------------------------------------------------
# A batch of episodes is a dict of arrays with a task axis T, E episodes per
# task and H time steps (the longest episode; mask marks the real steps):
#   obs (T, E, H, in), actions (T, E, H) int or (T, E, H, d), rewards (T, E, H), mask (T, E, H) bool.
def sample_actions(out, rng, policy="categorical"):
    """Actions of the policy whose network output is out (T, E, n_out):
    categorical over softmax(out), or Gaussian N(mean, exp(log_std)^2) with out = [mean, log_std].
    rng draws where out lives (device_rng)."""
    if policy == "categorical":  # inverse CDF: the first action whose cumulative probability exceeds u
        cdf = xp.cumsum(xp.exp(log_softmax(out)), axis=-1)
        u = rng.random(out.shape[:-1] + (1,))
        return xp.minimum((u > cdf).sum(axis=-1), out.shape[-1] - 1)
    d = out.shape[-1] // 2
    return out[..., :d] + xp.exp(out[..., d:]) * rng.standard_normal(out.shape[:-1] + (d,), dtype=out.dtype)


class Step(NamedTuple):
    """One step of every env of a batched env, task by task, or (_stack_steps) many along an axis after E."""
    x: object  # (T, E, in) the observations the policy saw
    actions: object  # (T, E) ints, or (T, E, d)
    rewards: object  # (T, E)
    done: object  # (T, E) bool: the env's episode ended with this step


def _run_envs(params, env, n_tasks, rng, policy, activation):
    """The policy's steps in every env of a batched env, one Step per iteration, without end."""
    E = env.num_envs // n_tasks
    ob, _ = env.reset(seed=int(rng.integers(2 ** 63)))
    draws = device_rng(rng)
    while True:
        x = ob.astype(params[0].dtype).reshape(n_tasks, E, -1)  # (T, E, in)
        a = sample_actions(mlp_forward(params, x, activation)[0], draws, policy)  # (T, E) or (T, E, d)
        ob, reward, terminated, truncated, _ = env.step(a.reshape((env.num_envs,) + a.shape[2:]))
        yield Step(x, a, reward.reshape(n_tasks, E), (terminated | truncated).reshape(n_tasks, E))


def _stack_steps(steps):
    """The Steps _run_envs yielded, stacked along a new time axis: a Step of (T, E, K, ...) arrays."""
    return Step(*[xp.stack(arrays, axis=2) for arrays in zip(*steps)])


def rollout(params, env, n_tasks, rng, horizon, policy="categorical", activation="tanh"):
    """One episode in each of the env.num_envs = n_tasks * E environments of a batched env.

      params: the policy network, shared or per task (a leading axis T)
      env: the batched Gymnasium API of cartpole.VecCartPole (reset(seed=), step(actions) -> obs,
        reward, terminated, truncated, info), restarting an env in the step that ends its episode
        (same-step autoreset; next-step also serves, as each env's first episode alone is kept;
        _check_autoreset reads the mode an env declares); env i belongs to task i // E
      rng: a numpy.random.Generator; horizon: the most steps of an episode
      policy: a key of POLICIES; activation: the network's
    Returns {"obs" (T, E, H, in), "actions" (T, E, H) or (T, E, H, d), "rewards" (T, E, H),
    "mask" (T, E, H)}, H the longest episode: each runs until it ends or `horizon` steps, and
    the steps after its end are masked out."""
    _check_rollout_args(env, n_tasks, rng, horizon, policy)
    _check_autoreset(env, "rollout", ("SameStep", "NextStep"))  # it keeps each env's first episode alone
    steps, ended = [], xp.zeros((n_tasks, env.num_envs // n_tasks), dtype=bool)
    for step in _run_envs(params, env, n_tasks, rng, policy, activation):
        steps.append(step)
        ended = ended | step.done
        if ended.all() or len(steps) == horizon:
            break
    steps = _stack_steps(steps)
    mask = xp.cumsum(steps.done, axis=2) - steps.done == 0  # no end before the step: the env's first episode
    return {"obs": steps.x, "actions": steps.actions, "rewards": xp.where(mask, steps.rewards, 0.0), "mask": mask}


def rollout_min_steps(params, env, n_tasks, rng, min_steps, horizon, policy="categorical", activation="tanh"):
    """Episodes as rllab's sampler collects them in the MAML authors' code.

      min_steps: the envs go on through their restarts until the episodes each task has finished
        hold min_steps steps or more; the episodes still running then are dropped
      horizon: the env must end every episode within it; the rest as rollout's
    Returns rollout's dict, a task's episodes along the E axis, env after env: E is the most
    episodes any task finished, and the rows a task leaves empty are masked out."""
    _check_rollout_args(env, n_tasks, rng, horizon, policy)
    _check_autoreset(env, "rollout_min_steps")
    _check_int_at_least("min_steps", min_steps, 1)
    steps, starts = [], []
    start = xp.zeros((n_tasks, env.num_envs // n_tasks), dtype=np.int64)  # the step each env's episode began at
    stop = xp.full(n_tasks, -1)  # the step after which each task's finished episodes held min_steps
    for k, step in enumerate(_run_envs(params, env, n_tasks, rng, policy, activation)):
        steps.append(step)
        starts.append(start)
        start = xp.where(step.done, k + 1, start)  # = the steps of the env's finished episodes
        stop = xp.where((stop < 0) & (start.sum(axis=1) >= min_steps), k, stop)
        if (stop >= 0).all():
            break
        if (k + 1 - start >= horizon).any():
            raise ValueError(f"with min_steps, the env must end each episode within horizon ({horizon}) steps")
    obs, actions, rewards, done = _stack_steps(steps)  # (T, E, K, ...) each
    # Each kept step's place (task, row, h): row = the episodes of the task's earlier envs + the env's
    # episodes before it; h = the steps since its episode began. Kept: the episodes ended by the stop.
    before = xp.cumsum(done, axis=2) - done  # (T, E, K) episodes the env ended before step k
    per_env = (done & (xp.arange(done.shape[2]) <= stop[:, None, None])).sum(axis=2)  # (T, E)
    kept = xp.nonzero(before < per_env[..., None])  # (task, env, step) of each kept step
    row = (before + (xp.cumsum(per_env, axis=1) - per_env)[..., None])[kept]
    h = kept[2] - xp.stack(starts, axis=2)[kept]
    rows = int(per_env.sum(axis=1).max())  # the most episodes any task finished

    def place(a):  # (T, E, K, ...) -> (T, rows, horizon, ...), zero where no step is kept
        out = xp.zeros((n_tasks, rows, horizon) + a.shape[3:], dtype=a.dtype)
        out[kept[0], row, h] = a[kept]
        return out
    return {"obs": place(obs), "actions": place(actions), "rewards": place(rewards),
            "mask": place(xp.ones(done.shape, dtype=bool))}


# What each reader of a batched env records wrongly in the other autoreset modes of Gymnasium's vector envs.
AUTORESET_MISREAD = {
    "NextStep": "next-step autoreset would record each env's reset step, its action ignored and its reward 0, as a "
                "step of the next episode",
    "Disabled": "with autoreset disabled an env stops at its first episode's end"}


def _check_autoreset(env, caller, allowed=("SameStep",)):
    """Refuse an env whose declared autoreset mode (Gymnasium's metadata["autoreset_mode"], an
    AutoresetMode or its value) `caller` would mis-record; an env that declares none is taken to be
    same-step, as TaskFamily's make_env and this file's envs are."""
    metadata = getattr(env, "metadata", None)
    mode = metadata.get("autoreset_mode") if isinstance(metadata, dict) else None
    mode = getattr(mode, "value", mode)
    if mode is not None and mode not in allowed:
        why = AUTORESET_MISREAD.get(mode, "it is none of Gymnasium's modes")
        raise ValueError(f"{caller} needs a vector env with {' or '.join(allowed)} autoreset; this one declares "
                         f"{mode!r}: {why} (make it with autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP)")


def _check_rollout_args(env, n_tasks, rng, horizon, policy):
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {tuple(POLICIES)}, got {policy!r}")
    if n_tasks < 1 or env.num_envs % n_tasks:
        raise ValueError(f"env.num_envs ({env.num_envs}) must be a multiple of n_tasks ({n_tasks})")
    _check_rng(rng)
    _check_int_at_least("horizon", horizon, 1)


def discounted_returns(rewards, gamma=0.99):
    """Rewards-to-go R_t = sum_{l>=0} gamma^l r_{t+l} along the last axis (masked rewards are 0)."""
    _check_interval("gamma", gamma, 0.0, 1.0)
    returns = xp.zeros(rewards.shape, dtype=np.float64)
    running = xp.zeros(rewards.shape[:-1])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def baseline_features(obs, mask):
    """The linear baseline's features (Duan et al. 2016, rllab's LinearFeatureBaseline):
    [o, o^2, t, t^2, t^3, 1] with o = clip(obs, -10, 10) and t = step / 100;
    zero where masked. obs (T, E, H, d) -> (T, E, H, 2 d + 4)."""
    o = xp.clip(obs.astype(np.float64), -10.0, 10.0)
    t = xp.broadcast_to((xp.arange(obs.shape[2]) / 100.0)[:, None], obs.shape[:3] + (1,))
    feats = xp.concatenate([o, o * o, t, t * t, t ** 3, xp.ones_like(t)], axis=-1)
    return feats * mask[..., None]


def fit_baseline(obs, returns, mask, reg=1e-5):
    """Per task, the ridge regression of the returns on the features:
    c_t = (F_t^T F_t + reg I)^-1 F_t^T R_t. Returns the fitted values (T, E, H), 0 where masked."""
    feats = baseline_features(obs, mask)
    T, n_feat = feats.shape[0], feats.shape[-1]
    F = feats.reshape(T, -1, n_feat)  # (T, E*H, n_feat)
    A = _T(F) @ F + reg * xp.eye(n_feat)  # (T, n_feat, n_feat)
    c = xp.linalg.solve(A, _T(F) @ (returns * mask).reshape(T, -1, 1))  # (T, n_feat, 1)
    return (F @ c).reshape(mask.shape)


def advantages(rewards, values, mask, gamma=0.99, lam=1.0):
    """GAE(lambda) (Schulman et al. 2016, eq. 16): A_t = sum_l (gamma lam)^l delta_{t+l},
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with V = 0 after the episode's last step.
    lam = 1 gives R_t - V(s_t), the estimator of the MAML paper."""
    _check_interval("gamma", gamma, 0.0, 1.0)
    _check_interval("lam", lam, 0.0, 1.0)
    next_values = xp.concatenate([values[..., 1:] * mask[..., 1:], xp.zeros(values.shape[:-1] + (1,))], axis=-1)
    deltas = (rewards + gamma * next_values - values) * mask
    return discounted_returns(deltas, gamma * lam) * mask


def pg_batch(episodes, gamma=0.99, lam=1.0, dtype=np.float32):
    """The "pg"/"gauss" loss's batch from episodes: advantages, normalised, as weights.

      episodes: rollout's dict; gamma, lam: GAE's (lam = 1: returns less the linear baseline)
    Returns (x (T, K, in), (actions (T, K) or (T, K, d), weights (T, K))): only the real steps,
    each task's first, K the largest count of any task, the padding of weight 0. The weights
    are the per-task normalised advantages over the number of steps, so the loss is the mean of
    -A log pi over the task's steps.
    Schulman et al. 2016, eq. 16; Duan et al. 2016, the linear baseline."""
    mask, rewards = episodes["mask"], episodes["rewards"]
    returns = discounted_returns(rewards, gamma)
    adv = advantages(rewards, fit_baseline(episodes["obs"], returns, mask), mask, gamma, lam)
    T = mask.shape[0]
    flat_mask = mask.reshape(T, -1)
    n = flat_mask.sum(axis=1, keepdims=True)  # (T, 1) steps per task
    mean = adv.reshape(T, -1).sum(axis=1, keepdims=True) / n
    std = xp.sqrt(((adv.reshape(T, -1) - mean) ** 2 * flat_mask).sum(axis=1, keepdims=True) / n)
    weights = (adv.reshape(T, -1) - mean) / (std + 1e-8) * flat_mask / n  # (T, E*H)
    # Pack: the real steps of each task first (a stable sort of the mask), cut at the largest count.
    order = xp.argsort(~flat_mask, axis=1, kind="stable")[:, :int(n.max())]  # (T, K)
    take = lambda a: xp.take_along_axis(a.reshape((T, -1) + a.shape[3:]),
                                        order.reshape(order.shape + (1,) * (a.ndim - 3)), axis=1)
    return take(episodes["obs"]).astype(dtype), (take(episodes["actions"]), take(weights).astype(dtype))


def with_old_logp(params, batch, policy="categorical", activation="tanh"):
    """A "pg"/"gauss" batch made a batch of their LVC losses: the log-probabilities
    of its actions under params, the policy that sampled them, join the target."""
    x, (actions, weights) = batch
    return x, (actions, weights, POLICIES[policy][0](mlp_forward(params, x, activation)[0], actions))


def episode_returns(episodes):
    """Undiscounted return of each episode: (T, E)."""
    return episodes["rewards"].sum(axis=-1)


def mean_returns(episodes):
    """Each task's mean return over its episodes: (T,). A row whose first step is masked holds no episode."""
    real = episodes["mask"][..., 0]  # (T, E)
    returns = episode_returns(episodes)
    return (returns * real).sum(axis=1) / real.sum(axis=1).astype(returns.dtype)


def step_weights(episodes):
    """(T, K) weights of the mean over each task's steps, packed as pg_batch packs them:
    1/n_t on the first n_t samples of task t (its real steps), 0 on the padding."""
    mask = episodes["mask"]
    n = mask.reshape(mask.shape[0], -1).sum(axis=1, keepdims=True)  # (T, 1)
    return (xp.arange(int(n.max())) < n) / n


# KL(pi_old || pi) between the policies of two outputs, per sample (T, K), and the
# Fisher information F of the policy as a product in out (F = the KL's Hessian at
# out = out_old), TRPO's metric:
#   categorical:  KL = sum_a p_old (log p_old - log p),   F r = p r - p (p . r)
#   Gaussian:     KL = sum_i [s - s_old + (e^{2 s_old} + (mu - mu_old)^2) e^{-2s} / 2 - 1/2],
#                 F r = [e^{-2s} r_mu,  2 r_s]
def categorical_kl(old_out, out):
    log_p_old = log_softmax(old_out)
    return (xp.exp(log_p_old) * (log_p_old - log_softmax(out))).sum(axis=-1)


def categorical_fisher(out, r):
    p = xp.exp(log_softmax(out))
    return p * (r - (p * r).sum(axis=-1, keepdims=True))


def gaussian_kl(old_out, out):
    d = out.shape[-1] // 2
    s_old, s, diff = old_out[..., d:], out[..., d:], out[..., :d] - old_out[..., :d]
    return (s - s_old + 0.5 * (xp.exp(2.0 * s_old) + diff * diff) * xp.exp(-2.0 * s) - 0.5).sum(axis=-1)


def gaussian_fisher(out, r):
    d = out.shape[-1] // 2
    return xp.concatenate([xp.exp(-2.0 * out[..., d:]) * r[..., :d], 2.0 * r[..., d:]], axis=-1)


POLICY_KL = {"categorical": (categorical_kl, categorical_fisher), "gaussian": (gaussian_kl, gaussian_fisher)}


def _dot(u, w):
    """The inner product of two directions, lists of arrays shaped as params: sum_i <u_i, w_i>."""
    return sum(float((ui * wi).sum()) for ui, wi in zip(u, w))


def clip_norm(grads, max_norm):
    """grads (a list of lists of arrays) scaled together so that their joint norm is at most max_norm
    (0 or None: as they are), as PPO's implementations clip theirs and the meta-learner LSTM's
    authors its meta-gradient."""
    if not max_norm:
        return grads
    norm = math.sqrt(sum(_dot(g, g) for g in grads))
    return [[gi * min(1.0, max_norm / (norm + 1e-12)) for gi in g] for g in grads]


def conjugate_gradient(matvec, b, iters=10, tol=1e-10):
    """x with A x = b for a symmetric positive-definite A given as matvec(x), both lists of arrays
    (Hestenes & Stiefel 1952; Nocedal & Wright 2006, Algorithm 5.2), from x = 0: iters steps at
    most, fewer once |b - A x|^2 <= tol |b|^2."""
    _check_int_at_least("iters", iters, 1)
    x = [xp.zeros_like(bi) for bi in b]
    r, p = list(b), list(b)  # residual b - A x, search direction
    rr = _dot(r, r)
    done = tol * rr
    for _ in range(iters):
        if rr <= done:
            break
        Ap = matvec(p)
        step = rr / _dot(p, Ap)
        x = [xi + step * pi for xi, pi in zip(x, p)]
        r = [ri - step * ai for ri, ai in zip(r, Ap)]
        rr, rr_old = _dot(r, r), rr
        p = [ri + (rr / rr_old) * pi for ri, pi in zip(r, p)]
    return x


RL_EVAL_STEPS = (0, 1, 2, 3)  # every RL family is evaluated after 0-3 adaptation steps (RL^2: in episodes 1-4)


# ----------------------------------------------------------------------------
# II.0.4 Two task families: CartPole with the actuator reversed on half the tasks
#        (cartpole.py), and the 2D navigation of the MAML paper (sec. 5.3).
# ----------------------------------------------------------------------------
def _import_cartpole():
    """cartpole.py, imported only by what runs CartPole; ImportError, in one line, when it is not at hand."""
    try:
        import cartpole
    except ModuleNotFoundError as e:
        if e.name != "cartpole":
            raise
        raise ImportError("this needs cartpole.py, which is not beside metarl_min.py: copy it from the "
                          "metarl-min repository") from None
    return cartpole


def cartpole_envs(tasks, episodes):
    """A VecCartPole holding `episodes` copies of each task's physics, task after task."""
    return _import_cartpole().VecCartPole(task_count(tasks) * episodes, **repeat_tasks(tasks, episodes))


# The recurrent learners see x, x_dot, theta, theta_dot in units of the small moves of a balanced pole: one push
# changes the velocities by about 0.2, which must be a large input for a memory to tell which way the actuator
# pushes (in units of the kernels' box, Q_STATE_HIGH, it is under 0.1, and plain RL^2 learned one polarity only).
CARTPOLE_OBS_SCALE = np.array([0.25, 0.125, 0.01, 0.125])


def cartpole_family(kind="reversed"):
    """CartPole tasks of cartpole.sample_tasks's `kind`: push left or right, episodes of at most 500 steps.
    Its task label is the actuator's polarity (1 where it is reversed)."""
    cartpole = _import_cartpole()
    return TaskFamily("cartpole" if kind == "reversed" else f"cartpole-{kind}",
                      lambda rng, n: cartpole.sample_tasks(rng, n, kind), cartpole_envs,
                      obs_dim=4, horizon=cartpole.MAX_EPISODE_STEPS, n_actions=2,
                      task_label=lambda tasks: tasks["force_mag"] < 0, obs_scale=CARTPOLE_OBS_SCALE)


# 2D navigation (MAML paper sec. 5.3), as in the authors' code (maml_rl,
# rllab's PointEnvRandGoal): a point starts at the origin and moves towards a
# goal it does not observe; the reward is minus its distance to the goal.
NAV_GOAL_RANGE = (-0.5, 0.5)  # goal ~ U[-0.5, 0.5]^2
NAV_MAX_SPEED = 0.1  # each velocity component is clipped to [-0.1, 0.1]
NAV_TOLERANCE = 0.01  # the episode ends when |dx| and |dy| are both below this
NAV_MAX_EPISODE_STEPS = 100


def sample_nav_tasks(rng, n):
    """Goals of n tasks: {"goal": (n, 2)}."""
    _check_rng(rng)
    _check_int_at_least("n", n, 1)
    return {"goal": rng.uniform(*NAV_GOAL_RANGE, size=(n, 2))}


class VecNav2D:
    """num_envs point robots, each with its own goal (goals: (num_envs, 2)),
    with the batched API of cartpole.VecCartPole (same-step autoreset, the
    ended episode's last observation in info["final_obs"]).

    The observation is the position (2,). An action a (2,) is in the policy's
    units: the velocity is clip(action_scale * a, -NAV_MAX_SPEED, NAV_MAX_SPEED),
    as rllab's normalize wrapper maps [-1, 1] onto the action bounds in the
    authors' code."""

    def __init__(self, goals, max_episode_steps=NAV_MAX_EPISODE_STEPS, action_scale=NAV_MAX_SPEED):
        goals = xp.asarray(goals, dtype=np.float64)
        if goals.ndim != 2 or goals.shape[0] < 1 or goals.shape[1] != 2 or not xp.isfinite(goals).all():
            raise ValueError(f"goals must be a finite array of shape (num_envs, 2), num_envs >= 1, got shape "
                             f"{goals.shape}")
        _check_int_at_least("max_episode_steps", max_episode_steps, 1)
        self.num_envs, self.goals = goals.shape[0], goals.copy()
        self.max_episode_steps, self.action_scale = int(max_episode_steps), float(action_scale)
        self.pos = None  # (N, 2)
        self.steps = xp.zeros(self.num_envs, dtype=np.int64)

    def reset(self, *, seed=None, options=None):
        """Every point back at the origin (the start is not random: seed is accepted and unused)."""
        self.pos = xp.zeros((self.num_envs, 2))
        self.steps[:] = 0
        return self.pos.astype(np.float32), {}

    def step(self, actions):
        """actions (N, 2) -> obs (N, 2) float32, reward (N,) float32, terminated, truncated, info."""
        actions = xp.asarray(actions, dtype=np.float64)
        if actions.shape != (self.num_envs, 2):
            raise ValueError(f"actions must have shape ({self.num_envs}, 2), got {actions.shape}")
        if self.pos is None:
            raise RuntimeError("Call reset() before step().")
        self.pos = self.pos + xp.clip(self.action_scale * actions, -NAV_MAX_SPEED, NAV_MAX_SPEED)
        d = self.pos - self.goals
        reward = -xp.sqrt((d * d).sum(axis=1))  # -||pos - goal||
        terminated = (xp.abs(d) < NAV_TOLERANCE).all(axis=1)
        self.steps += 1
        truncated = self.steps >= self.max_episode_steps
        obs = self.pos.astype(np.float32)
        done = terminated | truncated
        final_obs = obs.copy()
        self.pos[done] = 0.0
        obs[done] = 0.0
        self.steps[done] = 0
        return obs, reward.astype(np.float32), terminated, truncated, {"final_obs": final_obs, "_final_obs": done}


def nav_envs(tasks, episodes):
    """A VecNav2D holding `episodes` copies of each task's goal, task after task."""
    return VecNav2D(repeat_tasks(tasks, episodes)["goal"])


def nav2d_family():
    """The MAML paper's 2D navigation: a Gaussian policy of 2D velocities, episodes of 100 steps."""
    return TaskFamily("nav2d", sample_nav_tasks, nav_envs, obs_dim=2, horizon=NAV_MAX_EPISODE_STEPS, action_dim=2)


# ----------------------------------------------------------------------------
# II.0.5 Gymnasium's own environments as task families: any registered env, its
#        per-task settings given to gymnasium.make or set on the env after it.
#        Gymnasium is imported only here, when one is made.
# ----------------------------------------------------------------------------
def _import_gymnasium():
    try:
        import gymnasium
    except ImportError:
        raise ImportError("this needs Gymnasium, which is not installed: pip install gymnasium") from None
    return gymnasium


def _task_value(v):  # task i's value of one key: a Python scalar where it is one, as gymnasium.make's kwargs
    return v.item() if np.ndim(v) == 0 else v


def gymnasium_family(env_id, sample_tasks, horizon=None, attributes=()):
    """A TaskFamily over a registered Gymnasium env.

      env_id: what gymnasium.make takes, e.g. "Pendulum-v1"
      sample_tasks(rng, n): n tasks, a dict of per-task arrays (TaskFamily's); task i's values are
        gymnasium.make's keyword arguments, except the keys named in `attributes`, which are set on
        the unwrapped env after it is made (physics Gymnasium exposes only so, as Pendulum's m and l)
      horizon: the most steps of an episode (None: the env's registered max_episode_steps)
    make_env(tasks, episodes) is Gymnasium's SyncVectorEnv of one gymnasium.make per episode slot,
    with same-step autoreset. A Discrete action space gives a categorical policy, a 1-D Box a
    Gaussian one (its actions clipped to the box, as Gymnasium's ClipAction clips each env's, in
    one np.clip over the batch: the policy gradient is that of the unclipped sample). Other spaces,
    an unknown env_id, a key the env does not take: one clear error. obs_scale 1 and no task
    label: dataclasses.replace(family, ...) sets them."""
    gym = _import_gymnasium()
    from gymnasium.vector import AutoresetMode, SyncVectorEnv
    if not isinstance(env_id, str):
        raise TypeError(f"env_id must be a registered Gymnasium id (a str), got {type(env_id).__name__}")
    if env_id not in gym.registry:
        raise ValueError(f"env_id {env_id!r} is not registered with Gymnasium (gymnasium.pprint_registry() lists "
                         "those that are)")
    if not callable(sample_tasks):
        raise TypeError("sample_tasks must be callable: sample_tasks(rng, n) -> dict of per-task arrays")
    if isinstance(attributes, str) or not all(isinstance(a, str) for a in attributes):
        raise TypeError(f"attributes must be a sequence of key names (str), got {attributes!r}")
    attributes = tuple(attributes)
    horizon = gym.spec(env_id).max_episode_steps if horizon is None else horizon
    if horizon is None:
        raise ValueError(f"{env_id} registers no max_episode_steps: give horizon=, the most steps of an episode")
    _check_int_at_least("horizon", horizon, 1)

    def make(task):  # one env of one task: make's keyword arguments, then the attributes
        kwargs = {k: _task_value(v) for k, v in task.items() if k not in attributes}
        try:
            env = gym.make(env_id, max_episode_steps=horizon, **kwargs)
        except TypeError as e:
            raise ValueError(f"gymnasium.make({env_id!r}) does not take the task's keys {sorted(kwargs)} ({e}); "
                             "name those set on the env after it in attributes=") from None
        for name in attributes:
            if not hasattr(env.unwrapped, name):
                raise ValueError(f"{env_id} has no attribute {name!r} to set (attributes=)")
            setattr(env.unwrapped, name, _task_value(task[name]))
        return env

    def make_env(tasks, episodes):
        if xp is not np:
            raise ValueError(f"{env_id} is a Gymnasium env, stepped with NumPy: it needs the CPU backend (--device cpu)")
        slots = repeat_tasks(tasks, episodes)
        makers = [functools.partial(make, {k: v[i] for k, v in slots.items()}) for i in range(task_count(slots))]
        env = SyncVectorEnv(makers, autoreset_mode=AutoresetMode.SAME_STEP)
        space = env.single_action_space  # every env's, as SyncVectorEnv checks
        if isinstance(space, gym.spaces.Box):  # a Gaussian's actions clipped to the box, all envs in one call
            env = gym.wrappers.vector.TransformAction(env, lambda action: np.clip(action, space.low, space.high))
        _check_autoreset(env, f"gymnasium_family({env_id!r})")
        return env

    probe = make({k: np.asarray(v)[0] for k, v in sample_tasks(np.random.default_rng(0), 1).items()})
    obs_space, action_space = probe.observation_space, probe.action_space
    probe.close()
    if not isinstance(obs_space, gym.spaces.Box):
        raise TypeError(f"{env_id}'s observation space {obs_space} is not a Box: the policy reads a vector")
    if isinstance(action_space, gym.spaces.Discrete):
        if action_space.start != 0:
            raise TypeError(f"{env_id}'s action space {action_space} starts at {action_space.start}: the "
                            "categorical policy's actions are 0, ..., n - 1")
        space = dict(n_actions=int(action_space.n))
    elif isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        space = dict(action_dim=int(action_space.shape[0]))
    else:
        raise TypeError(f"{env_id}'s action space {action_space} is neither Discrete (a categorical policy) nor "
                        "a 1-D Box (a Gaussian one)")
    return TaskFamily(f"gymnasium {env_id}", sample_tasks, make_env, obs_dim=int(np.prod(obs_space.shape)),
                      horizon=int(horizon), **space)


def mirrored_action(action, space):
    """The action that pushes the other way: a Discrete action a becomes start + n - 1 - (a - start),
    a Box action its mirror low + high - a (-a in a symmetric box)."""
    if hasattr(space, "n"):
        return space.start + space.n - 1 - (action - space.start)
    return space.low + space.high - action


def reversible_env(base_id, reversed=False, render_mode=None, **kwargs):
    """Gymnasium's base_id (its bare env, without make's wrappers), its actuator mirrored where
    `reversed` (mirrored_action): what register_reversible registers."""
    gym = _import_gymnasium()
    env = gym.make(base_id, render_mode=render_mode, disable_env_checker=True, **kwargs).unwrapped
    if not reversed:
        return env
    return gym.wrappers.TransformAction(env, lambda a: mirrored_action(a, env.action_space), env.action_space)


def _register(env_id, entry_point, base_id):
    """Register env_id (once), made by entry_point, with base_id's time limit and reward threshold; returns env_id."""
    gym = _import_gymnasium()
    if env_id not in gym.registry:
        spec = gym.spec(base_id)
        gym.register(env_id, entry_point=entry_point, max_episode_steps=spec.max_episode_steps,
                     reward_threshold=spec.reward_threshold)
    return env_id


def register_reversible(base_id):
    """Register "reversible/" + base_id, whose keyword argument reversed=True mirrors the actuator of
    Gymnasium's base_id (the rest go to base_id), with base_id's time limit; returns the new id."""
    return _register("reversible/" + base_id, functools.partial(reversible_env, base_id), base_id)


# CartPole's physics, which Gymnasium's CartPoleEnv takes only as attributes (its step reads the two sums too).
GYMNASIUM_CARTPOLE_ATTRIBUTES = ("gravity", "masscart", "masspole", "length", "force_mag", "tau", "total_mass",
                                 "polemass_length")


def sample_gymnasium_cartpole_tasks(rng, n):
    """cartpole.sample_tasks's reversed tasks (the same draws), for Gymnasium's own CartPole-v1: the
    actuator's sign as reversed=, force_mag its size, and the sums CartPoleEnv computes at __init__."""
    tasks = _import_cartpole().sample_tasks(rng, n, "reversed")
    tasks["reversed"] = tasks["force_mag"] < 0
    tasks["force_mag"] = np.abs(tasks["force_mag"])
    tasks["total_mass"] = tasks["masspole"] + tasks["masscart"]  # Gymnasium's order of the operands
    tasks["polemass_length"] = tasks["masspole"] * tasks["length"]
    return tasks


def gymnasium_cartpole_family():
    """The reversed CartPole family on Gymnasium's own CartPole-v1 (the actuator reversed by a
    wrapper, the physics set as attributes): the cross-check of cartpole_family("reversed")."""
    family = gymnasium_family(register_reversible("CartPole-v1"), sample_gymnasium_cartpole_tasks,
                              attributes=GYMNASIUM_CARTPOLE_ATTRIBUTES)
    return dataclasses.replace(family, name="gymnasium CartPole-v1", task_label=lambda tasks: tasks["reversed"],
                               obs_scale=CARTPOLE_OBS_SCALE)


# Pendulum-v1 (swing-up: obs [cos, sin, thetadot], torque in [-2, 2], reward -(theta^2 + 0.1 thetadot^2
# + 0.001 u^2)) with per-task mass, length and gravity, and on half the tasks the torque reversed.
# The reversed task is the task seen in a mirror (theta, thetadot, u -> -theta, -thetadot, -u leave the
# physics and the reward unchanged), so a policy even in the state, u(-s) = u(s), earns the same on both
# halves. It cannot pump energy into a mirror-symmetric swing, though: not knowing the sign costs the
# pretrained policy 259 in return (docs/results.md).
PENDULUM_RANGES = {"m": (0.5, 1.5), "l": (0.5, 1.5), "g": (8.0, 12.0)}
PENDULUM_HORIZON = 100
PENDULUM_OBS_SCALE = np.array([1.0, 1.0, 8.0])  # cos, sin, thetadot (at most 8)


def sample_pendulum_tasks(rng, n, reverse_prob=0.5):
    """n Pendulum tasks: {"m", "l", "g", "reversed"} (n,) each; g goes to make, m and l are attributes."""
    _check_rng(rng)
    _check_int_at_least("n", n, 1)
    tasks = {k: rng.uniform(low, high, size=n) for k, (low, high) in PENDULUM_RANGES.items()}
    tasks["reversed"] = rng.random(n) < reverse_prob
    return tasks


def pendulum_family(horizon=PENDULUM_HORIZON):
    """Gymnasium's Pendulum-v1 as a meta-RL family: a Gaussian policy of the torque, whose sign a
    controller odd in the state must find out, and one even in it need not (the comment above)."""
    family = gymnasium_family(register_reversible("Pendulum-v1"), sample_pendulum_tasks, horizon, ("m", "l"))
    return dataclasses.replace(family, name="gymnasium Pendulum-v1", task_label=lambda tasks: tasks["reversed"],
                               obs_scale=PENDULUM_OBS_SCALE)


# Pendulum-v1 spun one way or the other: the MAML paper's direction task (HalfCheetah run forward or
# back, sec. 5.3) on a pendulum. The reward is direction * thetadot, the angular velocity after the step
# (at most 8 either way), in place of the swing-up's cost; mass, length and gravity per task as above.
# The physics does not depend on the direction, so from the same start the same actions earn on
# direction -1 exactly minus what they earn on +1: over the two halves every fixed policy's expected
# return is 0, and only a learner that adapts earns anything.
def spinning_pendulum(direction=1.0, render_mode=None, **kwargs):
    """Gymnasium's Pendulum-v1 (its bare env) rewarded for spinning in `direction`, +1 (theta increasing,
    the way a positive torque turns it) or -1: what register_spinning registers."""
    gym = _import_gymnasium()
    env = gym.make("Pendulum-v1", render_mode=render_mode, disable_env_checker=True, **kwargs).unwrapped
    # TransformReward calls this after env.step, so env.state holds the new (theta, thetadot).
    return gym.wrappers.TransformReward(env, lambda swing_up_reward: direction * float(env.state[1]))


def register_spinning():
    """Register "spinning/Pendulum-v1", whose keyword argument direction= is spinning_pendulum's (the rest go
    to Pendulum-v1), with Pendulum-v1's time limit; returns the id."""
    return _register("spinning/Pendulum-v1", spinning_pendulum, "Pendulum-v1")


def sample_spinning_tasks(rng, n):
    """n spinning tasks, sample_pendulum_tasks's draws with the reversed half spun the other way:
    {"m", "l", "g", "direction"} (n,) each, direction -1.0 or +1.0; direction and g go to make."""
    tasks = sample_pendulum_tasks(rng, n)
    tasks["direction"] = np.where(tasks.pop("reversed"), -1.0, 1.0)
    return tasks


def spinning_pendulum_family(horizon=PENDULUM_HORIZON):
    """Gymnasium's Pendulum-v1 as a direction family: a Gaussian policy of the torque, which earns only
    where it finds which way to spin (the comment above)."""
    family = gymnasium_family(register_spinning(), sample_spinning_tasks, horizon, ("m", "l"))
    return dataclasses.replace(family, name="gymnasium Pendulum-v1, spinning",
                               task_label=lambda tasks: tasks["direction"] < 0, obs_scale=PENDULUM_OBS_SCALE)


# ============================================================================
# II.1 Gradient-based meta-RL: MAML with policy-gradient inner steps (the MAML
#      paper, sec. 5.3 and Algorithm 3), its outer step Adam on the exact
#      meta-gradient (Part I's maml_grad) or TRPO; first-order MAML and Reptile
#      on the same rollouts; beside them a policy pretrained on all tasks.
# ============================================================================
# TRPO, the MAML paper's outer step for meta-RL (sec. 5.3; Schulman et al. 2015,
# "Trust Region Policy Optimization", sec. 6 and appendix C), on the meta-objective:
#   minimise  L(theta)  = mean_t -sum_k w_k pi'_t(a_k|s_k) / pi_old,t(a_k|s_k)
#   s.t.      KL(theta) = mean_t  sum_k m_k KL(pi_old,t(.|s_k) || pi'_t(.|s_k)) <= max_kl
# over the query batch, with pi'_t the policy of theta'_t = adapt(theta) and
# pi_old,t the adapted policy of the current theta, which sampled the query. There
# grad L is MAML's meta-gradient g, and KL's Hessian is the meta-Fisher matrix
#   F = mean_t J_t^T F_t J_t,   J_t = d theta'_t / d theta,   F_t = the Fisher of pi'_t,
# a product of three exact ones: J v forwards through the inner update, F_t v by
# the Gauss-Newton product, J^T backwards as in the meta-gradient. The step is
# d = F^-1 g by conjugate gradient, scaled so that the quadratic model of the KL,
# 1/2 d^T F d, equals max_kl, then shortened until L improves within the exact KL.
class KLBatch(NamedTuple):
    """Where TRPO measures the KL: the query's states, the sampling policies' outputs there, and the
    weights of the mean over them (step_weights)."""
    x: object  # (T, K, in)
    old_out: object  # (T, K, n_out)
    weights: object  # (T, K)


def _meta_fisher(params, thetas, supports, at, loss, inner_lr, first_order, activation, damping=0.0):
    """v -> (F + damping I) v with F = mean_t J_t^T F_t J_t, the Hessian of the meta-KL at params
    (thetas: adapt's params of every inner step from params; supports: the batch of each inner step
    (_step_batches); at: a KLBatch). Per task: J v forwards, the Gauss-Newton product, J^T backwards."""
    fisher = POLICY_KL[LOSS_POLICY[loss]][1]
    caches = [loss_and_grad(theta, batch, loss, activation)[2] for theta, batch in zip(thetas[:-1], supports)]
    adaptation = Adaptation(thetas, caches, None)
    hs_q = mlp_forward(thetas[-1], at.x, activation)[1]
    slopes_q = mlp_slopes(hs_q, activation)
    m = at.weights[..., None] / at.x.shape[0]  # the mean over tasks of the weighted sum over states

    def product(v):
        u = v if first_order else _forward_inner(v, adaptation, supports, inner_lr, loss, activation)
        u = mlp_gnvp(thetas[-1], hs_q, slopes_q, u, lambda r: m * fisher(at.old_out, r))  # F_t J_t v
        if not first_order:
            u = _backprop_inner(u, adaptation, supports, inner_lr, loss, False, activation)[0]
        return [ui + damping * vi for ui, vi in zip(_sum_tasks(u, params), v)]
    return product


@dataclasses.dataclass(frozen=True)
class TrustRegion:
    """TRPO's settings, rllab's defaults (the MAML authors' code)."""
    max_kl: float = 0.01  # delta: the mean KL of the adapted policies a step may reach (the MAML paper's)
    cg_iters: int = 10  # conjugate-gradient steps on F + damping I
    damping: float = 1e-5
    backtrack: float = 0.8  # the line search shortens the step by this factor ...
    max_backtracks: int = 15  # ... at most this many times
    fisher_stride: int = 10  # the meta-Fisher on every fisher_stride-th sample (rllab's subsample_factor)


def maml_trpo_step(params, support, query, kl_weights, loss="pg", inner_lr=0.1, first_order=False,
                   activation="tanh", trust_region=TrustRegion()):
    """One TRPO step on MAML's meta-objective (the block above).

      support: the batch of the one inner step, or a list of batches, one per inner step (the j-th
        sampled by the policy after j steps; [] is plain TRPO); query: the batch the adapted policies
        sampled; batches as for maml_grad, with a policy loss ("pg", "gauss", or their "_lvc" forms)
      kl_weights (T, K_query): m_k, the weights of the KL's mean over the query's states (step_weights)
      inner_lr, activation: as maml_grad's; first_order: drop J (J = I)
      trust_region: a TrustRegion; the meta-Fisher on every fisher_stride-th sample, its weights
        scaled to match; the line search on every sample
    Returns (new params, info {"kl", "improvement" (of L), "step_fraction"}); where no step passes,
    params come back as they are, with step_fraction 0.
    Schulman et al. 2015, appendix C; Finn et al. 2017, sec. 5.3."""
    region = _check_trust_region(trust_region)
    supports = support if _is_step_list(support) else [support]
    supports, query, kl_weights = _check_trpo_args(params, supports, query, kl_weights, loss, activation, inner_lr)
    inner_lr, inner_steps = float(inner_lr), len(supports)
    x_q, (actions, weights) = query[0], query[1][:2]
    T = x_q.shape[0]
    policy = LOSS_POLICY[loss]
    logp, surrogate = POLICIES[policy][0], lvc_loss(policy)[0]  # L: the LVC surrogate's value on the query
    kl = POLICY_KL[policy][0]

    # g = MAML's meta-gradient, in _maml's three steps; the query's forward pass gives pi_old's outputs.
    adaptation = adapt(params, supports, loss, inner_lr, inner_steps, activation)
    _, v, cache = loss_and_grad(adaptation.params, query, loss, activation, scale=1.0 / T)
    old_out = cache.out  # (T, K, n_out)
    g = _sum_tasks(_backprop_inner(v, adaptation, supports, inner_lr, loss, first_order, activation)[0], params)
    target = (actions, weights, logp(old_out, actions))
    objective = lambda out: float(surrogate(out, target).sum()) / T  # L at the adapted policies of out
    mean_kl = lambda out: float((kl_weights * kl(old_out, out)).sum()) / T

    # The meta-Fisher product on every fisher_stride-th sample (weights scaled by the stride).
    s = region.fisher_stride
    thin = lambda x, target: (x[:, ::s], (target[0][:, ::s], target[1][:, ::s] * s, *(r[:, ::s] for r in target[2:])))
    thin_support = [thin(*batch) for batch in supports]
    fisher_vector = _meta_fisher(params, adaptation.thetas, thin_support,
                                 KLBatch(x_q[:, ::s], old_out[:, ::s], kl_weights[:, ::s] * s),
                                 loss, inner_lr, first_order, activation, region.damping)
    direction = conjugate_gradient(fisher_vector, g, region.cg_iters)  # F^-1 g
    quadratic = _dot(direction, fisher_vector(direction))  # d^T F d
    before = objective(old_out)
    if quadratic > 0 and math.isfinite(quadratic):
        scale = math.sqrt(2.0 * region.max_kl / quadratic)  # 1/2 (scale d)^T F (scale d) = max_kl
        for i in range(region.max_backtracks):
            fraction = region.backtrack ** i
            new = [(p - (fraction * scale) * d).astype(p.dtype) for p, d in zip(params, direction)]
            out = mlp_forward(adapt(new, supports, loss, inner_lr, inner_steps, activation).params, x_q, activation)[0]
            improvement, step_kl = before - objective(out), mean_kl(out)
            if improvement > 0 and step_kl <= region.max_kl:  # False for NaN too
                return new, {"kl": step_kl, "improvement": improvement, "step_fraction": fraction}
    return list(params), {"kl": 0.0, "improvement": 0.0, "step_fraction": 0.0}


def _check_trust_region(region):
    """The TrustRegion of maml_trpo_step, checked."""
    if not isinstance(region, TrustRegion):
        raise TypeError(f"trust_region must be a TrustRegion, got {type(region).__name__}")
    for name in ("cg_iters", "max_backtracks", "fisher_stride"):
        _check_int_at_least(name, getattr(region, name), 1)
    for name in ("max_kl", "damping", "backtrack"):
        _check_number(name, getattr(region, name))
    if region.max_kl <= 0:
        raise ValueError(f"max_kl must be > 0, got {region.max_kl!r}")
    if region.damping < 0:
        raise ValueError(f"damping must be >= 0, got {region.damping!r}")
    if not 0 < region.backtrack < 1:
        raise ValueError(f"backtrack must be in (0, 1), got {region.backtrack!r}")
    return region


def _check_trpo_args(params, supports, query, kl_weights, loss, activation, inner_lr):
    """supports (a list of batches), query and kl_weights of maml_trpo_step, checked and cast to the params' dtype."""
    if loss not in LOSS_POLICY:
        raise ValueError(f"loss must be a policy loss, one of {tuple(LOSS_POLICY)}, got {loss!r}")
    support, query = _check_meta_args(params, supports, query, loss, len(supports), activation, inner_lr)
    kl_weights, weights = xp.asarray(kl_weights, dtype=params[0].dtype), query[1][1]
    if kl_weights.shape != weights.shape or not xp.isfinite(kl_weights).all() or (kl_weights < 0).any():
        raise ValueError(f"kl_weights must be finite and >= 0, of shape {weights.shape}, got {kl_weights.shape}")
    return support, query, kl_weights


def _check_meta_rl_config(config):
    """The settings of meta_rl_train, checked: each range, and the combinations that mean nothing."""
    check_config(config)
    if config.lvc and (config.algorithm != "maml" or config.first_order):
        raise ValueError("--lvc changes only the second-order term: it needs --algorithm maml without --first-order")
    if config.inner_steps > 1 and config.algorithm not in ("maml", "lstm"):
        raise ValueError("--inner-steps above 1 is MAML's and the LSTM's: it needs --algorithm maml or lstm")
    if config.outer == "trpo" and config.algorithm != "maml":
        raise ValueError("--outer trpo steps on MAML's meta-objective: it needs --algorithm maml")
    if config.outer == "trpo" and not config.max_kl > 0:
        raise ValueError(f"--max-kl must be > 0 with --outer trpo; got {config.max_kl!r}")


def meta_rl_train(family, config, save=None, load=None):
    """Meta-train MAML (or Reptile) on a task family, and beside it a policy pretrained on all tasks.

      family: a TaskFamily; config: a MetaRLConfig; save, load: checkpoint paths (None: none)
    Each iteration: sample meta_batch tasks; run fast_batch episodes of the policy in each
    (support); take an inner policy-gradient step per task, and again inner_steps - 1 times, each
    on fast_batch fresh episodes of the policy it adapts; run fast_batch episodes of each adapted
    policy (query); step Adam on the meta-gradient, or take a TRPO step (config.outer). The
    pretrained baseline takes as many env steps on the same tasks, a plain step on all of them.
    Returns (meta params, pretrained params, extra): extra["env_steps"], and extra["curve"], rows
    [iteration, pre, post, pretrained] of mean returns, one per progress line.
    Finn et al. 2017, Algorithm 3."""
    _check_meta_rl_config(config)
    if config.algorithm not in ("maml", "reptile"):
        raise ValueError(f"meta_rl_train trains --algorithm maml or reptile, not {config.algorithm}")
    loss, act = family.loss, config.activation
    if load:
        start, rng, models, opts, extra = load_checkpoint(load, config)
    else:
        start, rng = 0, np.random.default_rng(config.seed)
        init = init_policy(family, config, rng)
        models = {"meta": init, "pretrained": [p.copy() for p in init]}
        opts = {k: adam_init(p) for k, p in models.items()} if config.outer == "adam" else {}
        extra = {"env_steps": 0, "curve": []}  # curve: [iteration, pre, post, pretrained] per progress line
    T = config.meta_batch
    roll = lambda params, env: rollout(params, env, T, rng, family.horizon, family.policy, act)
    batch = lambda episodes: pg_batch(episodes, config.gamma, config.gae_lambda)
    mean_return = lambda episodes: float(episode_returns(episodes).mean())
    progress = Progress(config.iterations, start)

    def adam(name, grads):
        models[name], opts[name] = adam_step(models[name], grads, opts[name], config.meta_lr)

    window = []
    for it in range(start, config.iterations):
        tasks = family.sample_tasks(rng, T)
        env = family.make_env(tasks, config.fast_batch)
        # The inner steps, each on fresh episodes of the policy it adapts: policies[j] sampled supports[j].
        policies, supports, rollouts = [models["meta"]], [], []
        for _ in range(config.inner_steps):
            rollouts.append(roll(policies[-1], env))
            supports.append(batch(rollouts[-1]))
            policies.append(adapt(policies[-1], supports[-1], loss, config.inner_lr, 1, act).params)
        pre, post = rollouts[0], roll(policies[-1], env)
        query = batch(post)
        meta_loss, meta_support, meta_query = loss, supports, query
        if config.lvc:  # each batch with its actions' log-probabilities under the policy that sampled it
            meta_loss = loss + "_lvc"
            meta_support = [with_old_logp(p, b, family.policy, act) for p, b in zip(policies, supports)]
            meta_query = with_old_logp(policies[-1], query, family.policy, act)
        if config.algorithm == "reptile":
            adam("meta", reptile_grad(models["meta"], supports[0], query, loss, config.inner_lr, config.reptile_steps,
                                      act)[1])
        elif config.outer == "trpo":
            models["meta"] = maml_trpo_step(models["meta"], meta_support, meta_query, step_weights(post), meta_loss,
                                            config.inner_lr, config.first_order, act, TrustRegion(config.max_kl))[0]
        else:
            adam("meta", maml_grad(models["meta"], meta_support, meta_query, meta_loss, config.inner_lr,
                                   config.inner_steps, config.first_order, act)[1])
        # The baseline: as many episodes per task, (inner_steps + 1) * fast_batch, and a plain
        # policy-gradient (or TRPO) step on all of them.
        joint = roll(models["pretrained"], family.make_env(tasks, (config.inner_steps + 1) * config.fast_batch))
        both = batch(joint)
        if config.outer == "trpo":  # plain TRPO: no inner step
            models["pretrained"] = maml_trpo_step(models["pretrained"], [], both, step_weights(joint), loss,
                                                  activation=act, trust_region=TrustRegion(config.max_kl))[0]
        else:
            adam("pretrained", maml_grad(models["pretrained"], both, both, loss, inner_steps=0, activation=act)[1])
        extra["env_steps"] += int(sum(e["mask"].sum() for e in rollouts + [post, joint]))
        window.append((mean_return(pre), mean_return(post), mean_return(joint)))
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            pre_r, post_r, joint_r = np.mean(window, axis=0)
            progress(it + 1, pre_return=pre_r, post_return=post_r, pretrained_return=joint_r)
            extra["curve"].append([it + 1, float(pre_r), float(post_r), float(joint_r)])
            window = []
            if save:
                save_checkpoint(save, config, it + 1, rng, models, opts, extra)
    return models["meta"], models["pretrained"], extra


def meta_rl_evaluate(params, family, config, tasks, rng, inner_lr, later_lr=None, steps=max(RL_EVAL_STEPS)):
    """Each task's mean return after 0, 1, ..., steps (3) policy-gradient steps from params.

      family: a TaskFamily; config: its eval_batch, eval_min_steps, gamma, gae_lambda, activation
      tasks: the family's, a dict of per-task arrays; rng: a numpy.random.Generator
      inner_lr: the first step's size; later_lr: the later steps' (None: inner_lr)
    Each step is on fresh episodes of the current policy, which also give the return at that step:
    eval_batch of them, or as many as eval_batch envs finish in eval_min_steps steps. Fewer steps
    stop early: the returns up to the last are those of all three.
    Returns {"0": (n_tasks,), ..., str(steps): (n_tasks,)}."""
    later_lr = inner_lr if later_lr is None else later_lr
    act = config.activation
    env = family.make_env(tasks, config.eval_batch)
    n_tasks = env.num_envs // config.eval_batch
    result = {}
    for s in range(steps + 1):
        episodes = (rollout_min_steps(params, env, n_tasks, rng, config.eval_min_steps, family.horizon,
                                      family.policy, act) if config.eval_min_steps else
                    rollout(params, env, n_tasks, rng, family.horizon, family.policy, act))
        result[str(s)] = mean_returns(episodes)
        if s < steps:
            batch = pg_batch(episodes, config.gamma, config.gae_lambda)
            params = adapt(params, batch, family.loss, later_lr if s else inner_lr, 1, act).params
    return result


@dataclasses.dataclass
class MetaRLConfig:
    """Gradient-based meta-RL's settings, for any TaskFamily; the defaults are CartPole's."""
    command: ClassVar[str] = "meta-rl"
    iterations: int = hparam(100, "meta-training iterations (the total, also when resuming; --algorithm protonet: "
                             "200)", 1, per_algorithm={"protonet": 200})
    meta_batch: int = hparam(20, "tasks per meta-iteration", 1, only=("maml", "reptile", "rl2", "lstm", "protonet"))
    fast_batch: int = hparam(20, "episodes per task for each inner step and for the outer step", 1,
                             only=("maml", "reptile", "lstm"))
    inner_lr: float = hparam(0.5, "alpha: step size of the inner policy-gradient step (lstm: the input gate's "
                             "start, in (0, 1))", 0.0,
                             only=("maml", "reptile", "es", "lstm"))
    inner_steps: int = hparam(1, "inner policy-gradient steps in meta-training, each on fast_batch fresh episodes "
                              "of the policy it adapts (the paper's 1; the authors' code: num_grad_updates)", 1, 5,
                              only=("maml", "reptile", "lstm"))
    meta_lr: float = hparam(0.01, "beta: Adam step size of the outer loop", above=0.0, only=("maml", "reptile", "lstm"))
    hidden: int = hparam(32, "units in each of the two hidden layers of the policy", 1)
    activation: str = hparam("tanh", "the policy's hidden layers' activation", choices=tuple(ACTIVATIONS))
    init_out_scale: float = hparam(1.0, "factor on the policy's last-layer weights at initialisation (init_mlp's "
                                   "scale times this)", 0.0, 1.0)
    init_log_std: float = hparam(0.0, "Gaussian policies only: the log-std at initialisation (rllab's 0)", -5.0, 2.0)
    gamma: float = hparam(0.99, "discount of the returns-to-go", 0.0, 1.0)
    gae_lambda: float = hparam(1.0, "GAE lambda; 1 is returns minus the baseline, as in the paper", 0.0, 1.0,
                               only=("maml", "reptile", "es", "lstm"))
    algorithm: str = hparam("maml", "the meta-learner, on the same rollouts", choices=("maml", "reptile"))
    first_order: bool = hparam(False, "first-order MAML: drop the second-order term (lstm: the paper's, the "
                               "learner's gradient an input that does not depend on its params)", only=("maml", "lstm"))
    lvc: bool = hparam(False, "second-order MAML only: ProMP's LVC surrogate for the inner step, whose Hessian "
                       "keeps the term of the pre-update sampling distribution", only=("maml",))
    reptile_steps: int = hparam(3, "Reptile only: SGD steps on each task's pre- and post-update episodes", 1, 20,
                                only=("reptile",))
    outer: str = hparam("adam", "MAML's outer step: Adam on the meta-gradient (meta_lr), or TRPO on the meta-objective "
                        "(max_kl), as in the MAML paper; the pretrained baseline takes the same", choices=("adam", "trpo"),
                        only=("maml",))
    max_kl: float = hparam(0.01, "TRPO only: the trust region, the mean KL of the adapted policies per step (the "
                           "paper's 0.01)", above=0.0, only=("maml",))
    eval_tasks: int = hparam(40, "held-out tasks for the final evaluation", 2)
    val_tasks: int = hparam(20, "validation tasks, apart from the training and held-out ones, on which each model's "
                            "test-time step sizes are chosen", 1, only=("maml", "reptile"))
    baseline_lr_scale: float = hparam(1.0, "the baselines' test-time step sizes: this times RL_BASELINE_LRS (0.1, 0.3, "
                                      "1, 3), the best of them on the validation tasks", above=0.0,
                                      only=("maml", "reptile"))
    tune_first_lr: bool = hparam(False, "the meta-learned policy's first test-time step: the best of "
                                 "RL_FIRST_LR_FRACTIONS (1, 1.5, 2) times alpha on the validation tasks, by the return "
                                 "after it; off: alpha as trained (the authors' test script)", only=("maml", "reptile"))
    eval_batch: int = hparam(20, "episodes per task for each test-time step (held-out and validation tasks)", 1)
    eval_min_steps: int = hparam(0, "0: each test-time step samples eval_batch episodes per task; N > 0: as the "
                                 "authors' test script (rllab's sampler), the eval_batch envs of a task restart "
                                 "until its finished episodes hold N steps, and the return is their mean", 0,
                                 only=("maml", "reptile"))
    seed: int = hparam(0, "seed of every random draw", 0)
    log_every: int = hparam(5, "iterations between progress lines and checkpoints", 1)


# Test-time step sizes, each chosen on validation tasks. The baselines adapt with the best of
# RL_BASELINE_LRS times config.baseline_lr_scale at every step. MAML's first step is its trained
# inner_lr (with config.tune_first_lr, the best of RL_FIRST_LR_FRACTIONS of it, by the return after
# that step); its later steps use the best of RL_LATER_LR_FRACTIONS of it (the authors' test script
# halves it after the first step: with advantages normalised, a step's size does not shrink as the
# policy nears the optimum).
RL_BASELINE_LRS = (0.1, 0.3, 1.0, 3.0)
RL_FIRST_LR_FRACTIONS = (1.0, 1.5, 2.0)
RL_LATER_LR_FRACTIONS = (1.0, 0.5, 0.25)


def plot_meta_rl(plt, path, title, curve, results):
    """The meta-training curve and the adaptation bars (mean and 95% CI per step), as a PNG."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    curve = np.asarray(curve)
    for col, label in ((1, "MAML, before adaptation"), (2, "MAML, after adaptation"), (3, "pretrained")):
        left.plot(curve[:, 0], curve[:, col], label=label)
    left.set(xlabel="meta-iteration", ylabel="mean return", title="meta-training")
    left.legend()
    width = 0.8 / len(results)
    for i, (label, steps) in enumerate(results.items()):
        means, cis = zip(*steps.values())
        right.bar(np.arange(len(steps)) + i * width, means, width, yerr=cis, capsize=3, label=label)
    right.set(xticks=np.arange(len(RL_EVAL_STEPS)) + width * (len(results) - 1) / 2, xticklabels=RL_EVAL_STEPS,
              xlabel="inner policy-gradient steps on the held-out task", ylabel="mean return",
              title="adaptation on held-out tasks")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def run_meta_rl(family, config, json_path=None, save=None, load=None, plot=None, paper=None):
    """Meta-train on a TaskFamily, then the return on held-out tasks after 0-3 policy-gradient
    steps of the meta-learned policy, of one pretrained on all tasks and of a random one, each
    with test-time step sizes chosen on validation tasks; a table, the JSON and the plot.
    paper: {steps: return} to print beside ours."""
    _check_meta_rl_config(config)
    plt = _check_plot(plot)
    t0 = time.perf_counter()
    problem = family.name
    name = (f"{'first-order ' if config.first_order else ''}MAML{'+LVC' if config.lvc else ''}"
            f"{'-TRPO' if config.outer == 'trpo' else ''}" if config.algorithm == "maml" else "Reptile")
    print(f"{problem}: {name}, {config.iterations} iterations x {config.meta_batch} tasks x {config.fast_batch} "
          f"episodes, seed {config.seed}")
    meta, pretrained, extra = meta_rl_train(family, config, save, load)
    # Held-out tasks, validation tasks and the random init: streams of their own, untouched by resuming.
    tasks = family.sample_tasks(stream(config.seed, HELD_OUT_TASKS), config.eval_tasks)
    validation = family.sample_tasks(stream(config.seed, VALIDATION_TASKS), config.val_tasks)
    random_init = init_policy(family, config, stream(config.seed, RANDOM_INIT))

    def tuned(params, step_sizes, scored, first=None):
        """The step size with the best mean validation return after the steps `scored`, taken at
        every step; with `first` given, the size of the later steps, after a first step of `first`."""
        score = lambda lr, rng: -np.mean([float(r.mean()) for s, r in meta_rl_evaluate(
            params, family, config, validation, rng, lr if first is None else first, lr,
            steps=max(map(int, scored))).items() if s in scored])
        return best_step_size(score, step_sizes, stream(config.seed, VALIDATION_DRAWS))

    alpha = config.inner_lr
    first = tuned(meta, [f * alpha for f in RL_FIRST_LR_FRACTIONS], ("1",)) if config.tune_first_lr else alpha
    models = {name: (meta, first, tuned(meta, [f * alpha for f in RL_LATER_LR_FRACTIONS], ("2", "3"), first))}
    for label, params in (("pretrained", pretrained), ("random init", random_init)):
        lr = tuned(params, [config.baseline_lr_scale * lr for lr in RL_BASELINE_LRS], ("1", "2", "3"))
        models[label] = (params, lr, lr)
    results = {label: {s: mean_ci95(r) for s, r in meta_rl_evaluate(
        params, family, config, tasks, stream(config.seed, HELD_OUT_DRAWS), first, later).items()}
        for label, (params, first, later) in models.items()}
    seconds = time.perf_counter() - t0

    per_step = (f"{config.eval_min_steps} env steps ({config.eval_batch} envs)" if config.eval_min_steps else
                f"{config.eval_batch} episodes")
    print(f"\n{problem}: mean return on {config.eval_tasks} held-out tasks (+- 95% CI) after k policy-gradient "
          f"steps of {per_step} each; seed {config.seed}")
    step_sizes = lambda first, later: f"lr {first:g}" + (f", then {later:g}" if later != first else "")
    print(f"{'steps':>5}" + "".join(f"  {f'{label} ({step_sizes(*models[label][1:])})':>26}" for label in results)
          + ("  MAML (paper)" if paper else ""))
    for s in map(str, RL_EVAL_STEPS):
        print(f"{s:>5}" + "".join(f"  {results[label][s][0]:16.2f} +- {results[label][s][1]:6.2f}" for label in results)
              + (f"  {paper[s]:12.2f}" if paper else ""))
    print(f"({extra['env_steps']:,} training env steps; {seconds:.0f} s)")
    ours, base, rand = (results[k] for k in (name, "pretrained", "random init"))
    result = {}
    result["return"], result["return_ci95"] = means_and_cis(ours)
    result["pretrained_return"], result["pretrained_return_ci95"] = means_and_cis(base)
    result["random_init_return"], result["random_init_return_ci95"] = means_and_cis(rand)
    result.update(adaptation="policy-gradient steps",
                  baseline_lr={"pretrained": models["pretrained"][1], "random init": models["random init"][1]},
                  first_lr=models[name][1], later_lr=models[name][2],
                  env_steps=extra["env_steps"], seconds=seconds, config=dataclasses.asdict(config))
    if json_path:
        write_json(json_path, result)
    if plt is not None:
        plot_meta_rl(plt, plot, f"{problem}: {name}, seed {config.seed}", extra["curve"], results)
        print(f"plot written to {plot}")
    return result


# ============================================================================
# II.2 Memory-based meta-RL: RL^2 (Duan et al. 2016, "RL^2: Fast reinforcement
#      learning via slow reinforcement learning"). A recurrent policy whose
#      hidden state carries what it has learned of the task: the GRU's memory
#      is the learner, and nothing is learned at test time.
# ============================================================================
# The GRU (Cho et al. 2014), with backprop through time, batched over sequences.
# Params [Wx (in, 3H), Wh (H, 3H), b (3H,), Wo (H, n_out), bo (n_out,)], the three gates side by side [z, r, n]:
#   z_t = sigmoid(x_t Wx_z + h_{t-1} Wh_z + b_z)              update gate
#   r_t = sigmoid(x_t Wx_r + h_{t-1} Wh_r + b_r)              reset gate
#   n_t = tanh(x_t Wx_n + r_t * (h_{t-1} Wh_n) + b_n)         candidate (PyTorch's form: r scales h Wh_n)
#   h_t = (1 - z_t) * n_t + z_t * h_{t-1},    out_t = h_t Wo + bo
# x (N, K, in): N sequences (RL^2: trials) of K steps, from the hidden states h0 (N, H).
def init_gru(n_in, hidden, n_out, rng, dtype=np.float32):
    """Params of a GRU with a linear output layer: uniform in +-1/sqrt(hidden) (PyTorch's GRU default);
    the output layer as init_mlp's."""
    _check_rng(rng)
    bound = 1.0 / math.sqrt(hidden)
    gru = [rng.uniform(-bound, bound, size=shape).astype(dtype) for shape in ((n_in, 3 * hidden), (hidden, 3 * hidden),
                                                                            (3 * hidden,))]
    return [xp.asarray(p) for p in gru] + init_mlp((hidden, n_out), rng, dtype=dtype)


def sigmoid(z):
    return 0.5 * (xp.tanh(0.5 * z) + 1.0)  # 1 / (1 + e^-z), without overflow


def gru_step(params, a, h):
    """One step of every sequence: a = x_t Wx + b (N, 3H), h = h_{t-1} (N, H) -> h_t and the gates
    (z, r, n, h_{t-1} Wh_n) that the backward pass needs."""
    _, Wh, _, _, _ = params
    H = h.shape[-1]
    g = h @ Wh  # (N, 3H)
    z = sigmoid(a[:, :H] + g[:, :H])
    r = sigmoid(a[:, H:2 * H] + g[:, H:2 * H])
    n = xp.tanh(a[:, 2 * H:] + r * g[:, 2 * H:])
    return (1.0 - z) * n + z * h, (z, r, n, g[:, 2 * H:])


def gru_forward(params, x, h0):
    """out (N, K, n_out) and the cache (hs (N, K + 1, H) with hs[:, 0] = h0, each step's gates)."""
    Wx, _, b, Wo, bo = params
    a = x @ Wx + b  # (N, K, 3H): the inputs' part of every gate, one product
    hs, gates = [h0], []
    for t in range(x.shape[1]):
        h, gate = gru_step(params, a[:, t], hs[-1])
        hs.append(h)
        gates.append(gate)
    hs = xp.stack(hs, axis=1)
    return hs[:, 1:] @ Wo + bo, (hs, gates)


def gru_backward(params, x, cache, d_out):
    """Backprop through time, given d_out = dL/d out (N, K, n_out) (0 where a step is masked out).
    Returns grads [dWx, dWh, db, dWo, dbo], dL/dh0 (N, H) and dL/dx (N, K, in)."""
    Wx, Wh, _, Wo, _ = params
    hs, gates = cache
    N, K, H = hs.shape[0], x.shape[1], hs.shape[-1]
    flat = lambda a: a.reshape(-1, a.shape[-1])
    d_hs = d_out @ _T(Wo)  # (N, K, H): dL/dh_t through the output layer
    d_a, d_g = xp.empty((N, K, 3 * H), x.dtype), xp.empty((N, K, 3 * H), x.dtype)
    dh = xp.zeros((N, H), x.dtype)  # dL/dh_t through the later steps
    for t in reversed(range(K)):
        z, r, n, gn = gates[t]
        dh = dh + d_hs[:, t]
        dn = dh * (1.0 - z) * (1.0 - n * n)  # through h_t = (1 - z) n + z h_{t-1}, then n = tanh(.)
        dz = dh * (hs[:, t] - n) * z * (1.0 - z)  # through z = sigmoid(.)
        dr = dn * gn * r * (1.0 - r)  # through r = sigmoid(.), inside n
        d_a[:, t] = xp.concatenate([dz, dr, dn], axis=-1)  # dL/d(x_t Wx + b)
        d_g[:, t] = xp.concatenate([dz, dr, dn * r], axis=-1)  # dL/d(h_{t-1} Wh)
        dh = dh * z + d_g[:, t] @ _T(Wh)  # dL/dh_{t-1}
    grads = [_T(flat(x)) @ flat(d_a), _T(flat(hs[:, :-1])) @ flat(d_g), d_a.sum(axis=(0, 1)),
             _T(flat(hs[:, 1:])) @ flat(d_out), d_out.sum(axis=(0, 1))]
    return grads, dh, d_a @ _T(Wx)


# RL^2's trials.
# Each env runs one trial: `episodes` episodes of its task, the env restarting itself between
# them and the hidden state carried across (reset only where the trial starts). The input at each
# step is [observation, previous action one-hot, previous reward, done], the last three 0 where
# the trial starts and done 1 where a new episode of the trial starts. Nothing is learned at test
# time: what adapts is the hidden state.
def rl2_inputs(obs, prev_action, prev_reward, done, n_actions):
    """The GRU's input at one step of every trial: (N, obs_dim + n_actions + 2)."""
    one_hot = prev_action[:, None] == xp.arange(n_actions)
    return xp.concatenate([obs, one_hot, prev_reward[:, None], done[:, None]], axis=1)


def run_trials(env, rng, episodes, max_steps, act, dtype=np.float32):
    """One trial of `episodes` episodes in each of env's N environments, by any learner that acts.

      env: the batched API of cartpole.VecCartPole, one trial per env; rng: a numpy.random.Generator;
        max_steps: ValueError past this many steps
      act(obs, prev_action, prev_reward, done, draws) -> (record, action): the learner's step in every
        env, given the observation (N, obs_dim), the previous action and reward (0 where the trial
        starts) and done (True where a new episode of the trial starts: obs is its first); record, a
        tuple of (N, ...) arrays the learner keeps of the step; draws, the actions' random stream
    Returns (the records, each stacked to (N, K, ...); {"actions" (N, K), "rewards" (N, K),
    "episode" (N, K): the episode of the trial each step belongs to, "mask" (N, K): the steps inside
    the trial}), K the longest trial's steps."""
    _check_rng(rng)
    _check_int_at_least("episodes", episodes, 1)
    _check_autoreset(env, "a trial (run_trials)")
    N = env.num_envs
    obs, _ = env.reset(seed=int(rng.integers(2 ** 63)))
    draws = device_rng(rng)
    action, reward = xp.zeros(N, dtype=np.int64), xp.zeros(N, dtype)
    done, finished = xp.zeros(N, dtype=bool), xp.zeros(N, dtype=np.int64)  # episodes each env has finished
    steps = []
    while (finished < episodes).any():
        if len(steps) == max_steps:
            raise ValueError(f"a trial of {episodes} episodes ran past max_steps ({max_steps})")
        record, action = act(obs, action, reward, done, draws)
        obs, reward, terminated, truncated, _ = env.step(action)
        reward, done = reward.astype(dtype), terminated | truncated
        steps.append(record + (action, reward, finished))
        finished = finished + done
    *records, actions, rewards, episode = (xp.stack(a, axis=1) for a in zip(*steps))
    mask = episode < episodes
    return records, {"actions": actions, "rewards": rewards * mask, "episode": episode, "mask": mask}


def rollout_trials(params, env, rng, episodes, max_steps, obs_scale=1.0, n_actions=None):
    """One trial of `episodes` episodes in each of env's N environments, by a GRU policy (run_trials).

      params: [Wx, Wh, b, Wo, bo] (init_gru); env, rng, episodes, max_steps: as run_trials's
      obs_scale: the observations enter divided by it (a number, or one per variable)
      n_actions: the first n_actions outputs are the action logits (None: all of them; a task
        logit may come after them)
    Returns {"x" (N, K, in): the GRU's inputs, and run_trials's "actions", "rewards", "episode",
    "mask"}, K the longest trial's steps."""
    Wx, Wh, b, Wo, bo = params
    n_actions, scale = n_actions or bo.shape[-1], xp.asarray(obs_scale)
    h = [xp.zeros((env.num_envs, Wh.shape[0]), Wx.dtype)]  # the hidden state, carried across the trial

    def act(obs, action, reward, done, draws):
        x = rl2_inputs(obs / scale, action, reward, done, n_actions).astype(Wx.dtype)
        h[0], _ = gru_step(params, x @ Wx + b, h[0])
        return (x,), sample_actions((h[0] @ Wo + bo)[:, :n_actions], draws)  # (N,)

    (x,), trials = run_trials(env, rng, episodes, max_steps, act, Wx.dtype)
    return {"x": x, **trials}


def trial_returns(trials, episodes):
    """The return of each episode of each trial: (N, episodes)."""
    at = trials["episode"][..., None] == xp.arange(episodes)  # (N, K, episodes)
    return (trials["rewards"][..., None] * at).sum(axis=1)


def ppo_surrogate(out, actions, advantages, old_logp, weights, clip=0.2):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) of a categorical policy, and its gradient in out:
      L = -sum_k w_k min(rho_k A_k, clip(rho_k, 1 - eps, 1 + eps) A_k),   rho_k = pi(a_k | s_k) / pi_old(a_k | s_k)
      dL/dlog pi_k = -w_k rho_k A_k where the first term is the smaller (the clip does not bind), else 0."""
    rho = xp.exp(categorical_logp(out, actions) - old_logp)
    unclipped, clipped = rho * advantages, xp.clip(rho, 1.0 - clip, 1.0 + clip) * advantages
    d_logp = -weights * unclipped * (unclipped <= clipped)
    return float(-(weights * xp.minimum(unclipped, clipped)).sum()), d_logp[..., None] * categorical_score(out, actions)


def rl2_loss(out, actions, advantages, old_logp, weights, clip=0.2, entropy=0.0, task_labels=None, task_loss=0.0):
    """RL^2's loss on the GRU's outputs out (N, K, n_out), and its gradient in out: PPO's surrogate of the
    action logits, minus entropy times the policy's entropy, and, with task_labels (N,) (1 where the trial's
    task is of the second kind: here, the actuator reversed), task_loss times the binary cross-entropy of the
    last output, a logit of the label, at every step (Humplik et al. 2019, "Meta reinforcement learning as
    task inference"): it teaches the memory to find out the task. The labels are used in training only."""
    n_actions = out.shape[-1] - (task_labels is not None)
    logits = out[..., :n_actions]
    loss, d_logits = ppo_surrogate(logits, actions, advantages, old_logp, weights, clip)
    if entropy:  # - entropy sum_k w_k H_k, H = -sum_a p log p:  d/d logits = entropy w p (log p + H)
        logp = log_softmax(logits)
        p = xp.exp(logp)
        plogp = (p * logp).sum(-1, keepdims=True)  # -H
        loss += entropy * float((weights * plogp[..., 0]).sum())
        d_logits = d_logits + entropy * weights[..., None] * p * (logp - plogp)
    if task_labels is None:
        return loss, d_logits
    # + task_loss sum_k w_k BCE(sigmoid(u_k), y),  BCE = softplus(u) - y u:  d/du = task_loss w (sigmoid(u) - y)
    u, y = out[..., n_actions], task_labels[:, None]
    loss += task_loss * float((weights * (xp.logaddexp(0.0, u) - y * u)).sum())
    d_task = task_loss * weights * (sigmoid(u) - y)
    return loss, xp.concatenate([d_logits, d_task[..., None]], axis=-1)


@dataclasses.dataclass(frozen=True)
class PPO:
    """PPO's settings for RL^2 (Schulman et al. 2017; CleanRL's defaults where the paper gives none)."""
    lr: float = 2e-3  # Adam's step size
    gamma: float = 0.99  # discount
    lam: float = 0.95  # GAE lambda over each whole trial
    clip: float = 0.2  # the clip of the probability ratio
    epochs: int = 4  # passes over each batch of trials
    minibatches: int = 4  # groups of trials per pass, an Adam step each
    entropy: float = 0.0  # the weight of the policy's entropy
    max_norm: Optional[float] = None  # the gradient's norm clipped to this (None or 0: no clip)
    task_loss: float = 0.0  # the weight of the task-inference loss (rl2_loss)
    trial_mean: bool = False  # the loss a mean over trials of each trial's mean over its steps (ppo_weights)


def ppo_weights(mask, trial_mean=False):
    """The weight of each step of a group of trials (n, K) in PPO's loss, summing to 1: the mean over
    all the group's steps or, with trial_mean, the mean over trials of each trial's mean over its
    steps (a trial weighs the same however long its episodes ran)."""
    if trial_mean:
        return mask / (mask.sum(axis=1, keepdims=True) * mask.shape[0])
    return mask / mask.sum()


def ppo_step(params, state, trials, obs, ppo, rng, forward, backward, task_labels=None):
    """PPO on a batch of trials, for any policy network: RL^2's GRU, or an MLP.

      params: the network's; state: their Adam state; trials: {"x" (N, K, in), the network's
        inputs, and run_trials's "actions", "rewards", "mask"}; obs (N, K, obs_dim): the observations
        within x, the baseline's features; ppo: a PPO of settings; rng: the minibatches' draws
      forward(params, x) -> (out (n, K, n_out), cache); backward(params, x, cache, d_out) -> grads
      task_labels (N,): each trial's task label, whose logit is the network's last output (rl2_loss)
    Advantages by GAE(lam) over each whole trial (its episodes are steps of one meta-episode), from
    the linear feature baseline fit to all trials, then normalised; then `epochs` passes over the
    trials in `minibatches` random groups, an Adam step on rl2_loss for each.
    Returns (new params, new Adam state). Schulman et al. 2017, eq. 7 and Algorithm 1."""
    x, mask, rewards = trials["x"], trials["mask"], trials["rewards"]
    n_actions = params[-1].shape[-1] - (task_labels is not None)
    returns = discounted_returns(rewards[None], ppo.gamma)  # (1, N, K): one pooled fit, trials its episodes
    adv = advantages(rewards[None], fit_baseline(obs[None], returns, mask[None]), mask[None], ppo.gamma, ppo.lam)[0]
    n = mask.sum()
    mean = (adv * mask).sum() / n
    adv = (adv - mean) / (xp.sqrt((((adv - mean) * mask) ** 2).sum() / n) + 1e-8)
    adv, N = adv.astype(x.dtype), x.shape[0]
    old_logp = categorical_logp(forward(params, x)[0][..., :n_actions], trials["actions"])
    for _ in range(ppo.epochs):
        for group in np.array_split(rng.permutation(N), ppo.minibatches):
            g = xp.asarray(group)
            weights = ppo_weights(mask[g], ppo.trial_mean).astype(x.dtype)
            out, cache = forward(params, x[g])
            _, d_out = rl2_loss(out, trials["actions"][g], adv[g], old_logp[g], weights, ppo.clip, ppo.entropy,
                                None if task_labels is None else task_labels[g], ppo.task_loss)
            grads = clip_norm([backward(params, x[g], cache, d_out.astype(x.dtype))], ppo.max_norm)[0]
            params, state = adam_step(params, grads, state, ppo.lr)
    return params, state


def rl2_step(params, state, trials, ppo, rng, task_labels=None):
    """PPO on a batch of trials (ppo_step): the RL^2 update of the GRU, a forward pass and BPTT over
    each group's trials from a zero hidden state.

      params: [Wx, Wh, b, Wo, bo]; state: their Adam state; trials: rollout_trials's dict
      ppo: a PPO of settings; rng: the minibatches' draws
      task_labels (N,): each trial's task label, whose logit is the GRU's last output (rl2_loss)
    Returns (new params, new Adam state). Duan et al. 2016, sec. 3; Schulman et al. 2017, eq. 7."""
    x, H = trials["x"], params[1].shape[0]
    n_actions = params[-1].shape[-1] - (task_labels is not None)
    obs = x[..., :x.shape[-1] - n_actions - 2]  # the observations within [obs, action one-hot, reward, done]
    forward = lambda p, xs: gru_forward(p, xs, xp.zeros((xs.shape[0], H), xs.dtype))
    backward = lambda p, xs, cache, d_out: gru_backward(p, xs, cache, d_out)[0]
    return ppo_step(params, state, trials, obs, ppo, rng, forward, backward, task_labels)


def rl2_task_loss(family, config):
    """The weight of the task-inference loss: config.rl2_task_loss, or 0 where the family has no task_label."""
    return config.rl2_task_loss if family.task_label is not None else 0.0


def rl2_init(family, config, rng):
    """The GRU of RL^2 on a family: inputs [observation, previous action one-hot, previous reward, done],
    outputs the action logits and, where the task-inference loss is on, the task logit."""
    n_in = family.obs_dim + family.n_actions + 2
    return init_gru(n_in, config.hidden, family.n_actions + (rl2_task_loss(family, config) > 0), rng)


def _check_rl2_family(family, name="RL^2"):
    if family.n_actions is None:
        raise ValueError(f"{name} here has a categorical policy: the family {family.name!r} has continuous actions "
                         f"(action_dim={family.action_dim}), and needs n_actions")


def rl2_train(family, config, save=None, load=None):
    """Meta-train RL^2 on a task family with n_actions.

      family: a TaskFamily; config: an RL2Config; save, load: checkpoint paths (None: none)
    Each iteration: rl2_trials trials of trial_episodes episodes on each of meta_batch new tasks,
    the hidden state carried across a trial's episodes, then PPO (rl2_step).
    Returns (params [Wx, Wh, b, Wo, bo], extra): extra["env_steps"], and extra["curve"], rows
    [iteration, mean return of the trials' first episode, of their second].
    Duan et al. 2016, Algorithm 1."""
    check_config(config)
    _check_rl2_family(family)
    task_loss = rl2_task_loss(family, config)
    if config.rl2_task_loss and not task_loss:
        print(f"rl2: the family {family.name!r} has no task_label, so the task-inference loss is off")
    if load:
        start, rng, models, opts, extra = load_checkpoint(load, config)
    else:
        start, rng = 0, np.random.default_rng(config.seed)
        Wx, Wh, b, Wo, bo = rl2_init(family, config, rng)
        models = {"meta": [Wx, Wh, b, Wo * config.init_out_scale, bo]}
        opts, extra = {"meta": adam_init(models["meta"])}, {"env_steps": 0, "curve": []}
    ppo = PPO(config.rl2_lr, config.gamma, config.ppo_lambda, config.ppo_clip, config.ppo_epochs,
              config.ppo_minibatches, config.ppo_entropy, config.ppo_max_norm, task_loss)
    progress, window = Progress(config.iterations, start), []
    for it in range(start, config.iterations):
        tasks = family.sample_tasks(rng, config.meta_batch)
        trials = rollout_trials(models["meta"], family.make_env(tasks, config.rl2_trials), rng, config.trial_episodes,
                                family.horizon * config.trial_episodes, family.obs_scale, family.n_actions)
        labels = None
        if task_loss:  # each trial's task's label, as make_env lays the trials out
            labels = np.repeat(np.asarray(family.task_label(tasks)), config.rl2_trials)
            labels = xp.asarray(labels.astype(models["meta"][0].dtype))
        with _diverging(it + 1, "--rl2-lr"):  # a diverging step stops in one line, here or just below
            models["meta"], opts["meta"] = rl2_step(models["meta"], opts["meta"], trials, ppo, rng, labels)
        _check_finite_policy(models["meta"], it + 1, "--rl2-lr")
        extra["env_steps"] += int(trials["mask"].sum())
        window.append(to_host(trial_returns(trials, config.trial_episodes).mean(axis=0))[:2])
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            first, second = np.mean(window, axis=0) if config.trial_episodes > 1 else (np.mean(window), np.nan)
            progress(it + 1, episode_1_return=first, episode_2_return=second)
            extra["curve"].append([it + 1, float(first), float(second)])
            window = []
            if save:
                save_checkpoint(save, config, it + 1, rng, models, opts, extra)
    return models["meta"], extra


def rl2_evaluate(params, family, config, tasks, rng):
    """Each task's mean return in episodes 1-4 of its trials: nothing is learned at test time.

      family: a TaskFamily; config: its eval_batch (trials per task) and trial_episodes (the trials
        hold max(4, trial_episodes) episodes); tasks: the family's; rng: a numpy.random.Generator
    Returns {"0": (n_tasks,), ..., "3": (n_tasks,)}, "k" the (k + 1)-th episode, whose hidden state
    has seen k."""
    episodes = max(4, config.trial_episodes)
    env = family.make_env(tasks, config.eval_batch)
    trials = rollout_trials(params, env, rng, episodes, family.horizon * episodes, family.obs_scale, family.n_actions)
    returns = trial_returns(trials, episodes).reshape(-1, config.eval_batch, episodes).mean(axis=1)
    return {str(k): returns[:, k] for k in RL_EVAL_STEPS}


@dataclasses.dataclass
class RL2Config(MetaRLConfig):
    """RL^2's settings, for any TaskFamily with n_actions: MetaRLConfig's shared ones (iterations,
    meta_batch, hidden, gamma, the evaluation's), and PPO's."""
    command: ClassVar[str] = "rl2"
    trial_episodes: int = hparam(2, "RL^2 and protonet: episodes per trial in training, the memory (GRU's hidden "
                                 "state, running prototype) carried across them (evaluation: trials of max(4, "
                                 "this))", 1, 10, only=("rl2", "protonet"))
    rl2_trials: int = hparam(5, "RL^2 and protonet: trials per task in each iteration", 1, only=("rl2", "protonet"))
    rl2_lr: float = hparam(2e-3, "RL^2 and protonet: Adam step size of PPO", above=0.0, only=("rl2", "protonet"))
    rl2_task_loss: float = hparam(1.0, "RL^2 only: weight of the task-inference loss, a GRU output trained to tell "
                                  "whether the actuator is reversed, so that the memory finds it out in the first "
                                  "episode (the label is used in training only; 0: plain RL^2)", 0.0, only=("rl2",))
    ppo_epochs: int = hparam(4, "RL^2 and protonet: PPO's passes over each batch of trials", 1,
                             only=("rl2", "protonet"))
    ppo_minibatches: int = hparam(4, "RL^2 and protonet: groups of trials per pass, an Adam step each", 1,
                                  only=("rl2", "protonet"))
    ppo_clip: float = hparam(0.2, "RL^2 and protonet: PPO's clip of the probability ratio", 0.0, 1.0,
                             only=("rl2", "protonet"))
    ppo_lambda: float = hparam(0.95, "RL^2 and protonet: GAE lambda over each whole trial", 0.0, 1.0,
                               only=("rl2", "protonet"))
    ppo_entropy: float = hparam(0.01, "RL^2 and protonet: weight of the policy's entropy in PPO's loss", 0.0,
                                only=("rl2", "protonet"))
    ppo_max_norm: float = hparam(0.5, "RL^2 and protonet: the gradient's norm is clipped to this (0: no clip)", 0.0,
                                 only=("rl2", "protonet"))


# ============================================================================
# II.3 Evolutionary meta-RL: ES-MAML (Song et al. 2020, "ES-MAML: Simple
#      Hessian-free meta learning"): evolution strategies on the
#      meta-objective, with a zero-order adaptation.
# ============================================================================
# The meta-objective is J(theta) = E_task f(U(theta, task)): f the mean return of a policy, U an
# adaptation operator that only evaluates policies. Its Gaussian smoothing is estimated by
# antithetic pairs theta +- sigma eps_i (Salimans et al. 2017), each candidate's fitness its return
# after adaptation, ranked; Adam steps on the estimate. Every candidate's envs are one batch, every
# candidate's policy one slice of per-policy params (a leading axis), so a generation is a few
# batched rollouts. Nothing is backpropagated through U.
def centred_ranks(x):
    """Fitness shaping: the ranks of x (any shape) scaled to [-0.5, 0.5], ties broken by order."""
    ranks = xp.empty(x.size)
    ranks[xp.argsort(x.ravel())] = xp.arange(x.size)
    return (ranks / max(x.size - 1, 1) - 0.5).reshape(x.shape)


def es_gradient(fitness, noise, sigma):
    """The antithetic estimate of the gradient of E f(theta + sigma eps), eps ~ N(0, I):
      g = 1 / (2 n sigma) sum_i (f(theta + sigma eps_i) - f(theta - sigma eps_i)) eps_i
    fitness (2, n): f at theta + sigma eps_i, then at theta - sigma eps_i; noise: [(n, *p.shape)] per
    parameter array. Returns the estimate, a list shaped as the params."""
    weights = (fitness[0] - fitness[1]) / (2.0 * fitness.shape[1] * sigma)  # (n,)
    return [xp.tensordot(weights, eps, axes=1) for eps in noise]


def perturbed(params, noise, sigma):
    """The 2 n policies theta + sigma eps_i (i < n), then theta - sigma eps_i: per-policy params (2 n, ...);
    params shared, or per policy with the same leading axis as noise."""
    return [xp.concatenate([p + sigma * eps, p - sigma * eps]) for p, eps in zip(params, noise)]


def policy_returns(params, family, tasks, episodes, rng, activation="tanh"):
    """The mean return of each policy (params with a leading axis P) on its task (tasks: P tasks of the
    family), over `episodes` episodes each: (P,), and the env steps taken."""
    P = params[0].shape[0]
    batch = rollout(params, family.make_env(tasks, episodes), P, rng, family.horizon, family.policy, activation)
    return mean_returns(batch), int(batch["mask"].sum())


def hill_climb(params, family, tasks, rng, perturbations, sigma, episodes, only_last=None, activation="tanh"):
    """One round of ES-MAML's hill-climbing adaptation: per policy (leading axis P) and its task, the best
    by return of the policy itself and `perturbations` Gaussian perturbations of it (sigma each), of its
    last `only_last` param arrays (None: all of them). Returns the chosen params (P, ...) and the env steps."""
    P, first = params[0].shape[0], len(params) - (only_last or len(params))
    noise = [xp.asarray(rng.standard_normal((perturbations,) + p.shape).astype(p.dtype)) for p in params[first:]]
    candidates = [xp.broadcast_to(p, (perturbations + 1,) + p.shape) for p in params[:first]] + [
        xp.concatenate([p[None], p[None] + sigma * eps]) for p, eps in zip(params[first:], noise)]
    candidates = [c.reshape((-1,) + c.shape[2:]) for c in candidates]  # (1 + perturbations) P policies, in turn
    each = tile_tasks(tasks, perturbations + 1)  # the tasks stay on the host
    returns, steps = policy_returns(candidates, family, each, episodes, rng, activation)
    best = returns.reshape(perturbations + 1, P).argmax(axis=0)  # (P,)
    return [c.reshape((perturbations + 1, P) + c.shape[1:])[best, xp.arange(P)] for c in candidates], steps


HEAD = 2  # the policy's head, its last layer: the last two arrays [W, b] of an MLP's params


def es_init(family, config, rng):
    """The params ES-MAML meta-learns: the policy's, less its head where adaptation changes that alone."""
    params = init_policy(family, config, rng)
    return params[:-HEAD] if config.es_adapt_params == "head" else params


def es_policies(meta, family, config):
    """The policies ES-MAML adapts, per policy (leading axis P): the meta-learned params, and, where adaptation
    changes the head alone, a head of zeros, so that every task starts from the same policy (uniform, or a
    Gaussian of mean 0 and log-std 0)."""
    if config.es_adapt_params == "all":
        return meta
    P, H, dtype = meta[0].shape[0], meta[-2].shape[-1], meta[0].dtype  # H: the width of the last hidden layer
    return meta + [xp.zeros((P, H, family.n_out - family.bias_outputs), dtype), xp.zeros((P, family.n_out), dtype)]


def es_adapt(params, family, config, tasks, rng):
    """ES-MAML's adaptation operator, on per-policy params (leading axis P) and their tasks: es_adapt_rounds
    rounds of hill climbing (zero-order), or MAML's policy-gradient step; of the head alone where
    es_adapt_params is "head". Returns the adapted params and the env steps taken."""
    head = config.es_adapt_params == "head"
    if config.es_adaptation == "hill":
        steps = 0
        for _ in range(config.es_adapt_rounds):
            params, taken = hill_climb(params, family, tasks, rng, config.es_perturbations, config.es_adapt_sigma,
                                       config.es_episodes, HEAD if head else None, config.activation)
            steps += taken
        return params, steps
    P = params[0].shape[0]
    episodes = rollout(params, family.make_env(tasks, config.es_episodes), P, rng, family.horizon, family.policy,
                       config.activation)
    adapted = adapt(params, pg_batch(episodes, config.gamma, config.gae_lambda), family.loss, config.inner_lr, 1,
                    config.activation).params
    return (params[:-HEAD] + adapted[-HEAD:] if head else adapted), int(episodes["mask"].sum())


def es_train(family, config, save=None, load=None):
    """Meta-train ES-MAML on a task family.

      family: a TaskFamily; config: an ESConfig; save, load: checkpoint paths (None: none)
    Each generation: es_population antithetic pairs of candidates theta +- sigma eps, each adapted
    (es_adapt) and evaluated on the same es_tasks new tasks; fitness, the mean return after
    adaptation, ranked; an Adam step up the ES gradient.
    Returns (params, less the head where es_adapt_params is "head"; extra): extra["env_steps"], and
    extra["curve"], rows [iteration, mean return before adaptation, after it].
    Song et al. 2020, Algorithms 1 and 3."""
    check_config(config)
    if load:
        start, rng, models, opts, extra = load_checkpoint(load, config)
    else:
        start, rng = 0, np.random.default_rng(config.seed)
        models = {"meta": es_init(family, config, rng)}
        opts, extra = {"meta": adam_init(models["meta"])}, {"env_steps": 0, "curve": []}
    progress, window = Progress(config.iterations, start), []
    n, m = config.es_population, config.es_tasks
    returns = lambda policies, tasks: policy_returns(policies, family, tasks, config.es_episodes, rng,
                                                     config.activation)
    for it in range(start, config.iterations):
        tasks = family.sample_tasks(rng, m)
        noise = [xp.asarray(rng.standard_normal((n,) + p.shape).astype(p.dtype)) for p in models["meta"]]
        policies = es_policies([xp.repeat(c, m, axis=0) for c in perturbed(models["meta"], noise, config.es_sigma)],
                               family, config)  # (2 n m, ...)
        each = tile_tasks(tasks, 2 * n)  # candidate after candidate, its m tasks
        before, steps_before = returns(policies, each)
        adapted, steps_adapt = es_adapt(policies, family, config, each, rng)
        after, steps_after = returns(adapted, each)
        fitness = after.reshape(2 * n, m).mean(axis=1)  # the meta-objective of each candidate
        grads = es_gradient(centred_ranks(fitness).reshape(2, n), noise, config.es_sigma)
        with _diverging(it + 1, "--es-lr"):  # a diverging step stops in one line, here or just below
            models["meta"], opts["meta"] = adam_step(models["meta"], [-g for g in grads], opts["meta"], config.es_lr)
        _check_finite_policy(models["meta"], it + 1, "--es-lr")
        extra["env_steps"] += steps_before + steps_adapt + steps_after
        window.append((float(before.mean()), float(after.mean())))
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            pre, post = np.mean(window, axis=0)
            progress(it + 1, pre_return=pre, post_return=post)
            extra["curve"].append([it + 1, float(pre), float(post)])
            window = []
            if save:
                save_checkpoint(save, config, it + 1, rng, models, opts, extra)
    return models["meta"], extra


def es_evaluate(params, family, config, tasks, rng):
    """Each task's mean return before adaptation and after 1, 2 and 3 applications of es_adapt.

      params: es_train's; family: a TaskFamily; config: its eval_batch (episodes per task) and the
        adaptation's settings; tasks: the family's; rng: a numpy.random.Generator
    Returns {"0": (n_tasks,), ..., "3": (n_tasks,)}, each step on fresh episodes."""
    n_tasks = task_count(tasks)
    policies = es_policies([xp.broadcast_to(p, (n_tasks,) + p.shape).copy() for p in params], family, config)
    result = {}
    for s in RL_EVAL_STEPS:
        if s:
            policies = es_adapt(policies, family, config, tasks, rng)[0]
        result[str(s)] = policy_returns(policies, family, tasks, config.eval_batch, rng, config.activation)[0]
    return result


@dataclasses.dataclass
class ESConfig(MetaRLConfig):
    """ES-MAML's settings, for any TaskFamily: MetaRLConfig's shared ones (iterations, hidden, the
    evaluation's; inner_lr for the policy-gradient adaptation), and the search's."""
    command: ClassVar[str] = "es"
    es_population: int = hparam(8, "ES only: antithetic pairs of candidates per generation (an iteration)", 1,
                                only=("es",))
    es_sigma: float = hparam(0.1, "ES only: the standard deviation of the candidates' Gaussian perturbations",
                             above=0.0, only=("es",))
    es_lr: float = hparam(0.1, "ES only: Adam step size on the ES gradient", above=0.0, only=("es",))
    es_tasks: int = hparam(4, "ES only: tasks each candidate is evaluated on, the same for all candidates", 1,
                           only=("es",))
    es_episodes: int = hparam(2, "ES only: episodes per evaluation of a policy on a task", 1, only=("es",))
    es_adaptation: str = hparam("hill", "ES only: the adaptation operator: hill climbing, the best of the policy and "
                                "es_perturbations Gaussian perturbations by their returns (zero-order, as in ES-MAML), "
                                "or pg, MAML's policy-gradient step (inner_lr, on es_episodes episodes)",
                                choices=("hill", "pg"), only=("es",))
    es_adapt_params: str = hparam("head", "ES only: what adaptation changes: head, the last layer alone, which every "
                                  "task starts at zero, so that the layers below it are what is meta-learned (as "
                                  "ANIL); or all, every weight, from the meta-learned ones (as the ES-MAML paper; "
                                  "it finds one polarity only)", choices=("head", "all"), only=("es",))
    es_perturbations: int = hparam(16, "ES only: hill climbing's perturbations per round", 1, only=("es",))
    es_adapt_rounds: int = hparam(2, "ES only: hill climbing's rounds per adaptation step, each from the last "
                                  "round's best", 1, only=("es",))
    es_adapt_sigma: float = hparam(0.5, "ES only: the standard deviation of hill climbing's perturbations",
                                   above=0.0, only=("es",))


# ============================================================================
# II.4 Value-based learning with a meta-learned start: Q-learning with linear
#      features (Watkins 1989; Sutton & Barto 2018, eq. 6.8 and sec. 9.3), a
#      table as one-hot features, a kernel as its explicit feature map, each
#      from zero and from a start meta-learned by Reptile across tasks.
#      Batched: B envs, each with its own weights.
# ============================================================================


# The box the kernels scale states to [-1, 1] by: x, x_dot, theta, theta_dot.
Q_STATE_LOW = np.array([-2.4, -3.0, -0.21, -3.5])
Q_STATE_HIGH = -Q_STATE_LOW
# The box the table's bins divide: the classic tabular CartPole agent's (x and theta at
# the termination bounds, x_dot within 0.5 m/s, theta_dot within 50 degrees/s).
TABLE_LOW = np.array([-2.4, -0.5, -0.21, -math.radians(50)])
TABLE_HIGH = -TABLE_LOW


def _in_box(obs, low, high):
    """obs (B, n) as fractions of the box [low, high]: 0 at low, 1 at high, float64."""
    return (xp.asarray(obs, dtype=np.float64) - xp.asarray(low)) / xp.asarray(high - low)


def discretize(obs, bins, low=TABLE_LOW, high=TABLE_HIGH):
    """The table row of each state: obs (B, n) -> (B,) int. Each variable i
    gets bins[i] equal bins on [low_i, high_i]; values outside go to the end
    bins; a variable with 1 bin is ignored. Rows are C-order indices:
    row = sum_i idx_i prod_{j > i} bins_j."""
    bins = tuple(bins)
    for b in bins:
        _check_int_at_least("bins", b, 1)
    if len(bins) != obs.shape[-1]:
        raise ValueError(f"bins must give one count per state variable ({obs.shape[-1]}), got {bins}")
    counts = xp.asarray(bins, dtype=np.float64)
    idx = xp.minimum(xp.maximum(xp.floor(_in_box(obs, low, high) * counts), 0.0), counts - 1.0)  # (B, n)
    strides = np.cumprod((bins[1:] + (1,))[::-1])[::-1]  # prod_{j > i} bins_j
    return (idx @ xp.asarray(strides, dtype=np.float64)).astype(np.int64)


def _scaled(obs, low, high):
    """obs (B, n) scaled to [-1, 1] on the box [low, high], and clipped into it: a state outside the
    box counts as on its edge, as the table's end bins count it, so no feature grows without bound
    (a cube) or vanishes (a Gaussian far from every centre, whose normalised step would then blow up)."""
    return xp.clip(2.0 * _in_box(obs, low, high) - 1.0, -1.0, 1.0)


def _compositions(total, parts):
    """All tuples of `parts` non-negative integers that sum to `total`."""
    if parts == 1:
        return [(total,)]
    return [(first,) + rest for first in range(total + 1) for rest in _compositions(total - first, parts - 1)]


@functools.lru_cache(maxsize=None)
def _poly_terms(degree, n_vars, c, module):
    """sqrt of the multinomial coefficients (F,) and the powers k_1..k_n (F, n_vars) of
    poly_features, computed once per kernel and backend (no copy from the host per call)."""
    k = np.array(_compositions(degree, n_vars + 1))  # (F, n + 1): k_0, k_1, ..., k_n
    coef = np.array([math.factorial(degree) / math.prod(math.factorial(int(ki)) for ki in row) for row in k])
    return module.asarray(np.sqrt(coef * c ** k[:, 0])), module.asarray(k[:, 1:])


def poly_features(obs, degree, c=1.0, low=Q_STATE_LOW, high=Q_STATE_HIGH):
    """The explicit feature map of the polynomial kernel K(s, s') = (c + s.s')^d
    on states scaled to [-1, 1] (_scaled): phi(s).phi(s') = K(s, s'). By the multinomial
    theorem, phi_k(s) = sqrt(d! / (k_0! ... k_n!) c^k_0) prod_i s_i^k_i over all
    k_0 + ... + k_n = d: C(n + d, d) features. obs (B, n) -> (B, F)."""
    _check_int_at_least("degree", degree, 1)
    if not c >= 0:
        raise ValueError(f"c must be >= 0, got {c!r}")
    s = _scaled(obs, low, high)  # (B, n)
    root_coef, powers = _poly_terms(degree, s.shape[-1], float(c), xp)
    ones = xp.ones(s.shape + (1,))
    s_pow = xp.cumprod(xp.concatenate([ones, xp.repeat(s[:, :, None], degree, axis=2)], axis=2), axis=2)  # s_i^0..s_i^d
    return root_coef * xp.prod(s_pow[:, xp.arange(s.shape[-1]), powers], axis=-1)  # (B, F): prod_i s_i^k_i


@functools.lru_cache(maxsize=None)
def _rbf_centres(per_dim, n_vars, module):
    """The grid of per_dim^n_vars centres in [-1, 1]^n_vars, made once per grid and backend."""
    axis = np.linspace(-1.0, 1.0, per_dim)
    return module.asarray(np.stack(np.meshgrid(*[axis] * n_vars, indexing="ij"), axis=-1).reshape(-1, n_vars))


def rbf_features(obs, per_dim=4, width=0.4, low=Q_STATE_LOW, high=Q_STATE_HIGH):
    """Gaussian (RBF) features exp(-|s - c_j|^2 / (2 width^2)) on a grid of per_dim^n centres c_j
    in [-1, 1]^n, states scaled to [-1, 1] (_scaled). obs (B, n) -> (B, per_dim^n). Their kernel is
      phi(s).phi(s') = exp(-|s - s'|^2 / (4 width^2)) sum_j exp(-|(s + s')/2 - c_j|^2 / width^2),
    a Gaussian of width sqrt(2) width wherever the grid is dense around (s + s') / 2."""
    _check_int_at_least("per_dim", per_dim, 1)
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    s = _scaled(obs, low, high)  # (B, n)
    centres = _rbf_centres(per_dim, s.shape[-1], xp)  # (C, n)
    d2 = (s * s).sum(axis=1, keepdims=True) - 2.0 * s @ centres.T + (centres * centres).sum(axis=1)  # |s - c|^2
    return xp.exp(-xp.maximum(d2, 0.0) / (2.0 * width ** 2))  # (B, C)


def block_features(featurizers, learner_of_env):
    """One feature map for a batch whose envs learn with different maps: env b's features are
    those of featurizers[learner_of_env[b]] (a table's rows made one-hot), in that map's own block
    of columns, zero elsewhere. So one q_learn runs every learner side by side, and each env's
    update touches its own block alone (for one-hot features it is the tabular rule exactly).
    featurizers: [(featurize, n_features)]; the returned map takes obs whose rows are the
    envs in order, repeated (q_learn passes two rows a env)."""
    which = np.asarray(learner_of_env)
    ends = np.cumsum([n for _, n in featurizers])

    @functools.lru_cache(maxsize=None)
    def rows_of(n_rows):  # each learner's rows among n_rows, made once per count
        learner = np.tile(which, n_rows // which.size)
        return [xp.asarray(np.nonzero(learner == l)[0]) for l in range(len(featurizers))]

    def featurize(obs):
        phi = xp.zeros((obs.shape[0], int(ends[-1])))
        for (f, n), rows, end in zip(featurizers, rows_of(obs.shape[0]), ends):
            block = f(obs[rows])
            phi[rows, end - n:end] = (block[:, None] == xp.arange(n)) if block.ndim == 1 else block
        return phi
    return featurize


def log_decay(episode, floor, decay=25.0):
    """The classic CartPole schedule: max(floor, min(1, 1 - log10((episode + 1) / decay)))."""
    return xp.maximum(floor, xp.minimum(1.0, 1.0 - xp.log10((episode + 1.0) / decay)))


class _OneEnv:
    """A single env with Gymnasium's API (CartPoleEnv, gymnasium.make(...)) seen as
    a batch of one with same-step autoreset, so q_learn takes either, by duck typing."""

    def __init__(self, env):
        self.env, self.num_envs = env, 1

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed)
        return xp.asarray(obs)[None], info

    def step(self, actions):
        obs, reward, terminated, truncated, _ = self.env.step(int(actions[0]))
        final = xp.asarray(obs)[None]
        if terminated or truncated:
            obs, _ = self.env.reset()
        return (xp.asarray(obs)[None], xp.array([reward], dtype=np.float64), xp.array([terminated]),
                xp.array([truncated]), {"final_obs": final})


@dataclasses.dataclass(frozen=True)
class QSchedule:
    """Q-learning's step size and exploration, each log_decay(episode, floor, decay), and its discount."""
    alpha_min: float = 0.1  # the step size's floor, in (0, 1]
    epsilon_min: float = 0.01  # the exploration rate's floor, in [0, 1]
    decay: float = 25.0  # the episodes scale of both decays, > 0
    gamma: float = 0.99  # the discount, in [0, 1]


def q_learn(env, weights, featurize, rng, episodes, schedule=QSchedule(), start_episode=0, action_gap=0.0):
    """Q-learning with Q(s, a) = phi(s) . w_a, in each env of a batched env (or one env).

      env: a batched env (or one Gymnasium env), B envs; weights (B, F, A): copied, not modified
      featurize: obs (B, n) -> (B,) table rows (ints) or (B, F) features; rng: a numpy.random.Generator
      episodes: each env learns until it has finished this many
      schedule: a QSchedule; alpha and epsilon follow log_decay of the env's episode count, from
        start_episode (an int, or one per env)
      action_gap in [0, 1) (a number, or one per env): advantage learning, whose fixed point keeps
        the best action's value and lowers the others', their gap grown by 1 / (1 - action_gap)
    The semi-gradient update
      w_a <- w_a + alpha (r + gamma max_a' Q(s', a') - Q(s, a) - action_gap (max_b Q(s, b) - Q(s, a))) phi(s)
    is the tabular rule when phi is one-hot and action_gap 0; no bootstrap past termination, but
    through truncation; for features other than one-hot, alpha is divided by |phi(s)|^2, which
    keeps the step stable.
    Returns (weights (B, F, A), returns (B, episodes)).
    Watkins 1989; Sutton & Barto 2018, eq. 6.8 and sec. 9.5; Bellemare et al. 2016, eq. 4."""
    alpha_min, epsilon_min, decay, gamma = schedule.alpha_min, schedule.epsilon_min, schedule.decay, schedule.gamma
    if not 0.0 < alpha_min <= 1.0:
        raise ValueError(f"alpha_min must be in (0, 1], got {alpha_min!r}")
    _check_interval("gamma", gamma, 0.0, 1.0)
    _check_interval("epsilon_min", epsilon_min, 0.0, 1.0)
    _check_number("decay", decay)
    if not decay > 0:
        raise ValueError(f"decay must be > 0, got {decay!r}")
    _check_int_at_least("episodes", episodes, 1)
    gap = xp.asarray(action_gap, dtype=np.float64)
    gap_range = to_host(xp.stack([gap.min(), gap.max()]))
    if not (gap_range[0] >= 0.0 and gap_range[1] < 1.0):
        raise ValueError(f"action_gap must be in [0, 1) (a number, or one per env), got {action_gap!r}")
    env = env if hasattr(env, "num_envs") else _OneEnv(env)
    if weights.ndim != 3 or weights.shape[0] != env.num_envs:
        raise ValueError(f"weights must have shape (num_envs, F, A) = ({env.num_envs}, F, A), got {weights.shape}")
    B, A = env.num_envs, weights.shape[-1]
    space = getattr(env, "single_action_space", getattr(env, "action_space", None))
    if getattr(space, "n", A) != A:
        raise ValueError(f"weights must have one column per action of the env ({int(space.n)}), got {A}")
    W, rows = weights.copy(), xp.arange(B)
    obs, _ = env.reset(seed=int(rng.integers(2 ** 63)))
    draws = device_rng(rng)
    phi = featurize(obs)
    tabular = phi.dtype.kind in "iu"
    F = weights.shape[1]
    if tabular and int(phi.max()) >= F:
        raise ValueError(f"weights must have a row for each table row featurize gives (at least "
                         f"{int(phi.max()) + 1}), got shape {weights.shape}")
    if not tabular and phi.shape != (B, F):
        raise ValueError(f"weights must have one row per feature of featurize ({phi.shape[-1]}), got shape "
                         f"{weights.shape}")

    def q_values(phi):  # (B, A): phi_b . w_b,a, as (B, 1, F) @ (B, F, A) (einsum is several times slower)
        return W[rows, phi] if tabular else (phi[:, None, :] @ W)[:, 0, :]
    # The schedules, per env and episode count (the last column for an env that has finished)
    counts = xp.broadcast_to(xp.arange(episodes + 1) + xp.reshape(xp.asarray(start_episode), (-1, 1)),
                             (B, episodes + 1))
    alphas, epsilons = log_decay(counts, alpha_min, decay), log_decay(counts, epsilon_min, decay)
    alphas[:, -1] = 0.0  # no more learning once an env has finished its episodes
    episode, running = xp.zeros(B, dtype=np.int64), xp.zeros(B)
    returns = xp.zeros((B, episodes + 1))  # the last column takes the episodes of envs that have finished
    while (episode < episodes).any():
        col = xp.minimum(episode, episodes)
        alpha, epsilon = alphas[rows, col], epsilons[rows, col]
        q = q_values(phi)
        u = draws.random((B, 2))  # explore?, and which random action
        a = xp.where(u[:, 0] < epsilon, (u[:, 1] * A).astype(np.int64), q.argmax(axis=1))
        obs, reward, terminated, truncated, info = env.step(a)
        done = terminated | truncated
        # phi(s') of this step, and phi of the next step's state (after an end, the next episode's first)
        both = featurize(xp.concatenate([xp.where(done[:, None], info["final_obs"], obs), obs]))
        phi_next, phi_after = both[:B], both[B:]
        td = reward + gamma * ~terminated * q_values(phi_next).max(axis=1) - q[rows, a]
        if gap_range[1] > 0:  # advantage learning: less action_gap times a's gap to the best action
            td = td - gap * (q.max(axis=1) - q[rows, a])
        if tabular:
            W[rows, phi, a] += alpha * td
        else:  # the step scaled by 1 / |phi|^2, which is 1 for one-hot features (Sutton & Barto, sec. 9.5)
            W[rows, :, a] += (alpha * td / (phi * phi).sum(axis=1))[:, None] * phi
        running += reward
        returns[rows, col] = xp.where(done, running, returns[rows, col])
        episode += done
        running[done] = 0.0
        phi = phi_after
    return W, returns[:, :-1]


def episodes_to_solve(returns, threshold=475.0, window=100):
    """Per run, the first episode (1-based) at which the mean return of the
    last `window` episodes reaches threshold (CartPole-v1's criterion); inf if never."""
    _check_int_at_least("window", window, 1)
    if returns.shape[-1] < window:
        raise ValueError(f"window ({window}) must not exceed the episodes per run ({returns.shape[-1]})")
    csum = xp.cumsum(returns, axis=-1)
    means = (csum[..., window - 1:] - xp.concatenate([xp.zeros(returns.shape[:-1] + (1,)),
                                                       csum[..., :-window]], axis=-1)) / window
    solved = means >= threshold
    return xp.where(solved.any(axis=-1), solved.argmax(axis=-1) + window, np.inf)


# Q-learning on CartPole-v1 tasks: from zero, and from a start meta-learned by Reptile across training
# tasks; beside the table, the two kernels.
@dataclasses.dataclass
class QLearnConfig:
    """Tabular and kernel Q-learning on CartPole tasks, each from zero and from a meta-learned start."""
    command: ClassVar[str] = "qlearn"
    bins: str = hparam("1,1,6,3", "table bins for x, x_dot, theta, theta_dot (each >= 1; the classic agent's: 1,1,6,12)")
    alpha_min: float = hparam(0.1, "floor of the learning rate's log decay, in (0, 1]", 1e-9, 1.0)
    epsilon_min: float = hparam(0.0, "floor of the exploration rate's log decay, in [0, 1]", 0.0, 1.0)
    decay: float = hparam(15.0, "episodes scale of the log decay: rates fall from 1 after `decay` episodes, "
                          "and reach their floors after about 10 ** 0.9 decay", 1.0)
    gamma: float = hparam(0.99, "discount, in [0, 1]", 0.0, 1.0)
    action_gap: float = hparam(0.8, "the kernel learners' advantage learning: the TD target less this times the "
                               "gap of the action taken to the best, which keeps apart the actions' values that a "
                               "global feature map blurs (0: plain Q-learning; the table learns without it)", 0.0, 0.99)
    episodes: int = hparam(400, "episodes per learning run on a held-out task", 100)
    family: str = hparam("sunblaze", "the tasks' physics (cartpole.py)", choices=("sunblaze", "carl", "reversed"))
    eval_tasks: int = hparam(20, "held-out tasks", 1)
    seeds: int = hparam(1, "learning runs (seeds) per held-out task", 1)
    iterations: int = hparam(5, "Reptile meta-iterations (the total, also when resuming)", 1)
    meta_tasks: int = hparam(20, "training tasks per meta-iteration", 1)
    meta_episodes: int = hparam(100, "episodes of Q-learning per task in each meta-iteration", 1)
    meta_step: float = hparam(0.5, "Reptile step: init += meta_step (mean learned weights - init)", 0.0, 1.0)
    warm_start: int = hparam(150, "the episode the schedules of a learner from the meta-learned start begin at "
                             "(from 150 with decay 15: no exploration, step size at its floor)", 0)
    degree: int = hparam(3, "polynomial kernel (c + s.s')^d: the degree d", 1)
    rbf_per_dim: int = hparam(4, "RBF kernel: centres per state variable (a grid)", 1)
    rbf_width: float = hparam(0.4, "RBF kernel: the Gaussians' width, on states scaled to [-1, 1] (> 0)", 1e-6)
    seed: int = hparam(0, "seed of every random draw", 0)
    log_every: int = hparam(1, "meta-iterations between progress lines and checkpoints", 1)


def _parse_bins(text):
    try:
        bins = tuple(int(b) for b in text.split(","))
    except ValueError:
        bins = ()
    if len(bins) != 4 or min(bins) < 1:
        raise ValueError(f"--bins must be 4 integers >= 1 separated by commas, e.g. 1,1,6,12; got {text!r}")
    return bins


def run_qlearn(config, json_path=None, save=None, load=None):
    """The qlearn command: Reptile starts for every learner across training tasks of cartpole_family
    (config.family), then each learner from zero and from its start on held-out tasks; a table and the JSON."""
    check_config(config)
    bins = _parse_bins(config.bins)
    family = cartpole_family(config.family)
    schedule = QSchedule(config.alpha_min, config.epsilon_min, config.decay, config.gamma)
    t0 = time.perf_counter()
    # The learners: one q_learn, three feature maps, each given (featurize, number of features).
    learners = {"table": (lambda obs: discretize(obs, bins), math.prod(bins)),
                "poly": (lambda obs: poly_features(obs, config.degree), math.comb(4 + config.degree, 4)),
                "rbf": (lambda obs: rbf_features(obs, config.rbf_per_dim, config.rbf_width), config.rbf_per_dim ** 4)}
    kernel_names = {"poly": f"poly d={config.degree}", "rbf": f"rbf {config.rbf_per_dim}^4"}  # the JSON's keys

    def learn(members, tasks, rng, episodes):
        """Every member (learner, initial weights (F, 2), first episode) on every task, side by side
        in one batch, member after member; returns the weights and returns of each."""
        n = task_count(tasks) * config.seeds
        which = [list(learners).index(name) for name, _, _ in members for _ in range(n)]
        ends = np.cumsum([f for _, f in learners.values()])
        W0 = xp.zeros((len(which), int(ends[-1]), 2))
        for i, (name, init, _) in enumerate(members):
            l = list(learners).index(name)
            W0[i * n:(i + 1) * n, ends[l] - init.shape[0]:ends[l]] = init
        env = family.make_env(tile_tasks(tasks, len(members)), config.seeds)
        firsts = xp.repeat(xp.asarray([first for _, _, first in members]), n)
        gaps = xp.repeat(xp.asarray([0.0 if name == "table" else config.action_gap for name, _, _ in members]), n)
        W, returns = q_learn(env, W0, block_features(list(learners.values()), which), rng, episodes, schedule,
                             firsts, gaps)  # the table's rows: no blur
        blocks = {name: slice(ends[l] - f, ends[l]) for l, (name, (_, f)) in enumerate(learners.items())}
        return [(W[i * n:(i + 1) * n, blocks[name]], returns[i * n:(i + 1) * n])
                for i, (name, _, _) in enumerate(members)]

    print(f"qlearn: Q-learning with a table (bins {bins}), {kernel_names['poly']} and {kernel_names['rbf']} "
          f"features, tasks {config.family!r}; Reptile starts over {config.iterations} x {config.meta_tasks} tasks, "
          f"seed {config.seed}")
    # Reptile across training tasks (Nichol et al. 2018, Algorithm 2, batched), for every learner on the same tasks:
    #   init <- init + meta_step * (mean_b W_b - init),  W_b learned from init on task b.
    if load:
        start, rng, models, _, _ = load_checkpoint(load, config)
        if set(models) != set(learners):
            raise ValueError(f"{load} holds starts for {sorted(models)}, not for {sorted(learners)}: a checkpoint of "
                             "an older qlearn")
        inits = {name: models[name][0] for name in learners}
    else:
        start, rng = 0, np.random.default_rng(config.seed)
        inits = {name: xp.zeros((f, 2)) for name, (_, f) in learners.items()}
    progress = Progress(config.iterations, start)
    for it in range(start, config.iterations):
        tasks = family.sample_tasks(rng, config.meta_tasks)
        learned = learn([(name, inits[name], 0) for name in learners], tasks, rng, config.meta_episodes)
        for name, (W, _) in zip(learners, learned):
            inits[name] = inits[name] + config.meta_step * (W.mean(axis=0) - inits[name])
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            progress(it + 1, **{f"{name}_last_50": float(returns[:, -50:].mean())
                                for name, (_, returns) in zip(learners, learned)})
            if save:
                save_checkpoint(save, config, it + 1, rng, {name: [init] for name, init in inits.items()}, {})

    # Held-out tasks, each learned `seeds` times by every learner from zero and from its meta-learned
    # start (whose schedules begin at warm_start), all on the same tasks and draws.
    tasks = family.sample_tasks(stream(config.seed, HELD_OUT_TASKS), config.eval_tasks)
    members = [(name, init, first) for name in learners
               for init, first in ((xp.zeros_like(inits[name]), 0), (inits[name], config.warm_start))]
    curves = {(name, first > 0): returns for (name, _, first), (_, returns) in zip(
        members, learn(members, tasks, stream(config.seed, HELD_OUT_DRAWS), config.episodes))}
    seconds = time.perf_counter() - t0

    def summary(curve):  # a learner's returns (runs, episodes) -> its figures
        solve, curve = to_host(episodes_to_solve(curve)), to_host(curve)
        return {"episodes_to_solve": float(np.median(solve)), "solved_fraction": float(np.isfinite(solve).mean()),
                "mean_return_last_100": float(curve[:, -100:].mean()),
                "mean_return_first_20": float(curve[:, :20].mean())}
    stats = {key: summary(curve) for key, curve in curves.items()}
    print(f"\nqlearn: {config.eval_tasks} held-out tasks x {config.seeds} seeds, {config.episodes} episodes each; "
          f"solved = mean return of the last 100 episodes >= 475")
    print(f"{'learner':34s} {'median episodes to solve':>25} {'solved':>8} {'mean return, first 20':>22} "
          f"{'last 100':>9}")
    for (name, meta), st in stats.items():
        label = f"{'tabular' if name == 'table' else 'kernel ' + kernel_names[name]}, " + (
            "meta-learned start" if meta else "from zero")
        print(f"{label:34s} {st['episodes_to_solve']:25.0f} {st['solved_fraction']:8.0%} "
              f"{st['mean_return_first_20']:22.1f} {st['mean_return_last_100']:9.1f}")
    print(f"({seconds:.0f} s)")
    finite = lambda v: v if math.isfinite(v) else None  # JSON has no inf: unsolved medians are null
    table = {"scratch": stats["table", False], "meta": stats["table", True]}
    kernel_entry = lambda st: {k: finite(v) if k == "episodes_to_solve" else v for k, v in st.items()}
    result = {"episodes_to_solve": {k: finite(st["episodes_to_solve"]) for k, st in table.items()},
              "solved_fraction": {k: st["solved_fraction"] for k, st in table.items()},
              "mean_return_first_20": {k: st["mean_return_first_20"] for k, st in table.items()},
              "kernel": {kernel_names[name]: {**kernel_entry(stats[name, False]),
                                              "meta": kernel_entry(stats[name, True])} for name in kernel_names},
              "seconds": seconds, "config": dataclasses.asdict(config)}
    if json_path:
        write_json(json_path, result)
    return result


# ============================================================================
# II.5 Model-based meta-learning: an LSTM that learns how to update the learner
#      (Ravi & Larochelle 2017, "Optimization as a model for few-shot learning").
# ============================================================================
# The learner's parameters theta are the cell state of an LSTM, and each inner step is one step
# of it, coordinate by coordinate: one small network shared by every coordinate of theta, each
# coordinate with its own state. For the learner's loss L_t and gradient g_t = grad L_t(theta_{t-1}):
#   x_t = [pre(g_t), pre(L_t)]        pre(z) = (log|z| / p, sign z) if |z| >= e^-p, else (-1, e^p z)
#                                     (Andrychowicz et al. 2016, sec. 3.2; p = 10)
#   (h_t, c_t) = LSTM(x_t; h_{t-1}, c_{t-1})                  a first layer of H units (the paper's 20)
#   i_t = sigmoid(w_I . [h_t, theta_{t-1}, i_{t-1}] + b_I)    each coordinate's step size
#   f_t = sigmoid(w_F . [h_t, theta_{t-1}, f_{t-1}] + b_F)    each coordinate's forgetting
#   theta_t = f_t * theta_{t-1} - i_t * g_t                   (the paper's eqs. 2-4)
# With f = 1 and i = alpha it is MAML's inner step. Meta-learned: the first layer, the gates and
# the learner's start theta_0. b_F starts high (f near 1) and b_I at logit(inner_lr): the LSTM
# begins as MAML's SGD step, with a little weight decay.
#
# The meta-gradient, backwards through the unrolled steps. The paper takes g_t and L_t as inputs
# that do not depend on theta_{t-1} (first-order): the adjoint of theta_{t-1} collects
#   f_t * bar theta_t  +  the gates' paths through theta_{t-1}.
# Exactly, g_t and L_t depend on theta_{t-1} too, and it also collects
#   H_t bar g_t + bar L_t g_t,     bar g_t = -i_t * bar theta_t + the first layer's path through pre(g_t),
# one Hessian-vector product of the core per step (hvp), as MAML's.
LSTM_P = 10.0  # the preprocessing's p


def init_meta_lstm(hidden, inner_lr, rng, forget_bias=5.0, dtype=np.float32):
    """The meta-learner LSTM's params [W (4 + H, 4H), b (4H,), w_i (H + 2,), b_i (1,), w_f (H + 2,), b_f (1,)].

      hidden: H, the first layer's units; inner_lr: the step size it starts with, i = sigmoid(b_i),
        in (0, 1); forget_bias: b_f (5: f = 0.9933; the paper draws it in [4, 6])
    W, b: the first layer's gates (input, forget, output, candidate), uniform in +-1/sqrt(H) as
    PyTorch's LSTM; w_i, w_f: uniform in +-0.01, so that the gates start near their biases."""
    _check_rng(rng)
    _check_int_at_least("hidden", hidden, 1)
    _check_number("forget_bias", forget_bias)
    if not 0.0 < inner_lr < 1.0:
        raise ValueError(f"inner_lr must be in (0, 1), the input gate's range; got {inner_lr!r}")
    bound = 1.0 / math.sqrt(hidden)
    W = rng.uniform(-bound, bound, (4 + hidden, 4 * hidden))
    b = rng.uniform(-bound, bound, 4 * hidden)
    w_i, w_f = rng.uniform(-0.01, 0.01, (2, hidden + 2))
    lstm = [W, b, w_i, [math.log(inner_lr / (1.0 - inner_lr))], w_f, [forget_bias]]
    return [xp.asarray(np.asarray(p, dtype=dtype)) for p in lstm]


def flatten_params(params):
    """[(T, ...) for each array] -> (T, P): each task's params as one row of coordinates."""
    T = params[0].shape[0]
    return xp.concatenate([p.reshape(T, -1) for p in params], axis=1)


def unflatten_params(flat, shapes):
    """(T, P) -> [(T, *shape) for each shape]: flatten_params undone."""
    out, at = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[:, at:at + size].reshape((flat.shape[0],) + tuple(shape)))
        at += size
    return out


def lstm_preprocess(z, p=LSTM_P):
    """pre(z) and its derivative, each (2, ...): (log|z| / p, sign z) where |z| >= e^-p, else (-1, e^p z)."""
    small = math.exp(-p)
    big = xp.abs(z) >= small
    # log(max(|z|, e^-p)) / p is -1 below e^-p; clip(e^p z, -1, 1) is sign z above it
    value = xp.stack([xp.log(xp.maximum(xp.abs(z), small)) / p, xp.clip(z / small, -1.0, 1.0)])
    slope = xp.stack([big / (p * xp.where(big, z, 1.0)), (~big) / small])
    return value.astype(z.dtype, copy=False), slope.astype(z.dtype, copy=False)


class LearnerState(NamedTuple):
    """Each coordinate's state between inner steps: theta (T, P); the first layer's h, c (H, T, P),
    the unit axis first, so that each unit's values over the coordinates are one block of memory;
    the gates' last values i, f (T, P)."""
    theta: object
    h: object
    c: object
    i: object
    f: object


def lstm_start(params, tasks, hidden):
    """The state before the first step: theta_0 = the shared params for each of `tasks` tasks, the
    rest zero (the paper's)."""
    flat = xp.concatenate([p.reshape(-1) for p in params])
    theta = xp.broadcast_to(flat, (tasks, flat.shape[0]))
    zeros = xp.zeros((hidden, tasks, flat.shape[0]), flat.dtype)
    return LearnerState(theta, zeros, zeros, xp.zeros_like(theta), xp.zeros_like(theta))


class LSTMStep(NamedTuple):
    """What one step leaves for its backward: its state before, its inputs and gates."""
    before: LearnerState
    grad: object  # g_t (T, P)
    slopes: tuple  # pre'(g_t) (2, T, P), pre'(L_t) (2, T)
    z: object  # the first layer's input [x_t, h_{t-1}] (4 + H, T, P)
    gates: tuple  # the first layer's input, forget, output, candidate (H, T, P) each; tanh(c_t)
    after: LearnerState


def _units(u):  # (n, T, P) -> (n, T P): each unit's values over every coordinate, one row
    return u.reshape(u.shape[0], -1)


def lstm_step(lstm, state, grad, loss, p=LSTM_P):
    """One step of the meta-learner: theta_{t-1} and its gradient -> theta_t, every coordinate at once.

      lstm: init_meta_lstm's params; state: a LearnerState; grad: g_t (T, P); loss: L_t (T,)
    Returns (the LearnerState after it, the LSTMStep for its backward)."""
    W, b, w_i, b_i, w_f, b_f = lstm
    H, (T, P) = state.h.shape[0], grad.shape
    x_g, d_g = lstm_preprocess(grad, p)  # (2, T, P)
    x_l, d_l = lstm_preprocess(loss, p)  # (2, T): the task's loss, the same for each of its coordinates
    z = xp.concatenate([x_g, xp.broadcast_to(x_l[:, :, None], x_g.shape), state.h])  # (4 + H, T, P)
    a = (_T(W) @ _units(z)).reshape(4 * H, T, P) + b[:, None, None]  # W^T z + b: the four gates
    gi, gf, go, gc = sigmoid(a[:H]), sigmoid(a[H:2 * H]), sigmoid(a[2 * H:3 * H]), xp.tanh(a[3 * H:])
    c = gf * state.c + gi * gc  # the first layer's cell: an LSTM's
    tc = xp.tanh(c)
    h = go * tc  # (H, T, P)
    theta = state.theta
    gate = lambda w, bias, prev: sigmoid((w[:H] @ _units(h)).reshape(T, P) + theta * w[H] + prev * w[H + 1] + bias)
    i, f = gate(w_i, b_i, state.i), gate(w_f, b_f, state.f)  # (T, P)
    after = LearnerState(f * theta - i * grad, h, c, i, f)  # theta_t = f_t theta_{t-1} - i_t g_t
    return after, LSTMStep(state, grad, (d_g, d_l), z, (gi, gf, go, gc, tc), after)


def lstm_step_backward(lstm, step, bar):
    """The adjoints of one step's inputs from those of its outputs.

      step: lstm_step's LSTMStep; bar: a LearnerState of d meta_loss / d (each part of the state after)
    Returns (bar of the state before, grads of lstm's params, bar g_t (T, P), bar L_t (T,)): the
    exact meta-gradient adds H_t bar g_t + bar L_t g_t to bar theta_{t-1} (lstm_meta_grad)."""
    W, b, w_i, b_i, w_f, b_f = lstm
    before, after = step.before, step.after
    H, (T, P) = before.h.shape[0], step.grad.shape
    gi, gf, go, gc, tc = step.gates
    # theta_t = f theta_{t-1} - i g
    bar_f = bar.f + bar.theta * before.theta
    bar_i = bar.i - bar.theta * step.grad
    bar_g = -bar.theta * after.i
    # i = sigmoid(w_i . [h, theta, i_prev] + b_i), f likewise
    d_i, d_f = bar_i * after.i * (1.0 - after.i), bar_f * after.f * (1.0 - after.f)  # (T, P)
    gate_grads = []
    for d, prev in ((d_i, before.i), (d_f, before.f)):
        w_grad = xp.concatenate([_units(after.h) @ d.reshape(-1), xp.stack([(d * before.theta).sum(), (d * prev).sum()])])
        gate_grads += [w_grad, d.sum(keepdims=True).reshape(1)]
    bar_theta = bar.theta * after.f + d_i * w_i[H] + d_f * w_f[H]
    bar_h = bar.h + w_i[:H, None, None] * d_i + w_f[:H, None, None] * d_f  # (H, T, P)
    # the first layer: h = o tanh(c), c = f_1 c_prev + i_1 candidate
    bar_c = bar.c + bar_h * go * (1.0 - tc * tc)
    d_a = xp.concatenate([bar_c * gc * gi * (1.0 - gi), bar_c * before.c * gf * (1.0 - gf),
                          bar_h * tc * go * (1.0 - go), bar_c * gi * (1.0 - gc * gc)])  # (4H, T, P)
    grads = [_units(step.z) @ _T(_units(d_a)), _units(d_a).sum(axis=1)] + gate_grads
    bar_z = (W @ _units(d_a)).reshape(4 + H, T, P)  # [bar x (4, T, P), bar h_{t-1} (H, T, P)]
    d_g, d_l = step.slopes
    bar_g = bar_g + (bar_z[:2] * d_g).sum(axis=0)
    bar_loss = (bar_z[2:4] * d_l[:, :, None]).sum(axis=(0, 2))
    bar_before = LearnerState(bar_theta, bar_z[4:], bar_c * gf, d_i * w_i[H + 1], d_f * w_f[H + 1])
    return bar_before, grads, bar_g, bar_loss


class LSTMAdaptation(NamedTuple):
    """What the meta-learner's inner loop leaves: the LearnerState before each step and after the
    last (states[-1]), and for the meta-backward each step's LSTMStep and loss_and_grad Cache."""
    states: list
    steps: list
    caches: list
    shapes: list  # the shared params' shapes, to unflatten theta

    @property
    def params(self):
        """The adapted params, per task: [(T, ...) for each array]."""
        return unflatten_params(self.states[-1].theta, self.shapes)


def lstm_adapt(lstm, params, support, loss="mse", inner_steps=1, activation="tanh", start=None, record=True):
    """The inner loop taken by the meta-learner LSTM: inner_steps of lstm_step, each on the
    learner's gradient on its support batch.

      lstm: init_meta_lstm's; params: the shared start theta_0 [W1, b1, ...]; support: one batch
        (x (T, K, in), target) for every step, or a list of batches, one per step (as adapt's)
      start: an LSTMAdaptation to go on from (its last state), or None to start at theta_0
      record: keep each step's state, LSTMStep and Cache (False: the last state only)
    Returns an LSTMAdaptation: ``.params`` are the adapted params. Ravi & Larochelle 2017, Algorithm 1."""
    supports = _step_batches(support, inner_steps)
    shapes = [p.shape for p in params]
    if start is None:
        start = LSTMAdaptation([lstm_start(params, supports[0][0].shape[0], lstm[1].shape[0] // 4)], [], [], shapes)
    states, steps, caches = list(start.states), list(start.steps), list(start.caches)
    for batch in supports:
        losses, grads, cache = loss_and_grad(unflatten_params(states[-1].theta, shapes), batch, loss, activation)
        grad = flatten_params(grads)  # (T, P)
        state, step = lstm_step(lstm, states[-1], grad, losses.astype(grad.dtype, copy=False))
        states, steps, caches = (states + [state], steps + [step], caches + [cache]) if record else ([state], [], [])
    return LSTMAdaptation(states, steps, caches, shapes)


def lstm_meta_grad(lstm, params, support, query, loss="mse", inner_steps=1, first_order=False, activation="tanh"):
    """The meta-loss of the meta-learner LSTM and its gradients, w.r.t. the learner's start and the LSTM.

      lstm, params, support: as lstm_adapt's; query: (x, target), as maml_grad's
      first_order: the paper's, the learner's gradient and loss taken as inputs that do not depend on
        theta; else exact, through them too (one Hessian-vector product per step)
    meta_loss = mean_t L_query,t(theta_n,t), theta_n after inner_steps steps of lstm_step.
    Returns (meta_loss, grads shaped as params, grads shaped as lstm).
    Ravi & Larochelle 2017, sec. 3.2 (their first-order gradient) and the exact one."""
    support, query = _check_meta_args(params, support, query, loss, inner_steps, activation)
    _check_lstm(lstm)
    supports = _step_batches(support, inner_steps)
    run = lstm_adapt(lstm, params, supports, loss, len(supports), activation)
    T = query[0].shape[0]
    losses, v, _ = loss_and_grad(run.params, query, loss, activation, scale=1.0 / T)
    last = run.states[-1]
    bar = LearnerState(flatten_params(v), xp.zeros_like(last.h), xp.zeros_like(last.c), xp.zeros_like(last.i),
                       xp.zeros_like(last.f))
    lstm_grads = [xp.zeros_like(p) for p in lstm]
    for j in reversed(range(len(run.steps))):
        step = run.steps[j]
        bar, grads, bar_g, bar_loss = lstm_step_backward(lstm, step, bar)
        lstm_grads = [a + g.reshape(a.shape) for a, g in zip(lstm_grads, grads)]
        if not first_order:  # through g_t = grad L_t(theta_{t-1}) and L_t(theta_{t-1})
            hv = hvp(unflatten_params(step.before.theta, run.shapes), supports[j],
                     unflatten_params(bar_g, run.shapes), loss, activation, cache=run.caches[j])
            bar = bar._replace(theta=bar.theta + flatten_params(hv) + bar_loss[:, None] * step.grad)
    grads = [g[0].astype(p.dtype, copy=False) for g, p in zip(unflatten_params(bar.theta.sum(axis=0)[None], run.shapes),
                                                               params)]
    return float(losses.sum()) / T, grads, [g.astype(p.dtype, copy=False) for g, p in zip(lstm_grads, lstm)]


def _check_lstm(lstm):
    """The meta-learner's params: six arrays shaped as init_meta_lstm's, finite."""
    if not isinstance(lstm, (list, tuple)) or len(lstm) != 6:
        raise TypeError("lstm must be init_meta_lstm's list [W, b, w_i, b_i, w_f, b_f]")
    H = lstm[0].shape[-1] // 4
    shapes = [(4 + H, 4 * H), (4 * H,), (H + 2,), (1,), (H + 2,), (1,)]
    for name, p, shape in zip(("W", "b", "w_i", "b_i", "w_f", "b_f"), lstm, shapes):
        if tuple(p.shape) != shape:
            raise ValueError(f"lstm's {name} must have shape {shape} (H = {H}); got {tuple(p.shape)}")
    _check_finite([(p, "lstm") for p in lstm])


def lstm_of(config):
    """The meta-learner LSTM a run starts from: config's lstm_hidden, inner_lr and lstm_forget_bias,
    drawn from a stream of its own (the same whatever else the seed draws)."""
    return init_meta_lstm(config.lstm_hidden, config.inner_lr, stream(config.seed, LEARNER_INIT),
                          config.lstm_forget_bias)


# The meta-learner on a task family: the inner policy-gradient steps taken by the LSTM.
def lstm_init(family, config, rng):
    """(the policy's start, the meta-learner LSTM) for a family, before meta-training: the policy
    drawn from rng, the LSTM from its own stream (lstm_of)."""
    return init_policy(family, config, rng), lstm_of(config)


def _check_lstm_config(config):
    if not 0.0 < config.inner_lr < 1.0:
        raise ValueError(f"--inner-lr must be in (0, 1) with --algorithm lstm: it is the input gate's first value, "
                         f"a sigmoid; got {config.inner_lr!r}")


def lstm_rl_train(family, config, save=None, load=None):
    """Meta-train the meta-learner LSTM and the policy's start on a task family.

      family: a TaskFamily; config: an LSTMConfig; save, load: checkpoint paths (None: none)
    Each iteration, as MAML's (meta_rl_train): meta_batch tasks, fast_batch episodes of the policy
    in each for every inner step, each step taken by the LSTM on the policy-gradient loss, then
    fast_batch episodes of the adapted policies (query), and Adam on the meta-gradient of both
    (lstm_meta_grad: exact, or the paper's first-order with config.first_order).
    Returns ((policy start, lstm), extra): extra["env_steps"], and extra["curve"], rows
    [iteration, pre, post] of mean returns. Ravi & Larochelle 2017, Algorithm 1, on MAML's meta-RL."""
    _check_meta_rl_config(config)
    _check_lstm_config(config)
    loss, act = family.loss, config.activation
    if load:
        start, rng, models, opts, extra = load_checkpoint(load, config)
    else:
        start, rng = 0, np.random.default_rng(config.seed)
        models = dict(zip(("meta", "lstm"), lstm_init(family, config, rng)))
        opts, extra = {k: adam_init(p) for k, p in models.items()}, {"env_steps": 0, "curve": []}
    T = config.meta_batch
    roll = lambda params, env: rollout(params, env, T, rng, family.horizon, family.policy, act)
    batch = lambda episodes: pg_batch(episodes, config.gamma, config.gae_lambda)
    mean_return = lambda episodes: float(episode_returns(episodes).mean())
    progress, window = Progress(config.iterations, start), []
    for it in range(start, config.iterations):
        env = family.make_env(family.sample_tasks(rng, T), config.fast_batch)
        run, supports, rollouts = None, [], []
        for _ in range(config.inner_steps):  # each step on fresh episodes of the policy it adapts
            rollouts.append(roll(models["meta"] if run is None else run.params, env))
            supports.append(batch(rollouts[-1]))
            run = lstm_adapt(models["lstm"], models["meta"], supports[-1], loss, 1, act, start=run, record=False)
        post = roll(run.params, env)
        _, grads, lstm_grads = lstm_meta_grad(models["lstm"], models["meta"], supports, batch(post), loss,
                                              first_order=config.first_order, activation=act)
        grads, lstm_grads = clip_norm([grads, lstm_grads], config.lstm_max_norm)
        for name, g in (("meta", grads), ("lstm", lstm_grads)):
            models[name], opts[name] = adam_step(models[name], g, opts[name], config.meta_lr)
            _check_finite_policy(models[name], it + 1, "--meta-lr")
        extra["env_steps"] += int(sum(e["mask"].sum() for e in rollouts + [post]))
        window.append((mean_return(rollouts[0]), mean_return(post)))
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            pre_r, post_r = np.mean(window, axis=0)
            progress(it + 1, pre_return=pre_r, post_return=post_r)
            extra["curve"].append([it + 1, float(pre_r), float(post_r)])
            window = []
            if save:
                save_checkpoint(save, config, it + 1, rng, models, opts, extra)
    return (models["meta"], models["lstm"]), extra


def lstm_rl_evaluate(learner, family, config, tasks, rng):
    """Each task's mean return after 0, 1, 2 and 3 inner steps of the meta-learner LSTM, each on
    eval_batch fresh episodes of the current policy, the LSTM's state carried from step to step.

      learner: (policy start, lstm), lstm_rl_train's; family: a TaskFamily; tasks: the family's
    Returns {"0": (n_tasks,), ..., "3": (n_tasks,)}."""
    start, lstm = learner
    env = family.make_env(tasks, config.eval_batch)
    n_tasks = env.num_envs // config.eval_batch
    run, policy, result = None, start, {}
    for s in RL_EVAL_STEPS:
        episodes = rollout(policy, env, n_tasks, rng, family.horizon, family.policy, config.activation)
        result[str(s)] = mean_returns(episodes)
        if s < max(RL_EVAL_STEPS):
            run = lstm_adapt(lstm, start, pg_batch(episodes, config.gamma, config.gae_lambda), family.loss, 1,
                             config.activation, start=run, record=False)
            policy = run.params
    return result


@dataclasses.dataclass
class LSTMSettings:
    """The meta-learner LSTM's own settings, for every command that trains one."""
    lstm_hidden: int = hparam(20, "units of the meta-learner's first LSTM layer, which reads the preprocessed "
                              "gradient and loss (the paper's 20)", 1, only=("lstm",))
    lstm_forget_bias: float = hparam(5.0, "the forget gate's bias at the start: f = sigmoid(5) = 0.9933, near "
                                     "plain SGD (the paper draws it in [4, 6]); the input gate's starts at "
                                     "logit(inner_lr)", only=("lstm",))
    lstm_max_norm: float = hparam(0.25, "the meta-gradient's norm, the learner's start and the LSTM together, "
                                  "clipped to this (the authors' 0.25; 0: no clip)", 0.0, only=("lstm",))


@dataclasses.dataclass
class LSTMConfig(MetaRLConfig, LSTMSettings):
    """The meta-learner LSTM on any TaskFamily: MetaRLConfig's shared settings (meta_batch,
    fast_batch, inner_steps, meta_lr, first_order; inner_lr is the step size it starts with), and
    the LSTM's own."""
    command: ClassVar[str] = "lstm"
    algorithm: str = hparam("lstm", "the meta-learner", choices=("lstm",))


# ============================================================================
# II.6 Few-shot regression: MAML on the sinusoids of the MAML paper (sec. 5.1
#      and appendix C), beside a network pretrained on all tasks.
# ============================================================================
SINE_AMPLITUDE = (0.1, 5.0)  # A ~ U[0.1, 5]
SINE_PHASE = (0.0, math.pi)  # phase ~ U[0, pi]
SINE_X = (-5.0, 5.0)  # x ~ U[-5, 5]


def sample_sine_tasks(rng, n):
    """Amplitudes and phases of n tasks y = A sin(x - phase), each (n,)."""
    _check_rng(rng)
    _check_int_at_least("n", n, 1)
    return rng.uniform(*SINE_AMPLITUDE, size=n), rng.uniform(*SINE_PHASE, size=n)


def sample_sine_points(rng, amplitude, phase, k, dtype=np.float32):
    """k points of each task: x (T, k, 1), y (T, k, 1), drawn on the host (the same
    numbers on every device) and then made arrays of the backend."""
    x = rng.uniform(*SINE_X, size=(amplitude.shape[0], k, 1))
    y = amplitude[:, None, None] * np.sin(x - phase[:, None, None])
    return xp.asarray(x, dtype=dtype), xp.asarray(y, dtype=dtype)


def sine_train(config, save=None, load=None):
    """Meta-train MAML, Meta-SGD or the meta-learner LSTM (config.algorithm) on sinusoids and, on
    the same tasks, a network pretrained on all of them.

      config: a SineConfig; save, load: checkpoint paths (None: none)
    Returns (the meta-learned models, pretrained params): models["meta"] is the start theta_0, and
    with it models["inner_lrs"] (Meta-SGD's rates) or models["lstm"] (the LSTM's params).
    Finn et al. 2017, sec. 5.1 and Algorithm 2; Li et al. 2017; Ravi & Larochelle 2017."""
    sizes = (1, config.hidden, config.hidden, 1)
    if load:
        start, rng, models, opts, _ = load_checkpoint(load, config)
    else:
        start, rng = 0, np.random.default_rng(config.seed)
        init = init_mlp(sizes, rng, "relu")
        models = {"meta": init, "pretrained": [p.copy() for p in init]}
        if config.algorithm == "meta-sgd":  # every rate starts at inner_lr
            models["inner_lrs"] = [xp.full_like(p, config.inner_lr) for p in init]
        if config.algorithm == "lstm":
            models["lstm"] = lstm_of(config)
        opts = {k: adam_init(p) for k, p in models.items()}
    progress = Progress(config.iterations, start)

    def adam(name, grads):
        models[name], opts[name] = adam_step(models[name], grads, opts[name], config.meta_lr)

    window = []
    for it in range(start, config.iterations):
        amplitude, phase = sample_sine_tasks(rng, config.meta_batch)
        support = sample_sine_points(rng, amplitude, phase, config.shots)
        query = sample_sine_points(rng, amplitude, phase, config.shots)
        steps_and_order = config.inner_steps, config.first_order, "relu"
        if config.algorithm == "maml":
            meta_loss, grads = maml_grad(models["meta"], support, query, "mse", config.inner_lr, *steps_and_order)
        elif config.algorithm == "meta-sgd":
            meta_loss, grads, lr_grads = meta_sgd_grad(models["meta"], models["inner_lrs"], support, query, "mse",
                                                       *steps_and_order)
            adam("inner_lrs", lr_grads)
        else:
            meta_loss, grads, lstm_grads = lstm_meta_grad(models["lstm"], models["meta"], support, query, "mse",
                                                          *steps_and_order)
            grads, lstm_grads = clip_norm([grads, lstm_grads], config.lstm_max_norm)
            adam("lstm", lstm_grads)
        adam("meta", grads)
        # The baseline sees the same points, support and query alike, with no inner step.
        both = concat_batches(support, query)
        joint_loss, grads = maml_grad(models["pretrained"], both, both, "mse", inner_steps=0, activation="relu")
        adam("pretrained", grads)
        window.append((meta_loss, joint_loss))
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            post, joint = np.mean(window, axis=0)
            progress(it + 1, post_update_mse=post, pretrained_mse=joint)
            window = []
            if save:
                save_checkpoint(save, config, it + 1, rng, models, opts)
    pretrained = models.pop("pretrained")
    return models, pretrained


SINE_EVAL_STEPS = (0, 1, 5, 10)
# The MAML paper, appendix C, Table 2 (5-shot): MSE after 1, 5, 10 gradient steps.
# Meta-SGD's (Li et al. 2017, Table 1, 5-shot, one step; its MAML row there is 1.13).
SINE_PAPER_5SHOT = {"maml": {"1": 0.67, "5": 0.38, "10": 0.35}, "pretrained": {"1": 2.41, "5": 2.23, "10": 2.19},
                    "meta-sgd": {"1": 0.90}}
SINE_NAMES = {"maml": "MAML", "meta-sgd": "Meta-SGD", "lstm": "LSTM"}


# The pretrained baseline fine-tunes with the best of these step sizes, chosen on
# validation tasks (the paper tuned its step size too); MAML uses inner_lr.
SINE_BASELINE_LRS = (0.001, 0.002, 0.005, 0.01, 0.02)
SINE_LSTM_CHUNK = 100  # held-out tasks the LSTM adapts at once


def sine_evaluate(params, config, rng, inner_lr, n_tasks, lstm=None):
    """MSE on fresh query points of n_tasks new tasks after 0, 1, 5 and 10 steps on K points.

      params: the network (the start theta_0); config: its shots and eval_points; rng: the tasks'
        and points' draws; inner_lr: the SGD steps' size, or Meta-SGD's list of rates
      lstm: the meta-learner LSTM's params, whose steps are taken instead (inner_lr unused)
    Returns {"0": (mean, ci95), "1": ..., "5": ..., "10": ...}."""
    amplitude, phase = sample_sine_tasks(rng, n_tasks)
    support = sample_sine_points(rng, amplitude, phase, config.shots)
    query = sample_sine_points(rng, amplitude, phase, config.eval_points)
    if lstm is None:
        thetas = adapt(params, support, "mse", inner_lr, max(SINE_EVAL_STEPS), "relu").thetas
        return {str(s): mean_ci95(loss_and_grad(thetas[s], query, "mse", "relu")[0]) for s in SINE_EVAL_STEPS}
    losses = {s: [] for s in SINE_EVAL_STEPS}
    for at in range(0, n_tasks, SINE_LSTM_CHUNK):  # the LSTM's state is (tasks, coordinates, H): a chunk at a time
        part = lambda batch: tuple(u[at:at + SINE_LSTM_CHUNK] for u in batch)
        run = None
        for s in range(max(SINE_EVAL_STEPS) + 1):
            if s in losses:
                losses[s].append(loss_and_grad(params if run is None else run.params, part(query), "mse", "relu")[0])
            if s < max(SINE_EVAL_STEPS):
                run = lstm_adapt(lstm, params, part(support), "mse", 1, "relu", start=run, record=False)
    return {str(s): mean_ci95(xp.concatenate(v)) for s, v in losses.items()}


@dataclasses.dataclass
class SineConfig(LSTMSettings):
    """Sinusoid regression, as in the MAML paper (sec. 5.1 and appendix C), by MAML, Meta-SGD or the
    meta-learner LSTM."""
    command: ClassVar[str] = "sine"  # the command of these settings, recorded in its checkpoints
    algorithm: str = hparam("maml", "the meta-learner: maml, meta-sgd (a learned step size per parameter, Li et "
                            "al. 2017) or lstm (a learned optimiser, Ravi & Larochelle 2017)",
                            choices=("maml", "meta-sgd", "lstm"))
    lstm_hidden: int = hparam(4, "units of the meta-learner's first LSTM layer (the paper's 20 takes 23 ms an "
                              "iteration here, 4 takes 5 ms)", 1, only=("lstm",))
    shots: int = hparam(5, "K: points per task in the support set (the query set has K too)", 1)
    iterations: int = hparam(70000, "meta-training iterations (the total, also when resuming; --algorithm lstm: "
                             "30000)", 1, per_algorithm={"lstm": 30000})
    meta_batch: int = hparam(25, "tasks per meta-iteration", 1)
    inner_lr: float = hparam(0.01, "alpha: inner-loop SGD step size (meta-sgd: every rate's start; lstm: the input "
                             "gate's start, in (0, 1))", 0.0)
    inner_steps: int = hparam(1, "inner steps during meta-training", 0, 20)
    meta_lr: float = hparam(1e-3, "beta: Adam step size of the outer loop", 0.0)
    hidden: int = hparam(40, "units in each of the two hidden ReLU layers", 1)
    first_order: bool = hparam(False, "drop the second-order term (lstm: the paper's, the learner's gradient taken "
                               "as an input that does not depend on its params)")
    eval_tasks: int = hparam(600, "held-out tasks for the final evaluation", 2)
    eval_points: int = hparam(100, "fresh query points per held-out task", 1)
    seed: int = hparam(0, "seed of every random draw", 0)
    log_every: int = hparam(2000, "iterations between progress lines and checkpoints", 1)


def run_sine(config, json_path=None, save=None, load=None):
    check_config(config)
    if config.algorithm == "lstm":
        _check_lstm_config(config)
    t0 = time.perf_counter()
    name = SINE_NAMES[config.algorithm]
    print(f"sine: {config.shots}-shot sinusoid regression, {name} {'first' if config.first_order else 'second'}"
          f"-order, {config.iterations} iterations x {config.meta_batch} tasks, seed {config.seed}")
    models, pretrained = sine_train(config, save, load)
    # Evaluation streams of their own: resuming cannot change them; both models see the same tasks.
    # The baseline's step size: the lowest MSE (mean over 1, 5, 10 steps) on 100 validation tasks.
    baseline_lr = best_step_size(lambda lr, rng: np.mean([m for s, (m, _) in sine_evaluate(
        pretrained, config, rng, lr, 100).items() if s != "0"]), SINE_BASELINE_LRS,
        stream(config.seed, VALIDATION_TASKS))
    ours = sine_evaluate(models["meta"], config, stream(config.seed, HELD_OUT_TASKS),
                         models.get("inner_lrs", config.inner_lr), config.eval_tasks, models.get("lstm"))
    base = sine_evaluate(pretrained, config, stream(config.seed, HELD_OUT_TASKS), baseline_lr, config.eval_tasks)
    seconds = time.perf_counter() - t0
    paper = SINE_PAPER_5SHOT if config.shots == 5 else {}
    print(f"\n{config.shots}-shot sinusoid, MSE on {config.eval_tasks} held-out tasks (mean +- 95% CI), "
          f"{config.iterations} iterations, seed {config.seed}")
    print(f"{'steps':>5}  {name + ' (ours)':>17}  {'pretrained (ours)':>17}  {name + ' (paper)':>16}  "
          f"{'pretr. (paper)':>14}")
    for s in map(str, SINE_EVAL_STEPS):
        cite = lambda row: f"{paper[row][s]:.2f}" if s in paper.get(row, {}) else "-"
        print(f"{s:>5}  {ours[s][0]:9.3f} +- {ours[s][1]:5.3f}  {base[s][0]:9.3f} +- {base[s][1]:5.3f}  "
              f"{cite(config.algorithm):>16}  {cite('pretrained'):>14}")
    print(f"(pretrained baseline fine-tuned with step size {baseline_lr}, the best of {SINE_BASELINE_LRS} "
          f"on validation tasks; {seconds:.0f} s)")
    result = {"shots": config.shots}
    result["mse"], result["mse_ci95"] = means_and_cis(ours)
    result["pretrained_mse"], result["pretrained_mse_ci95"] = means_and_cis(base)
    result.update(pretrained_lr=baseline_lr, seconds=seconds, config=dataclasses.asdict(config))
    if json_path:
        write_json(json_path, result)
    return result


# ============================================================================
# II.7 Metric-based meta-learning: Prototypical Networks (Snell et al. 2017,
#      "Prototypical networks for few-shot learning"). An embedding in which
#      a class is the mean of its few examples: a new point belongs to the
#      nearest mean. What is meta-learned is the embedding; at test time
#      nothing is learned but the means.
# ============================================================================
# An episode: N classes (ways), K support points of each, M queries with their labels y.
#   c_k = (1/K) sum_j f(x_kj)                       the prototype of class k                  (eq. 1)
#   p(y = k | x) = softmax_k(-d(f(x), c_k)),   d(z, c) = ||z - c||^2                           (eq. 2)
# d is the squared distance, a Bregman divergence (sec. 2.3), for which the class means are the
# right prototypes; -d is then linear in f(x) up to a term the same for every class (sec. 2.4):
#   -||z - c_k||^2 = -||z||^2 + w_k . z + b_k,   w_k = 2 c_k,   b_k = -||c_k||^2.
# The loss, averaged over the T episodes of a batch:  L = -(1/T M) sum_t sum_q log p(y_q | x_q).
# Its gradient. With G = dL/d logits = (p - onehot(y)) / (T M)  (T, M, N), whose rows sum to 0:
#   dL/dz_q = sum_k G_qk * -2 (z_q - c_k) = 2 (G c)_q                    (the sum of a row of G is 0)
#   dL/dc_k = sum_q G_qk * 2 (z_q - c_k) = 2 (G^T z)_k - 2 (sum_q G_qk) c_k
#   dL/df(x_kj) = dL/dc_k / K                     every support point, through its class's mean
# then the embedding network's backward pass (mlp_backward) from these.
class Episodes(NamedTuple):
    """A batch of T few-shot episodes."""
    support: object  # (T, N, K, in): K examples of each of N classes
    query: object  # (T, M, in)
    labels: object  # (T, M) ints in [0, N): each query's class


def prototypes(z_support):
    """c_k, the mean of each class's support embeddings: (T, N, K, m) -> (T, N, m). Snell et al. eq. 1."""
    return z_support.mean(axis=2)


def proto_logits(z_query, c):
    """-||z_q - c_k||^2, each query's logit of each class: (T, M, m), (T, N, m) -> (T, M, N). Eq. 2."""
    diff = z_query[:, :, None, :] - c[:, None, :, :]  # (T, M, N, m)
    return -(diff * diff).sum(axis=-1)


def class_order_labels(n, ways, queries):
    """The labels of n episodes' queries laid out class by class, queries of each: (n, ways queries)."""
    return xp.asarray(np.repeat(np.arange(ways), queries)[None].repeat(n, axis=0))


def nearest_prototype(support, query):
    """The class of the nearest prototype (squared distance), for points in any space: the learned
    embedding's, the raw inputs' or the latent one's. support (T, N, K, m), query (T, M, m) -> (T, M)."""
    return proto_logits(query, prototypes(support)).argmax(axis=-1)


def _embed_episodes(params, episodes, activation):
    """The support and query embeddings of a batch of episodes, one forward pass, and its cache."""
    T, N, K, n_in = episodes.support.shape
    x = xp.concatenate([episodes.support.reshape(T, N * K, n_in), episodes.query], axis=1)  # (T, N K + M, in)
    out, hs = mlp_forward(params, x, activation)
    return out[:, :N * K].reshape(T, N, K, -1), out[:, N * K:], hs


def protonet_grad(params, episodes, activation="relu"):
    """The prototypical loss of an embedding network on a batch of episodes, and its gradient.

      params: the embedding MLP [W1, b1, ...], shared by the episodes; episodes: an Episodes
      activation: the MLP's
    Returns (loss, the mean over episodes and queries of -log p(y | x); grads shaped as params;
    accuracy (T,), each episode's fraction of queries whose nearest prototype is their class).
    Snell et al. 2017, eqs. 1-2 and Algorithm 1, batched over episodes."""
    _check_episodes(params, episodes)
    z_s, z_q, hs = _embed_episodes(params, episodes, activation)
    T, N, K, m = z_s.shape
    M = z_q.shape[1]
    c = prototypes(z_s)  # (T, N, m)
    logp = log_softmax(proto_logits(z_q, c))  # (T, M, N)
    one_hot = episodes.labels[..., None] == xp.arange(N)  # (T, M, N)
    loss = -float((logp * one_hot).sum()) / (T * M)
    G = (xp.exp(logp) - one_hot) / (T * M)  # dL/d logits
    d_zq = 2.0 * G @ c  # (T, M, m)
    d_c = 2.0 * (_T(G) @ z_q - G.sum(axis=1)[..., None] * c)  # (T, N, m)
    d_zs = xp.broadcast_to(d_c[:, :, None, :] / K, z_s.shape).reshape(T, N * K, m)
    grads, _ = mlp_backward(params, hs, xp.concatenate([d_zs, d_zq], axis=1).astype(z_q.dtype), activation)
    accuracy = (logp.argmax(axis=-1) == episodes.labels).mean(axis=1)
    return loss, _sum_tasks(grads, params), accuracy


def _check_episodes(params, episodes):
    _check_params(params)
    if not isinstance(episodes, Episodes):
        raise TypeError(f"episodes must be an Episodes(support, query, labels), got {type(episodes).__name__}")
    support, query, labels = episodes
    if support.ndim != 4 or query.ndim != 3 or labels.shape != query.shape[:2]:
        raise ValueError(f"episodes: support must be (T, N, K, in), query (T, M, in) and labels (T, M); got "
                         f"{support.shape}, {query.shape} and {labels.shape}")
    if support.shape[0] != query.shape[0] or not support.shape[-1] == query.shape[-1] == params[0].shape[0]:
        raise ValueError(f"episodes: support {support.shape} and query {query.shape} must have the same T and the "
                         f"network's input width {params[0].shape[0]}")
    if min(support.shape[:3]) < 1 or query.shape[1] < 1:
        raise ValueError(f"episodes: every axis of support {support.shape} and query {query.shape} must be non-empty")
    N = support.shape[1]
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= N:
        raise ValueError(f"episodes: labels must be integers in [0, {N}), the {N} classes of the support")


# The few-shot benchmark, with an oracle. Each class is a Gaussian cluster in a latent space of
# PROTO_LATENT dimensions, its mean mu ~ N(0, I) new in every episode, its points u ~ N(mu, s^2 I).
# The learner sees x = [tanh(u A + a), n]: a fixed nonlinear map into PROTO_SIGNAL dimensions
# (A, a drawn once, the same in every run), beside PROTO_NUISANCE dimensions of noise n ~ N(0, 1)
# that carry nothing of the class. The oracle sees u and takes the nearest prototype there: for
# clusters of equal, isotropic spread whose means it does not know, what an embedding that maps x
# back to u recovers (the Bayes rule, under the means' N(0, I) prior, also shrinks them towards 0
# by K / (K + s^2): bayes_accuracy). Nearest prototype on the raw x is the baseline without learning.
PROTO_LATENT = 4  # dimensions of the latent space
PROTO_SPREAD = 0.5  # s: the spread of a class around its mean
PROTO_SIGNAL = 16  # dimensions of x that the map fills
PROTO_NUISANCE = 16  # dimensions of x that are noise
PROTO_WORLD = 2017  # the seed of the map, the benchmark's own: the same in every run


def proto_world():
    """The fixed map of the benchmark: A (latent, signal) ~ N(0, 1 / latent), a ~ U[-0.5, 0.5]."""
    rng = np.random.default_rng(PROTO_WORLD)
    return rng.standard_normal((PROTO_LATENT, PROTO_SIGNAL)) / math.sqrt(PROTO_LATENT), \
        rng.uniform(-0.5, 0.5, PROTO_SIGNAL)


class FewShot(NamedTuple):
    """Episodes of the benchmark, as the learner sees them and in the latent space."""
    episodes: Episodes  # x: (T, N, K, in) and (T, N Q, in), in = PROTO_SIGNAL + PROTO_NUISANCE
    latent: Episodes  # the same points' u: (T, N, K, PROTO_LATENT) and (T, N Q, PROTO_LATENT)


def sample_few_shot(rng, n, ways, shots, queries, world, dtype=np.float32):
    """n episodes of the benchmark: ways new classes each, shots support points and queries queries
    of each class (queries in class order). world: proto_world()'s map."""
    A, a = world
    mu = rng.standard_normal((n, ways, 1, PROTO_LATENT))
    u = mu + PROTO_SPREAD * rng.standard_normal((n, ways, shots + queries, PROTO_LATENT))  # (n, N, K + Q, latent)
    x = np.concatenate([np.tanh(u @ A + a), rng.standard_normal(u.shape[:3] + (PROTO_NUISANCE,))], axis=-1)
    labels = class_order_labels(n, ways, queries)  # (n, N Q)
    split = lambda v: Episodes(xp.asarray(v[:, :, :shots]), xp.asarray(v[:, :, shots:].reshape(n, ways * queries, -1)),
                               labels)
    return FewShot(split(x.astype(dtype)), split(u))


def protonet_train(config, save=None, load=None):
    """Meta-train the embedding on the benchmark: each iteration, meta_batch new episodes of
    config.ways classes, train_shots support points and config.queries queries of each, and an
    Adam step on the prototypical loss.

      config: a ProtoNetConfig; save, load: checkpoint paths (None: none)
    Returns the embedding's params. Snell et al. 2017, Algorithm 1."""
    world = proto_world()
    if load:
        start, rng, models, opts, _ = load_checkpoint(load, config)
    else:
        start, rng = 0, np.random.default_rng(config.seed)
        models = {"embedding": init_mlp((PROTO_SIGNAL + PROTO_NUISANCE, config.hidden, config.hidden,
                                         config.embedding_dim), rng, config.activation)}
        opts = {"embedding": adam_init(models["embedding"])}
    progress, window = Progress(config.iterations, start), []
    for it in range(start, config.iterations):
        batch = sample_few_shot(rng, config.meta_batch, config.ways, config.train_shots, config.queries, world)
        loss, grads, accuracy = protonet_grad(models["embedding"], batch.episodes, config.activation)
        models["embedding"], opts["embedding"] = adam_step(models["embedding"], grads, opts["embedding"],
                                                           config.meta_lr)
        window.append((loss, float(accuracy.mean())))
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            loss, accuracy = np.mean(window, axis=0)
            progress(it + 1, loss=loss, train_accuracy=accuracy)
            window = []
            if save:
                save_checkpoint(save, config, it + 1, rng, models, opts)
    return models["embedding"]


PROTO_EVAL_SHOTS = (1, 5)


def protonet_evaluate(params, config, rng):
    """Accuracy on config.eval_episodes held-out episodes of config.ways new classes, at 1 and 5
    shots: the learned embedding's nearest prototype, the oracle's in the latent space, the Bayes
    rule's there, and the nearest prototype on the raw inputs, all on the same episodes.
    Returns {"accuracy": {"1": (mean, ci95), "5": ...}, "oracle_accuracy": ..., "bayes_accuracy": ...,
    "raw_accuracy": ...}, each a mean over episodes."""
    world, results = proto_world(), {k: {} for k in ("accuracy", "oracle_accuracy", "bayes_accuracy",
                                                     "raw_accuracy")}
    for shots in PROTO_EVAL_SHOTS:
        batch = sample_few_shot(rng, config.eval_episodes, config.ways, shots, config.queries, world)
        x, u = batch.episodes, batch.latent
        z_s, z_q, _ = _embed_episodes(params, x, config.activation)
        shrink = shots / (shots + PROTO_SPREAD ** 2)  # the posterior mean of mu, under its N(0, I) prior
        predictions = {"accuracy": nearest_prototype(z_s, z_q),
                       "oracle_accuracy": nearest_prototype(u.support, u.query),
                       "bayes_accuracy": proto_logits(u.query, shrink * prototypes(u.support)).argmax(axis=-1),
                       "raw_accuracy": nearest_prototype(x.support, x.query)}
        for key, predicted in predictions.items():
            results[key][str(shots)] = mean_ci95((predicted == x.labels).mean(axis=1))
    return results


@dataclasses.dataclass
class ProtoNetConfig:
    """Few-shot classification by Prototypical Networks (Snell et al. 2017), beside an oracle that sees
    the classes' latent space."""
    command: ClassVar[str] = "protonet"
    ways: int = hparam(5, "N: classes per episode, in training and at test", 2)
    train_shots: int = hparam(5, "K: support points of each class in training (the test takes 1 and 5)", 1)
    queries: int = hparam(15, "query points of each class per episode (the paper's 15)", 1)
    iterations: int = hparam(3000, "meta-training iterations (the total, also when resuming)", 1)
    meta_batch: int = hparam(16, "episodes per iteration", 1)
    hidden: int = hparam(64, "units in each of the embedding's two hidden layers", 1)
    embedding_dim: int = hparam(16, "the embedding's width", 1)
    activation: str = hparam("relu", "the embedding's hidden layers' activation", choices=tuple(ACTIVATIONS))
    meta_lr: float = hparam(1e-3, "Adam step size (the paper's)", above=0.0)
    eval_episodes: int = hparam(600, "held-out episodes at each number of shots (the paper's 600)", 2)
    seed: int = hparam(0, "seed of every random draw", 0)
    log_every: int = hparam(250, "iterations between progress lines and checkpoints", 1)


def run_protonet(config, json_path=None, save=None, load=None):
    """The protonet command: meta-train the embedding, then the held-out table and the JSON."""
    check_config(config)
    t0 = time.perf_counter()
    print(f"protonet: {config.ways}-way few-shot classification, {config.iterations} iterations x "
          f"{config.meta_batch} episodes, seed {config.seed}")
    params = protonet_train(config, save, load)
    results = protonet_evaluate(params, config, stream(config.seed, HELD_OUT_TASKS))
    seconds = time.perf_counter() - t0
    print(f"\n{config.ways}-way accuracy on {config.eval_episodes} held-out episodes (mean +- 95% CI), seed "
          f"{config.seed}")
    names = {"accuracy": "ProtoNet", "oracle_accuracy": "oracle (latent)", "bayes_accuracy": "Bayes (latent)",
             "raw_accuracy": "raw inputs"}
    print(f"{'shots':>5}" + "".join(f"  {name:>17}" for name in names.values()))
    for shots in map(str, PROTO_EVAL_SHOTS):
        print(f"{shots:>5}" + "".join(f"  {results[k][shots][0]:9.3f} +- {results[k][shots][1]:.3f}" for k in names))
    print(f"({seconds:.0f} s)")
    result = {}
    for key, stats in results.items():
        result[key], result[key + "_ci95"] = means_and_cis(stats)
    result.update(ways=config.ways, seconds=seconds, config=dataclasses.asdict(config))
    if json_path:
        write_json(json_path, result)
    return result


# Metric-based meta-RL. A task is a class, and its examples are the transitions (s, a, s' - s)
# seen in it. An encoder e, trained by the prototypical loss with the tasks of a batch as the
# classes, puts the transitions of one task close together; the policy pi(a | s, c_t) reads the
# task's running prototype, the mean embedding of the transitions of its trial so far:
#   c_t = (1 / n_t) sum_{i < t} e(s_i, a_i, s_{i+1} - s_i)    (c_0 = 0; n_t counts the transitions,
#                                                                 none across an episode's end)
# The policy is trained across tasks by PPO on trials, as RL^2's GRU (ppo_step), the encoder by
# the prototypical loss alone, on the transitions of the same trials. In PPO's loss each trial
# weighs the same (ppo_weights): by steps, the tasks whose episodes already run long (here, those
# whose actuator is not reversed) outweigh the others fifty to one, and the policy learns them
# alone (docs/results.md). At test time it adapts by what it sees: no gradient step, as RL^2,
# with a memory that is a mean instead of a GRU.
def transition_inputs(obs, action, next_obs, n_actions):
    """The encoder's input for a transition, [s, one-hot a, s' - s], the observations scaled:
    (N, 2 obs_dim + n_actions)."""
    one_hot = (action[:, None] == xp.arange(n_actions)).astype(obs.dtype)
    return xp.concatenate([obs, one_hot, next_obs - obs], axis=1)


def proto_rl_init(family, config, rng):
    """(policy, encoder) for a family with n_actions, before meta-training: the policy init_policy's
    of [observation, prototype], the encoder an MLP of transition_inputs with ReLU layers of
    proto_hidden units."""
    _check_rl2_family(family, "ProtoNet")
    n_in, m = 2 * family.obs_dim + family.n_actions, config.proto_embedding
    policy = init_policy(family, config, rng, extra_inputs=m)
    return policy, init_mlp((n_in, config.proto_hidden, config.proto_hidden, m), rng, "relu")


def rollout_proto_trials(learner, env, rng, episodes, max_steps, family, activation="tanh"):
    """One trial of `episodes` episodes in each of env's N environments, by the policy that reads
    the trial's running prototype (run_trials).

      learner: (policy, encoder), proto_rl_init's; env, rng, episodes, max_steps: as run_trials's
      family: the TaskFamily (its obs_scale and n_actions); activation: the policy's
    Returns {"x" (N, K, obs_dim + m): the policy's inputs [s, c_t]; "transitions" (N, K, in): each
    step's transition into it, and "seen" (N, K): where that is one (not at the trial's start or an
    episode's); and run_trials's "actions", "rewards", "episode", "mask"}."""
    policy, encoder = learner
    dtype, scale, N = policy[0].dtype, xp.asarray(family.obs_scale), env.num_envs
    memory = {"sum": xp.zeros((N, encoder[-1].shape[-1]), dtype), "count": xp.zeros((N, 1), dtype), "last": None}

    def act(obs, action, reward, done, draws):
        s = (obs / scale).astype(dtype)
        last = s if memory["last"] is None else memory["last"]
        t = transition_inputs(last, action, s, family.n_actions)  # (N, in)
        seen = ~done & (memory["last"] is not None)  # obs follows last in one episode
        memory["sum"] = memory["sum"] + mlp_forward(encoder, t[None], "relu")[0][0] * seen[:, None]
        memory["count"] = memory["count"] + seen[:, None]
        memory["last"] = s
        x = xp.concatenate([s, memory["sum"] / xp.maximum(memory["count"], 1.0)], axis=1)  # [s, c_t]
        return (x, t, seen), sample_actions(mlp_forward(policy, x[None], activation)[0][0], draws)

    (x, transitions, seen), trials = run_trials(env, rng, episodes, max_steps, act, dtype)
    return {"x": x, "transitions": transitions, "seen": seen & trials["mask"], **trials}


def transition_episodes(trials, trials_per_task, rng, ways, shots, queries, n):
    """n few-shot episodes of task identification from trials' transitions: in each, `ways` tasks
    drawn without replacement, `shots` support and `queries` query transitions of each, drawn
    without replacement from all of the task's seen transitions (in run_trials's layout, trial i
    is of task i // trials_per_task). Returns an Episodes, queries in class order."""
    seen = to_host(trials["seen"]).reshape(-1, trials_per_task * trials["seen"].shape[1])  # (tasks, steps)
    flat = trials["transitions"].reshape(seen.size, -1)
    at = [np.flatnonzero(row) + i * seen.shape[1] for i, row in enumerate(seen)]
    if min(len(a) for a in at) < shots + queries:
        raise ValueError(f"a task has {min(len(a) for a in at)} transitions, fewer than shots + queries "
                         f"({shots + queries})")
    picks = np.stack([np.stack([rng.choice(at[task], shots + queries, replace=False)
                                for task in rng.choice(len(at), ways, replace=False)]) for _ in range(n)])
    x = flat[xp.asarray(picks)]  # (n, ways, shots + queries, in)
    return Episodes(x[:, :, :shots], x[:, :, shots:].reshape(n, ways * queries, -1),
                    class_order_labels(n, ways, queries))


def _check_proto_rl_config(config):
    for name in ("meta_batch", "eval_tasks"):
        if config.proto_ways > getattr(config, name):
            raise ValueError(f"--proto-ways ({config.proto_ways}) must be at most --{name.replace('_', '-')} "
                             f"({getattr(config, name)}): each episode tells that many tasks apart")


def proto_rl_train(family, config, save=None, load=None):
    """Meta-train the prototype-reading policy and the transition encoder on a task family with n_actions.

      family: a TaskFamily; config: a ProtoRLConfig; save, load: checkpoint paths (None: none)
    Each iteration: rl2_trials trials of trial_episodes episodes on each of meta_batch new tasks;
    then encoder_steps Adam steps of the encoder on the prototypical loss, each on encoder_episodes
    episodes of proto_ways tasks, proto_shots and proto_queries transitions of each; then PPO on
    the policy (ppo_step), its inputs as the trials recorded them.
    Returns ((policy, encoder), extra): extra["env_steps"], and extra["curve"], rows [iteration,
    mean return of the trials' first episode, of their second, the encoder's training accuracy].
    Snell et al. 2017, Algorithm 1, on tasks as classes; Schulman et al. 2017."""
    check_config(config)
    _check_proto_rl_config(config)
    if load:
        start, rng, models, opts, extra = load_checkpoint(load, config)
    else:
        start, rng = 0, np.random.default_rng(config.seed)
        models = dict(zip(("policy", "encoder"), proto_rl_init(family, config, rng)))
        opts, extra = {k: adam_init(p) for k, p in models.items()}, {"env_steps": 0, "curve": []}
    ppo = PPO(config.rl2_lr, config.gamma, config.ppo_lambda, config.ppo_clip, config.ppo_epochs,
              config.ppo_minibatches, config.ppo_entropy, config.ppo_max_norm, trial_mean=True)
    act = config.activation
    forward = lambda p, xs: mlp_forward(p, xs, act)  # the trials as a task axis of the MLP's batch
    backward = lambda p, xs, hs, d_out: _sum_tasks(mlp_backward(p, hs, d_out, act)[0], p)
    progress, window = Progress(config.iterations, start), []
    for it in range(start, config.iterations):
        tasks = family.sample_tasks(rng, config.meta_batch)
        trials = rollout_proto_trials((models["policy"], models["encoder"]), family.make_env(tasks, config.rl2_trials),
                                      rng, config.trial_episodes, family.horizon * config.trial_episodes, family, act)
        accuracy = []
        for _ in range(config.encoder_steps):
            episodes = transition_episodes(trials, config.rl2_trials, rng, config.proto_ways, config.proto_shots,
                                           config.proto_queries, config.encoder_episodes)
            _, grads, right = protonet_grad(models["encoder"], episodes, "relu")
            models["encoder"], opts["encoder"] = adam_step(models["encoder"], grads, opts["encoder"], config.encoder_lr)
            accuracy.append(float(right.mean()))
        with _diverging(it + 1, "--rl2-lr"):
            models["policy"], opts["policy"] = ppo_step(models["policy"], opts["policy"], trials,
                                                        trials["x"][..., :family.obs_dim], ppo, rng, forward, backward)
        _check_finite_policy(models["policy"], it + 1, "--rl2-lr")
        _check_finite_policy(models["encoder"], it + 1, "--encoder-lr")
        extra["env_steps"] += int(trials["mask"].sum())
        returns = to_host(trial_returns(trials, config.trial_episodes).mean(axis=0))
        window.append((returns[0], returns[1] if config.trial_episodes > 1 else np.nan, np.mean(accuracy)))
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            first, second, accuracy = np.mean(window, axis=0)
            progress(it + 1, episode_1_return=first, episode_2_return=second, identification=accuracy)
            extra["curve"].append([it + 1, float(first), float(second), float(accuracy)])
            window = []
            if save:
                save_checkpoint(save, config, it + 1, rng, models, opts, extra)
    return (models["policy"], models["encoder"]), extra


def proto_rl_evaluate(learner, family, config, tasks, rng):
    """Each task's mean return in episodes 1-4 of its trials: nothing is learned at test time.

      learner: (policy, encoder); family: a TaskFamily; config: its eval_batch (trials per task)
        and trial_episodes (the trials hold max(4, trial_episodes) episodes); tasks: the family's
    Returns {"0": (n_tasks,), ..., "3": (n_tasks,)}, "k" the (k + 1)-th episode, whose prototype
    has seen k."""
    episodes = max(4, config.trial_episodes)
    trials = rollout_proto_trials(learner, family.make_env(tasks, config.eval_batch), rng, episodes,
                                  family.horizon * episodes, family, config.activation)
    returns = trial_returns(trials, episodes).reshape(-1, config.eval_batch, episodes).mean(axis=1)
    return {str(k): returns[:, k] for k in RL_EVAL_STEPS}


def proto_identification(learner, family, config, tasks, rng):
    """How well the encoder tells held-out tasks apart from their transitions: the accuracy of the
    nearest prototype on eval_episodes episodes of proto_ways tasks, at 1 and 5 shots (transitions
    of each task), proto_queries queries, the transitions from one trial of one episode per
    eval_batch envs of each task. Returns {"1": (mean, ci95), "5": ...}."""
    encoder = learner[1]
    trials = rollout_proto_trials(learner, family.make_env(tasks, config.eval_batch), rng, 1, family.horizon, family,
                                  config.activation)
    result = {}
    for shots in PROTO_EVAL_SHOTS:
        episodes = transition_episodes(trials, config.eval_batch, rng, config.proto_ways, shots, config.proto_queries,
                                       config.eval_episodes)
        z_s, z_q, _ = _embed_episodes(encoder, episodes, "relu")
        result[str(shots)] = mean_ci95((nearest_prototype(z_s, z_q) == episodes.labels).mean(axis=1))
    return result


@dataclasses.dataclass
class ProtoRLSettings:
    """The prototype-reading policy's own settings, for every task family."""
    proto_embedding: int = hparam(8, "protonet only: the width of a transition's embedding", 1, only=("protonet",))
    proto_hidden: int = hparam(32, "protonet only: units in each of the encoder's two hidden ReLU layers", 1,
                               only=("protonet",))
    encoder_lr: float = hparam(1e-3, "protonet only: Adam step size of the encoder", above=0.0, only=("protonet",))
    encoder_steps: int = hparam(4, "protonet only: the encoder's Adam steps in each iteration", 1, only=("protonet",))
    encoder_episodes: int = hparam(16, "protonet only: identification episodes in each of the encoder's steps", 1,
                                   only=("protonet",))
    proto_ways: int = hparam(5, "protonet only: tasks told apart in each identification episode", 2,
                             only=("protonet",))
    proto_shots: int = hparam(5, "protonet only: support transitions of each task in training (the test takes 1 "
                              "and 5)", 1, only=("protonet",))
    proto_queries: int = hparam(5, "protonet only: query transitions of each task per episode", 1, only=("protonet",))
    eval_episodes: int = hparam(600, "protonet only: held-out identification episodes at each number of shots", 2,
                                only=("protonet",))


@dataclasses.dataclass
class ProtoRLConfig(ProtoRLSettings, RL2Config):
    """The prototype-reading policy on any TaskFamily with n_actions: RL2Config's trials and PPO
    settings (rl2_trials, trial_episodes, rl2_lr and the ppo_ ones; not its task-inference loss),
    and the encoder's own."""
    command: ClassVar[str] = "protonet-rl"
    algorithm: str = hparam("protonet", "the meta-learner", choices=("protonet",))


# ============================================================================
# PART III. THE HARNESS: the commands (their settings and what each prints),
# the backend switch with CuPy's fast paths, bench, and the command line.
# ============================================================================
# ----------------------------------------------------------------------------
# III.1 The commands' settings: cartpole takes every family's flags.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class CartPoleConfig(ProtoRLSettings, ESConfig, RL2Config, LSTMConfig):
    """Meta-RL on CartPole tasks, half with the actuator reversed (cartpole.py's "reversed" family)."""
    command: ClassVar[str] = "cartpole"
    algorithm: str = hparam("maml", "the meta-learner: gradient-based (maml, reptile, on the same rollouts), memory-"
                            "based (rl2: a GRU, nothing learned at test time), evolutionary (es: ES-MAML) or "
                            "model-based (lstm: an LSTM that takes the inner steps) or metric-based (protonet: a "
                            "policy that reads the prototype of the transitions it has seen)",
                            choices=("maml", "reptile", "rl2", "es", "lstm", "protonet"))
    env: str = hparam("cartpole", "the env: cartpole.py's VecCartPole (cartpole), or Gymnasium's own CartPole-v1, one "
                      "gymnasium.make per episode slot, through gymnasium_family (gymnasium: the cross-check; needs "
                      "Gymnasium)", choices=("cartpole", "gymnasium"))


@dataclasses.dataclass
class Nav2DConfig(MetaRLConfig):
    """Meta-RL on the MAML paper's 2D navigation: reach a goal the policy does not observe."""
    command: ClassVar[str] = "nav2d"
    inner_lr: float = hparam(0.1, "alpha: step size of the inner policy-gradient step (the paper's 0.1; the "
                             "authors' code, 0.5, did worse here: docs/results.md)", 0.0,
                             only=("maml", "reptile", "es"))
    meta_lr: float = hparam(0.003, "beta: Adam step size of the outer loop (--outer adam)",
                            above=0.0, only=("maml", "reptile"))
    hidden: int = hparam(100, "units in each of the two hidden ReLU layers (the paper's 100)", 1)
    init_out_scale: float = hparam(0.01, "factor on the policy's last-layer weights at initialisation: small, the "
                                   "initial policy's mean is near 0 everywhere (CleanRL's 0.01); at 1, TRPO's "
                                   "pre-update policy drifted away on half the seeds", 0.0, 1.0)
    activation: str = hparam("relu", "the policy's hidden layers' activation", choices=tuple(ACTIVATIONS))
    outer: str = hparam("trpo", "MAML's outer step: TRPO on the meta-objective (max_kl), as in the MAML paper, or "
                        "Adam on the meta-gradient (meta_lr); the pretrained baseline takes the same",
                        choices=("trpo", "adam"), only=("maml",))
    init_log_std: float = hparam(-0.5, "log-std of the Gaussian policy at initialisation (rllab's 0 is a velocity "
                                 "noise of 0.1 per step; lower lets adapted policies stop at the goal)", -5.0, 2.0)
    eval_batch: int = hparam(40, "envs per task for each test-time step (the authors' test script: 40)", 1)
    eval_min_steps: int = hparam(4000, "steps per task for each test-time step, as the authors' test script samples "
                                 "them (rllab's sampler): the eval_batch envs restart until the finished episodes "
                                 "hold this many, and the return is their mean, in which short episodes count more "
                                 "often; 0: exactly eval_batch episodes", 0, only=("maml", "reptile"))
    log_every: int = hparam(10, "iterations between progress lines and checkpoints", 1)


@dataclasses.dataclass
class PendulumConfig(MetaRLConfig):
    """Meta-RL on Gymnasium's Pendulum-v1, per-task mass, length and gravity: spin it one way or the other, or swing it
    up with the torque reversed on half the tasks (a Gaussian policy, MAML-TRPO; needs Gymnasium)."""
    command: ClassVar[str] = "pendulum"
    task: str = hparam("spinning", "the tasks: spin the pendulum in the task's direction (spinning_pendulum_family), or "
                       "swing it up with the torque reversed on half of them (reversed: pendulum_family, run with "
                       "--iterations 100 --inner-lr 0.1 --init-log-std -0.5 --baseline-lr-scale 0.01 --eval-tasks 40 "
                       "--no-tune-first-lr)",
                       choices=("spinning", "reversed"))
    iterations: int = hparam(80, "meta-training iterations (the total, also when resuming): 10-13 minutes on "
                             "2 cores", 1)
    inner_lr: float = hparam(0.3, "alpha: step size of the inner policy-gradient step", 0.0, only=("maml", "reptile"))
    hidden: int = hparam(64, "units in each of the two hidden ReLU layers", 1)
    activation: str = hparam("relu", "the policy's hidden layers' activation", choices=tuple(ACTIVATIONS))
    init_out_scale: float = hparam(0.01, "factor on the policy's last-layer weights at initialisation: small, the "
                                   "initial torque's mean is near 0 everywhere", 0.0, 1.0)
    init_log_std: float = hparam(0.0, "log-std of the Gaussian policy's torque at initialisation: rllab's 0 (-0.5 "
                                 "gives the inner step's episodes less to tell the directions apart)", -5.0, 2.0)
    outer: str = hparam("trpo", "MAML's outer step: TRPO on the meta-objective (max_kl), as in the MAML paper, or "
                        "Adam on the meta-gradient (meta_lr); the pretrained baseline takes the same",
                        choices=("trpo", "adam"), only=("maml",))
    horizon: int = hparam(PENDULUM_HORIZON, "steps of an episode (Pendulum-v1 registers 200)", 1)
    tune_first_lr: bool = hparam(True, "the meta-learned policy's first test-time step: the best of "
                                 "RL_FIRST_LR_FRACTIONS (1, 1.5, 2) times alpha on the validation tasks, by the return "
                                 "after it, as the baselines' steps are chosen; off: alpha as trained",
                                 only=("maml", "reptile"))
    eval_tasks: int = hparam(400, "held-out tasks for the final evaluation: a task's return after a step spreads over "
                             "hundreds (its physics, the way the step spins it), and 400 narrow each model's 95% "
                             "interval to +-17-29 (about 9 minutes on 2 cores)", 2)
    log_every: int = hparam(10, "iterations between progress lines and checkpoints", 1)


# The other families' trainers, each with its evaluation and its model at random initialisation.
FAMILY_RUNS = {"rl2": ("RL^2", rl2_train, rl2_evaluate, rl2_init), "es": ("ES-MAML", es_train, es_evaluate, es_init),
               "lstm": ("LSTM", lstm_rl_train, lstm_rl_evaluate, lstm_init),
               "protonet": ("ProtoNet", proto_rl_train, proto_rl_evaluate, proto_rl_init)}


def run_family(family, config, json_path=None, save=None, load=None):
    """--algorithm rl2, es, lstm or protonet: training on a TaskFamily, then the same held-out tasks as MAML's
    evaluation (the same stream), beside the same model at its random initialisation; a table and the JSON."""
    t0 = time.perf_counter()
    name, train, evaluate, init = FAMILY_RUNS[config.algorithm]
    if config.algorithm == "es":
        name += f" ({'hill climbing' if config.es_adaptation == 'hill' else 'policy gradient'})"
    if config.algorithm == "lstm":
        name += f" ({'first' if config.first_order else 'second'}-order)"
    tasks_per_iteration = config.es_tasks if config.algorithm == "es" else config.meta_batch
    print(f"{family.name}: {name}, {config.iterations} iterations x {tasks_per_iteration} tasks, seed {config.seed}")
    params, extra = train(family, config, save, load)
    tasks = family.sample_tasks(stream(config.seed, HELD_OUT_TASKS), config.eval_tasks)
    random_init = init(family, config, stream(config.seed, RANDOM_INIT))
    draws = lambda: stream(config.seed, HELD_OUT_DRAWS)  # both models on the same draws
    results = {label: {s: mean_ci95(r) for s, r in evaluate(p, family, config, tasks, draws()).items()}
               for label, p in ((name, params), ("random init", random_init))}
    seconds = time.perf_counter() - t0
    in_context = "episode k + 1 of a trial (nothing learned at test time)"
    what = {"rl2": in_context, "protonet": in_context, "es": "k adaptation steps",
            "lstm": "k inner steps taken by the LSTM"}[config.algorithm]
    print(f"\n{family.name}: mean return on {config.eval_tasks} held-out tasks (+- 95% CI) after {what}; "
          f"seed {config.seed}")
    print(f"{'k':>5}" + "".join(f"  {label:>26}" for label in results))
    for s in map(str, RL_EVAL_STEPS):
        print(f"{s:>5}" + "".join(f"  {results[label][s][0]:16.2f} +- {results[label][s][1]:6.2f}"
                                  for label in results))
    result = {}
    if config.algorithm == "protonet":  # and how well the encoder tells the held-out tasks apart
        for label, key, p in ((name, "identification_accuracy", params),
                              ("random init", "random_init_identification_accuracy", random_init)):
            found = proto_identification(p, family, config, tasks, draws())
            result[key], result[key + "_ci95"] = means_and_cis(found)
            print(f"{label}: {config.proto_ways}-way identification of held-out tasks from transitions, "
                  + ", ".join(f"{s}-shot {m:.3f} +- {c:.3f}" for s, (m, c) in found.items()))
        seconds = time.perf_counter() - t0
    print(f"({extra['env_steps']:,} training env steps; {seconds:.0f} s)")
    result["return"], result["return_ci95"] = means_and_cis(results[name])
    result["random_init_return"], result["random_init_return_ci95"] = means_and_cis(results["random init"])
    adaptation = {"rl2": "in-context", "protonet": "in-context (prototype)", "lstm": "learned optimiser (LSTM)",
                  "es": {"hill": "zero-order (hill climbing)", "pg": "policy-gradient step"}[config.es_adaptation]}
    result.update(adaptation=adaptation[config.algorithm], env_steps=extra["env_steps"], seconds=seconds,
                  config=dataclasses.asdict(config))
    if json_path:
        write_json(json_path, result)
    return result


def run_cartpole(config, json_path=None, save=None, load=None, plot=None):
    """The cartpole command: --algorithm maml or reptile (run_meta_rl), rl2, es, lstm or protonet (run_family)."""
    family = gymnasium_cartpole_family() if config.env == "gymnasium" else cartpole_family("reversed")
    if config.algorithm in FAMILY_RUNS:
        _check_meta_rl_config(config)
        if plot is not None:
            raise ValueError("--plot draws MAML's and Reptile's curves: it needs --algorithm maml or reptile")
        return run_family(family, config, json_path, save, load)
    return run_meta_rl(family, config, json_path, save, load, plot)


# The MAML paper, Table 4 (2D navigation), MAML row: return after 0, 1, 2, 3 policy-gradient steps.
NAV_PAPER = {"0": -40.41, "1": -11.68, "2": -3.33, "3": -3.23}


def run_nav2d(config, json_path=None, save=None, load=None, plot=None):
    """The nav2d command: MAML on the 2D navigation tasks, beside the paper's numbers."""
    return run_meta_rl(nav2d_family(), config, json_path, save, load, plot, paper=NAV_PAPER)


def run_pendulum(config, json_path=None, save=None, load=None, plot=None):
    """The pendulum command: MAML-TRPO on Gymnasium's Pendulum-v1 tasks of config.task
    (spinning_pendulum_family or pendulum_family)."""
    family = spinning_pendulum_family if config.task == "spinning" else pendulum_family
    return run_meta_rl(family(config.horizon), config, json_path, save, load, plot)


# ----------------------------------------------------------------------------
# III.2 The backend switch, and the fast paths that plug themselves in: CuPy's
#       products and sums, and glibc's allocator for the command line.
# ----------------------------------------------------------------------------
DEVICES = ("cpu", "gpu")
CUPY_INSTALL = ("pip install cupy-cuda12x (or cupy-cuda11x for CUDA 11; "
                "see https://docs.cupy.dev/en/stable/install.html)")


def _optional(module):
    """Import an optional module (cartpole.py beside this file, a library bench compares with); None if absent."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def set_array_module(module):
    """The one switch of the backend: compute with ``module`` (numpy, cupy, or another
    NumPy-compatible module) in this file and in cartpole.py, with that module's fast paths."""
    global xp
    xp = module
    globals().update(_CUPY_PATHS if hasattr(module, "cuda") else _PLAIN_PATHS)
    cartpole = _optional("cartpole")  # it follows when it is at hand
    if cartpole is not None:
        cartpole.set_array_module(module)


def use_device(device):
    """Compute on "cpu" (NumPy, the default) or "gpu" (CuPy, imported only now), here and in
    cartpole.py. ImportError, saying how to install it, when CuPy or a GPU is missing."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return set_array_module(np)
    try:
        import cupy
    except ImportError:
        raise ImportError(f"device 'gpu' needs CuPy, which is not installed: {CUPY_INSTALL}") from None
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver
        raise ImportError(f"device 'gpu': CuPy is installed but cannot reach a GPU ({e})") from None
    if n_gpus < 1:
        raise ImportError("device 'gpu': CuPy is installed but finds no GPU")
    set_array_module(cupy)


def _cublas_matmul(a, b):
    """_matmul on CuPy: one cuBLAS strided-batched product that reads a transposed operand where
    it lies. CuPy's own @ first copies every operand that is not C-contiguous (h_l^T in each
    weight gradient, W^T in each backward pass), and runs a 2-D one through an array of pointers."""
    tasks = {x.shape[0] for x in (a, b) if x.ndim == 3} - {1}
    if (max(a.ndim, b.ndim) != 3 or len(tasks) > 1 or a.dtype != b.dtype or a.shape[-1] != b.shape[-2]
            or 0 in a.shape + b.shape):
        return a @ b  # not a product of this shape: CuPy's own, or its error
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas

    def column_major(x):  # cuBLAS's view of x (rows, cols): an op and a leading dimension giving x^T
        rows, cols = x.shape[-2:]
        row_stride, col_stride = (s // x.itemsize for s in x.strides[-2:])
        if col_stride == 1 and row_stride >= max(1, cols):  # row-major: as stored, it is x^T
            return x, cublas.CUBLAS_OP_N, row_stride
        if row_stride == 1 and col_stride >= max(1, rows):  # a transposed view: transpose it back
            return x, cublas.CUBLAS_OP_T, col_stride
        return xp.ascontiguousarray(x), cublas.CUBLAS_OP_N, cols

    T = tasks.pop() if tasks else 1
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    (a, op_a, ld_a), (b, op_b, ld_b) = column_major(a), column_major(b)
    task_stride = lambda x: x.strides[0] // x.itemsize if x.ndim == 3 and x.shape[0] > 1 else 0  # 0: shared
    out = xp.empty((T, m, n), a.dtype)
    one, zero = np.ones((), a.dtype), np.zeros((), a.dtype)
    dtype, compute = ((runtime.CUDA_R_64F, cublas.CUBLAS_COMPUTE_64F) if a.dtype == np.float64 else
                      (runtime.CUDA_R_32F, cublas.CUBLAS_COMPUTE_32F))
    # Column-major, out^T (n, m) = b^T a^T: out comes back row-major (T, m, n).
    cublas.gemmStridedBatchedEx(
        xp.cuda.device.get_cublas_handle(), op_b, op_a, n, m, k, one.ctypes.data,
        b.data.ptr, dtype, ld_b, task_stride(b), a.data.ptr, dtype, ld_a, task_stride(a),
        zero.ctypes.data, out.data.ptr, dtype, n, m * n, T, compute, cublas.CUBLAS_GEMM_DEFAULT)
    return out


def _cublas_sum_leading(a):
    """_sum_leading on CuPy: the product 1^T a, one cuBLAS call, where CuPy's reduction over a
    leading axis is many times slower."""
    return (_ones_row(a.shape[0], a.dtype, xp) @ a.reshape(a.shape[0], -1)).reshape(a.shape[1:])


# What set_array_module puts in place: the core's plain functions, or CuPy's fast paths.
_PLAIN_PATHS = {"_matmul": _matmul, "_sum_leading": _sum_leading}
_CUPY_PATHS = {"_matmul": _cublas_matmul, "_sum_leading": _cublas_sum_leading}


def _tune_allocator():
    """Let glibc keep freed memory in the process instead of giving it back to the OS, where
    each new array would page-fault anew. Setting any of these options turns off glibc's own
    adaptive threshold, so all three are set: M_TOP_PAD (64 MB kept when the heap shrinks),
    M_MMAP_THRESHOLD (arrays up to 32 MB, glibc's most, from the heap, not from mmap: the
    meta-RL batches hold arrays of several MB) and M_TRIM_THRESHOLD (give memory back only
    above 256 MB free). Only the command line does this; importing this file changes nothing."""
    import ctypes
    import platform
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(-2, 64 << 20)  # M_TOP_PAD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


# ----------------------------------------------------------------------------
# III.3 bench: speed, measured side by side in one run.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class BenchConfig:
    """Speed, measured side by side in one run: env steps/s and meta-gradient time, on the CPU and,
    with --device gpu, on the GPU too."""
    quick: bool = hparam(False, "small sizes and few repeats: seconds, for a smoke test")
    rounds: int = hparam(7, "timing rounds; each alternative's best round is reported", 1)
    seed: int = hparam(0, "seed of the random inputs", 0)


def _synchronize(module):
    """Wait for the work queued on the GPU (CuPy's module has .cuda); nothing on the CPU."""
    if hasattr(module, "cuda"):
        module.cuda.Device().synchronize()


def _time_alternatives(fns, calls, rounds, sync=None):
    """Seconds per call of each function, the best of `rounds` rounds; the
    alternatives take turns within each round, so machine noise hits all alike.
    sync[name], if given, waits for the device before the clock is read."""
    best = {name: float("inf") for name in fns}
    sync = sync or {}
    for _ in range(rounds):
        for name, fn in fns.items():
            wait = sync.get(name, lambda: None)
            wait()
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            wait()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls[name])
    return best


def bench_env(config, rng, device="cpu"):
    """Env steps per second of VecCartPole on the backend xp at several N, with random
    actions, so that episodes end and autoreset is part of the figure. On the CPU,
    beside it: a Python loop of CartPoleEnv and, when Gymnasium is installed, its
    CartPoleVectorEnv and (at the smallest N) gymnasium_cartpole_family's env."""
    cartpole = _import_cartpole()
    if device == "gpu":
        sizes = (1 << 16,) if config.quick else (1 << 20, 1 << 24)
    else:
        sizes = (256,) if config.quick else (1024, 16384)
    gym_cartpole = _optional("gymnasium.envs.classic_control.cartpole") if device == "cpu" else None
    fns, calls, steps, sync = {}, {}, {}, {}
    python_steps = set()  # envs that step one env at a time in Python: 20 calls suffice
    suffix = "" if device == "cpu" else f" ({device})"
    for n in sizes:
        actions = [rng.integers(0, 2, n) for _ in range(4)]
        device_actions = [xp.asarray(a) for a in actions]
        envs = {f"VecCartPole N={n}{suffix}": (cartpole.VecCartPole(n), device_actions)}
        if device == "gpu":  # beside the fused kernel: the same step as separate CuPy operations, and per-task physics
            separate = cartpole.VecCartPole(n)
            separate.fused = False
            envs[f"VecCartPole N={n} (gpu, separate ops)"] = (separate, device_actions)
            tasks = cartpole.sample_tasks(np.random.default_rng(config.seed), n)
            envs[f"VecCartPole N={n} (gpu, per-task physics)"] = (cartpole.VecCartPole(n, **tasks), device_actions)
        if gym_cartpole is not None:
            envs[f"gymnasium CartPoleVectorEnv N={n}"] = (gym_cartpole.CartPoleVectorEnv(num_envs=n), actions)
        if gym_cartpole is not None and n == sizes[0]:  # what gymnasium_family steps: one CartPoleEnv an env
            family = gymnasium_cartpole_family()
            tasks = family.sample_tasks(np.random.default_rng(config.seed), n)
            name = f"gymnasium_family CartPole-v1 (SyncVectorEnv) N={n}"
            envs[name] = (family.make_env(tasks, 1), actions)
            python_steps.add(name)
        for name, (env, acts) in envs.items():
            env.reset(seed=config.seed)
            counter = iter(range(1 << 62))
            fns[name] = lambda env=env, counter=counter, acts=acts: env.step(acts[next(counter) % 4])
            calls[name] = 20 if config.quick or name in python_steps else max(20, 2_000_000 // n // 4)
            steps[name] = n
            sync[name] = lambda: _synchronize(xp)
    if device == "cpu":
        singles = [cartpole.CartPoleEnv() for _ in range(64)]
        for i, env in enumerate(singles):
            env.reset(seed=config.seed + i)
        single_actions = rng.integers(0, 2, 64).tolist()

        def loop():  # the same work one env at a time: step, and reset when done
            for env, a in zip(singles, single_actions):
                _, _, terminated, truncated, _ = env.step(a)
                if terminated or truncated:
                    env.reset()
        name = "Python loop of 64 CartPoleEnv"
        fns[name], calls[name], steps[name] = loop, 5 if config.quick else 50, 64
    seconds = _time_alternatives(fns, calls, config.rounds, sync)
    return {name: steps[name] / s for name, s in seconds.items()}


def bench_es(config, rng, device="cpu"):
    """Env steps per second of a round of ES-MAML's hill climbing, the largest batch of a generation: every
    candidate's perturbations of its head on every task, one batched env and one batched forward pass of
    per-policy weights (4-32-32-2), as es_train runs them. On the CPU a generation of the defaults' size
    and one 16 times larger; on the GPU 16 and 256 times."""
    family, defaults = cartpole_family("reversed"), CartPoleConfig()
    body = es_init(family, defaults, rng)
    scales = (1,) if config.quick else ((16, 256) if device == "gpu" else (1, 16))
    fns, steps = {}, {}
    for scale in scales:
        n, m, K = defaults.es_population * scale, defaults.es_tasks, defaults.es_perturbations
        noise = [xp.asarray(rng.standard_normal((n,) + p.shape).astype(p.dtype)) for p in body]
        policies = es_policies([xp.repeat(c, m, axis=0) for c in perturbed(body, noise, 0.1)], family, defaults)
        tasks = tile_tasks(family.sample_tasks(rng, m), 2 * n)
        name = f"ES-MAML hill climbing, {2 * n * m * (K + 1)} policies x 2 episodes" + (
            "" if device == "cpu" else f" ({device})")
        seed = int(rng.integers(2 ** 63))
        run = lambda policies=policies, tasks=tasks, seed=seed: hill_climb(
            policies, family, tasks, np.random.default_rng(seed), K, defaults.es_adapt_sigma, defaults.es_episodes,
            HEAD)[1]
        fns[name], steps[name] = run, run()  # the same draws each call: the same steps
    seconds = _time_alternatives(fns, {name: 1 for name in fns}, config.rounds, {name: lambda: _synchronize(xp)
                                                                                  for name in fns})
    return {name: steps[name] / s for name, s in seconds.items()}


def _peak_memory(fn, torch=None):
    """The most device memory one call of fn holds at once, in bytes: PyTorch's own count for its
    rows; for CuPy's, what its memory pool holds after one call from empty (it keeps what it frees)."""
    if torch is not None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    pool = xp.get_default_memory_pool()
    _synchronize(xp)
    pool.free_all_blocks()
    fn()
    _synchronize(xp)
    return int(pool.total_bytes())


def _torch_maml(torch, params, support, query, device="cpu", loop=True):
    """The same second-order meta-gradient with PyTorch, in the formulations we know, fastest last:
    torch.func's grad of a vmap over tasks; vmap over the inner loop, then autograd.grad of the
    mean query loss; the tasks batched by hand (bmm over per-task copies of the weights), then
    autograd.grad; and (on the CPU, with loop) the per-task autograd.grad(create_graph=True) loop
    most MAML libraries use."""
    from torch.func import grad, vmap
    if device == "cpu":
        torch.set_num_threads(1)
    tp = [torch.tensor(to_host(p), device=device) for p in params]
    xs, ys, xq, yq = (torch.tensor(to_host(a), device=device) for a in (*support, *query))
    T = xs.shape[0]
    mse = lambda out, y: ((out - y) ** 2).mean()

    def f(p, x):
        for l in range(0, len(p) - 2, 2):
            x = torch.relu(x @ p[l] + p[l + 1])
        return x @ p[-2] + p[-1]

    def adapted(p, xs, ys):  # one task's inner step
        return [a - 0.01 * b for a, b in zip(p, grad(lambda p: mse(f(p, xs), ys))(p))]

    def task_loss(p, xs, ys, xq, yq):
        return mse(f(adapted(p, xs, ys), xq), yq)

    grad_of_vmap = grad(lambda p: vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean())

    def vmap_then_autograd():
        ps = [a.detach().requires_grad_() for a in tp]
        loss = vmap(lambda p, xq, yq: mse(f(p, xq), yq))(vmap(adapted, in_dims=(None, 0, 0))(ps, xs, ys), xq, yq)
        return torch.autograd.grad(loss.mean(), ps)

    def batched(W, x):  # per-task weights (T, in, out), biases (T, out)
        for l in range(0, len(W) - 2, 2):
            x = torch.relu(torch.bmm(x, W[l]) + W[l + 1][:, None])
        return torch.bmm(x, W[-2]) + W[-1][:, None]

    def bmm_then_autograd():
        ps = [a.detach().requires_grad_() for a in tp]
        W = [p.expand(T, *p.shape) for p in ps]
        inner = torch.autograd.grad(((batched(W, xs) - ys) ** 2).mean(dim=(1, 2)).sum(), W, create_graph=True)
        loss = ((batched([w - 0.01 * g for w, g in zip(W, inner)], xq) - yq) ** 2).mean()
        return torch.autograd.grad(loss, ps)

    def per_task_loop():
        ps = [a.clone().requires_grad_() for a in tp]
        total = 0.0
        for t in range(T):
            g = torch.autograd.grad(mse(f(ps, xs[t]), ys[t]), ps, create_graph=True)
            total = total + mse(f([a - 0.01 * b for a, b in zip(ps, g)], xq[t]), yq[t])
        return torch.autograd.grad(total / T, ps)
    fns = {"torch.func grad(vmap), second-order": lambda: grad_of_vmap(tp),
           "torch vmap inner loop, autograd.grad, second-order": vmap_then_autograd,
           "torch bmm batched by hand, autograd.grad, second-order": bmm_then_autograd}
    if device == "cpu" and loop:
        fns["torch autograd loop over tasks, second-order"] = per_task_loop
    return fns


def bench_meta_grad(config, rng, device="cpu"):
    """Milliseconds per meta-gradient of the sinusoid problem (K=10, 1-40-40-1 ReLU, one inner
    step, float32), on the backend xp: maml_grad as it chooses (the middle weight factored), every
    weight factored, every weight dense, first-order; beside them PyTorch's formulations when it is
    installed. On the CPU the paper's meta-batch (T=25), with a per-task loop of maml_grad, and
    T=1,000; on the GPU T=10,000 to 1,000,000, and each path's peak device memory.
    Returns ({name: ms}, {name: bytes})."""
    if device == "gpu":
        sizes = (1000,) if config.quick else (10_000, 100_000, 1_000_000)
    else:
        sizes = (5,) if config.quick else (25, 1000)
    torch = _optional("torch")
    torch_device = "cuda" if device == "gpu" else "cpu"
    if torch is not None and torch_device == "cuda" and not torch.cuda.is_available():
        torch = None
    params = init_mlp((1, 40, 40, 1), rng, "relu")
    fns, sync = {}, {}
    for T in sizes:
        amplitude, phase = sample_sine_tasks(rng, T)
        support, query = sample_sine_points(rng, amplitude, phase, 10), sample_sine_points(rng, amplitude, phase, 10)
        tag = f" T={T}" + ("" if device == "cpu" else f" ({device})")
        rows = (("second-order, batched", False, None), ("second-order, factored", False, True),
                ("second-order, dense", False, False), ("first-order, batched", True, None))
        for name, first_order, factored in rows:
            fns[f"maml_grad {name}{tag}"] = lambda s=support, q=query, f=first_order, k=factored: maml_grad(
                params, s, q, "mse", 0.01, 1, f, "relu", k)
        if device == "cpu" and T <= 25:
            one = lambda batch, t: (batch[0][t:t + 1], batch[1][t:t + 1])
            fns[f"maml_grad second-order, loop over tasks{tag}"] = lambda s=support, q=query, T=T: [
                maml_grad(params, one(s, t), one(q, t), "mse", 0.01, 1, False, "relu") for t in range(T)]
        if torch is not None:
            for name, fn in _torch_maml(torch, params, support, query, torch_device, loop=T <= 25).items():
                fns[name + tag] = fn
    for name in fns:
        sync[name] = (lambda: torch.cuda.synchronize()) if "torch" in name and device == "gpu" else (
            lambda: _synchronize(xp))
    memory = ({name: _peak_memory(fn, torch if "torch" in name else None) for name, fn in fns.items()}
              if device == "gpu" else {})
    def calls(name):  # per round: enough to outlast the clock's resolution, few where one call is long
        T = int(name.split(" T=")[1].split()[0])
        if config.quick:
            return 3
        return (3 if T >= 10 ** 6 else 10) if device == "gpu" else 10 if "loop" in name else max(3, 2500 // T)
    calls = {name: calls(name) for name in fns}
    return {name: 1e3 * s for name, s in _time_alternatives(fns, calls, config.rounds, sync).items()}, memory


def _print_rows(title, unit, rows, ratios=None):
    """A table of rows {name: value}, with a column for each of ratios {header: (name, value) -> ratio or None}."""
    ratios = ratios or {}
    print(f"\n{title:66s} {unit:>10}" + "".join(f" {header:>16}" for header in ratios))
    for name, v in rows.items():
        cells = [ratio(name, v) for ratio in ratios.values()]
        print(f"{name:66s} {v:10.4g}" + "".join(f" {'':>16}" if r is None else f" {r:15.2f}x" for r in cells))


def run_bench(config, json_path=None):
    check_config(config)
    import platform
    backend = xp  # what --device chose: the CPU alone, or the CPU and then the GPU
    devices = {"cpu": np} if backend is np else {"cpu": np, "gpu": backend}
    gpu_name = (f"; GPU: {backend.cuda.runtime.getDeviceProperties(0)['name'].decode()}, CuPy {backend.__version__}"
                if "gpu" in devices else "")
    print(f"bench on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, NumPy {np.__version__}"
          f"{gpu_name}{' (quick)' if config.quick else ''}; best of {config.rounds} interleaved rounds")
    env, meta, memory = {}, {}, {}
    with_env = _optional("cartpole") is not None  # the env rows need cartpole.py beside this file
    try:
        for device, module in devices.items():
            set_array_module(module)
            rng = np.random.default_rng(config.seed)
            if with_env:
                env.update(bench_env(config, rng, device))
                env.update(bench_es(config, rng, device))
            times, peaks = bench_meta_grad(config, rng, device)
            meta.update(times)
            memory.update(peaks)
    finally:
        set_array_module(backend)
    if with_env:
        _print_rows("CartPole env steps per second", "steps/s", env)
    else:
        print("\n(no CartPole rows: cartpole.py is not beside metarl_min.py)")

    setting = lambda name: name[name.rindex(" T="):]  # " T=25", or " T=100000 (gpu)"
    torch_best = {}  # the fastest PyTorch formulation of each setting
    for name, ms in meta.items():
        if name.startswith("torch"):
            torch_best[setting(name)] = min(ms, torch_best.get(setting(name), math.inf))
    _print_rows("meta-gradient, sinusoid problem (K=10, 1-40-40-1)", "ms", meta, {
        "time / ours": lambda name, v: v / meta[f"maml_grad second-order, batched{setting(name)}"],
        "fastest torch / it": lambda name, v: torch_best[setting(name)] / v if setting(name) in torch_best else None})
    if memory:
        _print_rows("peak device memory of one meta-gradient", "MB", {k: v / 2 ** 20 for k, v in memory.items()})
    result = {"env_steps_per_second": env, "meta_grad_ms": meta, "meta_grad_peak_bytes": memory,
              "devices": list(devices), "quick": config.quick}
    if json_path:
        write_json(json_path, result)
    return result


# ----------------------------------------------------------------------------
# III.4 The command line.
# ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag_group(only):
    """The --help heading of the flags that the algorithms `only` read (None: every one)."""
    return "settings" if only is None else f"settings read only by --algorithm {' or '.join(only)}"


def _add_config_flags(parser, cls):
    """A flag for each field of cls, grouped by the algorithms that read it."""
    groups = {}
    for f in dataclasses.fields(cls):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        only = meta.get("only")
        if only not in groups:
            groups[only] = parser.add_argument_group(_flag_group(only))
        group = groups[only]
        if f.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            kind = type(f.default)
            group.add_argument(flag, type=kind, default=f.default, choices=meta.get("choices"),
                               help=f"{meta['help']} (default: {f.default})")


EXPERIMENTS = {"cartpole": (CartPoleConfig, run_cartpole), "nav2d": (Nav2DConfig, run_nav2d),
               "pendulum": (PendulumConfig, run_pendulum),
               "qlearn": (QLearnConfig, run_qlearn), "sine": (SineConfig, run_sine),
               "protonet": (ProtoNetConfig, run_protonet), "bench": (BenchConfig, run_bench)}
TRAINED = ("cartpole", "nav2d", "pendulum", "qlearn", "sine", "protonet")  # the commands with checkpoints
PLOTTED = ("cartpole", "nav2d", "pendulum")  # the commands with --plot
DEFAULT_COMMAND = "cartpole"  # what plain `python metarl_min.py [flags]` runs
EXAMPLES = {  # one command of each, and its time on a 2-core x86-64 CPU, one BLAS thread
    "cartpole": "python metarl_min.py cartpole --seed 1 --save ck.npz    # 38-57 s (--algorithm rl2: 142-165 s)",
    "nav2d": "python metarl_min.py nav2d --seed 1 --json nav.json      # 165-227 s",
    "pendulum": "python metarl_min.py pendulum --seed 1 --json pend.json  # 22 min (needs Gymnasium)",
    "qlearn": "python metarl_min.py qlearn --seed 1                      # about 120 s",
    "sine": "python metarl_min.py sine --seed 1 --json sine.json        # 53-95 s",
    "protonet": "python metarl_min.py protonet --seed 1                    # 7-8 s",
    "bench": "python metarl_min.py bench --quick                         # a few seconds"}


def build_parser():
    parser = _Parser(prog="metarl_min.py", description="Meta-learning with exact second-order MAML, in NumPy.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                     epilog=f"With no COMMAND, or flags alone, it runs {DEFAULT_COMMAND}:\n"
                            f"  python metarl_min.py --seed 1    is    python metarl_min.py {DEFAULT_COMMAND} --seed 1\n"
                            "Each command's flags: python metarl_min.py COMMAND --help")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, _) in EXPERIMENTS.items():
        summary = " ".join(cls.__doc__.split("\n\n")[0].split())  # the docstring's first paragraph, on one line
        p = sub.add_parser(name, help=summary, description=cls.__doc__, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"Example:\n  {EXAMPLES[name]}")
        _add_config_flags(p, cls)
        files = p.add_argument_group("files and device")
        files.add_argument("--json", metavar="PATH", help="write the final metrics to this JSON file")
        files.add_argument("--device", choices=DEVICES, help="cpu (NumPy) or gpu (CuPy); default: the "
                           "environment variable METARL_DEVICE, else cpu")
        if name in TRAINED:
            files.add_argument("--save", metavar="PATH", help="write a checkpoint (.npz) here as training goes")
            files.add_argument("--load", metavar="PATH", help="resume from this checkpoint")
        if name in PLOTTED:
            files.add_argument("--plot", metavar="PATH", help="save the training curve and adaptation bars as a "
                                                               "PNG (needs matplotlib)")
    return parser


def _typed_flags(argv):
    """The names of the flags typed on the command line (--no-x counts as x)."""
    names = {token[2:].split("=")[0] for token in argv if token.startswith("--")}
    return {n[3:] if n.startswith("no-") else n for n in names}


def _algorithm_defaults(config, typed):
    """config with the chosen algorithm's own defaults (hparam's per_algorithm) for the flags not typed."""
    algorithm = getattr(config, "algorithm", None)
    return dataclasses.replace(config, **{
        f.name: f.metadata["per_algorithm"][algorithm] for f in dataclasses.fields(config)
        if algorithm in (f.metadata.get("per_algorithm") or {}) and f.name.replace("_", "-") not in typed})


def _check_flags(config, typed):
    """Refuse a flag that the chosen algorithm does not read, naming the algorithms that do."""
    algorithm = getattr(config, "algorithm", None)
    for f in dataclasses.fields(config):
        only, flag = f.metadata.get("only"), f.name.replace("_", "-")
        if flag in typed and only is not None and algorithm not in only:
            raise ValueError(f"--{flag} is read only by --algorithm {' or '.join(only)}; with --algorithm "
                             f"{algorithm} it would do nothing")


def _check_outputs(load, outputs):
    """Fail before any work, not after it: the file to load must be a file; each file to be written
    must have a folder it can be written in, be no folder, device or FIFO, and be no other output's
    file nor the --load file (a symbolic link counts as its target)."""
    seen = {}
    if load is not None:
        if os.path.isdir(load):
            raise ValueError(f"--load {load}: a folder, not a checkpoint file")
        if not os.path.isfile(load):
            raise ValueError(f"--load {load}: no such file")
        seen[os.path.realpath(load)] = "--load"
    for flag, path in outputs.items():
        if path is None:
            continue
        if not path:
            raise ValueError(f"--{flag}: an empty path; give a file name")
        target = os.path.realpath(path)
        folder = os.path.dirname(target)
        if os.path.isdir(target) or path.endswith(os.sep):
            raise ValueError(f"--{flag} {path}: a folder; give a file name")
        if not os.path.isdir(folder):
            raise ValueError(f"--{flag} {path}: the folder {folder} does not exist")
        if os.path.exists(target) and not stat.S_ISREG(os.stat(target).st_mode):
            raise ValueError(f"--{flag} {path}: not a regular file (a device, FIFO or socket); give a file name")
        if target in seen:
            raise ValueError(f"--{flag} {path}: the same file as {seen[target]}; give each its own file")
        seen[target] = f"--{flag}"
        try:  # can this process write there? (a read-only folder or file system says so now, not after training)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"--{flag} {path}: cannot write in {folder} ({e.strerror})") from None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temps(path):
    """Remove the temporary files that a killed run left beside path (_atomic_write's .tmp-PID-..., PID gone)."""
    target = os.path.realpath(path)
    folder, name = os.path.split(target)
    for entry in os.listdir(folder):
        parts = entry.split("-", 2)
        if entry.startswith(".tmp-") and entry.endswith(name) and len(parts) == 3 and parts[1].isdigit():
            if not _alive(int(parts[1])):
                try:
                    os.unlink(os.path.join(folder, entry))
                except OSError:
                    pass


def _lock(path):
    """Hold the checkpoint path for this run: a lock on a file beside it (.NAME.lock), which the system
    releases when the process ends, however it ends. ValueError where another running process holds it.
    Returns what _unlock takes (None where the system has no file locks)."""
    try:
        import fcntl
    except ImportError:
        return None
    target = os.path.realpath(path)
    lock_path = os.path.join(os.path.dirname(target), "." + os.path.basename(target) + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"--save {path}: another run (pid {other}) is writing checkpoints there, and this one "
                         "will not overwrite them; give another path") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd, lock_path


def _unlock(held):
    if held is not None:
        os.unlink(held[1])
        os.close(held[0])


class _Stopped(Exception):
    """SIGTERM, raised in the main thread where it arrives, as Ctrl-C raises KeyboardInterrupt."""


def _on_sigterm(signum, frame):
    raise _Stopped()


def _stopped_line(command, argv, how):
    """Where an interrupted run stopped, its last checkpoint, and the command that resumes from it."""
    where = (f"at iteration {RUN['iteration']} of {RUN['total']} (its last progress line)" if "iteration" in RUN
             else "before its first progress line")
    if "checkpoint" not in RUN:
        return f"metarl_min.py {command}: stopped by {how} {where}; no checkpoint was written (--save PATH keeps one)"
    path, iteration = RUN["checkpoint"]
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--save", "--load"):
            skip = True
        elif not token.startswith(("--save=", "--load=")):
            kept.append(token)
    resume = shlex.join(["python", "metarl_min.py"] + kept + ["--load", path])
    return (f"metarl_min.py {command}: stopped by {how} {where}; its last checkpoint, of iteration {iteration}, "
            f"is {path}; resume with: {resume}")


def _available_memory():
    """Bytes of memory free for this run: the GPU's where the backend is CuPy, else the host's
    (MemAvailable on Linux); None where it cannot be told."""
    if hasattr(xp, "cuda"):
        return int(xp.cuda.runtime.memGetInfo()[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _needed_memory(command, config):
    """An estimate, from above, of the most memory a run holds at once, in bytes, and the flags that set
    it: the largest arrays of training and of the evaluation (each step's float32 activations, its
    float64 returns and baseline features, per-task weights), counted as if every episode ran to the
    horizon."""
    c = config
    if command == "sine":
        n_params = 2 * c.hidden + c.hidden * c.hidden + 2 * c.hidden + 1
        train = 4 * (8 * n_params + c.meta_batch * n_params * (c.inner_steps + 4)
                     + c.meta_batch * 2 * c.shots * c.hidden * 12)
        evaluate = 4 * max(c.eval_tasks, 100) * (n_params * (max(SINE_EVAL_STEPS) + 2) + c.eval_points * c.hidden * 6)
        return max(train, evaluate), "--hidden, --meta-batch, --shots, --eval-tasks, --eval-points"
    if command == "protonet":  # the activations of a batch of episodes; the evaluation's distances
        points = c.ways * (max(c.train_shots, max(PROTO_EVAL_SHOTS)) + c.queries)
        train = 4 * c.meta_batch * points * (PROTO_SIGNAL + PROTO_NUISANCE + 6 * c.hidden + 4 * c.embedding_dim)
        evaluate = 8 * c.eval_episodes * points * (2 * PROTO_SIGNAL + 2 * PROTO_NUISANCE + 4 * c.hidden
                                                  + c.ways * (PROTO_SIGNAL + PROTO_NUISANCE + c.embedding_dim))
        return max(train, evaluate), "--ways, --queries, --meta-batch, --hidden, --embedding-dim, --eval-episodes"
    if command == "qlearn":
        bins = _parse_bins(c.bins)
        features = math.prod(bins) + math.comb(4 + c.degree, 4) + c.rbf_per_dim ** 4
        envs = 6 * max(c.meta_tasks, c.eval_tasks) * c.seeds
        return 8 * envs * features * 12 + 8 * envs * c.episodes, "--rbf-per-dim, --degree, --bins, --meta-tasks, " \
                                                               "--eval-tasks, --seeds"
    horizon = {"nav2d": 100, "pendulum": getattr(c, "horizon", 0)}.get(command, 500)  # without importing cartpole.py
    per_step = 4 * 10 * c.hidden + 8 * 16  # a step's activations in the meta-gradient, its returns and features
    if command == "cartpole" and c.algorithm in ("rl2", "protonet"):
        trials = c.meta_batch * c.rl2_trials * c.trial_episodes * horizon
        test = c.eval_tasks * c.eval_batch * max(4, c.trial_episodes) * horizon
        return per_step * max(trials, test), "--meta-batch, --rl2-trials, --trial-episodes, --hidden, --eval-tasks, " \
                                             "--eval-batch"
    if command == "cartpole" and c.algorithm == "es":
        policies = 2 * c.es_population * c.es_tasks * (c.es_perturbations + 1)
        steps = policies * max(c.es_episodes, 1) * horizon
        weights = 4 * policies * (c.hidden * c.hidden + 8 * c.hidden)
        test = c.eval_tasks * (c.es_perturbations + 1) * max(c.eval_batch, c.es_episodes) * horizon
        return 64 * max(steps, test) + weights, "--es-population, --es-tasks, --es-perturbations, --es-episodes, " \
                                                "--hidden, --eval-tasks, --eval-batch"
    train = c.meta_batch * c.fast_batch * horizon * (2 * c.inner_steps + 2)  # support and query, and the baseline's
    test = max(c.eval_tasks, c.val_tasks) * max(c.eval_batch * horizon, 2 * c.eval_min_steps)
    return per_step * max(train, test), "--meta-batch, --fast-batch, --inner-steps, --hidden, --eval-tasks, " \
                                        "--eval-batch, --eval-min-steps"


def _check_memory(command, config):
    """Refuse, in one line and before any work, settings whose arrays cannot fit in the memory free."""
    if command == "bench":
        return
    needed, flags = _needed_memory(command, config)
    free = _available_memory()
    if free is not None and needed > free:
        raise ValueError(f"these settings need about {needed / 2 ** 30:.3g} GiB and {free / 2 ** 30:.3g} GiB is "
                         f"free; smaller values of {flags} need less")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT_COMMAND] + argv
    args = build_parser().parse_args(argv)
    command = args.command
    cls, run = EXPERIMENTS[command]
    config = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    _tune_allocator()
    backend, held = xp, None
    RUN.clear()
    sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        device = args.device or os.environ.get("METARL_DEVICE", "cpu")
        if device not in DEVICES:
            raise ValueError(f"METARL_DEVICE must be one of {', '.join(DEVICES)}; got {device!r}")
        typed = _typed_flags(argv[1:])
        config = _algorithm_defaults(config, typed)
        check_config(config)
        _check_flags(config, typed)
        files = dict(save=args.save, load=args.load) if command in TRAINED else {}
        if command in PLOTTED:
            files["plot"] = args.plot
        outputs = dict(json=args.json, save=files.get("save"), plot=files.get("plot"))
        _check_outputs(files.get("load"), outputs)
        use_device(device)
        _check_memory(command, config)
        if files.get("save"):
            held = _lock(files["save"])
        for path in outputs.values():
            if path:
                _remove_stale_temps(path)
        run(config, json_path=args.json, **files)
    except (ValueError, OSError, ImportError) as e:  # bad flags or files, no CuPy: one line, no traceback
        print(f"metarl_min.py {command}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"metarl_min.py {command}: error: out of memory; smaller sizes (--hidden, --meta-batch, the batches "
              "and the evaluation's tasks) need less", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_stopped_line(command, argv, "Ctrl-C"), file=sys.stderr)
        return 130
    except _Stopped:
        print(_stopped_line(command, argv, "SIGTERM"), file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        _unlock(held)
        set_array_module(backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
