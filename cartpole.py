"""CartPole, equal step for step to Gymnasium's CartPole-v1, batched over tasks.

What it implements
  * ``CartPoleEnv``: one environment with Gymnasium's API (``reset``/``step``,
    ``observation_space``/``action_space``) and CartPole-v1's behaviour,
    ``gymnasium.make("CartPole-v1")`` included: the 500-step time limit sets
    ``truncated``, and ``step`` before ``reset`` is an error. For the same seed
    and actions its observations are bit-identical to Gymnasium 1.x's on the
    same machine (both take cosine and sine from NumPy, whose float64 ones are
    libm's on x86-64 without AVX-512 and SVML's with it: they can differ).
  * ``VecCartPole``: ``num_envs`` environments stepped together with NumPy
    array operations, each with its own physics (every parameter a scalar or
    an array of shape ``(num_envs,)``), resetting itself when an episode ends.
  * ``sample_tasks``: a distribution over physics for meta-RL.

What it leaves out: rendering, and the warning Gymnasium logs when one steps
past termination (we return the same rewards, silently).

Backend: ``VecCartPole`` computes with the module-level array module ``xp``,
NumPy unless ``use_device("gpu")`` swaps in CuPy (imported only then; beside
metarl_min.py, its ``use_device`` switches both files); its arrays, and the RNG
that resets its episodes, then live on the GPU, and its step runs as one kernel
that ``cupy.fuse`` traces from ``cartpole_dynamics`` (at the end of this file).
``CartPoleEnv`` is one environment stepped from Python and always uses NumPy.

The equations are those of Barto, Sutton & Anderson (1983) as corrected by
Florian (2007), "Correct equations for the dynamics of the cart-pole system",
eqs. (23)-(24) with friction set to zero, written in Gymnasium's order:
    temp     = (F + m_p l thetadot^2 sin theta) / (m_c + m_p)
    thetaacc = (g sin theta - cos theta temp) / (l (4/3 - m_p cos^2 theta / (m_c + m_p)))
    xacc     = temp - m_p l thetaacc cos theta / (m_c + m_p)
where l is half the pole's length. The order of the floating-point operations
is Gymnasium's own, which is what makes the trajectories bit-identical.
"""

import functools
import math
import types

import numpy as np

# Default physics: CartPole-v1 (Gymnasium, classic_control/cartpole.py).
GRAVITY = 9.8  # m/s^2
MASSCART = 1.0  # kg
MASSPOLE = 0.1  # kg
LENGTH = 0.5  # m, half the pole's length
FORCE_MAG = 10.0  # N, pushed left or right
TAU = 0.02  # s between state updates
PHYSICS = ("gravity", "masscart", "masspole", "length", "force_mag", "tau")  # what a task may vary
INTEGRATORS = ("euler", "semi-implicit euler")

# Termination: the pole beyond 12 degrees, or the cart beyond 2.4 m.
THETA_THRESHOLD_RADIANS = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
# Initial state: each of the 4 variables uniform in [RESET_LOW, RESET_HIGH).
RESET_LOW, RESET_HIGH = -0.05, 0.05
MAX_EPISODE_STEPS = 500  # CartPole-v1's TimeLimit

# Observation bounds, twice the termination bounds so a failing state is inside.
_OBS_HIGH = np.array([X_THRESHOLD * 2, np.inf, THETA_THRESHOLD_RADIANS * 2, np.inf], dtype=np.float32)


# ----------------------------------------------------------------------------
# Backend: the array module of the batched code, NumPy or CuPy.
# ----------------------------------------------------------------------------
xp = np  # what VecCartPole computes with; set by use_device / set_array_module
DEVICES = ("cpu", "gpu")
CUPY_INSTALL = "pip install cupy-cuda12x (or cupy-cuda11x for CUDA 11; see https://docs.cupy.dev/en/stable/install.html)"


def array_module(device):
    """NumPy for "cpu"; CuPy for "gpu", imported here and only here. ImportError,
    saying how to install it, when CuPy or a GPU is missing."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return np
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
    return cupy


def set_array_module(module):
    """Compute with ``module`` (numpy, cupy, or another NumPy-compatible module) from now on."""
    global xp
    xp = module


def use_device(device):
    """Run the batched code on "cpu" (NumPy, the default) or "gpu" (CuPy)."""
    set_array_module(array_module(device))


# ----------------------------------------------------------------------------
# Spaces: the two parts of Gymnasium's spaces that CartPole uses.
# ----------------------------------------------------------------------------
class Discrete:
    """The integers {0, ..., n-1}, as ``gymnasium.spaces.Discrete(n)``."""

    def __init__(self, n, seed=None):
        self.n, self.shape, self.dtype = int(n), (), np.dtype(np.int64)
        self.np_random = np.random.default_rng(seed)

    def sample(self):
        return np.int64(self.np_random.integers(self.n))

    def contains(self, x):
        if isinstance(x, (bool, int, np.integer)) or (isinstance(x, np.ndarray) and x.shape == () and x.dtype.kind in "biu"):
            return 0 <= int(x) < self.n
        return False

    def __repr__(self):
        return f"Discrete({self.n})"


class Box:
    """A box ``low <= x <= high`` of float32 vectors, as ``gymnasium.spaces.Box``."""

    def __init__(self, low, high, seed=None):
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.shape, self.dtype = self.low.shape, np.dtype(np.float32)
        self.np_random = np.random.default_rng(seed)

    def sample(self):
        # Unbounded coordinates are drawn from a standard normal, as Gymnasium does.
        bounded = np.isfinite(self.low) & np.isfinite(self.high)
        x = self.np_random.standard_normal(self.shape)
        x[bounded] = self.np_random.uniform(self.low[bounded], self.high[bounded])
        return x.astype(np.float32)

    def contains(self, x):
        x = np.asarray(x)
        return x.shape == self.shape and bool(np.all((x >= self.low) & (x <= self.high)))

    def __repr__(self):
        return f"Box({self.low}, {self.high}, {self.shape}, float32)"


# ----------------------------------------------------------------------------
# Checks shared by both environments.
# ----------------------------------------------------------------------------
def _check_physics(num_envs=None, **physics):
    """Return the physics as floats or float64 arrays of shape (num_envs,).

    Masses, length, tau and gravity must be finite and positive; force_mag
    finite and non-zero (negative reverses the actuator)."""
    out = {}
    for name, value in physics.items():
        if isinstance(value, (str, bytes)) or value is None:
            raise TypeError(f"{name} must be a number or an array of numbers, got {value!r}")
        arr = np.asarray(value, dtype=np.float64)
        if num_envs is None and arr.ndim != 0:
            raise ValueError(f"{name} must be a scalar for CartPoleEnv, got shape {arr.shape}")
        if arr.ndim not in (0, 1) or (arr.ndim == 1 and arr.shape[0] != num_envs):
            raise ValueError(f"{name} must be a scalar or an array of shape ({num_envs},), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if name == "force_mag":
            if np.any(arr == 0):
                raise ValueError(f"force_mag must be non-zero (negative reverses the actuator), got {value!r}")
        elif np.any(arr <= 0):
            raise ValueError(f"{name} must be positive, got {value!r}")
        out[name] = float(arr) if arr.ndim == 0 else arr.copy()
    return out


def _check_options(kinematics_integrator, max_episode_steps):
    if kinematics_integrator not in INTEGRATORS:
        raise ValueError(f"kinematics_integrator must be one of {INTEGRATORS}, got {kinematics_integrator!r}")
    if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, (int, np.integer)) or max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}")


def _make_rng(seed, module=np):
    """Gymnasium's seeding: default_rng(seed), which in NumPy is Generator(PCG64(SeedSequence(seed)));
    with module=cupy, CuPy's generator, whose draws are made on the GPU."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}")
    return module.random.default_rng(seed)


def _reset_bounds(options):
    """Gymnasium's reset options: {"low": float, "high": float}, default +-0.05."""
    if options is None:
        return RESET_LOW, RESET_HIGH
    if not isinstance(options, dict):
        raise TypeError(f"options must be None or a dict with keys 'low'/'high', got {type(options).__name__}")
    try:
        low, high = float(options.get("low", RESET_LOW)), float(options.get("high", RESET_HIGH))
    except (TypeError, ValueError) as e:
        raise ValueError(f"options 'low' and 'high' must be numbers, got {options!r}") from e
    if low > high:
        raise ValueError(f"options: low ({low}) must not exceed high ({high})")
    return low, high


class _Physics:
    """The physical parameters and the quantities derived from them.

    ``total_mass`` and ``polemass_length`` are properties, so they follow any
    change to ``masspole``, ``masscart`` or ``length``."""

    def _init_physics(self, num_envs, kinematics_integrator, max_episode_steps, sutton_barto_reward, **physics):
        """Check and set the physics (scalars, or (num_envs,) arrays when num_envs is given) and options."""
        for name, value in _check_physics(num_envs, **physics).items():
            setattr(self, name, value)
        _check_options(kinematics_integrator, max_episode_steps)
        self.kinematics_integrator = kinematics_integrator
        self.max_episode_steps = int(max_episode_steps)
        self.sutton_barto_reward = bool(sutton_barto_reward)

    @property
    def total_mass(self):
        return self.masspole + self.masscart

    @property
    def polemass_length(self):
        return self.masspole * self.length


# ----------------------------------------------------------------------------
# One environment.
# ----------------------------------------------------------------------------
class CartPoleEnv(_Physics):
    """CartPole-v1 with Gymnasium's API; physics given as keyword arguments.

    Actions: 0 pushes the cart left, 1 right (with ``force_mag < 0``, reversed).
    Observation: float32 [x, x_dot, theta, theta_dot]; ``.state`` is float64.
    Reward: +1 per step, the terminating one included, then 0 for steps taken
    after termination; with ``sutton_barto_reward``, 0 per step and -1 from
    termination on."""

    def __init__(self, gravity=GRAVITY, masscart=MASSCART, masspole=MASSPOLE, length=LENGTH, force_mag=FORCE_MAG,
                 tau=TAU, kinematics_integrator="euler", max_episode_steps=MAX_EPISODE_STEPS, sutton_barto_reward=False):
        self._init_physics(None, kinematics_integrator, max_episode_steps, sutton_barto_reward, gravity=gravity,
                           masscart=masscart, masspole=masspole, length=length, force_mag=force_mag, tau=tau)
        self.action_space = Discrete(2)
        self.observation_space = Box(-_OBS_HIGH, _OBS_HIGH)
        self.np_random = None  # made by the first reset
        self._state = None
        self._elapsed_steps = 0
        self.steps_beyond_terminated = None

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, value):
        value = np.array(value, dtype=np.float64)  # a copy: the caller's array stays theirs
        if value.shape != (4,):
            raise ValueError(f"state must have shape (4,), got {value.shape}")
        self._state = value

    def reset(self, *, seed=None, options=None):
        """Start an episode; the RNG carries on across resets unless a seed is given."""
        if seed is not None or self.np_random is None:
            self.np_random = _make_rng(seed)
        low, high = _reset_bounds(options)
        self._state = self.np_random.uniform(low=low, high=high, size=(4,))
        self._elapsed_steps = 0
        self.steps_beyond_terminated = None
        return np.array(self._state, dtype=np.float32), {}

    def step(self, action):
        if not isinstance(action, (bool, int, np.integer)) and not (
                isinstance(action, np.ndarray) and action.shape == () and action.dtype.kind in "biu"):
            raise TypeError(f"action must be an integer in {{0, 1}}, got {action!r} ({type(action).__name__})")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 (push left) or 1 (push right), got {action!r}")
        if self._state is None:
            raise RuntimeError("Call reset() before step().")
        force = self.force_mag if action == 1 else -self.force_mag
        s = self._state.reshape(4, 1).copy()  # a new array each step, as Gymnasium's
        cartpole_dynamics(s, force, self)
        self._state = s.reshape(4)
        terminated = bool(_terminated(s[0], s[2])[0])
        if not terminated:
            reward = 0.0 if self.sutton_barto_reward else 1.0
        elif self.steps_beyond_terminated is None:  # the pole just fell
            self.steps_beyond_terminated = 0
            reward = -1.0 if self.sutton_barto_reward else 1.0
        else:  # stepping past termination: undefined in Gymnasium, rewarded as it does
            self.steps_beyond_terminated += 1
            reward = -1.0 if self.sutton_barto_reward else 0.0
        self._elapsed_steps += 1
        truncated = self._elapsed_steps >= self.max_episode_steps
        return np.array(self._state, dtype=np.float32), reward, terminated, truncated, {}


def cartpole_dynamics(s, force, p, work=None, m=np):
    """One integration step of the cart-pole equations (module docstring), in place.

    s: the state rows x, x_dot, theta, theta_dot (a (4, N) float64 array, or
    four (N,) arrays), overwritten with the next state; force: (N,) in
    newtons; p: the physics (scalars or (N,) arrays). ``work``, if given, is a
    (4, N) float64 scratch array, so that a step allocates nothing; m: the
    array module (NumPy, CuPy, or CuPy tracing this function into one kernel
    with cupy.fuse, where a scratch array is a register: hence each ``out=``
    call's result is taken by name). Each line keeps the order of Gymnasium's floating-point
    operations (a*b == b*a exactly, (a*b)*c != a*(b*c)): that order is what
    makes the trajectories bit-identical."""
    x, x_dot, theta, theta_dot = s
    cos, sin, temp, acc = (None,) * 4 if work is None else work
    total_mass, polemass_length = p.total_mass, p.polemass_length
    cos = m.cos(theta, out=cos)
    sin = m.sin(theta, out=sin)
    # temp = (F + m_p l thetadot^2 sin) / (m_c + m_p)
    temp = m.square(theta_dot, out=temp)
    temp *= polemass_length
    temp *= sin
    temp += force
    temp /= total_mass
    # thetaacc = (g sin - cos temp) / (l (4/3 - m_p cos^2 / (m_c + m_p)))
    thetaacc = m.multiply(cos, temp, out=acc)
    thetaacc = m.subtract(m.multiply(sin, p.gravity, out=sin), thetaacc, out=thetaacc)  # sin no longer needed
    denom = m.square(cos, out=sin)
    denom *= p.masspole
    denom /= total_mass
    denom = m.subtract(4.0 / 3.0, denom, out=denom)
    denom *= p.length
    thetaacc /= denom
    # xacc = temp - m_p l thetaacc cos / (m_c + m_p)
    xacc = m.multiply(thetaacc, polemass_length, out=denom)  # denom no longer needed
    xacc *= cos
    xacc /= total_mass
    xacc = m.subtract(temp, xacc, out=xacc)
    step = temp  # temp no longer needed: step holds tau * (a rate)
    if p.kinematics_integrator == "euler":  # positions move with the old velocities
        x += m.multiply(x_dot, p.tau, out=step)
        x_dot += m.multiply(xacc, p.tau, out=step)
        theta += m.multiply(theta_dot, p.tau, out=step)
        theta_dot += m.multiply(thetaacc, p.tau, out=step)
    else:  # semi-implicit Euler: velocities first, positions with the new ones
        x_dot += m.multiply(xacc, p.tau, out=step)
        x += m.multiply(x_dot, p.tau, out=step)
        theta_dot += m.multiply(thetaacc, p.tau, out=step)
        theta += m.multiply(theta_dot, p.tau, out=step)


AUTORESET_MODES = ("SameStep", "NextStep")  # Gymnasium's AutoresetMode values VecCartPole offers


def _terminated(x, theta, m=np):
    """|x| > 2.4 or |theta| > 12 degrees."""
    return (m.abs(x) > X_THRESHOLD) | (m.abs(theta) > THETA_THRESHOLD_RADIANS)


# ----------------------------------------------------------------------------
# Many environments at once.
# ----------------------------------------------------------------------------
class VecCartPole(_Physics):
    """``num_envs`` CartPoles stepped together, each with its own physics.

    Each physics keyword (as ``CartPoleEnv``'s) is a scalar or an array of
    shape ``(num_envs,)``. ``.state`` has shape ``(num_envs, 4)``, float64.

    Autoreset, in one of Gymnasium's two modes (``autoreset_mode``, also in
    ``metadata["autoreset_mode"]``):
      * "SameStep" (the default): when an environment terminates or is
        truncated, ``step`` returns its reward, ``terminated`` and ``truncated``
        for that last step, but the observation of the *new* episode, drawn at
        once from this env's RNG. The last observation of the ended episode is
        in ``info["final_obs"]`` (shape (num_envs, 4); rows where
        ``info["_final_obs"]`` is False equal the returned observation). So
        every ``step`` is a real environment step and no action is ever ignored.
      * "NextStep" (Gymnasium's vector envs' default, and what its vector
        observation wrappers take): the ended episode's last observation is
        returned, and the *next* ``step`` resets that environment, ignoring its
        action: the new episode's first observation, reward 0, ``terminated``
        and ``truncated`` False; ``info`` is empty. The reset draws come from
        the RNG in the same order in both modes.

    Reward: +1 every step (the terminating step included); with
    ``sutton_barto_reward``, -1 on the terminating step and 0 otherwise.

    Arrays (state, physics, what ``step`` returns, the reset RNG) belong to
    the backend ``xp`` of when the env was made: choose the device first."""

    def __init__(self, num_envs, gravity=GRAVITY, masscart=MASSCART, masspole=MASSPOLE, length=LENGTH,
                 force_mag=FORCE_MAG, tau=TAU, kinematics_integrator="euler", max_episode_steps=MAX_EPISODE_STEPS,
                 sutton_barto_reward=False, autoreset_mode="SameStep"):
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if autoreset_mode not in AUTORESET_MODES:
            raise ValueError(f"autoreset_mode must be one of {AUTORESET_MODES}, got {autoreset_mode!r}")
        self.num_envs = int(num_envs)
        self.metadata = {"autoreset_mode": autoreset_mode}
        self._init_physics(self.num_envs, kinematics_integrator, max_episode_steps, sutton_barto_reward,
                           gravity=gravity, masscart=masscart, masspole=masspole, length=length, force_mag=force_mag,
                           tau=tau)
        for name in PHYSICS:  # arrays onto the device; scalars stay Python floats
            if isinstance(getattr(self, name), np.ndarray):
                setattr(self, name, xp.asarray(getattr(self, name)))
        self.single_action_space = Discrete(2)
        self.single_observation_space = Box(-_OBS_HIGH, _OBS_HIGH)
        self.np_random = None
        self._s = None  # (4, N): rows x, x_dot, theta, theta_dot, each contiguous
        self.steps = xp.zeros(self.num_envs, dtype=np.int64)  # steps in the current episode
        self._ended = xp.zeros(self.num_envs, dtype=bool)  # next-step mode: the envs the next step resets
        self._low, self._high = RESET_LOW, RESET_HIGH
        self._work = self._force = None  # scratch of the unfused step, made at its first call
        # On CuPy, step in one fused kernel (set False for separate CuPy operations, as bench compares).
        self.fused = hasattr(xp, "fuse")

    @property
    def state(self):
        return None if self._s is None else self._s.T  # (N, 4), a view

    @state.setter
    def state(self, value):
        value = xp.asarray(value, dtype=np.float64)
        if value.shape != (self.num_envs, 4):
            raise ValueError(f"state must have shape ({self.num_envs}, 4), got {value.shape}")
        self._s = xp.ascontiguousarray(value.T)  # a copy, laid out (4, N)

    def reset(self, *, seed=None, options=None):
        """Reset every environment. The draws are Gymnasium's: uniform, shape (4, N)."""
        if seed is not None or self.np_random is None:
            self.np_random = _make_rng(seed, xp)
        self._low, self._high = _reset_bounds(options)
        self._s = self.np_random.uniform(low=self._low, high=self._high, size=(4, self.num_envs))
        self.steps[:] = 0
        self._ended[:] = False
        return self._s.T.astype(np.float32), {}

    @property
    def autoreset_mode(self):
        return self.metadata["autoreset_mode"]

    def step(self, actions):
        """Step every env. actions: (N,) integers in {0, 1}.

        Returns obs (N, 4) float32, reward (N,) float32, terminated (N,) bool,
        truncated (N,) bool, info {"final_obs", "_final_obs"} (next-step mode: {})."""
        actions = xp.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        if actions.dtype.kind not in "biu":
            raise TypeError(f"actions must be integers in {{0, 1}}, got dtype {actions.dtype}")
        # Viewed as unsigned, a negative action is huge: one comparison checks both ends.
        if actions.dtype.kind != "b" and actions.view(f"u{actions.itemsize}").max() > 1:
            raise ValueError("actions must be 0 (push left) or 1 (push right); got other values")
        if self._s is None:
            raise RuntimeError("Call reset() before step().")
        s = self._s
        if self.fused:  # the else branch, as one GPU kernel
            obs_rows = xp.empty((4, self.num_envs), np.float32)
            terminated, truncated = _fused_step(self.kinematics_integrator)(
                *s, self.steps, actions, *(getattr(self, name) for name in PHYSICS), self.max_episode_steps,
                *obs_rows)
            obs = obs_rows.T
        else:
            if self._work is None:  # not before: the fused step needs none, and at large N it is big
                self._work, self._force = xp.empty((4, self.num_envs)), xp.empty(self.num_envs)
            # F = +force_mag for action 1, -force_mag for 0: a * 2f - f is exact in floating point.
            force = xp.multiply(actions, 2.0 * self.force_mag, out=self._force)
            force -= self.force_mag
            cartpole_dynamics(s, force, self, self._work, xp)
            self.steps += 1
            terminated = _terminated(s[0], s[2], xp)
            truncated = self.steps >= self.max_episode_steps
            obs = s.T.astype(np.float32)  # (N, 4), Fortran-ordered as Gymnasium's: no transposing copy
        reward = -terminated.astype(np.float32) if self.sutton_barto_reward else xp.ones(self.num_envs, np.float32)
        if self.autoreset_mode == "NextStep":
            return self._next_step_reset(obs, reward, terminated, truncated)

        done = terminated | truncated
        final_obs = obs  # after an autoreset, obs is made anew and this keeps the ended episodes' last observations
        idx = xp.nonzero(done)[0]
        if idx.size:  # same-step autoreset of the ended episodes
            new = self.np_random.uniform(low=self._low, high=self._high, size=(4, idx.size))  # Gymnasium's draw
            s[:, idx] = new
            # The observation anew from the state, not a copy of final_obs with the new rows written in: glibc
            # can put that copy 16 bytes past a multiple of 4096 from its source, and the CPU then stalls each
            # load behind a store it seems to alias (docs/performance.md).
            obs = s.T.astype(np.float32)
            self.steps[idx] = 0
        return obs, reward, terminated, truncated, {"final_obs": final_obs, "_final_obs": done}

    def _next_step_reset(self, obs, reward, terminated, truncated):
        """Next-step autoreset, as Gymnasium's CartPoleVectorEnv: the envs that ended at the last step
        start anew now (their step above is discarded), the others' ended episodes wait for the next."""
        s, idx = self._s, xp.nonzero(self._ended)[0]
        if idx.size:
            s[:, idx] = self.np_random.uniform(low=self._low, high=self._high, size=(4, idx.size))
            self.steps[idx] = 0
            reward[idx] = 0.0
            terminated[idx] = truncated[idx] = False
            obs = s.T.astype(np.float32)
        self._ended = terminated | truncated
        return obs, reward, terminated, truncated, {}


# ----------------------------------------------------------------------------
# Tasks for meta-RL: a distribution over physics.
# ----------------------------------------------------------------------------
# Sunblaze's "random" CartPole ranges (Packer et al. 2018, "Assessing
# Generalization in Deep Reinforcement Learning", Table 1: RandomCartPole).
SUNBLAZE_RANGES = {"force_mag": (5.0, 15.0), "length": (0.25, 0.75), "masspole": (0.05, 0.5)}
# CARL's CartPole context bounds (Benjamins et al. 2023, "Contextualize Me",
# carl/envs/gymnax/classic_control/carl_gymnax_cartpole.py: CONTEXT_BOUNDS).
CARL_RANGES = {"gravity": (5.0, 15.0), "masscart": (0.5, 2.0), "masspole": (0.05, 0.2), "length": (0.25, 1.0),
               "force_mag": (5.0, 15.0), "tau": (0.01, 0.05)}
REVERSE_PROB = 0.5  # fraction of "reversed" tasks whose actuator pushes the other way

TASK_FAMILIES = {
    # Robustness: physics vary, the sign of control does not. One fixed policy
    # balances nearly all of these, so adaptation is barely needed.
    "sunblaze": SUNBLAZE_RANGES,
    # CARL's wider context space, the time step included; some tasks are hard.
    "carl": CARL_RANGES,
    # Meta-RL (the default): sunblaze physics, and with probability
    # REVERSE_PROB force_mag < 0, so action 1 pushes left. A fixed policy can
    # balance at most one of the two halves: the agent has to find out which
    # way its actuator pushes, from its own experience.
    "reversed": SUNBLAZE_RANGES,
}


def sample_tasks(rng, n, family="reversed", reverse_prob=REVERSE_PROB):
    """Physics of ``n`` tasks: a dict of float64 arrays of shape (n,), ready
    for ``VecCartPole(n, **tasks)``. Parameters a family does not vary keep
    CartPole-v1's defaults."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if family not in TASK_FAMILIES:
        raise ValueError(f"family must be one of {tuple(TASK_FAMILIES)}, got {family!r}")
    if not 0.0 <= reverse_prob <= 1.0:
        raise ValueError(f"reverse_prob must be in [0, 1], got {reverse_prob!r}")
    tasks = {"gravity": GRAVITY, "masscart": MASSCART, "masspole": MASSPOLE, "length": LENGTH,
             "force_mag": FORCE_MAG, "tau": TAU}
    tasks = {k: np.full(n, v) for k, v in tasks.items()}
    for name, (low, high) in TASK_FAMILIES[family].items():
        tasks[name] = rng.uniform(low, high, size=n)
    if family == "reversed":
        tasks["force_mag"] *= np.where(rng.random(n) < reverse_prob, -1.0, 1.0)
    return tasks


# ----------------------------------------------------------------------------
# Gymnasium: the two environments as a real gymnasium.Env and gymnasium.vector.VectorEnv,
# for Gymnasium's wrappers, its env checker and the agents built on it. Gymnasium is
# imported only here, when one of these is called.
# ----------------------------------------------------------------------------
GYMNASIUM_INSTALL = "pip install gymnasium"
GYMNASIUM_ID = "MetaCartPole-v1"  # what register() names them


def gymnasium_env(render_mode=None, **physics):
    """A ``gymnasium.Env`` around ``CartPoleEnv(**physics)``: CartPole-v1's spaces, and the
    trajectories of the bare class (its reset draws from the generator that
    ``gymnasium.Env.reset(seed=)`` seeds, which is ``numpy.random.default_rng(seed)``).
    ImportError, naming the install command, without Gymnasium."""
    return _gymnasium_classes()[0](render_mode, **physics)


def gymnasium_vector_env(num_envs, render_mode=None, autoreset_mode="SameStep", **physics):
    """A ``gymnasium.vector.VectorEnv`` around ``VecCartPole(num_envs, **physics)``, each physics
    parameter a scalar or a (num_envs,) array: batched spaces, and the autoreset mode declared in
    ``metadata["autoreset_mode"]``: same-step (the default), with the ended episodes' last
    observations in ``info["final_obs"]``, or next-step (``gymnasium.vector.AutoresetMode.NEXT_STEP``
    or "NextStep"), which Gymnasium's vector observation wrappers (NormalizeObservation and the
    others) require. NumPy arrays only (the CPU backend)."""
    return _gymnasium_classes()[1](num_envs, render_mode, autoreset_mode, **physics)


def register(env_id=GYMNASIUM_ID):
    """Register env_id with Gymnasium, so that ``gymnasium.make(env_id, force_mag=-10.0)`` and
    ``gymnasium.make_vec(env_id, num_envs=8, force_mag=forces)`` make these; as CartPole-v1, a
    500-step limit and a reward threshold of 475. Registering again changes nothing."""
    gym = _import_gymnasium()
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=gymnasium_env, vector_entry_point=gymnasium_vector_env,
                     max_episode_steps=MAX_EPISODE_STEPS, reward_threshold=475.0)
    return env_id


def _import_gymnasium():
    try:
        import gymnasium
    except ImportError:
        raise ImportError(f"this needs Gymnasium, which is not installed: {GYMNASIUM_INSTALL}") from None
    return gymnasium


@functools.lru_cache(maxsize=None)
def _gymnasium_classes():
    """The two adapter classes, made once, when Gymnasium is first asked for."""
    gym = _import_gymnasium()
    from gymnasium.vector import AutoresetMode, VectorEnv
    from gymnasium.vector.utils import batch_space

    def no_render(render_mode):
        if render_mode is not None:
            raise ValueError(f"render_mode must be None: this CartPole does not render; got {render_mode!r}")

    class GymnasiumCartPole(gym.Env):
        metadata = {"render_modes": [], "render_fps": 50}

        def __init__(self, render_mode=None, **physics):
            no_render(render_mode)
            self.cartpole = CartPoleEnv(**physics)
            self.observation_space = gym.spaces.Box(-_OBS_HIGH, _OBS_HIGH, dtype=np.float32)
            self.action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)  # seeds self.np_random as every gymnasium.Env does
            self.cartpole.np_random = self.np_random
            return self.cartpole.reset(options=options)

        def step(self, action):
            return self.cartpole.step(action)

    class GymnasiumVecCartPole(VectorEnv):
        metadata = {"render_modes": [], "render_fps": 50, "autoreset_mode": AutoresetMode.SAME_STEP}

        def __init__(self, num_envs, render_mode=None, autoreset_mode=AutoresetMode.SAME_STEP, **physics):
            no_render(render_mode)
            modes = [AutoresetMode(m) for m in AUTORESET_MODES]
            if autoreset_mode not in modes + list(AUTORESET_MODES):
                raise ValueError(f"autoreset_mode must be one of {', '.join(map(str, modes))} (or their values "
                                 f"{AUTORESET_MODES}), got {autoreset_mode!r}")
            mode = AutoresetMode(autoreset_mode)
            self.metadata = {**self.metadata, "autoreset_mode": mode}
            self.cartpoles = VecCartPole(num_envs, autoreset_mode=mode.value, **physics)
            self.num_envs = self.cartpoles.num_envs
            self.single_observation_space = gym.spaces.Box(-_OBS_HIGH, _OBS_HIGH, dtype=np.float32)
            self.single_action_space = gym.spaces.Discrete(2)
            self.observation_space = batch_space(self.single_observation_space, self.num_envs)
            self.action_space = batch_space(self.single_action_space, self.num_envs)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.cartpoles.np_random = self.np_random
            return self.cartpoles.reset(options=options)

        def step(self, actions):
            obs, reward, terminated, truncated, info = self.cartpoles.step(actions)
            if self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP:
                return obs, reward, terminated, truncated, info
            # Same-step autoreset's keys, as Gymnasium's vector envs give them (CartPole's infos are empty).
            return obs, reward, terminated, truncated, {**info, "final_info": {}, "_final_info": info["_final_obs"]}

    return GymnasiumCartPole, GymnasiumVecCartPole


# ----------------------------------------------------------------------------
# On a GPU: VecCartPole's step as one kernel (VecCartPole.fused, the default on CuPy).
# ----------------------------------------------------------------------------
_fused_steps = {}  # (array module, integrator) -> VecCartPole.step's arithmetic as one GPU kernel


def _fused_step(kinematics_integrator):
    """The arithmetic of VecCartPole.step (force, cartpole_dynamics, step count,
    termination, truncation, float32 observation) as one GPU kernel: cupy.fuse
    traces the very functions the CPU runs. One pass over memory in place of
    some thirty, each reading and writing (N,) arrays."""
    key = (xp, kinematics_integrator)
    if key not in _fused_steps:
        def step(x, x_dot, theta, theta_dot, steps, action, gravity, masscart, masspole, length, force_mag, tau,
                 max_episode_steps, obs_x, obs_x_dot, obs_theta, obs_theta_dot):
            p = types.SimpleNamespace(gravity=gravity, masspole=masspole, length=length, tau=tau,
                                      total_mass=masspole + masscart, polemass_length=masspole * length,
                                      kinematics_integrator=kinematics_integrator)  # _Physics's, inside the kernel
            cartpole_dynamics((x, x_dot, theta, theta_dot), action * (2.0 * force_mag) - force_mag, p, m=xp)
            steps += 1
            for value, obs in zip((x, x_dot, theta, theta_dot), (obs_x, obs_x_dot, obs_theta, obs_theta_dot)):
                xp.positive(value, out=obs)  # float64 -> float32 as astype: round to nearest
            return _terminated(x, theta, xp), steps >= max_episode_steps
        _fused_steps[key] = xp.fuse(kernel_name="cartpole_step")(step)
    return _fused_steps[key]
