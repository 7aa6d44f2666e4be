"""Tests for metarl-min: ``python -m unittest`` (or ``pytest``), NumPy only.

Reference numbers from libraries the project does not import (Gymnasium,
PyTorch) were generated once in a virtualenv outside the repository and are embedded here;
the script that made each set is described beside it.
"""

import dataclasses
import hashlib
import itertools
import math
import unittest

import numpy as np

import cartpole as cp

# ----------------------------------------------------------------------------
# CartPole
# ----------------------------------------------------------------------------
# Made with Gymnasium 1.4.0: env = gymnasium.make("CartPole-v1",
# sutton_barto_reward=...), the physics set on env.unwrapped (and its
# total_mass / polemass_length recomputed by hand, since Gymnasium's do not
# follow), env.reset(seed=seed), then actions from
#   "random": np.random.default_rng(seed).integers(2) each step;
#   "linear": int(0.02 x + 0.2 x_dot + 4 theta + 1 theta_dot > 0).
# sha256 is the first 32 hex digits of the hash of the float32 observations
# (reset's, then each step's) laid end to end: equal hashes mean bit-identical
# trajectories. "extra" steps were taken past termination.
GYMNASIUM_TRAJECTORIES = [
    dict(seed=0, integrator="euler", policy="random", physics={}, sutton_barto=False, extra=0, steps=18,
         terminated=True, truncated=False, reward_sum=18.0, last_rewards=[1.0, 1.0, 1.0, 1.0],
         final_obs=[0.06748709827661514, 1.1702202558517456, -0.23051922023296356, -2.3516910076141357],
         sha256="09c3edc2f9e559cb24b4ca48085c92b5"),
    dict(seed=1, integrator="euler", policy="random", physics={}, sutton_barto=False, extra=0, steps=29,
         terminated=True, truncated=False, reward_sum=29.0, last_rewards=[1.0, 1.0, 1.0, 1.0],
         final_obs=[0.07347968220710754, 0.2742626965045929, -0.22721044719219208, -1.0239938497543335],
         sha256="885868c88c1f6b912903c2685e2bd88c"),
    dict(seed=2, integrator="semi-implicit euler", policy="random", physics={}, sutton_barto=False, extra=0,
         steps=12, terminated=True, truncated=False, reward_sum=12.0, last_rewards=[1.0, 1.0, 1.0, 1.0],
         final_obs=[-0.13908857107162476, -0.42425987124443054, 0.21221454441547394, 0.8682922720909119],
         sha256="802ff83c2b124f9d46b49a7387756a67"),
    dict(seed=42, integrator="euler", policy="linear", physics={}, sutton_barto=False, extra=0, steps=500,
         terminated=False, truncated=True, reward_sum=500.0, last_rewards=[1.0, 1.0, 1.0, 1.0],
         final_obs=[1.4028120040893555, -0.01515334565192461, -0.005193243734538555, 0.21917285025119781],
         sha256="14cdc7c8b9da8c0df45cd5663b34ed81"),
    dict(seed=7, integrator="semi-implicit euler", policy="linear", physics={}, sutton_barto=False, extra=0,
         steps=500, terminated=False, truncated=True, reward_sum=500.0, last_rewards=[1.0, 1.0, 1.0, 1.0],
         final_obs=[0.36948248744010925, 0.03898479789495468, -0.0021748440340161324, -0.01132117584347725],
         sha256="bb5908e1a6f86cfa1b5af995a70b2291"),
    dict(seed=3, integrator="euler", policy="linear",
         physics=dict(gravity=12.0, masscart=1.5, masspole=0.3, length=0.7, force_mag=14.0, tau=0.03),
         sutton_barto=False, extra=0, steps=500, terminated=False, truncated=True, reward_sum=500.0,
         last_rewards=[1.0, 1.0, 1.0, 1.0],
         final_obs=[-0.23555774986743927, -0.02693324349820614, -0.006444413214921951, 0.013495533727109432],
         sha256="1b0ad1757c0df4e70329abafecaf0ee7"),
    dict(seed=5, integrator="semi-implicit euler", policy="random",
         physics=dict(gravity=7.5, masscart=0.6, masspole=0.05, length=0.3, force_mag=6.0, tau=0.01),
         sutton_barto=False, extra=0, steps=40, terminated=True, truncated=False, reward_sum=40.0,
         last_rewards=[1.0, 1.0, 1.0, 1.0],
         final_obs=[-0.05278097838163376, -0.3656374514102936, 0.2173180729150772, 1.1840075254440308],
         sha256="7646a7c20c1db7edd05e77aa9e282659"),
    dict(seed=9, integrator="euler", policy="random", physics={}, sutton_barto=True, extra=3, steps=19,
         terminated=True, truncated=False, reward_sum=-4.0, last_rewards=[-1.0, -1.0, -1.0, -1.0],
         final_obs=[0.3059147596359253, 1.7419542074203491, -0.3998622000217438, -2.9667577743530273],
         sha256="c5692e7d598aa2751413cda806782901"),
]


def _numpy_trig_equals_libm(angles):
    """Whether NumPy's float64 cosine and sine equal libm's (Python's math) at these angles.

    The references above were made where they do: on x86-64 without AVX-512,
    NumPy calls libm. On CPUs with AVX-512, NumPy 2.x computes them with SVML
    (its wheels carry __svml_sin8_ha), which can differ in the last bit
    (numpy/numpy#23523); Gymnasium, which calls NumPy too, then makes other
    trajectories than these, and so does CartPoleEnv, exactly as Gymnasium."""
    angles = np.asarray(angles, dtype=np.float64)
    return (np.cos(angles).tolist() == [math.cos(a) for a in angles.tolist()]
            and np.sin(angles).tolist() == [math.sin(a) for a in angles.tolist()])


def _reference_policy(kind, obs, rng):
    if kind == "random":
        return int(rng.integers(2))
    x, x_dot, theta, theta_dot = obs
    return int(0.02 * x + 0.2 * x_dot + 4.0 * theta + 1.0 * theta_dot > 0)


class TestCartPoleMatchesGymnasium(unittest.TestCase):
    def test_trajectories_bit_identical(self):
        other_trig = []  # seeds whose trajectory met an angle where this CPU's NumPy trigonometry is not libm's
        for ref in GYMNASIUM_TRAJECTORIES:
            with self.subTest(seed=ref["seed"], integrator=ref["integrator"], physics=ref["physics"]):
                env = cp.CartPoleEnv(kinematics_integrator=ref["integrator"],
                                     sutton_barto_reward=ref["sutton_barto"], **ref["physics"])
                obs, info = env.reset(seed=ref["seed"])
                self.assertEqual(info, {})
                rng = np.random.default_rng(ref["seed"])
                observations, rewards, extra, angles = [obs], [], ref["extra"], []
                while True:
                    angles.append(env.state[2])
                    obs, reward, terminated, truncated, _ = env.step(_reference_policy(ref["policy"], obs, rng))
                    observations.append(obs)
                    rewards.append(reward)
                    self.assertIsInstance(reward, float)
                    if terminated or truncated:
                        if extra == 0:
                            break
                        extra -= 1
                if not _numpy_trig_equals_libm(angles):
                    other_trig.append(ref["seed"])
                    continue
                self.assertEqual(len(rewards), ref["steps"])
                self.assertEqual((terminated, truncated), (ref["terminated"], ref["truncated"]))
                self.assertEqual(sum(rewards), ref["reward_sum"])
                self.assertEqual(rewards[-4:], ref["last_rewards"])
                self.assertEqual(obs.tolist(), ref["final_obs"])
                self.assertEqual(obs.dtype, np.float32)
                self.assertEqual(env.state.dtype, np.float64)
                digest = hashlib.sha256(np.array(observations, np.float32).tobytes()).hexdigest()[:32]
                self.assertEqual(digest, ref["sha256"])
        if other_trig:
            self.skipTest(f"seeds {other_trig}: NumPy's float64 cos or sin differs from libm's at an angle these "
                          "trajectories reach (AVX-512's SVML?), so Gymnasium's own trajectories differ from the "
                          "references here; the other seeds matched")

    def test_reset_options_and_rng_stream(self):
        # Gymnasium's CartPoleEnv docstring: reset(seed=123, options={"low": 0, "high": 1}).
        env = cp.CartPoleEnv()
        obs, _ = env.reset(seed=123, options={"low": 0, "high": 1})
        np.testing.assert_allclose(obs, [0.6823519, 0.05382102, 0.22035988, 0.18437181], rtol=0, atol=5e-8)
        # Without a seed the stream carries on: the second reset equals the
        # next draws of Generator(PCG64(SeedSequence(123))).
        second, _ = env.reset()
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(123)))
        rng.uniform(0, 1, size=4)
        np.testing.assert_array_equal(second, rng.uniform(-0.05, 0.05, size=4).astype(np.float32))
        with self.assertRaises(ValueError):
            env.reset(options={"low": 1, "high": 0})

    def test_derived_constants_follow_the_physics(self):
        env = cp.CartPoleEnv(masspole=0.2, length=0.8)
        self.assertAlmostEqual(env.total_mass, 1.2)
        self.assertAlmostEqual(env.polemass_length, 0.16)
        env.masspole, env.masscart, env.length = 0.5, 2.0, 0.25
        self.assertEqual(env.total_mass, 2.5)
        self.assertEqual(env.polemass_length, 0.125)

    def test_state_can_be_assigned(self):
        env = cp.CartPoleEnv()
        env.reset(seed=0)
        start = [0.1, -0.2, 0.05, 0.3]
        env.state = start
        obs, *_ = env.step(1)
        other = cp.CartPoleEnv()
        other.reset(seed=99)
        other.state = np.array(start)
        self.assertEqual(other.step(1)[0].tolist(), obs.tolist())
        with self.assertRaises(ValueError):
            env.state = [0.0, 0.0]

    def test_truncation_keeps_counting_like_time_limit(self):
        env = cp.CartPoleEnv(max_episode_steps=3)
        env.reset(seed=0)
        flags = [env.step(i % 2)[3] for i in range(4)]
        self.assertEqual(flags, [False, False, True, True])

    def test_spaces(self):
        env = cp.CartPoleEnv()
        self.assertEqual(env.action_space.n, 2)
        self.assertEqual(env.observation_space.shape, (4,))
        self.assertTrue(env.action_space.contains(env.action_space.sample()))
        self.assertTrue(env.observation_space.contains(env.observation_space.sample()))
        self.assertFalse(env.action_space.contains(2))
        self.assertFalse(env.observation_space.contains(np.array([10.0, 0, 0, 0])))


class TestVecCartPole(unittest.TestCase):
    def test_matches_single_envs_with_mixed_physics(self):
        rng = np.random.default_rng(0)
        n = 24
        for integrator in cp.INTEGRATORS:
            tasks = cp.sample_tasks(rng, n, family="carl")
            tasks["force_mag"][::3] *= -1
            vec = cp.VecCartPole(n, kinematics_integrator=integrator, max_episode_steps=60, **tasks)
            vec.reset(seed=1)
            singles = []
            for i in range(n):
                env = cp.CartPoleEnv(kinematics_integrator=integrator, max_episode_steps=60,
                                     **{k: float(v[i]) for k, v in tasks.items()})
                env.reset(seed=0)
                env.state = vec.state[i]
                singles.append(env)
            ended = 0
            for t in range(150):
                actions = rng.integers(0, 2, n)
                obs, reward, terminated, truncated, info = vec.step(actions)
                for i, env in enumerate(singles):
                    o, r, te, tr, _ = env.step(int(actions[i]))
                    self.assertEqual(o.tolist(), info["final_obs"][i].tolist())
                    self.assertEqual((te, tr, r), (terminated[i], truncated[i], reward[i]))
                    if te or tr:
                        ended += 1
                        self.assertTrue(info["_final_obs"][i])
                        env.reset()
                        env.state = vec.state[i]
                    self.assertEqual(env.state.tolist(), vec.state[i].tolist())
                    self.assertEqual(obs[i].tolist(), vec.state[i].astype(np.float32).tolist())
            self.assertGreater(ended, n)  # both terminations and truncations happened

    def test_reset_draws_like_gymnasium_vector_env(self):
        # Gymnasium's CartPoleVectorEnv draws uniform(-0.05, 0.05, size=(4, N)).
        vec = cp.VecCartPole(5)
        obs, _ = vec.reset(seed=11)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(11)))
        np.testing.assert_array_equal(obs, rng.uniform(-0.05, 0.05, size=(4, 5)).T.astype(np.float32))
        self.assertEqual(vec.state.shape, (5, 4))

    def test_autoreset_same_step(self):
        vec = cp.VecCartPole(3, max_episode_steps=5)
        vec.reset(seed=0)
        for _ in range(4):
            obs, _, _, truncated, info = vec.step(np.zeros(3, dtype=np.int64) + [0, 1, 0])
            self.assertFalse(truncated.any())
        obs, reward, terminated, truncated, info = vec.step(np.array([0, 1, 0]))
        self.assertTrue(truncated.all() or (terminated | truncated).all())
        self.assertTrue(info["_final_obs"].all())
        self.assertFalse(np.array_equal(obs, info["final_obs"]))
        self.assertTrue(np.all(np.abs(obs) <= 0.05))  # new episodes
        np.testing.assert_array_equal(vec.steps, 0)
        np.testing.assert_array_equal(reward, 1.0)

    def test_autoreset_next_step(self):
        """Next-step: the ended episode's last observation at its end, and at the next step the new episode's
        first, drawn from the env's RNG as Gymnasium's uniform(size=(4, k)), its action ignored, reward 0."""
        import copy
        tasks = cp.sample_tasks(np.random.default_rng(4), 6)
        same, vec = cp.VecCartPole(6, **tasks), cp.VecCartPole(6, autoreset_mode="NextStep", max_episode_steps=30,
                                                            **tasks)
        self.assertEqual((same.metadata, vec.metadata), ({"autoreset_mode": "SameStep"}, {"autoreset_mode": "NextStep"}))
        np.testing.assert_array_equal(same.reset(seed=3)[0], vec.reset(seed=3)[0])
        rng, resets, ended = np.random.default_rng(5), 0, np.zeros(6, bool)
        for _ in range(300):
            draws = copy.deepcopy(vec.np_random).uniform(-0.05, 0.05, size=(4, int(ended.sum())))
            obs, reward, terminated, truncated, info = vec.step(rng.integers(0, 2, 6))
            self.assertEqual(info, {})
            np.testing.assert_array_equal(obs, vec.state.astype(np.float32))
            np.testing.assert_array_equal(vec.state[ended], draws.T)  # the ended envs start anew, nothing else
            np.testing.assert_array_equal(reward, np.where(ended, 0.0, 1.0))
            self.assertFalse((terminated | truncated)[ended].any())
            np.testing.assert_array_equal(vec.steps[ended], 0)
            resets += int(ended.sum())
            ended = terminated | truncated
            fallen = (np.abs(vec.state[:, 0]) > cp.X_THRESHOLD) | (np.abs(vec.state[:, 2]) > cp.THETA_THRESHOLD_RADIANS)
            np.testing.assert_array_equal(terminated, fallen)  # the last observation stays the ended episode's
            np.testing.assert_array_equal(truncated, vec.steps >= 30)
        self.assertGreater(resets, 12)
        with self.assertRaisesRegex(ValueError, r"autoreset_mode must be one of \('SameStep', 'NextStep'\)"):
            cp.VecCartPole(2, autoreset_mode="Disabled")

    def test_sutton_barto_reward(self):
        vec = cp.VecCartPole(2, sutton_barto_reward=True)
        vec.reset(seed=0)
        total = np.zeros(2)
        for _ in range(60):
            _, reward, terminated, _, _ = vec.step(np.ones(2, dtype=int))
            np.testing.assert_array_equal(reward, -terminated.astype(np.float32))
            total += reward
        self.assertTrue(np.all(total < 0))

    def test_state_assignment_copies(self):
        vec = cp.VecCartPole(2)
        vec.reset(seed=0)
        new = np.zeros((2, 4))
        vec.state = new
        vec.step(np.array([1, 1]))
        np.testing.assert_array_equal(new, 0.0)
        with self.assertRaises(ValueError):
            vec.state = np.zeros((3, 4))


class TestCartPoleErrors(unittest.TestCase):
    def test_bad_actions(self):
        env = cp.CartPoleEnv()
        env.reset(seed=0)
        for bad, err in [(2, ValueError), (-1, ValueError), (0.5, TypeError), (float("nan"), TypeError),
                         ("1", TypeError), (None, TypeError), (np.array([1]), TypeError)]:
            with self.subTest(action=bad), self.assertRaisesRegex(err, "action"):
                env.step(bad)
        env.step(np.int64(1))
        env.step(np.array(0))

    def test_step_before_reset(self):
        with self.assertRaisesRegex(RuntimeError, "reset"):
            cp.CartPoleEnv().step(0)
        with self.assertRaisesRegex(RuntimeError, "reset"):
            cp.VecCartPole(2).step(np.array([0, 1]))

    def test_bad_physics(self):
        for name in ("gravity", "masscart", "masspole", "length", "tau"):
            for bad in (0.0, -1.0, float("nan"), float("inf")):
                with self.subTest(name=name, value=bad), self.assertRaisesRegex(ValueError, name):
                    cp.CartPoleEnv(**{name: bad})
                with self.subTest(name=name, value=bad, vec=True), self.assertRaisesRegex(ValueError, name):
                    cp.VecCartPole(2, **{name: np.array([1.0, bad])})
        for bad in (0.0, float("inf")):
            with self.assertRaisesRegex(ValueError, "force_mag"):
                cp.CartPoleEnv(force_mag=bad)
        with self.assertRaisesRegex(TypeError, "gravity"):
            cp.CartPoleEnv(gravity="9.8")
        with self.assertRaisesRegex(ValueError, "length"):
            cp.VecCartPole(3, length=np.ones(4))
        with self.assertRaisesRegex(ValueError, "scalar"):
            cp.CartPoleEnv(length=np.ones(2))

    def test_bad_options(self):
        with self.assertRaisesRegex(ValueError, "kinematics_integrator"):
            cp.CartPoleEnv(kinematics_integrator="rk4")
        for bad in (0, -5, 2.5, True):
            with self.assertRaisesRegex(ValueError, "max_episode_steps"):
                cp.CartPoleEnv(max_episode_steps=bad)
        for bad in (0, -1, 1.5, "4"):
            with self.assertRaisesRegex(ValueError, "num_envs"):
                cp.VecCartPole(bad)
        with self.assertRaisesRegex(ValueError, "seed"):
            cp.CartPoleEnv().reset(seed=-1)

    def test_bad_vector_actions(self):
        vec = cp.VecCartPole(3)
        vec.reset(seed=0)
        with self.assertRaisesRegex(ValueError, "shape"):
            vec.step(np.array([0, 1]))
        with self.assertRaisesRegex(ValueError, "shape"):
            vec.step(np.zeros((3, 1), dtype=int))
        with self.assertRaisesRegex(ValueError, "0 .push left. or 1"):
            vec.step(np.array([0, 1, 2]))
        with self.assertRaisesRegex(ValueError, "0 .push left. or 1"):
            vec.step(np.array([0, -1, 1], dtype=np.int8))
        with self.assertRaisesRegex(TypeError, "integers"):
            vec.step(np.array([0.0, 1.0, 0.5]))
        vec.step(np.array([True, False, True]))


class TestTasks(unittest.TestCase):
    def test_sample_tasks(self):
        rng = np.random.default_rng(0)
        tasks = cp.sample_tasks(rng, 1000)
        self.assertEqual(set(tasks), {"gravity", "masscart", "masspole", "length", "force_mag", "tau"})
        for v in tasks.values():
            self.assertEqual(v.shape, (1000,))
        flipped = np.mean(tasks["force_mag"] < 0)
        self.assertGreater(flipped, 0.4)
        self.assertLess(flipped, 0.6)
        self.assertTrue(np.all((np.abs(tasks["force_mag"]) >= 5) & (np.abs(tasks["force_mag"]) <= 15)))
        carl = cp.sample_tasks(rng, 500, family="carl")
        for name, (low, high) in cp.CARL_RANGES.items():
            self.assertTrue(np.all((carl[name] >= low) & (carl[name] <= high)), name)
        self.assertTrue(np.all(cp.sample_tasks(rng, 100, family="sunblaze")["force_mag"] > 0))
        cp.VecCartPole(1000, **tasks).reset(seed=0)  # every sampled task is valid physics
        np.testing.assert_array_equal(cp.sample_tasks(np.random.default_rng(3), 5)["length"],
                                      cp.sample_tasks(np.random.default_rng(3), 5)["length"])

    def test_no_fixed_policy_solves_reversed_tasks(self):
        # The balancing controller of the reference trajectories solves a task
        # only when the actuator is not reversed.
        rng = np.random.default_rng(1)
        tasks = cp.sample_tasks(rng, 64)
        vec = cp.VecCartPole(64, **tasks)
        obs, _ = vec.reset(seed=0)
        alive = np.ones(64, bool)
        length = np.zeros(64)
        for _ in range(500):
            actions = (obs @ np.array([0.02, 0.2, 4.0, 1.0]) > 0).astype(np.int64)
            obs, _, terminated, truncated, _ = vec.step(actions)
            length += alive
            alive &= ~(terminated | truncated)
        reversed_ = tasks["force_mag"] < 0
        self.assertTrue(np.all(length[reversed_] < 100))
        self.assertGreater(np.mean(length[~reversed_]), 400)

    def test_bad_arguments(self):
        rng = np.random.default_rng(0)
        with self.assertRaisesRegex(ValueError, "family"):
            cp.sample_tasks(rng, 3, family="moon")
        with self.assertRaisesRegex(ValueError, "n must"):
            cp.sample_tasks(rng, 0)
        with self.assertRaisesRegex(TypeError, "rng"):
            cp.sample_tasks(0, 3)
        with self.assertRaisesRegex(ValueError, "reverse_prob"):
            cp.sample_tasks(rng, 3, reverse_prob=1.5)



# ----------------------------------------------------------------------------
# The model, the losses and MAML, against central finite differences (float64).
# ----------------------------------------------------------------------------
# ----------------------------------------------------------------------------
# Gymnasium: the adapters (these tests run where Gymnasium is installed:
# pip install gymnasium && python -m unittest)
# ----------------------------------------------------------------------------
def _gymnasium():
    try:
        import gymnasium
    except ImportError:
        return None
    return gymnasium


class TestGymnasiumAdapters(unittest.TestCase):
    def test_without_gymnasium_one_clear_line(self):
        cp._gymnasium_classes.cache_clear()
        try:
            with unittest.mock.patch.dict(sys.modules, {"gymnasium": None}):  # as if it were not installed
                for make in (lambda: cp.gymnasium_env(), lambda: cp.gymnasium_vector_env(2), cp.register):
                    with self.assertRaisesRegex(ImportError, "needs Gymnasium, which is not installed: pip install "
                                                             "gymnasium"):
                        make()
        finally:
            cp._gymnasium_classes.cache_clear()

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_check_env_passes(self):
        from gymnasium.utils.env_checker import check_env
        gym = _gymnasium()
        check_env(cp.gymnasium_env(force_mag=-7.0, length=0.3))
        check_env(gym.make(cp.register(), masspole=0.2).unwrapped)
        with self.assertRaisesRegex(ValueError, "render_mode must be None"):
            cp.gymnasium_env(render_mode="human")

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_trajectories_equal_the_bare_classes_and_cartpole_v1(self):
        gym = _gymnasium()
        rng = np.random.default_rng(0)
        # One env, through resets: the adapter, the bare class, and Gymnasium's own CartPole-v1 by make.
        ours, bare = cp.gymnasium_env(), cp.CartPoleEnv()
        made, theirs = gym.make(cp.register()), gym.make("CartPole-v1")
        for seed in range(3):
            first = [env.reset(seed=seed)[0] for env in (ours, bare, made, theirs)]
            for _ in range(600):
                a = int(rng.integers(2))
                steps = [env.step(a) for env in (ours, bare, made, theirs)]
                for step in steps[1:]:
                    self.assertEqual(step[0].tobytes(), steps[0][0].tobytes())
                    self.assertEqual(step[1:4], steps[0][1:4])
                if steps[0][2] or steps[0][3]:
                    break
            for obs in first[1:]:
                self.assertEqual(obs.tobytes(), first[0].tobytes())
        # Many envs with mixed physics, through autoresets: the adapter and the bare VecCartPole.
        tasks = cp.sample_tasks(np.random.default_rng(1), 16)
        ours, bare = cp.gymnasium_vector_env(16, **tasks), cp.VecCartPole(16, **tasks)
        for a, b in zip(ours.reset(seed=5), bare.reset(seed=5)):
            np.testing.assert_array_equal(a, b)
        ended = 0
        for _ in range(200):
            actions = rng.integers(0, 2, 16)
            got, want = ours.step(actions), bare.step(actions)
            for a, b in zip(got[:4], want[:4]):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(got[4]["final_obs"], want[4]["final_obs"])
            np.testing.assert_array_equal(got[4]["_final_info"], want[4]["_final_obs"])
            ended += int(want[4]["_final_obs"].sum())
        self.assertGreater(ended, 16)
        self.assertEqual(ours.metadata["autoreset_mode"], gym.vector.AutoresetMode.SAME_STEP)
        self.assertEqual(ours.single_observation_space, gym.make("CartPole-v1").observation_space)

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_next_step_mode_is_gymnasiums_vector_cartpole(self):
        """Next-step, as Gymnasium's own CartPoleVectorEnv: its observations, rewards, terminations and
        truncations to the bit through resets; by make_vec's keyword too; and its vector observation
        wrappers, which refuse same-step, run over it."""
        gym = _gymnasium()
        theirs = gym.make_vec("CartPole-v1", num_envs=16, vectorization_mode="vector_entry_point")
        mode = gym.vector.AutoresetMode.NEXT_STEP
        ours = [cp.gymnasium_vector_env(16, autoreset_mode="NextStep"),
                gym.make_vec(cp.register(), num_envs=16, autoreset_mode=mode)]
        for env in ours:
            self.assertEqual(env.metadata["autoreset_mode"], mode)
            np.testing.assert_array_equal(env.reset(seed=3)[0], theirs.reset(seed=3)[0])
        rng, ended = np.random.default_rng(0), 0
        for _ in range(400):
            actions = rng.integers(0, 2, 16)
            want = theirs.step(actions)
            for env in ours:
                for a, b in zip(env.step(actions)[:4], want[:4]):
                    np.testing.assert_array_equal(a, b)
            ended += int((want[2] | want[3]).sum())
        self.assertGreater(ended, 16)
        wrappers = gym.wrappers.vector
        inf = np.float32(np.inf)
        for wrap in (wrappers.NormalizeObservation, wrappers.FlattenObservation,
                     lambda e: wrappers.DtypeObservation(e, np.float64),
                     lambda e: wrappers.TransformObservation(e, lambda o: 2 * o),
                     lambda e: wrappers.RescaleObservation(e, np.array([-1, -inf, -1, -inf], np.float32),
                                                         np.array([1, inf, 1, inf], np.float32))):
            env = wrap(cp.gymnasium_vector_env(4, autoreset_mode=mode))
            env.reset(seed=0)
            for _ in range(40):
                obs = env.step(np.ones(4, dtype=np.int64))[0]
            self.assertEqual(obs.shape, (4, 4))
            with self.assertRaisesRegex(ValueError, "SAME_STEP"):  # what the issue is: Gymnasium refuses same-step
                wrap(cp.gymnasium_vector_env(4))
        with self.assertRaisesRegex(ValueError, "autoreset_mode must be one of"):
            cp.gymnasium_vector_env(2, autoreset_mode=gym.vector.AutoresetMode.DISABLED)

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_record_episode_statistics_counts_our_returns(self):
        gym = _gymnasium()
        rng = np.random.default_rng(2)
        env = gym.wrappers.RecordEpisodeStatistics(cp.gymnasium_env(force_mag=-10.0))
        env.reset(seed=0)
        returns, total = [], 0.0
        while len(returns) < 5:
            _, reward, terminated, truncated, info = env.step(int(rng.integers(2)))
            total += reward
            if terminated or truncated:
                self.assertEqual(info["episode"]["r"], total)
                returns.append(total)
                total = 0.0
                env.reset()
        # Vectorised, over same-step autoresets: each ended episode's return as we count it.
        tasks = cp.sample_tasks(np.random.default_rng(3), 8)
        envs = gym.wrappers.vector.RecordEpisodeStatistics(cp.gymnasium_vector_env(8, **tasks))
        envs.reset(seed=0)
        running, checked = np.zeros(8), 0
        for _ in range(150):
            _, reward, terminated, truncated, info = envs.step(rng.integers(0, 2, 8))
            running += reward
            done = terminated | truncated
            if done.any():
                np.testing.assert_array_equal(info["episode"]["r"][done], running[done])
                np.testing.assert_array_equal(info["_episode"], done)
                checked += int(done.sum())
            running[done] = 0.0
        self.assertGreater(checked, 8)

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_make_vec_with_per_env_physics(self):
        gym = _gymnasium()
        forces = np.array([10.0, -10.0, 7.0, -7.0])
        envs = gym.make_vec(cp.register(), num_envs=4, force_mag=forces)
        bare = cp.VecCartPole(4, force_mag=forces)
        for a, b in zip(envs.reset(seed=1)[0], bare.reset(seed=1)[0]):
            np.testing.assert_array_equal(a, b)
        for _ in range(50):
            np.testing.assert_array_equal(envs.step(np.ones(4, int))[0], bare.step(np.ones(4, int))[0])


import metarl_min as mm  # noqa: E402


def _batch(rng, loss, T, K, n_in, n_out):
    x = rng.normal(size=(T, K, n_in))
    if loss == "mse":
        return x, rng.normal(size=(T, K, n_out))
    if mm.LOSS_POLICY[loss] == "categorical":
        target = (rng.integers(0, n_out, (T, K)), rng.normal(size=(T, K)))
    else:
        target = (rng.normal(size=(T, K, n_out // 2)), rng.uniform(0.1, 0.5, size=(T, K)))
    if loss.endswith("_lvc"):  # the sampling policy's log-probabilities
        target += (rng.normal(-2.0, 0.5, size=(T, K)),)
    return x, target


def _gaussian(loss):
    return mm.LOSS_POLICY.get(loss) == "gaussian"


def _fd_grad(f, params, eps=1e-6):
    """Central finite differences of a scalar function of params (float64)."""
    grads = []
    for p in params:
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up = f(params)
            p[i] = old - eps
            down = f(params)
            p[i] = old
            g[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def _rel_err(a, b):
    return max(float(np.abs(x - y).max() / (1e-4 + np.abs(y).max())) for x, y in zip(a, b))


# Made with torch 2.13.0 (float64) in a scratch virtualenv: torch.func.grad of
# vmap over tasks of the one-step MAML query loss, for the inputs of
# TestGradients.test_matches_pytorch_autograd; and torch.optim.Adam(lr=0.1).
TORCH_META_LOSS = 0.04195936895910396
TORCH_GRADS = [np.array([[-0.16852556724368228, 0.09162317741126519, -0.048250572063138306]]),
               np.array([0.029855774769272654, -0.01223941620837021, -0.0045771352815627215]),
               np.array([[-0.07710741692699849], [0.12421116796345034], [-0.18392776676222622]]),
               np.array([0.02055902264785802])]
TORCH_ADAM_3_STEPS = [0.7015862729460302, -1.7006233915360325]

class TestGradients(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(0)

    def test_activation_derivatives(self):
        z = np.linspace(-2, 2, 41) + 0.013  # away from ReLU's kink
        for name, (f, d1, d2) in mm.ACTIVATIONS.items():
            h, eps = f(z), 1e-6
            np.testing.assert_allclose(d1(h), (f(z + eps) - f(z - eps)) / (2 * eps), atol=1e-8, err_msg=name)
            np.testing.assert_allclose(d2(h) + 0 * z, (d1(f(z + eps)) - d1(f(z - eps))) / (2 * eps), atol=1e-6,
                                       err_msg=name)

    def test_sum_over_samples_equals_a_loop(self):
        for shape in ((3, 1, 2), (3, 7, 1), (2, 50, 5), (1, 4, 3), (4, 3)):
            for dtype in (np.float32, np.float64):
                delta = self.rng.normal(size=shape).astype(dtype)
                loop = np.zeros(shape[:-2] + shape[-1:], np.float64)
                for k in range(shape[-2]):
                    loop += delta[..., k, :]
                total = mm._sum_k(delta)
                self.assertEqual((total.shape, total.dtype), (loop.shape, dtype))
                np.testing.assert_allclose(total, loop, rtol=1e-5 if dtype == np.float32 else 1e-12)

    def test_backward_and_hvp_against_finite_differences(self):
        # "gauss" also with a state-independent log-std: bias-only outputs (init_mlp's bias_outputs).
        cases = [(loss, act, bias) for loss in mm.LOSSES for act in mm.ACTIVATIONS
                 for bias in ((0, 2) if _gaussian(loss) else (0,))]
        for loss, activation, bias_outputs in cases:
            with self.subTest(loss=loss, activation=activation, bias_outputs=bias_outputs):
                n_out = 4 if _gaussian(loss) else 3
                params = mm.init_mlp((2, 5, 4, n_out), self.rng, activation, np.float64, bias_outputs)
                batch = _batch(self.rng, loss, 3, 4, 2, n_out)
                values, grads, _ = mm.loss_and_grad(params, batch, loss, activation)
                self.assertEqual(values.shape, (3,))
                for t in range(3):  # per-task gradients, task by task
                    sub = (batch[0][t:t + 1], batch[1][t:t + 1] if loss == "mse" else
                           tuple(a[t:t + 1] for a in batch[1]))
                    fd = _fd_grad(lambda P: mm.loss_and_grad(P, sub, loss, activation)[0][0], params)
                    self.assertLess(_rel_err([g[t] for g in grads], fd), 1e-6)
                # H v per task: the directional derivative of the gradient along v.
                v = [self.rng.normal(size=(3,) + p.shape) for p in params]
                hv = mm.hvp(params, batch, v, loss, activation)
                eps = 1e-6
                plus = [p + eps * vi for p, vi in zip(params, v)]
                minus = [p - eps * vi for p, vi in zip(params, v)]
                fd = [(a - b) / (2 * eps) for a, b in zip(mm.loss_and_grad(plus, batch, loss, activation)[1],
                                                          mm.loss_and_grad(minus, batch, loss, activation)[1])]
                self.assertLess(_rel_err(hv, fd), 1e-6)

    def test_lvc_adds_the_score_outer_product_to_the_hessian(self):
        # Where old_logp = log pi (rho = 1), the LVC gradient is REINFORCE's, and its Hessian is
        # REINFORCE's plus -sum_k w_k g_k g_k^T, g_k the gradient of log pi(a_k | s_k): here taken
        # sample by sample in a loop.
        for loss, n_out, bias_outputs in (("pg", 3, 0), ("gauss", 4, 2)):
            with self.subTest(loss=loss):
                params = mm.init_mlp((2, 5, n_out), self.rng, "tanh", np.float64, bias_outputs)
                x, target = _batch(self.rng, loss, 2, 4, 2, n_out)
                logp = mm.POLICIES[mm.LOSS_POLICY[loss]][0]
                lvc = (x, target + (logp(mm.mlp_forward(params, x, "tanh")[0], target[0]),))
                _, plain_grads, _ = mm.loss_and_grad(params, (x, target), loss, "tanh")
                _, lvc_grads, _ = mm.loss_and_grad(params, lvc, loss + "_lvc", "tanh")
                self.assertLess(_rel_err(lvc_grads, plain_grads), 1e-12)
                v = [self.rng.normal(size=(2,) + p.shape) for p in params]
                expected = mm.hvp(params, (x, target), v, loss, "tanh")
                for t in range(2):
                    for k in range(4):  # g_k = -grad log pi(a_k | s_k): the REINFORCE loss of one sample, weight 1
                        one = (x[t:t + 1, k:k + 1], (target[0][t:t + 1, k:k + 1], np.ones((1, 1))))
                        g = [gi[0] for gi in mm.loss_and_grad(params, one, loss, "tanh")[1]]
                        g_dot_v = sum(float((gi * vi[t]).sum()) for gi, vi in zip(g, v))
                        for e, gi in zip(expected, g):
                            e[t] -= target[1][t, k] * gi * g_dot_v
                self.assertLess(_rel_err(mm.hvp(params, lvc, v, loss + "_lvc", "tanh"), expected), 1e-10)

    def test_maml_grad_against_finite_differences(self):
        cases = [(loss, act, bias) for loss in mm.LOSSES for act in mm.ACTIVATIONS
                 for bias in ((0, 2) if _gaussian(loss) else (0,))]
        for loss, activation, bias_outputs in cases:
            for steps in (1, 2, 3):
                with self.subTest(loss=loss, activation=activation, bias_outputs=bias_outputs, inner_steps=steps):
                    n_out = 4 if _gaussian(loss) else 3
                    lr = 0.02 if _gaussian(loss) else 0.1
                    params = mm.init_mlp((2, 5, 4, n_out), self.rng, activation, np.float64, bias_outputs)
                    support = _batch(self.rng, loss, 3, 4, 2, n_out)
                    query = _batch(self.rng, loss, 3, 5, 2, n_out)
                    meta_loss, grads = mm.maml_grad(params, support, query, loss, lr, steps, False, activation)
                    fd = _fd_grad(lambda P: mm.maml_grad(P, support, query, loss, lr, steps, False, activation)[0],
                                  params)
                    self.assertLess(_rel_err(grads, fd), 1e-6)
                    # The factored inner update (every weight a LowRank) against the same differences.
                    _, factored = mm.maml_grad(params, support, query, loss, lr, steps, False, activation, True)
                    self.assertLess(_rel_err(factored, fd), 1e-6)
                    # The second-order term matters: first-order MAML differs.
                    _, fo = mm.maml_grad(params, support, query, loss, lr, steps, True, activation)
                    self.assertGreater(_rel_err(fo, fd), 1e-4)

    def test_one_support_batch_per_inner_step(self):
        # Meta-RL samples fresh episodes with each adapted policy: support as a list, batch j for step j.
        for loss, n_out, bias_outputs in (("mse", 3, 0), ("gauss", 4, 2), ("pg_lvc", 3, 0)):
            with self.subTest(loss=loss):
                params = mm.init_mlp((2, 5, 4, n_out), self.rng, "tanh", np.float64, bias_outputs)
                supports = [_batch(self.rng, loss, 3, 4 + j, 2, n_out) for j in range(2)]  # other sizes per step
                query = _batch(self.rng, loss, 3, 5, 2, n_out)
                meta_loss, grads = mm.maml_grad(params, supports, query, loss, 0.05, 2, False, "tanh")
                # The meta-loss by hand: a step on each batch in turn, the loss of the query after them.
                theta = list(params)
                for batch in supports:
                    theta = [p - 0.05 * g for p, g in zip(theta, mm.loss_and_grad(theta, batch, loss, "tanh")[1])]
                self.assertAlmostEqual(meta_loss, float(mm.loss_and_grad(theta, query, loss, "tanh")[0].mean()),
                                       places=12)
                fd = _fd_grad(lambda P: mm.maml_grad(P, supports, query, loss, 0.05, 2, False, "tanh")[0], params)
                self.assertLess(_rel_err(grads, fd), 1e-6)
                # A list repeating one batch is that batch at every step.
                same = mm.maml_grad(params, [supports[0]] * 2, query, loss, 0.05, 2, False, "tanh")
                one = mm.maml_grad(params, supports[0], query, loss, 0.05, 2, False, "tanh")
                self.assertEqual(same[0], one[0])
                for a, b in zip(same[1], one[1]):
                    np.testing.assert_array_equal(a, b)
        with self.assertRaisesRegex(ValueError, r"one per inner step \(3\), got 2"):
            mm.maml_grad(params, supports, query, loss, 0.05, 3)
        with self.assertRaisesRegex(TypeError, "one batch"):
            mm.reptile_grad(params, supports, query, loss, 0.05, 2)

    def test_factored_equals_dense(self):
        """The inner update kept as its rank-K factors (LowRank) against the dense per-task weights, in
        float64: every loss and activation, bias-only outputs, 1-3 inner steps, second- and first-order,
        one support batch or one per step."""
        cases = [(loss, act, bias) for loss in mm.LOSSES for act in mm.ACTIVATIONS
                 for bias in ((0, 2) if _gaussian(loss) else (0,))]
        for (loss, activation, bias_outputs), steps, first_order, per_step in itertools.product(
                cases, (1, 2, 3), (False, True), (False, True)):
            with self.subTest(loss=loss, activation=activation, bias_outputs=bias_outputs, inner_steps=steps,
                              first_order=first_order, per_step=per_step):
                n_out = 4 if _gaussian(loss) else 3
                params = mm.init_mlp((2, 16, 12, n_out), self.rng, activation, np.float64, bias_outputs)
                support = ([_batch(self.rng, loss, 3, 3 + j, 2, n_out) for j in range(steps)] if per_step
                           else _batch(self.rng, loss, 3, 4, 2, n_out))
                query = _batch(self.rng, loss, 3, 5, 2, n_out)
                dense = mm.maml_grad(params, support, query, loss, 0.05, steps, first_order, activation, False)
                for factored in (True, None):  # every weight factored; and where it pays (here the middle one)
                    got = mm.maml_grad(params, support, query, loss, 0.05, steps, first_order, activation, factored)
                    self.assertLess(abs(got[0] - dense[0]), 1e-12 * abs(dense[0]))
                    self.assertLess(max(float(np.abs(g - d).max() / np.abs(d).max()) for g, d in zip(got[1], dense[1])),
                                    1e-12)

    def test_factored_where_the_update_rank_is_below_the_widths(self):
        """The automatic choice: a weight is held as a LowRank when the inner steps' samples, S K,
        are fewer than both its widths. On the sinusoid's 1-40-40-1, K = 10 and one step factor the
        middle weight only; four steps (rank 40) or K = 50 leave every weight dense."""
        params = mm.init_mlp((1, 40, 40, 1), self.rng, "relu", np.float64)
        kinds = lambda K, steps: [type(p).__name__ for p in mm._factored(params, [_batch(self.rng, "mse", 2, K, 1, 1)]
                                                                                  * steps, None)[::2]]
        self.assertEqual(kinds(10, 1), ["ndarray", "LowRank", "ndarray"])
        self.assertEqual(kinds(10, 3), ["ndarray", "LowRank", "ndarray"])
        self.assertEqual(kinds(10, 4), ["ndarray"] * 3)
        self.assertEqual(kinds(50, 1), ["ndarray"] * 3)
        self.assertEqual(kinds(10, 0), ["ndarray"] * 3)  # no inner step: nothing to factor
        # The adapted params of a factored weight are its factors: W shared, L the support inputs, R = -alpha delta.
        support = _batch(self.rng, "mse", 2, 10, 1, 1)
        adapted = mm.adapt(mm._factored(params, [support], None), support, "mse", 0.01, 1, "relu")
        W = adapted.params[2]
        self.assertIsInstance(W, mm.LowRank)
        self.assertIs(W.W, params[2])
        np.testing.assert_array_equal(W.L, adapted.caches[0][1][1])  # the first hidden layer's outputs
        self.assertEqual((W.shape, W.L.shape, W.R.shape), ((2, 40, 40), (2, 10, 40), (2, 10, 40)))
        dense = mm.adapt(params, support, "mse", 0.01, 1, "relu").params[2]
        np.testing.assert_allclose(W.W + W.L.swapaxes(1, 2) @ W.R, dense, rtol=0, atol=1e-14)

    def test_first_order_is_mean_query_gradient_at_adapted_params(self):
        params = mm.init_mlp((1, 8, 1), self.rng, "tanh", dtype=np.float64)
        support, query = _batch(self.rng, "mse", 4, 5, 1, 1), _batch(self.rng, "mse", 4, 6, 1, 1)
        _, grads = mm.maml_grad(params, support, query, "mse", 0.05, 2, True, "tanh")
        adapted = [p.copy() for p in params]
        for t in range(4):  # a naive loop over tasks, one at a time
            theta = [p.copy() for p in params]
            sub = lambda b: (b[0][t:t + 1], b[1][t:t + 1])
            for _ in range(2):
                g = mm.loss_and_grad(theta, sub(support), "mse", "tanh")[1]
                theta = [th - 0.05 * gi[0] for th, gi in zip(theta, g)]
            qg = mm.loss_and_grad(theta, sub(query), "mse", "tanh")[1]
            adapted = [a + gi[0] / 4 for a, gi in zip(adapted, qg)]
        self.assertLess(_rel_err(grads, [a - p for a, p in zip(adapted, params)]), 1e-12)

    def test_batched_equals_loop_over_tasks(self):
        params = mm.init_mlp((2, 6, 3), self.rng, "relu", dtype=np.float64)
        support, query = _batch(self.rng, "pg", 5, 4, 2, 3), _batch(self.rng, "pg", 5, 4, 2, 3)
        meta_loss, grads = mm.maml_grad(params, support, query, "pg", 0.1, 2)
        one = lambda b, t: (b[0][t:t + 1], tuple(a[t:t + 1] for a in b[1]))
        per_task = [mm.maml_grad(params, one(support, t), one(query, t), "pg", 0.1, 2) for t in range(5)]
        self.assertAlmostEqual(meta_loss, np.mean([r[0] for r in per_task]), places=12)
        for i, g in enumerate(grads):
            np.testing.assert_allclose(g, np.mean([r[1][i] for r in per_task], axis=0), atol=1e-12)

    def test_zero_inner_steps_is_the_plain_gradient(self):
        params = mm.init_mlp((1, 4, 1), self.rng, dtype=np.float64)
        support, query = _batch(self.rng, "mse", 3, 5, 1, 1), _batch(self.rng, "mse", 3, 5, 1, 1)
        meta_loss, grads = mm.maml_grad(params, support, query, inner_steps=0)
        values, per_task, _ = mm.loss_and_grad(params, query)
        self.assertAlmostEqual(meta_loss, values.mean())
        for g, p in zip(grads, per_task):
            np.testing.assert_allclose(g, p.mean(axis=0))

    def test_meta_sgd_gradients(self):
        params = mm.init_mlp((1, 5, 1), self.rng, "tanh", dtype=np.float64)
        lrs = [np.full(p.shape, 0.05) + 0.01 * self.rng.random(p.shape) for p in params]
        support, query = _batch(self.rng, "mse", 3, 4, 1, 1), _batch(self.rng, "mse", 3, 4, 1, 1)
        for steps in (1, 2):
            meta_loss, grads, lr_grads = mm.meta_sgd_grad(params, lrs, support, query, "mse", steps)
            f = lambda P, L: mm.meta_sgd_grad(P, L, support, query, "mse", steps)[0]
            self.assertLess(_rel_err(grads, _fd_grad(lambda P: f(P, lrs), params)), 1e-6)
            self.assertLess(_rel_err(lr_grads, _fd_grad(lambda L: f(params, L), lrs)), 1e-6)
        # A uniform learning rate is MAML.
        same = mm.meta_sgd_grad(params, [np.full(p.shape, 0.05) for p in params], support, query)
        maml = mm.maml_grad(params, support, query, "mse", 0.05, 1)
        self.assertAlmostEqual(same[0], maml[0])
        self.assertLess(_rel_err(same[1], maml[1]), 1e-12)

    def test_reptile_direction(self):
        params = mm.init_mlp((1, 5, 1), self.rng, dtype=np.float64)
        support, query = _batch(self.rng, "mse", 2, 4, 1, 1), _batch(self.rng, "mse", 2, 4, 1, 1)
        _, direction = mm.reptile_grad(params, support, query, "mse", 0.1, 1)
        both = (np.concatenate([support[0], query[0]], 1), np.concatenate([support[1], query[1]], 1))
        g = mm.loss_and_grad(params, both)[1]
        for d, gi in zip(direction, g):  # one step: theta - mean theta' = lr * mean grad
            np.testing.assert_allclose(d, 0.1 * gi.mean(axis=0), atol=1e-12)
        with self.assertRaisesRegex(ValueError, "inner_steps must be an integer >= 1"):
            mm.reptile_grad(params, support, query, "mse", 0.1, 0)
        with self.assertRaisesRegex(ValueError, "inner_lr must be a finite number"):
            mm.reptile_grad(params, support, query, "mse", float("nan"), 1)

    def test_matches_pytorch_autograd(self):
        # Reference: torch 2.13.0, torch.func.grad of the vmapped second-order
        # MAML loss (1 step, inner_lr 0.1, tanh) for these exact inputs, float64.
        params = [np.array([[0.3, -0.5, 0.8]]), np.array([0.1, 0.0, -0.2]),
                  np.array([[0.7], [-0.4], [0.25]]), np.array([0.05])]
        xs = np.array([[[0.5], [-1.0]], [[1.5], [0.2]]])
        xq = np.array([[[0.1], [0.9]], [[-0.7], [1.2]]])
        meta_loss, grads = mm.maml_grad(params, (xs, np.sin(xs)), (xq, np.sin(xq)), "mse", 0.1, 1)
        self.assertAlmostEqual(meta_loss, TORCH_META_LOSS, places=12)
        for g, ref in zip(grads, TORCH_GRADS):
            np.testing.assert_allclose(g, ref, rtol=1e-10, atol=1e-12)


class TestMamlContract(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(1)
        self.params = mm.init_mlp((1, 8, 1), rng, "relu")
        self.support = _batch(rng, "mse", 3, 5, 1, 1)
        self.query = _batch(rng, "mse", 3, 5, 1, 1)

    def test_params_unchanged_dtype_kept_deterministic(self):
        before = [p.copy() for p in self.params]
        a = mm.maml_grad(self.params, self.support, self.query, inner_steps=2, activation="relu")
        b = mm.maml_grad(self.params, self.support, self.query, inner_steps=2, activation="relu")
        for p, q in zip(self.params, before):
            np.testing.assert_array_equal(p, q)
        self.assertEqual(a[0], b[0])
        for g, h, p in zip(a[1], b[1], self.params):
            np.testing.assert_array_equal(g, h)
            self.assertEqual((g.dtype, g.shape), (np.float32, p.shape))
        self.assertEqual(mm.maml_grad([p.astype(np.float64) for p in self.params], self.support,
                                      self.query)[1][0].dtype, np.float64)

    def test_errors(self):
        p, s, q = self.params, self.support, self.query
        cases = [
            (dict(loss="hinge"), ValueError, "loss must be one of"),
            (dict(activation="gelu"), ValueError, "activation must be one of"),
            (dict(inner_steps=-1), ValueError, "inner_steps"),
            (dict(inner_steps=1.5), ValueError, "inner_steps"),
            (dict(inner_lr=float("nan")), ValueError, "inner_lr"),
            (dict(support=(s[0][..., :0], s[1])), ValueError, r"support x must have shape \(T, K, 1\)"),
            (dict(query=(q[0], q[1][:, :2])), ValueError, "query y must have shape"),
            (dict(query=(q[0][:2], q[1][:2])), ValueError, "same number of tasks"),
            (dict(support=(np.full_like(s[0], np.nan), s[1])), ValueError, r"support x contains NaN or inf"),
            (dict(query=(q[0], np.full_like(q[1], np.inf))), ValueError, r"query target contains NaN or inf"),
            (dict(params=[p[0]]), TypeError, "params must be a list"),
            (dict(params=[p[0].astype(int), p[1], p[2], p[3]]), TypeError, "float32 or float64"),
            (dict(params=[p[0] * np.nan, p[1], p[2], p[3]]), ValueError, r"params\[0\] contains NaN or inf"),
            (dict(loss="pg", query=(q[0], (np.zeros((3, 5), int), np.ones((3, 5))))), TypeError, "pair"),
            (dict(loss="pg", support=(s[0], (np.full((3, 5), 3), np.ones((3, 5)))),
                  query=(q[0], (np.zeros((3, 5), int), np.ones((3, 5))))), ValueError, "actions must be in"),
            (dict(loss="pg_lvc", support=(s[0], (np.zeros((3, 5), int), np.ones((3, 5)))),
                  query=(q[0], (np.zeros((3, 5), int), np.ones((3, 5)), np.zeros((3, 5))))), TypeError, "triple"),
            (dict(loss="pg_lvc", support=(s[0], (np.zeros((3, 5), int), np.ones((3, 5)), np.zeros((3, 4)))),
                  query=(q[0], (np.zeros((3, 5), int), np.ones((3, 5)), np.zeros((3, 5))))), ValueError,
             r"support old_logp must have shape \(3, 5\)"),
        ]
        for override, err, pattern in cases:
            kwargs = dict(params=p, support=s, query=q)
            kwargs.update(override)
            with self.subTest(override=list(override)), self.assertRaisesRegex(err, pattern):
                mm.maml_grad(**kwargs)

    def test_adam_matches_reference_and_leaves_inputs(self):
        # Reference: torch.optim.Adam(lr=0.1), 3 steps on f(w) = sum(w^2 * [1, 3]) from w = [1, -2].
        w = [np.array([1.0, -2.0])]
        state = mm.adam_init(w)
        for _ in range(3):
            g = [2 * w[0] * np.array([1.0, 3.0])]
            old, before, m_before = w, w[0].copy(), state["m"][0].copy()
            w, state_new = mm.adam_step(w, g, state, lr=0.1)
            np.testing.assert_array_equal(old[0], before)
            np.testing.assert_array_equal(state["m"][0], m_before)
            state = state_new
        np.testing.assert_allclose(w[0], TORCH_ADAM_3_STEPS, rtol=1e-12)
        # Bad settings, and grads that do not match params (zip would silently drop the rest).
        for kwargs, pattern in ((dict(lr=-0.1), r"lr must be in \[0.0, inf\)"), (dict(beta1=1.0), "beta1 must be in"),
                                (dict(beta2=float("nan")), "beta2 must be a finite number"),
                                (dict(grads=[]), r"one array per parameter array \(1\)")):
            with self.subTest(kwargs=list(kwargs)), self.assertRaisesRegex(ValueError, pattern):
                mm.adam_step(**{"params": w, "grads": g, "state": state, **kwargs})



# ----------------------------------------------------------------------------
# The sinusoid experiment and the command line.
# ----------------------------------------------------------------------------
import contextlib  # noqa: E402
import io  # noqa: E402
import types  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import unittest.mock  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_main(argv):
    """Run metarl_min.main in-process, its output captured; return (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = mm.main(argv)
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _straight_and_resumed(test, flags, total, part):
    """flags + [total], run straight and run as flags + [part] then resumed to total: (JSON, JSON, the straight
    run's output). flags end with the flag of the iterations."""
    with tempfile.TemporaryDirectory() as d:
        ck, a, b = (os.path.join(d, n) for n in ("ck.npz", "a.json", "b.json"))
        status, out, err = _run_main(flags + [total, "--json", a])
        test.assertEqual(status, 0, err)
        test.assertEqual(_run_main(flags + [part, "--save", ck])[0], 0)
        test.assertEqual(_run_main(flags + [total, "--load", ck, "--json", b])[0], 0)
        return _read_json(a), _read_json(b), out


def _refused(test, cases):
    """Each (argv, message) of cases refused in one line on stderr that holds message, exit status 2."""
    for args, message in cases:
        with test.subTest(args=args):
            status, _, err = _run_main(args)
            _one_line(test, status, err)
            test.assertIn(message, err)


def _cli(*args):
    """Run the command line in a fresh process."""
    return subprocess.run([sys.executable, os.path.join(HERE, "metarl_min.py"), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=120)


class TestSine(unittest.TestCase):
    KEYS = ("shots", "mse", "mse_ci95", "pretrained_mse", "pretrained_mse_ci95", "pretrained_lr", "seconds", "config")
    SHORT = ["sine", "--iterations", "300", "--log-every", "100", "--eval-tasks", "50", "--eval-points", "20",
             "--meta-lr", "0.005"]

    def test_short_run_improves_post_adaptation_mse(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "out.json")
            status, out, _ = _run_main(self.SHORT + ["--json", path])
            self.assertEqual(status, 0)
            self.assertIn("iter    100/300", out)
            self.assertIn("ETA", out)
            result = _read_json(path)
        self.assertEqual(set(result["mse"]), {"0", "1", "5", "10"})
        self.assertEqual(set(result), set(self.KEYS))
        self.assertLess(result["mse"]["10"], 0.8 * result["mse"]["0"])
        self.assertLess(result["mse"]["1"], result["pretrained_mse"]["1"])

    def test_resume_ends_where_a_straight_run_ends(self):
        with tempfile.TemporaryDirectory() as d:
            ck, a, b = (os.path.join(d, n) for n in ("ck.npz", "a.json", "b.json"))
            short = [x if x != "300" else "200" for x in self.SHORT]
            self.assertEqual(_run_main(self.SHORT + ["--json", a])[0], 0)
            self.assertEqual(_run_main(short + ["--save", ck])[0], 0)
            self.assertEqual(_run_main(self.SHORT + ["--load", ck, "--json", b])[0], 0)
            ra, rb = _read_json(a), _read_json(b)
            self.assertEqual(ra["mse"], rb["mse"])
            self.assertEqual(ra["pretrained_mse"], rb["pretrained_mse"])
            self.assertEqual([n for n in os.listdir(d) if n.startswith(".tmp")], [])
            umask = os.umask(0)
            os.umask(umask)
            self.assertEqual(os.stat(a).st_mode & 0o777, 0o666 & ~umask)  # as any new file, not mkstemp's 0600
            # Other hyperparameters than the checkpoint's: one clear line.
            status, _, err = _run_main(self.SHORT + ["--load", ck, "--inner-lr", "0.02"])
            self.assertEqual(status, 2)
            self.assertIn("--inner-lr 0.01", err)
            # Evaluation settings leave training as it was: another --eval-tasks resumes.
            status, _, err = _run_main(self.SHORT + ["--load", ck, "--eval-tasks", "7"])
            self.assertEqual(status, 0, err)

    def test_bad_flags_and_files_give_one_line(self):
        with tempfile.TemporaryDirectory() as d:
            corrupt = os.path.join(d, "bad.npz")
            with open(corrupt, "wb") as f:
                f.write(b"not a checkpoint")
            cases = [(["sine", "--shots", "0"], "--shots must be >= 1"),
                     (["sine", "--shots", "five"], "invalid int value"),
                     (["sine", "--no-such-flag"], "unrecognized arguments"),
                     (["sine", "--load", os.path.join(d, "missing.npz")], "no such file"),
                     (["sine", "--load", corrupt], "not a readable metarl-min checkpoint"),
                     (["sine", "--load", d], "a folder, not a checkpoint file"),
                     (["sine", "--json", d], "a folder; give a file name"),
                     (["sine", "--save", os.path.join(d, "new") + os.sep], "a folder; give a file name"),
                     (["nonsense"], "invalid choice")]
            for args, message in cases:
                with self.subTest(args=args):
                    proc = _cli(*args)
                    self.assertNotEqual(proc.returncode, 0)
                    self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                    self.assertIn(message, proc.stderr)
                    self.assertNotIn("Traceback", proc.stderr)

    def test_bench_quick_writes_json(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bench.json")
            status, out, _ = _run_main(["bench", "--quick", "--rounds", "1", "--json", path])
            self.assertEqual(status, 0)
            result = _read_json(path)
        self.assertGreater(result["env_steps_per_second"]["VecCartPole N=256"], 0)
        self.assertGreater(result["meta_grad_ms"]["maml_grad second-order, batched T=5"], 0)
        self.assertGreater(result["meta_grad_ms"]["maml_grad second-order, loop over tasks T=5"], 0)
        self.assertEqual(result["devices"], ["cpu"])
        self.assertIn("maml_grad first-order, batched T=5", out)
        gymnasium_rows = {"gymnasium CartPoleVectorEnv N=256", "gymnasium_family CartPole-v1 (SyncVectorEnv) N=256"}
        self.assertEqual(gymnasium_rows <= set(result["env_steps_per_second"]), bool(_gymnasium()))

    def test_help(self):
        proc = _cli("sine", "--help")
        self.assertEqual(proc.returncode, 0)
        self.assertIn("--inner-lr", proc.stdout)
        self.assertIn("--first-order", proc.stdout)
        # The list of commands gives each one's whole first paragraph, not its first line.
        proc = _cli("--help")
        self.assertEqual(proc.returncode, 0)
        self.assertIn("on the GPU too.", " ".join(proc.stdout.split()))
        self.assertIn("With no COMMAND, or flags alone, it runs cartpole", " ".join(proc.stdout.split()))


class TestMetaLearnerLSTM(unittest.TestCase):
    """The model-based family: the meta-learner LSTM's steps and meta-gradients, in float64."""

    def setUp(self):
        self.rng = np.random.default_rng(0)
        self.params = mm.init_mlp((2, 4, 3), self.rng, "tanh", np.float64)
        lstm = mm.init_meta_lstm(3, 0.1, self.rng, forget_bias=1.0, dtype=np.float64)
        lstm[2], lstm[4] = self.rng.normal(0.0, 0.5, (2, 5))  # gates that read h, theta and their last value
        self.lstm = lstm

    def _supports(self, loss):
        return [_batch(self.rng, loss, 3, 4, 2, 3) for _ in range(2)], _batch(self.rng, loss, 3, 5, 2, 3)

    def test_exact_meta_gradient_against_finite_differences(self):
        n = len(self.params)
        for loss in ("mse", "pg"):
            supports, query = self._supports(loss)
            for support in (supports, supports[0]):  # a batch per step, or one for both steps
                with self.subTest(loss=loss, per_step=support is supports):
                    meta = lambda ps: mm.lstm_meta_grad(ps[n:], ps[:n], support, query, loss, 2, False, "tanh")[0]
                    _, grads, lstm_grads = mm.lstm_meta_grad(self.lstm, self.params, support, query, loss, 2, False,
                                                             "tanh")
                    numeric = _fd_grad(meta, [p.copy() for p in self.params + self.lstm], eps=1e-7)
                    self.assertLess(_rel_err(grads + lstm_grads, numeric), 1e-6)

    def test_first_order_is_the_gradient_with_the_learners_inputs_held(self):
        """The paper's gradient: g_t and L_t as inputs fixed at their values, through the rest exactly."""
        n, H = len(self.params), 3
        supports, query = self._supports("mse")
        run = mm.lstm_adapt(self.lstm, self.params, supports, "mse", 2, "tanh")
        shapes = [p.shape for p in self.params]
        held = [(step.grad, mm.loss_and_grad(mm.unflatten_params(step.before.theta, shapes), batch, "mse",
                                             "tanh")[0]) for step, batch in zip(run.steps, supports)]

        def meta(ps):
            state = mm.lstm_start(ps[:n], 3, H)
            for grad, loss in held:
                state = mm.lstm_step(ps[n:], state, grad, loss)[0]
            return float(mm.loss_and_grad(mm.unflatten_params(state.theta, shapes), query, "mse", "tanh")[0].mean())

        _, grads, lstm_grads = mm.lstm_meta_grad(self.lstm, self.params, supports, query, "mse", 2, True, "tanh")
        numeric = _fd_grad(meta, [p.copy() for p in self.params + self.lstm], eps=1e-7)
        self.assertLess(_rel_err(grads + lstm_grads, numeric), 1e-6)
        exact = mm.lstm_meta_grad(self.lstm, self.params, supports, query, "mse", 2, False, "tanh")[1]
        self.assertGreater(_rel_err(grads, exact), 1e-3)  # the dropped term matters

    def test_with_f_1_and_i_alpha_it_is_mamls_inner_step(self):
        alpha = 0.1
        lstm = [p.copy() for p in self.lstm]
        lstm[2][:], lstm[4][:] = 0.0, 0.0  # gates that read nothing
        lstm[3][:], lstm[5][:] = math.log(alpha / (1 - alpha)), 40.0  # i = alpha, f = 1 (sigmoid(40) is 1.0)
        supports, query = self._supports("mse")
        ours = mm.lstm_adapt(lstm, self.params, supports, "mse", 2, "tanh").params
        maml = mm.adapt(self.params, supports, "mse", alpha, 2, "tanh").params
        self.assertLess(_rel_err(ours, maml), 1e-12)
        for first_order in (False, True):
            loss, grads, _ = mm.lstm_meta_grad(lstm, self.params, supports, query, "mse", 2, first_order, "tanh")
            maml_loss, maml_grads = mm.maml_grad(self.params, supports, query, "mse", alpha, 2, first_order, "tanh")
            self.assertAlmostEqual(loss, maml_loss, places=12)
            self.assertLess(_rel_err(grads, maml_grads), 1e-10, f"first_order={first_order}")

    def test_it_starts_as_sgd_with_a_small_step(self):
        lstm = mm.init_meta_lstm(20, 0.01, np.random.default_rng(1))
        self.assertEqual([p.shape for p in lstm], [(24, 80), (80,), (22,), (1,), (22,), (1,)])
        self.assertAlmostEqual(float(mm.sigmoid(lstm[3][0])), 0.01, places=6)
        self.assertGreater(float(mm.sigmoid(lstm[5][0])), 0.99)

    def test_the_meta_gradient_clipped_by_its_joint_norm(self):
        grads, lstm_grads = [np.array([3.0, 0.0])], [np.array([[0.0], [4.0]])]  # a joint norm of 5
        (g,), (h,) = mm.clip_norm([grads, lstm_grads], 1.0)
        np.testing.assert_allclose(g, [0.6, 0.0])
        np.testing.assert_allclose(h, [[0.0], [0.8]])
        self.assertIs(mm.clip_norm([grads, lstm_grads], 0.0)[0], grads)  # 0: as they are
        np.testing.assert_allclose(mm.clip_norm([grads, lstm_grads], 10.0)[0][0], [3.0, 0.0])  # under the bound
        np.testing.assert_array_equal(grads[0], [3.0, 0.0])  # nothing passed in is modified

    def test_preprocessing(self):
        z = np.array([-3.0, 2e-4, 1e-6, 0.0, 5.0])
        value, slope = mm.lstm_preprocess(z)
        np.testing.assert_allclose(value, [[math.log(3) / 10, math.log(2e-4) / 10, -1, -1, math.log(5) / 10],
                                           [-1, 1, math.exp(10) * 1e-6, 0, 1]])
        eps = 1e-9
        numeric = (mm.lstm_preprocess(z + eps)[0] - mm.lstm_preprocess(z - eps)[0]) / (2 * eps)
        np.testing.assert_allclose(slope[:, [0, 1, 2, 4]], numeric[:, [0, 1, 2, 4]], rtol=1e-5)

    def test_nothing_passed_in_is_modified_and_errors_are_clear(self):
        supports, query = self._supports("mse")
        before = [p.copy() for p in self.params + self.lstm]
        mm.lstm_meta_grad(self.lstm, self.params, supports, query, "mse", 2)
        for a, b in zip(before, self.params + self.lstm):
            np.testing.assert_array_equal(a, b)
        with self.assertRaisesRegex(ValueError, r"inner_lr must be in \(0, 1\)"):
            mm.init_meta_lstm(4, 1.0, self.rng)
        bad = list(self.lstm)
        bad[2] = np.zeros(4)
        with self.assertRaisesRegex(ValueError, r"lstm's w_i must have shape \(5,\)"):
            mm.lstm_meta_grad(bad, self.params, supports, query, "mse", 2)
        with self.assertRaisesRegex(TypeError, "init_meta_lstm's list"):
            mm.lstm_meta_grad(self.lstm[:5], self.params, supports, query, "mse", 2)

    SHORT = ["sine", "--iterations", "300", "--log-every", "100", "--eval-tasks", "120", "--eval-points", "20",
             "--meta-lr", "0.005", "--hidden", "20"]

    def test_sine_by_each_algorithm_resumes_exactly(self):
        with tempfile.TemporaryDirectory() as d:
            for algorithm in ("lstm", "meta-sgd"):
                with self.subTest(algorithm=algorithm):
                    ck, a, b = (os.path.join(d, f"{algorithm}.{n}") for n in ("npz", "a.json", "b.json"))
                    flags = self.SHORT + ["--algorithm", algorithm]
                    short = [x if x != "300" else "200" for x in flags]
                    self.assertEqual(_run_main(flags + ["--json", a])[0], 0)
                    self.assertEqual(_run_main(short + ["--save", ck])[0], 0)
                    self.assertEqual(_run_main(flags + ["--load", ck, "--json", b])[0], 0)
                    ra, rb = _read_json(a), _read_json(b)
                    self.assertEqual(set(ra), set(TestSine.KEYS))
                    self.assertEqual(ra["mse"], rb["mse"])
                    self.assertLess(ra["mse"]["1"], ra["mse"]["0"])  # it learned to adapt
            # The pretrained baseline trains on the same tasks whatever the algorithm.
            self.assertEqual(_read_json(os.path.join(d, "lstm.a.json"))["pretrained_mse"],
                             _read_json(os.path.join(d, "meta-sgd.a.json"))["pretrained_mse"])

    def test_cartpole_by_the_lstm_resumes_exactly(self):
        flags = ["cartpole", "--algorithm", "lstm", "--log-every", "2", "--meta-batch", "4", "--fast-batch", "4",
                 "--hidden", "8", "--lstm-hidden", "4", "--eval-tasks", "4", "--eval-batch", "3", "--iterations"]
        ra, rb, out = _straight_and_resumed(self, flags, "4", "2")
        self.assertIn("k inner steps taken by the LSTM", out)
        self.assertEqual(ra["return"], rb["return"])
        self.assertEqual(ra["adaptation"], "learned optimiser (LSTM)")
        self.assertEqual(set(ra["return"]), {"0", "1", "2", "3"})

    def test_bad_settings_give_one_line(self):
        cases = [(["sine", "--lstm-hidden", "3"], "--lstm-hidden is read only by --algorithm lstm"),
                 (["sine", "--algorithm", "lstm", "--inner-lr", "1.5"], "--inner-lr must be in (0, 1)"),
                 (["cartpole", "--algorithm", "lstm", "--inner-lr", "1"], "--inner-lr must be in (0, 1)"),
                 (["cartpole", "--algorithm", "lstm", "--lvc"], "--lvc is read only by --algorithm maml"),
                 (["sine", "--algorithm", "protonet"], "invalid choice")]
        _refused(self, cases)


class TestPrototypicalNetworks(unittest.TestCase):
    """The metric-based family: the prototypical loss, its gradient in float64, and the protonet command."""
    SHORT = ["protonet", "--iterations", "200", "--log-every", "100", "--eval-episodes", "100", "--hidden", "32"]
    KEYS = {"accuracy", "accuracy_ci95", "oracle_accuracy", "oracle_accuracy_ci95", "bayes_accuracy",
            "bayes_accuracy_ci95", "raw_accuracy", "raw_accuracy_ci95", "ways", "seconds", "config"}

    def _episodes(self, rng, T=2, N=3, K=2, M=5, n_in=3):
        return mm.Episodes(rng.normal(size=(T, N, K, n_in)), rng.normal(size=(T, M, n_in)),
                           rng.integers(0, N, (T, M)))

    def test_gradient_against_finite_differences(self):
        rng = np.random.default_rng(0)
        params = mm.init_mlp((3, 5, 4), rng, "tanh", np.float64)
        for K in (1, 3):
            with self.subTest(shots=K):
                episodes = self._episodes(rng, K=K)
                loss, grads, accuracy = mm.protonet_grad(params, episodes, "tanh")
                numeric = _fd_grad(lambda ps: mm.protonet_grad(ps, episodes, "tanh")[0], [p.copy() for p in params],
                                   eps=1e-5)
                self.assertLess(_rel_err(grads, numeric), 1e-8)
                # A shift of every embedding moves no distance: the last bias has no gradient.
                self.assertLess(np.abs(grads[-1]).max(), 1e-15)
                self.assertEqual([g.shape for g in grads], [p.shape for p in params])
                # The loss and accuracy, one query at a time, by the paper's eqs. 1-2.
                z_s = mm.mlp_forward(params, episodes.support.reshape(2, -1, 3), "tanh")[0].reshape(2, 3, K, 4)
                z_q = mm.mlp_forward(params, episodes.query, "tanh")[0]
                total, right = 0.0, np.zeros(2)
                for t in range(2):
                    for q in range(5):
                        d = np.array([np.sum((z_q[t, q] - z_s[t, k].mean(axis=0)) ** 2) for k in range(3)])
                        total -= -d[episodes.labels[t, q]] - np.log(np.exp(-d).sum())
                        right[t] += d.argmin() == episodes.labels[t, q]
                self.assertAlmostEqual(loss, total / 10, places=12)
                np.testing.assert_array_equal(accuracy, right / 5)

    def test_the_squared_distance_is_a_linear_classifier(self):
        # Snell et al. sec. 2.4: softmax(-||z - c_k||^2) = softmax(w_k . z + b_k), w_k = 2 c_k, b_k = -||c_k||^2.
        rng = np.random.default_rng(1)
        z, c = rng.normal(size=(3, 7, 4)), rng.normal(size=(3, 5, 4))
        linear = z @ np.swapaxes(2 * c, 1, 2) - (c * c).sum(-1)[:, None, :]
        np.testing.assert_allclose(mm.log_softmax(mm.proto_logits(z, c)), mm.log_softmax(linear), atol=1e-12)
        np.testing.assert_array_equal(mm.nearest_prototype(rng.normal(size=(3, 5, 2, 4)) * 0 + c[:, :, None], z),
                                      linear.argmax(-1))

    def test_the_benchmark_and_its_oracle(self):
        rng = np.random.default_rng(2)
        world = mm.proto_world()
        np.testing.assert_array_equal(world[0], mm.proto_world()[0])  # the map is the benchmark's, fixed
        batch = mm.sample_few_shot(rng, 50, 5, 3, 4, world)
        x, u = batch.episodes, batch.latent
        self.assertEqual(x.support.shape, (50, 5, 3, mm.PROTO_SIGNAL + mm.PROTO_NUISANCE))
        self.assertEqual(u.query.shape, (50, 20, mm.PROTO_LATENT))
        np.testing.assert_array_equal(x.labels[0], np.repeat(np.arange(5), 4))
        np.testing.assert_allclose(x.support[..., :mm.PROTO_SIGNAL], np.tanh(u.support @ world[0] + world[1]),
                                   rtol=1e-6, atol=1e-6)
        # The learner sees the class through the map: the oracle knows the latent means better than raw x.
        oracle = (mm.nearest_prototype(u.support, u.query) == x.labels).mean()
        raw = (mm.nearest_prototype(x.support, x.query) == x.labels).mean()
        self.assertGreater(oracle, raw + 0.15)

    def test_short_run_learns_resumes_and_fails_clearly(self):
        with tempfile.TemporaryDirectory() as d:
            ck, a, b = (os.path.join(d, n) for n in ("ck.npz", "a.json", "b.json"))
            status, out, err = _run_main(self.SHORT + ["--json", a])
            self.assertEqual(status, 0, err)
            self.assertIn("ETA", out)
            self.assertEqual(_run_main([x if x != "200" else "100" for x in self.SHORT] + ["--save", ck])[0], 0)
            self.assertEqual(_run_main(self.SHORT + ["--load", ck, "--json", b])[0], 0)
            ra, rb = _read_json(a), _read_json(b)
        self.assertEqual(set(ra), self.KEYS)
        self.assertEqual(ra["accuracy"], rb["accuracy"])
        for key in ("accuracy", "oracle_accuracy", "raw_accuracy", "bayes_accuracy"):
            self.assertEqual(set(ra[key]), {"1", "5"})
        for shots in ("1", "5"):
            self.assertGreater(ra["accuracy"][shots], ra["raw_accuracy"][shots] + 0.1)
            self.assertLessEqual(ra["accuracy"][shots], ra["oracle_accuracy"][shots] + 3 * ra["accuracy_ci95"][shots])
        cases = [(["protonet", "--ways", "1"], "--ways must be >= 2"),
                 (["protonet", "--meta-lr", "0"], "--meta-lr must be > 0"),
                 (["protonet", "--inner-lr", "0.1"], "unrecognized arguments")]
        _refused(self, cases)

    def test_bad_episodes_are_refused_by_name(self):
        rng = np.random.default_rng(3)
        params = mm.init_mlp((3, 4, 2), rng, "relu", np.float64)
        good = self._episodes(rng)
        cases = [(good._replace(labels=good.labels + 3), "labels must be integers in [0, 3)"),
                 (good._replace(labels=good.labels.astype(float)), "labels must be integers"),
                 (good._replace(query=good.query[..., :2]), "the network's input width 3"),
                 (good._replace(support=good.support[0]), "support must be (T, N, K, in)"),
                 ((good.support, good.query, good.labels), "must be an Episodes")]
        for episodes, message in cases:
            with self.subTest(message=message):
                with self.assertRaises((ValueError, TypeError)) as caught:
                    mm.protonet_grad(params, episodes)
                self.assertIn(message, str(caught.exception))
        before = [p.copy() for p in params]
        mm.protonet_grad(params, good)
        for p, q in zip(params, before):
            np.testing.assert_array_equal(p, q)

    # Metric-based meta-RL: the running prototype, the identification episodes, the cartpole command.
    def _countdown_family(self):
        lengths = np.array([3, 2, 4])
        return mm.TaskFamily("countdown", sample_tasks=lambda rng, n: {"length": lengths[:n]},
                             make_env=lambda tasks, episodes: _CountdownEnv(np.repeat(tasks["length"], episodes)),
                             obs_dim=1, horizon=10, n_actions=2, obs_scale=2.0)

    def test_the_running_prototype_by_hand(self):
        rng = np.random.default_rng(4)
        family = self._countdown_family()
        policy = mm.init_mlp((1 + 3, 5, 2), rng, "tanh", np.float64)
        encoder = mm.init_mlp((2 + 2, 6, 3), rng, "relu", np.float64)
        env = family.make_env(family.sample_tasks(rng, 3), 1)
        trials = mm.rollout_proto_trials((policy, encoder), env, rng, 2, 20, family)
        lengths = [3, 2, 4]
        for n, length in enumerate(lengths):
            s = np.concatenate([np.arange(length)] * 2) / 2.0  # the trial's observations, scaled
            steps = 2 * length
            np.testing.assert_array_equal(trials["mask"][n], np.arange(trials["mask"].shape[1]) < steps)
            total, count = np.zeros(3), 0
            for k in range(steps):
                seen = k > 0 and k != length  # no transition into the trial's first step or an episode's
                self.assertEqual(bool(trials["seen"][n, k]), seen)
                if seen:
                    a = trials["actions"][n, k - 1]
                    t = np.array([s[k - 1], a == 0, a == 1, s[k] - s[k - 1]], float)
                    np.testing.assert_array_equal(trials["transitions"][n, k], t)
                    total, count = total + mm.mlp_forward(encoder, t[None, None], "relu")[0][0, 0], count + 1
                c = total / max(count, 1)  # the mean embedding of the transitions seen so far
                np.testing.assert_allclose(trials["x"][n, k], np.concatenate([[s[k]], c]), atol=1e-12)
        # The policy's actions are drawn from its output on [s, c_t]: with all logits on one action, that one.
        sure = [p.copy() for p in policy]
        sure[-2][:], sure[-1][:] = 0.0, [0.0, 50.0]
        again = mm.rollout_proto_trials((sure, encoder), family.make_env(family.sample_tasks(rng, 3), 1), rng, 2, 20,
                                        family)
        self.assertTrue((again["actions"][again["mask"]] == 1).all())

    def test_identification_episodes_are_tasks_as_classes(self):
        rng = np.random.default_rng(5)
        tasks, per_task, K = 6, 3, 7
        seen = rng.random((tasks * per_task, K)) < 0.7
        task_of = np.repeat(np.arange(tasks), per_task)[:, None] * np.ones((1, K))
        transitions = np.stack([task_of, rng.normal(size=task_of.shape)], axis=-1)  # [the trial's task, noise]
        transitions[~seen] = -1.0  # where there is no transition
        trials = {"seen": seen, "transitions": transitions}
        episodes = mm.transition_episodes(trials, per_task, rng, 4, 2, 3, 50)
        self.assertEqual(episodes.support.shape, (50, 4, 2, 2))
        self.assertEqual(episodes.query.shape, (50, 12, 2))
        for e in range(50):
            support_tasks = episodes.support[e, :, :, 0]  # (ways, shots)
            self.assertTrue((support_tasks >= 0).all())  # only transitions that were seen
            self.assertTrue((support_tasks == support_tasks[:, :1]).all())  # one task per class
            self.assertEqual(len(set(support_tasks[:, 0])), 4)  # four different tasks
            np.testing.assert_array_equal(episodes.query[e, :, 0], support_tasks[episodes.labels[e], 0])
            drawn = np.concatenate([episodes.support[e, k, :, 1] for k in range(4)] + [episodes.query[e, :, 1]])
            self.assertEqual(len(set(drawn)), len(drawn))  # no transition twice in an episode
        with self.assertRaisesRegex(ValueError, "fewer than shots \\+ queries"):
            mm.transition_episodes(trials, per_task, rng, 4, 10, 10, 1)

    def test_ppo_weights(self):
        mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
        np.testing.assert_allclose(mm.ppo_weights(mask), mask / 6)
        np.testing.assert_allclose(mm.ppo_weights(mask, trial_mean=True), [[0.25, 0.25, 0, 0], [0.125] * 4])

    def test_cartpole_by_protonet_resumes_exactly_and_fails_clearly(self):
        flags = ["cartpole", "--algorithm", "protonet", "--log-every", "1", "--meta-batch", "5", "--rl2-trials", "2",
                 "--hidden", "8", "--proto-hidden", "8", "--eval-tasks", "5", "--eval-batch", "2", "--eval-episodes",
                 "20", "--encoder-steps", "2", "--iterations"]
        ra, rb, out = _straight_and_resumed(self, flags, "2", "1")
        self.assertIn("identification", out)
        self.assertEqual(ra["return"], rb["return"])
        self.assertEqual(ra["identification_accuracy"], rb["identification_accuracy"])
        self.assertEqual(set(ra["identification_accuracy"]), {"1", "5"})
        self.assertEqual(set(ra["return"]), {"0", "1", "2", "3"})
        self.assertEqual(ra["adaptation"], "in-context (prototype)")
        # protonet's own default of --iterations, where the flag is not given
        config = mm.CartPoleConfig(algorithm="protonet")
        self.assertEqual(mm._algorithm_defaults(config, set()).iterations, 200)
        self.assertEqual(mm._algorithm_defaults(config, {"iterations"}).iterations, 100)
        self.assertEqual(mm._algorithm_defaults(mm.CartPoleConfig(), set()).iterations, 100)
        self.assertEqual(mm._algorithm_defaults(mm.SineConfig(algorithm="lstm"), set()).iterations, 30000)
        self.assertEqual(mm._algorithm_defaults(mm.SineConfig(algorithm="meta-sgd"), set()).iterations, 70000)
        cases = [(["--proto-ways", "6"], "--proto-ways (6) must be at most --meta-batch (5)"),
                 (["--rl2-task-loss", "1"], "--rl2-task-loss is read only by --algorithm rl2"),
                 (["--encoder-lr", "0"], "--encoder-lr must be > 0")]
        _refused(self, [(flags + ["1"] + extra, message) for extra, message in cases])
        status, _, err = _run_main(["cartpole", "--algorithm", "maml", "--proto-ways", "3"])
        self.assertIn("--proto-ways is read only by --algorithm protonet", err)
        with self.assertRaisesRegex(ValueError, "ProtoNet here has a categorical policy"):
            mm.proto_rl_init(mm.nav2d_family(), mm.ProtoRLConfig(), np.random.default_rng(0))


# ----------------------------------------------------------------------------
# Meta-RL: returns, baseline, advantages, rollouts, environments, commands.
# ----------------------------------------------------------------------------
class _CountdownEnv:
    """A batched env whose env i ends after lengths[i] steps; obs = the step count, reward 1."""

    def __init__(self, lengths):
        self.lengths, self.num_envs = np.asarray(lengths), len(lengths)

    def reset(self, *, seed=None, options=None):
        self.steps = np.zeros(self.num_envs, dtype=int)
        return self.steps[:, None].astype(np.float32), {}

    def step(self, actions):
        self.steps += 1
        terminated = self.steps >= self.lengths
        self.steps[terminated] = 0
        return self.steps[:, None].astype(np.float32), np.ones(self.num_envs, np.float32), terminated, \
            np.zeros(self.num_envs, bool), {}


class TestPolicyGradient(unittest.TestCase):
    def test_helpers_reject_bad_arguments(self):
        rng = np.random.default_rng(0)
        cases = [(lambda: mm.discounted_returns(np.ones((1, 3)), 1.5), ValueError, r"gamma must be in \[0.0, 1.0\]"),
                 (lambda: mm.conjugate_gradient(lambda v: v, [np.ones(3)], iters=0), ValueError, "iters must be"),
                 (lambda: mm.mean_ci95(np.array([1.0])), ValueError, "at least 2 numbers"),
                 (lambda: mm.episodes_to_solve(np.ones((2, 50))), ValueError, r"window \(100\) must not exceed"),
                 (lambda: mm.sample_nav_tasks(rng, 0), ValueError, "n must be an integer >= 1"),
                 (lambda: mm.sample_sine_tasks(0, 3), TypeError, "rng must be a numpy.random.Generator"),
                 (lambda: mm.VecNav2D(np.zeros((0, 2))), ValueError, "num_envs >= 1"),
                 (lambda: mm.advantages(np.ones((1, 3)), np.ones((1, 3)), np.ones((1, 3), bool), lam=-1), ValueError,
                  r"lam must be in \[0.0, 1.0\]")]
        for i, (call, err, pattern) in enumerate(cases):
            with self.subTest(case=i), self.assertRaisesRegex(err, pattern):
                call()

    def test_returns_and_advantages_by_hand(self):
        rewards = np.array([[1.0, 2.0, 3.0]])
        np.testing.assert_allclose(mm.discounted_returns(rewards, 0.5), [[2.75, 3.5, 3.0]])
        values, mask = np.ones((1, 3)), np.ones((1, 3), bool)
        # delta = r + 0.5 V' - V = [0.5, 1.5, 2] (V = 0 after the end); lam = 1 gives R - V.
        np.testing.assert_allclose(mm.advantages(rewards, values, mask, 0.5, 1.0), [[1.75, 2.5, 2.0]])
        np.testing.assert_allclose(mm.advantages(rewards, values, mask, 0.5, 0.0), [[0.5, 1.5, 2.0]])
        np.testing.assert_allclose(mm.advantages(rewards, values, mask, 0.5, 0.5), [[0.5 + 0.25 * (1.5 + 0.25 * 2),
                                                                                    1.5 + 0.25 * 2, 2.0]])
        # An episode that ends after 2 steps: the third step is masked and V(s_2) is not bootstrapped.
        short = np.array([[1.0, 2.0, 0.0]])
        np.testing.assert_allclose(mm.advantages(short, values, np.array([[True, True, False]]), 0.5, 1.0),
                                   [[1.0, 1.0, 0.0]])

    def test_baseline_is_the_per_task_ridge_fit(self):
        rng = np.random.default_rng(0)
        T, E, H, d = 3, 4, 7, 2
        obs = rng.normal(size=(T, E, H, d))
        mask = np.arange(H) < rng.integers(1, H + 1, size=(T, E, 1))
        returns = rng.normal(size=(T, E, H)) * mask
        fitted = mm.fit_baseline(obs, returns, mask)
        for t in range(T):  # the naive way: features of the real steps, one task at a time
            rows = [(np.concatenate([o, o ** 2, [s / 100, (s / 100) ** 2, (s / 100) ** 3, 1.0]]), returns[t, e, s])
                    for e in range(E) for s in range(H) if mask[t, e, s] for o in [np.clip(obs[t, e, s], -10, 10)]]
            F, R = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
            c = np.linalg.solve(F.T @ F + 1e-5 * np.eye(F.shape[1]), F.T @ R)
            np.testing.assert_allclose(fitted[t][mask[t]], F @ c, rtol=1e-8, atol=1e-10)
            self.assertTrue((fitted[t][~mask[t]] == 0).all())

    def test_rollout_masks_episodes_that_end_at_different_times(self):
        lengths = [1, 2, 3, 4, 5, 6]
        params = mm.init_mlp((1, 4, 2), np.random.default_rng(0))
        episodes = mm.rollout(params, _CountdownEnv(lengths), 2, np.random.default_rng(1), horizon=10)
        self.assertEqual(episodes["obs"].shape, (2, 3, 6, 1))
        self.assertEqual(episodes["actions"].shape, (2, 3, 6))
        self.assertEqual(episodes["rewards"].shape, (2, 3, 6))
        np.testing.assert_array_equal(episodes["mask"].sum(axis=-1), [[1, 2, 3], [4, 5, 6]])
        np.testing.assert_array_equal(mm.episode_returns(episodes), [[1, 2, 3], [4, 5, 6]])
        for i, n in enumerate(lengths):
            t, e = divmod(i, 3)
            self.assertTrue(episodes["mask"][t, e, :n].all() and not episodes["mask"][t, e, n:].any())
            np.testing.assert_array_equal(episodes["obs"][t, e, :n, 0], np.arange(n))  # each its own episode
        self.assertTrue(set(np.unique(episodes["actions"])) <= {0, 1})
        cut = mm.rollout(params, _CountdownEnv(lengths), 2, np.random.default_rng(1), horizon=4)
        np.testing.assert_array_equal(cut["mask"].sum(axis=-1), [[1, 2, 3], [4, 4, 4]])
        with self.assertRaisesRegex(ValueError, "multiple of n_tasks"):
            mm.rollout(params, _CountdownEnv(lengths), 4, np.random.default_rng(1), horizon=4)
        with self.assertRaisesRegex(ValueError, "policy must be one of"):
            mm.rollout(params, _CountdownEnv(lengths), 2, np.random.default_rng(1), 4, policy="beta")
        with self.assertRaisesRegex(ValueError, "horizon must be an integer >= 1"):
            mm.rollout(params, _CountdownEnv(lengths), 2, np.random.default_rng(1), 0)
        with self.assertRaisesRegex(TypeError, "rng must be a numpy.random.Generator"):
            mm.rollout(params, _CountdownEnv(lengths), 2, 0, 4)

    def test_rollout_with_min_steps_by_hand(self):
        # Task 0: episodes of 3 and 5 steps; by step 5 (0-based) it has finished 3 + 3 + 5 >= 10 steps.
        # Task 1: episodes of 2 and 7; by step 6, 2 + 2 + 2 + 7 >= 10. Running episodes are dropped.
        params = mm.init_mlp((1, 4, 2), np.random.default_rng(0))
        episodes = mm.rollout_min_steps(params, _CountdownEnv([3, 5, 2, 7]), 2, np.random.default_rng(1), 10,
                                        horizon=8)
        self.assertEqual(episodes["obs"].shape, (2, 4, 8, 1))
        np.testing.assert_array_equal(episodes["mask"].sum(axis=-1), [[3, 3, 5, 0], [2, 2, 2, 7]])
        for t, e in zip(*np.nonzero(episodes["mask"][..., 0])):
            n = episodes["mask"][t, e].sum()
            self.assertTrue(episodes["mask"][t, e, :n].all())
            np.testing.assert_array_equal(episodes["obs"][t, e, :n, 0], np.arange(n))  # each from its start
        np.testing.assert_allclose(mm.mean_returns(episodes), [11 / 3, 13 / 4])  # over the episodes, not the rows
        with self.assertRaisesRegex(ValueError, "within horizon"):
            mm.rollout_min_steps(params, _CountdownEnv([3, 9]), 1, np.random.default_rng(1), 30, horizon=8)
        with self.assertRaisesRegex(ValueError, "min_steps must be"):
            mm.rollout_min_steps(params, _CountdownEnv([3, 5]), 1, np.random.default_rng(1), 0, horizon=8)

    def test_rollout_with_min_steps_equals_rllabs_sampler_loop(self):
        # Goals near the start and a narrow policy: episodes end after 1 to 100 steps.
        T, E, min_steps = 3, 4, 150
        goals = np.array([[0.004, 0.0], [0.0, -0.006], [0.05, 0.05]])
        params = mm.init_policy(mm.nav2d_family(), mm.Nav2DConfig(hidden=8, init_log_std=-2.5, init_out_scale=0.0),
                                np.random.default_rng(0))
        params[-1][:2] = 0.0  # the mean velocity: 0 everywhere
        got = mm.rollout_min_steps(params, mm.nav_envs({"goal": goals}, E), T, np.random.default_rng(4), min_steps,
                                   mm.NAV_MAX_EPISODE_STEPS, "gaussian", "relu")
        # rllab's VectorizedSampler, one env at a time: keep each episode as it ends until the task has enough.
        rng, env = np.random.default_rng(4), mm.nav_envs({"goal": goals}, E)
        ob, _ = env.reset(seed=int(rng.integers(2 ** 63)))
        draws = mm.device_rng(rng)
        running, kept, count = [[] for _ in range(T * E)], [[] for _ in range(T)], np.zeros(T, int)
        while (count < min_steps).any():
            x = ob.reshape(T, E, 2)
            a = mm.sample_actions(mm.mlp_forward(params, x, "relu")[0], draws, "gaussian").reshape(T * E, 2)
            ob, reward, terminated, truncated, _ = env.step(a)
            full = count >= min_steps
            for i in range(T * E):
                running[i].append((x.reshape(T * E, 2)[i], a[i], reward[i]))
                if terminated[i] or truncated[i]:
                    if not full[i // E]:
                        kept[i // E].append(running[i])
                        count[i // E] += len(running[i])
                    running[i] = []
        lengths = [sorted(len(ep) for ep in k) for k in kept]
        self.assertTrue(any(n < 100 for n in lengths[0]) and max(map(len, kept)) > E)  # restarts happened
        for t in range(T):
            rows = [e for e in range(got["mask"].shape[1]) if got["mask"][t, e, 0]]
            self.assertEqual(sorted(int(got["mask"][t, e].sum()) for e in rows), lengths[t])
            ours = sorted((got["obs"][t, e][got["mask"][t, e]].tobytes(), got["actions"][t, e][got["mask"][t, e]]
                           .tobytes(), got["rewards"][t, e][got["mask"][t, e]].tobytes()) for e in rows)
            theirs = sorted((np.array([s[0] for s in ep]).tobytes(), np.array([s[1] for s in ep]).tobytes(),
                             np.array([s[2] for s in ep]).tobytes()) for ep in kept[t])
            self.assertEqual(ours, theirs)
            self.assertFalse(got["mask"][t, len(rows):].any())  # the empty rows come last

    def test_rollout_with_per_task_params_equals_one_task_at_a_time(self):
        rng = np.random.default_rng(3)
        params = mm.init_mlp((4, 8, 2), rng)
        per_task = [p + 0.5 * rng.normal(size=(2,) + p.shape).astype(p.dtype) for p in params]
        tasks = cp.sample_tasks(rng, 2)
        both = mm.rollout(per_task, mm.cartpole_envs(tasks, 3), 2, np.random.default_rng(4), 50)
        self.assertEqual(both["obs"].shape[:2], (2, 3))
        # The same draws taken one task at a time: the actions follow each task's own params.
        for t in range(2):
            x = both["obs"][t][None]
            logits = mm.mlp_forward([p[t] for p in per_task], x)[0]
            other = mm.mlp_forward([p[1 - t] for p in per_task], x)[0]
            self.assertFalse(np.allclose(logits, other))
            logp = mm.log_softmax(logits)[0]
            taken = np.take_along_axis(logp, both["actions"][t][..., None], -1)[..., 0]
            self.assertTrue(np.isfinite(taken[both["mask"][t]]).all())

    def test_categorical_and_gaussian_sampling(self):
        rng = np.random.default_rng(5)
        logits = np.log(np.array([[[0.2, 0.5, 0.3]]] * 1)).repeat(20000, axis=1)  # (1, 20000, 3)
        counts = np.bincount(mm.sample_actions(logits, rng).ravel(), minlength=3) / 20000
        np.testing.assert_allclose(counts, [0.2, 0.5, 0.3], atol=0.015)
        out = np.zeros((1, 20000, 4))
        out[..., 0], out[..., 3] = 1.5, np.log(0.5)  # means (1.5, 0), stds (1, 0.5)
        a = mm.sample_actions(out, rng, "gaussian")
        np.testing.assert_allclose(a.mean(axis=(0, 1)), [1.5, 0.0], atol=0.03)
        np.testing.assert_allclose(a.std(axis=(0, 1)), [1.0, 0.5], atol=0.03)

    def test_pg_weights_are_normalised_per_task(self):
        rng = np.random.default_rng(2)
        params = mm.init_mlp((4, 8, 2), rng)
        episodes = mm.rollout(params, mm.cartpole_envs(cp.sample_tasks(rng, 3), 4), 3, rng, 100)
        x, (actions, weights) = mm.pg_batch(episodes)
        n = episodes["mask"].reshape(3, -1).sum(axis=1)
        self.assertEqual(x.shape, (3, n.max(), 4))
        for t in range(3):
            w = weights[t, :n[t]] * n[t]  # the normalised advantages
            self.assertAlmostEqual(float(w.mean()), 0.0, places=5)
            self.assertAlmostEqual(float((w ** 2).mean()), 1.0, places=4)
            self.assertTrue((weights[t, n[t]:] == 0).all())  # padding
            np.testing.assert_array_equal(x[t, :n[t]], episodes["obs"][t][episodes["mask"][t]])  # real steps, in order
            np.testing.assert_array_equal(actions[t, :n[t]], episodes["actions"][t][episodes["mask"][t]])

    def test_nav2d_steps_by_hand(self):
        env = mm.VecNav2D([[0.05, 0.0], [0.3, 0.3]])
        obs, _ = env.reset(seed=0)
        np.testing.assert_array_equal(obs, np.zeros((2, 2)))
        # Velocities 0.1 * action, each component clipped to [-0.1, 0.1].
        obs, reward, terminated, truncated, _ = env.step(np.array([[1.0, 0.0], [5.0, -5.0]]))
        np.testing.assert_allclose(obs, [[0.1, 0.0], [0.1, -0.1]], rtol=1e-6)
        np.testing.assert_allclose(reward, [-0.05, -np.sqrt(0.2 ** 2 + 0.4 ** 2)], rtol=1e-6)
        np.testing.assert_array_equal(terminated, [False, False])
        # Within 0.01 of the goal on both axes: the episode ends, the next one starts at the origin.
        obs, reward, terminated, truncated, info = env.step(np.array([[-0.45, 0.05], [0.0, 0.0]]))
        np.testing.assert_array_equal(terminated, [True, False])
        np.testing.assert_allclose(info["final_obs"][0], [0.055, 0.005], rtol=1e-6)
        np.testing.assert_array_equal(obs[0], [0.0, 0.0])
        self.assertAlmostEqual(float(reward[0]), -np.sqrt(0.005 ** 2 * 2), places=6)
        for _ in range(98):
            obs, reward, terminated, truncated, _ = env.step(np.zeros((2, 2)))
        np.testing.assert_array_equal(truncated, [False, True])  # env 1's 100th step
        with self.assertRaisesRegex(ValueError, "actions must have shape"):
            env.step(np.zeros(2))
        with self.assertRaisesRegex(ValueError, "goals must be"):
            mm.VecNav2D(np.zeros((3, 3)))


    def test_gaussian_policy_starts_at_init_log_std(self):
        config = mm.Nav2DConfig(hidden=8, init_log_std=-1.5)
        params = mm.init_policy(mm.nav2d_family(), config, np.random.default_rng(0))
        out = mm.mlp_forward(params, np.random.default_rng(1).uniform(-0.5, 0.5, (1, 5, 2)).astype(np.float32),
                             "relu")[0]
        np.testing.assert_array_equal(out[..., 2:], -1.5)  # the log-std, the same in every state
        self.assertFalse(np.allclose(out[0, 0, :2], out[0, 1, :2]))  # the mean follows the state
        cart = mm.init_policy(mm.cartpole_family(), mm.CartPoleConfig(hidden=8), np.random.default_rng(0))
        plain = mm.init_mlp((4, 8, 8, 2), np.random.default_rng(0), "tanh")
        for a, b in zip(cart, plain):
            np.testing.assert_array_equal(a, b)

    def test_init_out_scale_scales_the_last_weights_only(self):
        plain = mm.init_mlp((2, 8, 8, 4), np.random.default_rng(0), "relu", bias_outputs=2)
        for scale in (0.01, 1.0):
            config = mm.Nav2DConfig(hidden=8, init_out_scale=scale, init_log_std=0.0)
            params = mm.init_policy(mm.nav2d_family(), config, np.random.default_rng(0))
            for i, (a, b) in enumerate(zip(params, plain)):
                np.testing.assert_array_equal(a, b * scale if i == len(params) - 2 else b)
                self.assertEqual(a.dtype, np.float32)

    def test_evaluation_steps_equal_a_loop_by_hand(self):
        # Step 1 of inner_lr, then steps of later_lr, each on fresh episodes of the current policy:
        # eval_batch episodes, or those eval_batch envs finish in eval_min_steps steps.
        goals = mm.sample_nav_tasks(np.random.default_rng(1), 2)
        for min_steps in (0, 450):
            config = mm.Nav2DConfig(hidden=8, eval_batch=3, eval_min_steps=min_steps)
            params = mm.init_policy(mm.nav2d_family(), config, np.random.default_rng(0))
            got = mm.meta_rl_evaluate(params, mm.nav2d_family(), config, goals, np.random.default_rng(2), 0.3, 0.05)
            rng, p = np.random.default_rng(2), params
            for step, lr in zip("0123", (0.3, 0.05, 0.05, None)):
                env = mm.nav_envs(goals, 3)
                episodes = (mm.rollout_min_steps(p, env, 2, rng, min_steps, mm.NAV_MAX_EPISODE_STEPS, "gaussian",
                                                 "relu") if min_steps else
                            mm.rollout(p, env, 2, rng, mm.NAV_MAX_EPISODE_STEPS, "gaussian", "relu"))
                self.assertEqual(episodes["mask"].shape[1], 3 if min_steps == 0 else 6)  # 2 rounds of 100 steps
                np.testing.assert_array_equal(got[step], mm.episode_returns(episodes).mean(axis=1))
                if lr is not None:
                    p = mm.adapt(p, mm.pg_batch(episodes), "gauss", lr, 1, "relu").params
            same = mm.meta_rl_evaluate(params, mm.nav2d_family(), config, goals, np.random.default_rng(2), 0.3, None)
            np.testing.assert_array_equal(same["1"], got["1"])  # later_lr does not touch the first step
            self.assertFalse(np.array_equal(same["2"], got["2"]))


class TestTRPO(unittest.TestCase):
    """TRPO's pieces against central finite differences (float64): the policies' KL and Fisher,
    the Gauss-Newton product, conjugate gradient, the meta-Fisher as the meta-KL's Hessian."""

    def setUp(self):
        self.rng = np.random.default_rng(3)

    def test_policy_kl_and_its_hessian_the_fisher(self):
        nodes, weights = np.polynomial.hermite_e.hermegauss(4)  # exact for the quadratic log-ratio of Gaussians
        weights = weights / weights.sum()
        for policy, n_out in (("categorical", 3), ("gaussian", 4)):
            with self.subTest(policy=policy):
                kl, fisher = mm.POLICY_KL[policy]
                logp = mm.POLICIES[policy][0]
                old, out = 0.5 * self.rng.normal(size=(2, 5, n_out)), 0.5 * self.rng.normal(size=(2, 5, n_out))
                np.testing.assert_allclose(kl(old, old), 0.0, atol=1e-12)
                # KL(old || new) = E_{a ~ pi_old}[log pi_old(a) - log pi(a)], by the policies' log-likelihoods.
                expected = np.zeros((2, 5))
                if policy == "categorical":
                    for a in range(n_out):
                        actions = np.full((2, 5), a)
                        expected += np.exp(logp(old, actions)) * (logp(old, actions) - logp(out, actions))
                else:
                    for (i, zi), (j, zj) in itertools.product(enumerate(nodes), repeat=2):
                        actions = old[..., :2] + np.exp(old[..., 2:]) * np.array([zi, zj])
                        expected += weights[i] * weights[j] * (logp(old, actions) - logp(out, actions))
                np.testing.assert_allclose(kl(old, out), expected, rtol=1e-10)
                # The Fisher product is the KL's Hessian at out = old: u^T F r by second differences.
                u, r, eps = self.rng.normal(size=old.shape), self.rng.normal(size=old.shape), 1e-4
                quad = lambda w: (kl(old, old + eps * w) + kl(old, old - eps * w)) / eps ** 2  # w^T F w
                np.testing.assert_allclose((u * fisher(old, r)).sum(-1), (quad(u + r) - quad(u - r)) / 4,
                                           rtol=1e-5, atol=1e-8)

    def test_gauss_newton_product(self):
        # u^T J^T M J v = (J u) . M (J v), J u by central differences of the network's output.
        for activation, bias_outputs in (("tanh", 0), ("relu", 2)):
            params = mm.init_mlp((2, 5, 4, 4), self.rng, activation, np.float64, bias_outputs)
            x = self.rng.normal(size=(3, 6, 2))
            c = self.rng.uniform(0.5, 2.0, size=(3, 6, 4))
            u, v = ([self.rng.normal(size=p.shape) for p in params] for _ in range(2))
            hs = mm.mlp_forward(params, x, activation)[1]
            gv = mm.mlp_gnvp(params, hs, mm.mlp_slopes(hs, activation), v, lambda r: c * r)
            eps = 1e-6
            jac = lambda d: (mm.mlp_forward([p + eps * di for p, di in zip(params, d)], x, activation)[0]
                             - mm.mlp_forward([p - eps * di for p, di in zip(params, d)], x, activation)[0]) / (2 * eps)
            expected = (jac(u) * c * jac(v)).sum(axis=(1, 2))  # per task
            got = sum((ui * gi).sum(axis=tuple(range(1, gi.ndim))) for ui, gi in zip(u, gv))
            np.testing.assert_allclose(got, expected, rtol=1e-6)

    def test_conjugate_gradient_solves_spd_systems(self):
        m = self.rng.normal(size=(7, 7))
        A = m @ m.T + np.eye(7)
        b = self.rng.normal(size=7)
        split = lambda z: [z[:3], z[3:].reshape(2, 2)]  # a list of arrays, as params are
        matvec = lambda xs: split(A @ np.concatenate([xi.ravel() for xi in xs]))
        x = mm.conjugate_gradient(matvec, split(b), iters=7)
        np.testing.assert_allclose(np.concatenate([xi.ravel() for xi in x]), np.linalg.solve(A, b), rtol=1e-8)

    def test_meta_fisher_is_the_hessian_of_the_meta_kl(self):
        eps = 3e-5  # the second differences' error falls as eps^2 down to here (measured)
        for loss, n_out, bias_outputs in (("pg", 3, 0), ("gauss", 4, 2), ("gauss_lvc", 4, 0)):
            for steps, first_order, per_step in ((0, False, False), (1, False, False), (2, False, False),
                                                 (1, True, False), (2, False, True)):
                with self.subTest(loss=loss, inner_steps=steps, first_order=first_order, per_step=per_step):
                    kl = mm.POLICY_KL[mm.LOSS_POLICY[loss]][0]
                    params = mm.init_mlp((2, 5, 4, n_out), self.rng, "tanh", np.float64, bias_outputs)
                    support, x_q = _batch(self.rng, loss, 3, 4, 2, n_out), self.rng.normal(size=(3, 5, 2))
                    if per_step:  # a batch for each inner step
                        support = [support] + [_batch(self.rng, loss, 3, 6, 2, n_out) for _ in range(steps - 1)]
                    kl_weights = self.rng.uniform(0.1, 1.0, size=(3, 5))
                    thetas = mm.adapt(params, support, loss, 0.1, steps, "tanh").thetas
                    old_out = mm.mlp_forward(thetas[-1], x_q, "tanh")[0]
                    product = mm._meta_fisher(params, thetas, mm._step_batches(support, steps),
                                              mm.KLBatch(x_q, old_out, kl_weights), loss, 0.1, first_order, "tanh")

                    def meta_kl(d):  # first-order: the same shift of every task's adapted params (J = I)
                        moved = ([t + di for t, di in zip(thetas[-1], d)] if first_order else
                                 mm.adapt([p + di for p, di in zip(params, d)], support, loss, 0.1, steps,
                                          "tanh").params)
                        return (kl_weights * kl(old_out, mm.mlp_forward(moved, x_q, "tanh")[0])).sum() / 3

                    quad = lambda w: (meta_kl([eps * wi for wi in w]) + meta_kl([-eps * wi for wi in w])) / eps ** 2
                    u, v = ([self.rng.normal(size=p.shape) for p in params] for _ in range(2))
                    got = mm._dot(u, product(v))
                    expected = (quad([a + b for a, b in zip(u, v)]) - quad([a - b for a, b in zip(u, v)])) / 4
                    self.assertLess(abs(got - expected), 1e-5 * (abs(expected) + 1e-3))

    def _problem(self, loss="gauss", n_out=4, bias_outputs=2, dtype=np.float64):
        params = mm.init_mlp((2, 6, 6, n_out), self.rng, "tanh", dtype, bias_outputs)
        support, query = _batch(self.rng, loss, 3, 8, 2, n_out), _batch(self.rng, loss, 3, 8, 2, n_out)
        kl_weights = np.ones((3, 8)) / 8
        return params, support, query, kl_weights

    def test_step_improves_the_surrogate_within_the_trust_region(self):
        for loss, n_out, bias_outputs, steps, per_step in (("gauss", 4, 2, 1, False), ("pg", 3, 0, 1, False),
                                                           ("pg", 3, 0, 0, False), ("gauss", 4, 0, 2, False),
                                                           ("gauss", 4, 2, 2, True)):
            with self.subTest(loss=loss, inner_steps=steps, per_step=per_step):
                params, support, query, kl_weights = self._problem(loss, n_out, bias_outputs)
                if per_step:  # a batch for each inner step
                    support = [support, _batch(self.rng, loss, 3, 5, 2, n_out)]
                before = [p.copy() for p in params]
                max_kl = 1e-4
                region = mm.TrustRegion(max_kl=max_kl, cg_iters=100, damping=1e-2, fisher_stride=1)
                new, info = mm.maml_trpo_step(params, mm._step_batches(support, steps), query, kl_weights, loss, 0.1,
                                              activation="tanh", trust_region=region)
                for p, q in zip(params, before):
                    np.testing.assert_array_equal(p, q)
                # The reported KL and improvement, recomputed from the adapted policies.
                logp, kl = mm.POLICIES[mm.LOSS_POLICY[loss]][0], mm.POLICY_KL[mm.LOSS_POLICY[loss]][0]
                out = lambda P: mm.mlp_forward(mm.adapt(P, support, loss, 0.1, steps, "tanh").params, query[0],
                                               "tanh")[0]
                old_out, new_out = out(params), out(new)
                actions, weights = query[1]
                ratio = np.exp(logp(new_out, actions) - logp(old_out, actions))
                self.assertAlmostEqual(info["improvement"], (weights * (ratio - 1)).sum() / 3, places=12)
                self.assertGreater(info["improvement"], 0)
                self.assertAlmostEqual(info["kl"], (kl_weights * kl(old_out, new_out)).sum() / 3, places=14)
                # The step is the natural gradient, -F^-1 g (F with its damping, exact here: stride 1 and CG
                # run to convergence), scaled so that the quadratic model 1/2 d^T F d of the KL is max_kl,
                # then shortened by the line search.
                g = mm.maml_grad(params, support, query, loss, 0.1, steps, False, "tanh")[1]
                step = [q - p for p, q in zip(params, new)]
                thetas = mm.adapt(params, support, loss, 0.1, steps, "tanh").thetas
                f_step = mm._meta_fisher(params, thetas, mm._step_batches(support, steps),
                                         mm.KLBatch(query[0], old_out, kl_weights), loss, 0.1, False, "tanh",
                                         1e-2)(step)
                dot = mm._dot
                # (CG stops at a residual of 1e-5 |g|.)
                self.assertLess(_rel_err(f_step, [gi * (dot(f_step, g) / dot(g, g)) for gi in g]), 1e-4)
                self.assertLess(dot(f_step, g), 0)
                self.assertAlmostEqual(0.5 * dot(step, f_step) / info["step_fraction"] ** 2 / max_kl, 1.0, places=6)

    def test_no_gradient_no_step_and_dtype_kept(self):
        params, support, query, kl_weights = self._problem(dtype=np.float32)
        flat = (query[0], (query[1][0], np.zeros((3, 8))))  # every advantage 0: nothing to gain
        new, info = mm.maml_trpo_step(params, support, flat, kl_weights, "gauss", 0.1, activation="tanh")
        self.assertEqual(info, {"kl": 0.0, "improvement": 0.0, "step_fraction": 0.0})
        for p, q in zip(new, params):
            np.testing.assert_array_equal(p, q)
        new, _ = mm.maml_trpo_step(params, support, query, kl_weights, "gauss", 0.1, activation="tanh")
        self.assertEqual([p.dtype for p in new], [np.float32] * len(params))

    def test_errors(self):
        params, support, query, kl_weights = self._problem()
        cases = [(dict(loss="mse"), "loss must be a policy loss"), (dict(max_kl=0.0), "max_kl must be > 0"),
                 (dict(backtrack=1.0), r"backtrack must be in \(0, 1\)"), (dict(damping=-1.0), "damping"),
                 (dict(cg_iters=0), "cg_iters must be an integer >= 1"), (dict(fisher_stride=2.0), "fisher_stride"),
                 (dict(max_backtracks=0), "max_backtracks"), (dict(kl_weights=kl_weights[:, :3]), "kl_weights"),
                 (dict(kl_weights=-kl_weights), "kl_weights"), (dict(inner_lr=float("inf")), "inner_lr")]
        region_fields = {f.name for f in dataclasses.fields(mm.TrustRegion)}
        for override, pattern in cases:
            kwargs = dict(params=params, support=support, query=query, kl_weights=kl_weights, loss="gauss")
            kwargs.update({k: v for k, v in override.items() if k not in region_fields})
            region = {k: v for k, v in override.items() if k in region_fields}
            if region:
                kwargs["trust_region"] = mm.TrustRegion(**region)
            with self.subTest(override=list(override)), self.assertRaisesRegex(ValueError, pattern):
                mm.maml_trpo_step(**kwargs)

    def test_step_weights_match_pg_batch_packing(self):
        mask = np.zeros((2, 2, 4), bool)
        mask[0, 0, :3] = mask[0, 1, :1] = mask[1, 0, :4] = mask[1, 1, :2] = True  # 4 and 6 steps
        weights = mm.step_weights({"mask": mask})
        np.testing.assert_allclose(weights, [[0.25] * 4 + [0, 0], [1 / 6] * 6])


class TestMetaRL(unittest.TestCase):
    SHORT = ["cartpole", "--iterations", "8", "--meta-batch", "10", "--fast-batch", "10", "--eval-tasks", "10",
             "--eval-batch", "10", "--val-tasks", "5", "--log-every", "4"]

    def test_short_cartpole_run_adapts(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "out.json")
            status, out, _ = _run_main(self.SHORT + ["--json", path])
            self.assertEqual(status, 0)
            self.assertIn("post_return", out)
            self.assertIn("ETA", out)
            result = _read_json(path)
        for key in ("return", "return_ci95", "pretrained_return", "random_init_return"):
            self.assertEqual(set(result[key]), {"0", "1", "2", "3"})
        self.assertGreater(result["env_steps"], 0)
        self.assertGreater(result["seconds"], 0)
        self.assertGreater(result["return"]["1"], 1.3 * result["return"]["0"])
        # MAML's later steps: a fraction of its inner_lr, chosen on validation tasks; the baselines' from the grid.
        self.assertIn(result["later_lr"], [f * 0.5 for f in mm.RL_LATER_LR_FRACTIONS])
        for lr in result["baseline_lr"].values():
            self.assertIn(lr, mm.RL_BASELINE_LRS)

    def test_tune_first_lr_takes_the_best_first_step_on_the_validation_tasks(self):
        with tempfile.TemporaryDirectory() as d:
            ck, a, b = (os.path.join(d, n) for n in ("ck.npz", "a.json", "b.json"))
            flags = self.SHORT[:2] + ["4"] + self.SHORT[3:] + ["--hidden", "8", "--save", ck]
            self.assertEqual(_run_main(flags + ["--json", a])[0], 0)
            # Evaluation only: the checkpoint, made without the flag, loads with it.
            status, _, err = _run_main(flags[:-2] + ["--load", ck, "--tune-first-lr", "--json", b])
            self.assertEqual(status, 0, err)
            config = mm.CartPoleConfig(iterations=4, meta_batch=10, fast_batch=10, eval_tasks=10, eval_batch=10,
                                     val_tasks=5, log_every=4, hidden=8)
            meta = mm.load_checkpoint(ck, config)[2]["meta"]
            off, on = _read_json(a), _read_json(b)
        self.assertEqual(off["first_lr"], 0.5)  # off: alpha as trained
        self.assertEqual(on["config"]["tune_first_lr"], True)
        # On: the candidate whose validation return after the first step is the highest, on the same draws.
        family = mm.cartpole_family("reversed")
        validation = family.sample_tasks(mm.stream(0, mm.VALIDATION_TASKS), 5)
        after_one = {f * 0.5: mm.meta_rl_evaluate(meta, family, config, validation, mm.stream(0, mm.VALIDATION_DRAWS),
                                                  f * 0.5)["1"].mean() for f in mm.RL_FIRST_LR_FRACTIONS}
        self.assertEqual(on["first_lr"], max(after_one, key=after_one.get))
        # The command scores it on one step alone: the first two returns of all three steps, no more.
        one = mm.meta_rl_evaluate(meta, family, config, validation, mm.stream(0, mm.VALIDATION_DRAWS), 0.5, steps=1)
        self.assertEqual(set(one), {"0", "1"})
        self.assertEqual(one["1"].mean(), after_one[0.5])
        self.assertEqual(on["return"]["0"], off["return"]["0"])  # the same held-out tasks and draws
        if on["first_lr"] != 0.5:
            self.assertNotEqual(on["return"]["1"], off["return"]["1"])

    def test_resume_ends_where_a_straight_run_ends(self):
        for outer in ("adam", "trpo"):  # TRPO keeps no optimiser state
            with self.subTest(outer=outer), tempfile.TemporaryDirectory() as d:
                ck, a, b, c = (os.path.join(d, n) for n in ("ck.npz", "a.json", "b.json", "c.json"))
                base = ["cartpole", "--meta-batch", "3", "--fast-batch", "3", "--eval-tasks", "3", "--val-tasks", "2",
                        "--eval-batch", "3", "--log-every", "2", "--hidden", "8", "--outer", outer]
                self.assertEqual(_run_main(base + ["--iterations", "4", "--json", a])[0], 0)
                self.assertEqual(_run_main(base + ["--iterations", "2", "--save", ck])[0], 0)
                # The evaluation's settings may change on resuming; training's may not.
                self.assertEqual(_run_main(base + ["--iterations", "2", "--load", ck, "--val-tasks", "3",
                                                   "--baseline-lr-scale", "0.01", "--json", c])[0], 0)
                for lr in _read_json(c)["baseline_lr"].values():  # the grid, scaled
                    self.assertIn(lr, [0.001, 0.003, 0.01, 0.03])
                status, _, err = _run_main(base + ["--iterations", "2", "--load", ck, "--fast-batch", "4"])
                self.assertEqual(status, 2)
                self.assertIn("was made with other hyperparameters: --fast-batch 3 (now 4)", err)
                # Another command's checkpoint: refused by name, before any training.
                status, _, err = _run_main(["nav2d", "--load", ck])
                self.assertEqual(status, 2)
                self.assertIn("is a checkpoint of the cartpole command, not of nav2d", err)
                self.assertEqual(_run_main(base + ["--iterations", "4", "--load", ck, "--json", b])[0], 0)
                ra, rb = _read_json(a), _read_json(b)
                for key in ("return", "pretrained_return", "random_init_return", "env_steps"):
                    self.assertEqual(ra[key], rb[key])
                # A checkpoint made before a setting existed was made with its default, and resumes.
                with np.load(ck) as data:
                    arrays = dict(data)
                meta = json.loads(str(arrays["meta"]))
                del meta["config"]["inner_steps"]
                arrays["meta"] = np.array(json.dumps(meta))
                np.savez(ck, **arrays)
                self.assertEqual(_run_main(base + ["--iterations", "4", "--load", ck, "--json", b])[0], 0)
                self.assertEqual(_read_json(b)["return"], ra["return"])
                # An older checkpoint does not name its command: another command's settings tell.
                del meta["command"]
                arrays["meta"] = np.array(json.dumps(meta))
                np.savez(ck, **arrays)
                status, _, err = _run_main(["sine", "--load", ck])
                self.assertEqual(status, 2)
                self.assertIn(f"{ck} was made with settings that sine does not have: "
                              "--fast-batch, --activation, --init-out-scale, ...", err)

    def test_algorithms_run(self):
        for flags in (["--first-order"], ["--algorithm", "reptile"], ["--lvc"], ["--outer", "trpo", "--lvc"],
                      ["--inner-steps", "2"], ["--inner-steps", "2", "--outer", "trpo", "--lvc"]):
            with self.subTest(flags=flags):
                status, out, err = _run_main(["cartpole", "--iterations", "2", "--meta-batch", "2", "--fast-batch",
                                              "2", "--eval-tasks", "2", "--val-tasks", "2", "--eval-batch", "2",
                                              "--hidden", "8"] + flags)
                self.assertEqual(status, 0, err)
        status, out, err = _run_main(["cartpole", "--lvc", "--first-order"])
        self.assertEqual(status, 2)
        self.assertIn("--lvc changes only the second-order term", err)
        status, out, err = _run_main(["cartpole", "--lvc", "--algorithm", "reptile"])
        self.assertEqual((status, err.count("\n")), (2, 1))
        self.assertIn("--lvc is read only by --algorithm maml; with --algorithm reptile it would do nothing", err)
        status, out, err = _run_main(["cartpole", "--inner-steps", "2", "--algorithm", "reptile"])
        self.assertEqual((status, err.count("\n")), (2, 1))
        self.assertIn("--inner-steps above 1 is MAML's", err)
        status, out, err = _run_main(["cartpole", "--outer", "trpo", "--algorithm", "reptile"])
        self.assertEqual((status, err.count("\n")), (2, 1))
        self.assertIn("--outer is read only by --algorithm maml", err)
        status, out, err = _run_main(["nav2d", "--outer", "trpo", "--max-kl", "0"])
        self.assertEqual((status, err.count("\n"), out), (2, 1, ""))
        self.assertIn("--max-kl must be > 0", err)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "out.json")
            status, out, err = _run_main(["nav2d", "--iterations", "1", "--meta-batch", "2", "--fast-batch", "2",
                                          "--eval-tasks", "2", "--val-tasks", "2", "--eval-batch", "2",
                                          "--eval-min-steps", "300", "--hidden", "8", "--inner-steps", "2",
                                          "--json", path])
            self.assertEqual(status, 0, err)
            self.assertIn("MAML (paper)", out)
            # 2 tasks, each: 2 episodes before each of the 2 inner steps, 2 after them, and the
            # pretrained baseline's 3 x 2; all 100 steps long (no goal reached).
            self.assertEqual(_read_json(path)["env_steps"], 2 * (3 * 2 + 3 * 2) * 100)

    def test_plot_without_matplotlib_is_one_clear_line(self):
        with unittest.mock.patch.dict(sys.modules, {"matplotlib": None}):
            status, out, err = _run_main(["cartpole", "--plot", "x.png"])
        self.assertEqual(status, 2)
        self.assertIn("--plot needs matplotlib", err)
        self.assertEqual(out, "")  # refused before any training

    def test_missing_load_file_or_output_folder_is_refused_before_training(self):
        with tempfile.TemporaryDirectory() as d:
            for flag in ("--json", "--save"):
                path = os.path.join(d, "missing", "out")
                status, out, err = _run_main(["cartpole", flag, path])
                self.assertEqual(status, 2)
                self.assertIn(f"error: {flag} {path}: the folder {os.path.join(d, 'missing')} does not exist", err)
                self.assertEqual(out, "")  # before any training
                self.assertFalse(os.path.exists(os.path.join(d, "missing")))
            path = os.path.join(d, "none.npz")
            status, out, err = _run_main(["cartpole", "--load", path])
            self.assertEqual((status, out), (2, ""))
            self.assertIn(f"error: --load {path}: no such file", err)

    def test_plain_command_is_cartpole(self):
        self.assertEqual(mm.DEFAULT_COMMAND, "cartpole")
        status, out, err = _run_main(["--iterations", "x"])
        self.assertEqual(status, 2)
        self.assertIn("metarl_min.py cartpole: error: argument --iterations", err)


# ----------------------------------------------------------------------------
# Q-learning.
# ----------------------------------------------------------------------------
class _TwoStateEnv:
    """A hand-made MDP, batched: state 0 --a=1--> state 1 (reward 0); state 1 --any--> end (reward 1);
    state 0 --a=0--> end (reward 0). Observations are the state index; no randomness."""

    def __init__(self, num_envs):
        self.num_envs = num_envs

    def reset(self, *, seed=None, options=None):
        self.s = np.zeros(self.num_envs, dtype=np.int64)
        return self.s[:, None].astype(float), {}

    def step(self, actions):
        reward = (self.s == 1).astype(float)
        terminated = (self.s == 1) | (actions == 0)
        final = np.where(terminated, self.s, 1)
        self.s = np.where(terminated, 0, 1)
        return self.s[:, None].astype(float), reward, terminated, np.zeros(self.num_envs, bool), \
            {"final_obs": final[:, None].astype(float)}


class _Columns:
    """Stands in for a Generator: the draws a batch of `n` would get, column `b` of them."""

    def __init__(self, seed, n, b):
        self.g, self.n, self.b = np.random.default_rng(seed), n, b

    def integers(self, high):
        return self.g.integers(high)

    def random(self, shape):
        return self.g.random((self.n,) + tuple(shape[1:]))[self.b:self.b + 1]


class TestQLearning(unittest.TestCase):
    rows = staticmethod(lambda obs: obs[:, 0].astype(np.int64))

    def test_update_rule_on_a_two_state_mdp(self):
        # alpha = gamma = 0.5 throughout (a decay of 1e-3 puts the rates at their floors from the first
        # episode), epsilon 0: greedy.
        W0 = np.zeros((1, 2, 2))
        W0[0, 0, 1] = 0.1  # so the greedy action in state 0 is 1
        W, returns = mm.q_learn(_TwoStateEnv(1), W0, self.rows, np.random.default_rng(0), 2,
                                schedule=mm.QSchedule(alpha_min=0.5, epsilon_min=0.0, decay=1e-3, gamma=0.5))
        # Episode 1: Q(0,1) <- 0.1 + 0.5 (0 + 0.5 max Q(1, .) - 0.1) = 0.05;  Q(1,0) <- 0 + 0.5 (1 - 0) = 0.5
        # Episode 2: Q(0,1) <- 0.05 + 0.5 (0.5 * 0.5 - 0.05) = 0.15;         Q(1,0) <- 0.5 + 0.5 (1 - 0.5) = 0.75
        np.testing.assert_allclose(W[0], [[0.0, 0.15], [0.75, 0.0]])
        np.testing.assert_array_equal(returns, [[1.0, 1.0]])
        np.testing.assert_array_equal(W0[0], [[0.0, 0.1], [0.0, 0.0]])  # the caller's weights are untouched
        # Many episodes converge to Q*: Q*(1, .) = 1, Q*(0, 1) = gamma, Q*(0, 0) = 0.
        W, _ = mm.q_learn(_TwoStateEnv(1), W0, self.rows, np.random.default_rng(0), 200,
                          schedule=mm.QSchedule(alpha_min=0.5, epsilon_min=0.3, decay=1e-3, gamma=0.5))
        np.testing.assert_allclose(W[0], [[0.0, 0.5], [1.0, 1.0]], atol=1e-3)
        # Advantage learning keeps the best action's value and widens the gap to the others by 1 / (1 - gap):
        # Q(0, 0) = V*(0) - (V*(0) - Q*(0, 0)) / (1 - 0.5) = 0.5 - 1 = -0.5; in state 1 both actions are best.
        W, _ = mm.q_learn(_TwoStateEnv(1), W0, self.rows, np.random.default_rng(0), 200, action_gap=0.5,
                          schedule=mm.QSchedule(alpha_min=0.5, epsilon_min=0.3, decay=1e-3, gamma=0.5))
        np.testing.assert_allclose(W[0], [[-0.5, 0.5], [1.0, 1.0]], atol=1e-3)

    def test_batched_equals_one_task_at_a_time(self):
        rng = np.random.default_rng(0)
        W0 = rng.normal(size=(3, 2, 2))
        starts = np.array([0, 3, 10])  # each env's schedules start at its own episode
        batched, returns = mm.q_learn(_TwoStateEnv(3), W0, self.rows, np.random.default_rng(5), 20,
                                      mm.QSchedule(epsilon_min=0.4, decay=2.0), start_episode=starts)
        for b in range(3):
            single, r = mm.q_learn(_TwoStateEnv(1), W0[b:b + 1], self.rows, _Columns(5, 3, b), 20,
                                   mm.QSchedule(epsilon_min=0.4, decay=2.0), start_episode=int(starts[b]))
            np.testing.assert_allclose(single[0], batched[b], rtol=1e-12)
            np.testing.assert_array_equal(r[0], returns[b])

    def test_single_gymnasium_style_env(self):
        W, returns = mm.q_learn(cp.CartPoleEnv(), np.zeros((1, 72, 2)), lambda o: mm.discretize(o, (1, 1, 6, 12)),
                                np.random.default_rng(0), 5)
        self.assertEqual(returns.shape, (1, 5))
        self.assertTrue((returns >= 8).all())
        self.assertTrue(np.abs(W).sum() > 0)

    def test_block_features_run_learners_side_by_side(self):
        """Envs of one batch learning with different feature maps: each env's features sit in its map's
        block, zero elsewhere; a table's rows become one-hot, and learning on them is the tabular rule."""
        obs = np.array([[0.0], [1.0], [1.0], [0.0]])
        double = lambda o: np.concatenate([o, 2 * o], axis=1)  # a dense map of 2 features
        featurize = mm.block_features([(self.rows, 2), (double, 2)], [0, 1])  # env 0: table, env 1: dense
        np.testing.assert_array_equal(featurize(obs), [[1, 0, 0, 0], [0, 0, 1, 2], [0, 1, 0, 0], [0, 0, 0, 0]])
        W0 = np.zeros((2, 2, 2))
        W0[:, 0, 1] = 0.1
        table, returns = mm.q_learn(_TwoStateEnv(2), W0, self.rows, np.random.default_rng(0), 30,
                                    schedule=mm.QSchedule(epsilon_min=0.2, decay=2.0, gamma=0.5))
        one_hot, same = mm.q_learn(_TwoStateEnv(2), W0, mm.block_features([(self.rows, 2)], [0, 0]),
                                   np.random.default_rng(0), 30,
                                   schedule=mm.QSchedule(epsilon_min=0.2, decay=2.0, gamma=0.5))
        np.testing.assert_array_equal(one_hot, table)
        np.testing.assert_array_equal(same, returns)

    def test_learner_from_a_meta_learned_start(self):
        """Reptile over the weights learned on the two-state MDP gives a start from which a greedy
        learner takes the rewarded path at once; from zero, greedy, it ends with nothing."""
        init = np.zeros((2, 2))
        for it in range(5):
            W, _ = mm.q_learn(_TwoStateEnv(3), np.broadcast_to(init, (3, 2, 2)), self.rows,
                              np.random.default_rng(it), 20,
                              schedule=mm.QSchedule(epsilon_min=0.0, decay=5.0, gamma=0.5))
            init = init + 0.5 * (W.mean(axis=0) - init)
        self.assertGreater(init[0, 1], init[0, 0])  # in state 0, action 1 leads on to the reward
        for start, first_return in ((init, 1.0), (np.zeros((2, 2)), 0.0)):
            _, returns = mm.q_learn(_TwoStateEnv(1), start[None], self.rows, np.random.default_rng(9), 3,
                                    mm.QSchedule(epsilon_min=0.0, decay=5.0, gamma=0.5), start_episode=150)
            self.assertEqual(returns[0, 0], first_return)

    def test_discretizer_edges(self):
        low, high = np.array([0.0, -1.0]), np.array([1.0, 1.0])
        obs = np.array([[0.0, -1.0], [0.2499, 0.0], [0.25, 0.999], [1.0, 1.0], [-5.0, 7.0], [0.999, -0.0001]])
        rows = mm.discretize(obs, (4, 2), low, high)
        # bins of x: [0, .25), [.25, .5), [.5, .75), [.75, 1], outside clipped; y: [-1, 0), [0, 1].
        np.testing.assert_array_equal(rows, [0 * 2 + 0, 0 * 2 + 1, 1 * 2 + 1, 3 * 2 + 1, 0 * 2 + 1, 3 * 2 + 0])
        np.testing.assert_array_equal(mm.discretize(obs, (1, 1), low, high), np.zeros(6))

    def test_each_feature_map_is_its_kernel(self):
        """phi(s).phi(s') against each kernel's formula, on states scaled to [-1, 1] on the box and
        clipped into it (the states below reach past the box's edges)."""
        rng = np.random.default_rng(1)
        scale = lambda o: np.clip(2 * (o - mm.Q_STATE_LOW) / (mm.Q_STATE_HIGH - mm.Q_STATE_LOW) - 1, -1, 1)
        for degree, c in ((1, 1.0), (2, 0.5), (3, 1.0), (4, 2.0)):
            x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
            fx, fy = mm.poly_features(x, degree, c), mm.poly_features(y, degree, c)
            self.assertEqual(fx.shape[1], math.comb(4 + degree, degree))
            np.testing.assert_allclose((fx * fy).sum(1), (c + (scale(x) * scale(y)).sum(1)) ** degree, rtol=1e-10,
                                       atol=1e-12)
        # The RBF grid's kernel: exp(-|s - s'|^2 / (4 w^2)) sum_j exp(-|(s + s')/2 - c_j|^2 / w^2).
        for per_dim, width in ((2, 0.5), (3, 0.3), (4, 0.4)):
            x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
            fx, fy = mm.rbf_features(x, per_dim, width), mm.rbf_features(y, per_dim, width)
            self.assertEqual(fx.shape[1], per_dim ** 4)
            grid = np.linspace(-1, 1, per_dim)
            centres = np.stack(np.meshgrid(*[grid] * 4, indexing="ij"), -1).reshape(-1, 4)
            sx, sy = scale(x), scale(y)
            mid = (sx + sy) / 2
            kernel = np.exp(-((sx - sy) ** 2).sum(1) / (4 * width ** 2)) * np.exp(
                -((mid[:, None] - centres) ** 2).sum(-1) / width ** 2).sum(1)
            np.testing.assert_allclose((fx * fy).sum(1), kernel, rtol=1e-10)
        # Past the box, a state counts as on its edge: bounded features that never all vanish.
        edge, far = np.array([[2.4, 3.0, 0.21, 3.5]]), np.array([[9.0, 30.0, 2.0, 35.0]])
        for f in (lambda o: mm.poly_features(o, 3), lambda o: mm.rbf_features(o, 4, 0.2)):
            np.testing.assert_array_equal(f(far), f(edge))
        self.assertGreater(mm.rbf_features(far, 4, 0.2).max(), 0.99)

    def test_solve_criterion(self):
        returns = np.full((2, 300), 500.0)
        returns[0, :50] = 10
        returns[1] = 400
        # Episodes 46-145 hold five 10s and 95 500s: a mean of 475.5, the first window >= 475.
        np.testing.assert_array_equal(mm.episodes_to_solve(returns), [145, np.inf])

    def test_bad_hyperparameters(self):
        env, W = _TwoStateEnv(1), np.zeros((1, 2, 2))
        schedule = lambda **k: {"schedule": mm.QSchedule(**k)}
        for kwargs, message in ((schedule(alpha_min=0.0), "alpha_min must be in \\(0, 1\\]"),
                                (schedule(alpha_min=1.5), "alpha_min"),
                                (schedule(gamma=-0.1), "gamma must be in \\[0.0, 1.0\\]"),
                                (schedule(gamma=1.01), "gamma"), (schedule(decay=0.0), "decay must be > 0"),
                                ({"action_gap": 1.0}, r"action_gap must be in \[0, 1\)"),
                                ({"action_gap": np.array([-0.1])}, "action_gap"),
                                ({"weights": np.zeros((2, 2, 2))}, r"weights must have shape \(num_envs, F, A\)")):
            with self.subTest(message=message), self.assertRaisesRegex(ValueError, message):
                mm.q_learn(**{"env": env, "weights": W, "featurize": self.rows, "rng": np.random.default_rng(0),
                              "episodes": 1, **kwargs})
        with self.assertRaisesRegex(ValueError, "degree must be an integer >= 1"):
            mm.poly_features(np.zeros((1, 4)), 0)
        with self.assertRaisesRegex(ValueError, "width must be > 0"):
            mm.rbf_features(np.zeros((1, 4)), 3, 0.0)
        with self.assertRaisesRegex(ValueError, "per_dim must be an integer >= 1"):
            mm.rbf_features(np.zeros((1, 4)), 0)
        for flag, value, message in (("--degree", "0", "--degree must be >= 1"),
                                     ("--rbf-width", "0", "--rbf-width must be"),
                                     ("--rbf-per-dim", "0", "--rbf-per-dim must be >= 1")):
            status, _, err = _run_main(["qlearn", flag, value])
            self.assertEqual(status, 2)
            self.assertIn(message, err)
        with self.assertRaisesRegex(ValueError, "bins must be an integer >= 1"):
            mm.discretize(np.zeros((1, 4)), (1, 0, 6, 12))
        status, _, err = _run_main(["qlearn", "--bins", "1,1,6"])
        self.assertEqual(status, 2)
        self.assertIn("--bins must be 4 integers >= 1", err)
        status, _, err = _run_main(["qlearn", "--gamma", "1.5"])
        self.assertEqual(status, 2)
        self.assertIn("--gamma must be in [0.0, 1.0]", err)

    def test_short_qlearn_command_writes_json(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "q.json")
            # Random actions (epsilon 1 throughout) keep the episodes short: this checks the command, not learning.
            status, out, err = _run_main(["qlearn", "--episodes", "100", "--eval-tasks", "2", "--iterations", "1",
                                          "--meta-tasks", "2", "--meta-episodes", "20", "--epsilon-min", "1",
                                          "--json", path])
            self.assertEqual(status, 0, err)
            result = _read_json(path)
        self.assertEqual(set(result["episodes_to_solve"]), {"scratch", "meta"})
        self.assertEqual(set(result["solved_fraction"]), {"scratch", "meta"})
        self.assertEqual(set(result["mean_return_first_20"]), {"scratch", "meta"})
        self.assertEqual(set(result["kernel"]), {"poly d=3", "rbf 4^4"})
        keys = {"episodes_to_solve", "solved_fraction", "mean_return_last_100", "mean_return_first_20"}
        for entry in result["kernel"].values():
            self.assertEqual(set(entry), keys | {"meta"})
            self.assertEqual(set(entry["meta"]), keys)
        self.assertIn("median episodes to solve", out)

    def test_qlearn_resume_ends_where_a_straight_run_ends(self):
        """The meta-training of every learner, table and kernels, checkpointed and resumed."""
        short = ["qlearn", "--episodes", "100", "--eval-tasks", "2", "--meta-tasks", "2", "--meta-episodes", "20",
                 "--epsilon-min", "1", "--rbf-per-dim", "2"]
        with tempfile.TemporaryDirectory() as d:
            ck, straight, resumed, a, b = (os.path.join(d, n) for n in ("ck.npz", "s.npz", "r.npz", "a.json", "b.json"))
            self.assertEqual(_run_main(short + ["--iterations", "2", "--json", a, "--save", straight])[0], 0)
            self.assertEqual(_run_main(short + ["--iterations", "1", "--save", ck])[0], 0)
            status, _, err = _run_main(short + ["--iterations", "2", "--load", ck, "--json", b, "--save", resumed])
            self.assertEqual(status, 0, err)
            ra, rb = _read_json(a), _read_json(b)
            for r in (ra, rb):
                r.pop("seconds")
            self.assertEqual(ra, rb)
            with np.load(straight) as x, np.load(resumed) as y:  # every learner's meta-learned start, bit for bit
                self.assertEqual(sorted(k for k in x.files if k.startswith("params/")),
                                 ["params/poly/0", "params/rbf/0", "params/table/0"])
                for k in x.files:
                    if k != "meta":
                        np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------
# The other families: a GRU with BPTT, RL^2's trials, ES-MAML.
# ----------------------------------------------------------------------------
class _CueEnv:
    """A batched two-step memory task: a trial's first episode is one step that shows a cue +-1 (and ends);
    the second is one step with nothing shown, rewarded 1 for action 1 if the cue was +1, for 0 if -1.
    Only a policy that carries its state from the first episode into the second is rewarded every time."""

    def __init__(self, cues):
        self.cues, self.num_envs = np.asarray(cues, float), len(cues)

    def reset(self, *, seed=None, options=None):
        self.phase = np.zeros(self.num_envs, int)
        return self._obs(), {}

    def _obs(self):
        return np.stack([np.where(self.phase == 0, self.cues, 0.0)] + [np.zeros(self.num_envs)] * 3, axis=1)

    def step(self, actions):
        reward = np.where(self.phase == 1, (actions == (self.cues > 0)).astype(float), 0.0)
        self.phase = 1 - self.phase
        done = np.ones(self.num_envs, bool)
        return self._obs(), reward, done, np.zeros(self.num_envs, bool), {}


class TestMemoryAndEvolution(unittest.TestCase):
    def test_gru_backprop_through_time_against_finite_differences(self):
        rng = np.random.default_rng(0)
        N, K, n_in, H, n_out = 3, 5, 4, 6, 2
        params = mm.init_gru(n_in, H, n_out, rng, np.float64)
        x, h0 = rng.normal(size=(N, K, n_in)), 0.5 * rng.normal(size=(N, H))
        weights = rng.normal(size=(N, K, n_out))
        mask = np.ones((N, K, 1))
        mask[1, 3:] = mask[2, 1:] = 0.0  # finished trials: their later steps carry no loss
        loss = lambda: float((mm.gru_forward(params, x, h0)[0] * weights * mask).sum())
        out, cache = mm.gru_forward(params, x, h0)
        grads, d_h0, d_x = mm.gru_backward(params, x, cache, weights * mask)
        for got, array in list(zip(grads, params)) + [(d_h0, h0), (d_x, x)]:
            self.assertLess(_rel_err([got], _fd_grad(lambda _: loss(), [array])), 1e-7)
        # The forward pass by hand, one step, against gru_step's gates.
        Wx, Wh, b, Wo, bo = params
        sig = lambda v: 1 / (1 + np.exp(-v))
        gate = lambda i: sig(x[:, 0] @ Wx[:, i * H:(i + 1) * H] + h0 @ Wh[:, i * H:(i + 1) * H] + b[i * H:(i + 1) * H])
        z, r = gate(0), gate(1)
        n = np.tanh(x[:, 0] @ Wx[:, 2 * H:] + r * (h0 @ Wh[:, 2 * H:]) + b[2 * H:])
        np.testing.assert_allclose(cache[0][:, 1], (1 - z) * n + z * h0, rtol=1e-12)
        np.testing.assert_allclose(out[:, 0], ((1 - z) * n + z * h0) @ Wo + bo, rtol=1e-12)

    def test_hidden_state_carried_across_episodes_and_reset_at_the_trial(self):
        # A GRU made by hand: h keeps the cue (the update gate shut once it is seen), the action follows h.
        H, big = 1, 20.0
        Wx = np.zeros((4 + 2 + 2, 3 * H))  # [observation, previous action one-hot, previous reward, done]
        Wx[0, 2] = big  # the candidate n = tanh(big * cue)
        Wx[7, 0] = big  # done (a new episode of the trial) shuts the update gate: h is kept
        params = [Wx, np.zeros((H, 3 * H)), np.array([-big, 0.0, 0.0]), np.array([[-big, big]]), np.zeros(2)]
        cues = np.array([1.0, -1.0, 1.0, -1.0])
        trials = mm.rollout_trials(params, _CueEnv(cues), np.random.default_rng(0), 2, 10)
        np.testing.assert_array_equal(trials["episode"], [[0, 1]] * 4)
        np.testing.assert_array_equal(mm.trial_returns(trials, 2), [[0.0, 1.0]] * 4)  # rewarded every time
        np.testing.assert_array_equal(trials["x"][:, 1, 7], 1.0)  # the second step is a new episode's first
        # With the hidden state reset where an episode starts, the second episode sees nothing: chance.
        no_memory = [params[0].copy()] + params[1:]
        no_memory[0][7, 0] = -big  # done opens the gate: h becomes n = tanh(0) = 0
        returns = mm.trial_returns(mm.rollout_trials(no_memory, _CueEnv(np.tile(cues, 50)),
                                                     np.random.default_rng(1), 2, 10), 2)
        self.assertTrue(0.35 < returns[:, 1].mean() < 0.65)
        # Each trial starts from a zero state: a second call gives the same (deterministic) behaviour.
        again = mm.rollout_trials(params, _CueEnv(-cues), np.random.default_rng(2), 2, 10)
        np.testing.assert_array_equal(mm.trial_returns(again, 2), [[0.0, 1.0]] * 4)

    def test_rl2_loss_gradient_against_finite_differences(self):
        """PPO's clipped surrogate, the entropy bonus and the task-inference cross-entropy, in the GRU's outputs."""
        rng = np.random.default_rng(0)
        N, K = 3, 5
        out = rng.normal(size=(N, K, 3))
        actions, advantages = rng.integers(0, 2, size=(N, K)), rng.normal(size=(N, K))
        old_logp = mm.categorical_logp(out[..., :2] + 0.3 * rng.normal(size=(N, K, 2)), actions)
        weights, labels = rng.uniform(size=(N, K)), np.array([0.0, 1.0, 1.0])
        for clip, entropy, task in ((0.2, 0.0, None), (0.2, 0.05, labels), (10.0, 0.05, labels)):
            with self.subTest(clip=clip, entropy=entropy, task=task is not None):
                o = out if task is not None else out[..., :2].copy()
                loss = lambda: mm.rl2_loss(o, actions, advantages, old_logp, weights, clip, entropy, task, 0.7)[0]
                _, grad = mm.rl2_loss(o, actions, advantages, old_logp, weights, clip, entropy, task, 0.7)
                self.assertEqual(grad.shape, o.shape)
                self.assertLess(_rel_err([grad], _fd_grad(lambda _: loss(), [o])), 1e-7)
        # The clip binds somewhere (so the first case checks the clipped branch), and the task term is there.
        rho = np.exp(mm.categorical_logp(out[..., :2], actions) - old_logp)
        self.assertTrue(((rho < 0.8) | (rho > 1.2)).any())
        self.assertGreater(np.abs(mm.rl2_loss(out, actions, advantages, old_logp, weights, 0.2, 0.0, labels, 1.0)[1]
                                  [..., 2]).min(), 0.0)

    def test_hill_climb_changes_only_the_last_arrays(self):
        """Hill climbing on the head alone keeps the body; each policy gets the best of its candidates, and the
        zero head that es_policies appends starts every task at the uniform policy."""
        config = mm.CartPoleConfig(hidden=4, es_perturbations=3)
        rng = np.random.default_rng(0)
        family = mm.cartpole_family()
        body = [np.repeat(p[None], 5, axis=0) for p in mm.es_init(family, config, rng)]
        self.assertEqual(len(body), 4)
        params = mm.es_policies(body, family, config)
        self.assertEqual([p.shape for p in params[4:]], [(5, 4, 2), (5, 2)])
        self.assertEqual(float(np.abs(params[4]).sum() + np.abs(params[5]).sum()), 0.0)
        tasks = family.sample_tasks(rng, 5)
        adapted, steps = mm.es_adapt(params, family, config, tasks, rng)
        self.assertGreater(steps, 0)
        for a, p in zip(adapted[:4], params[:4]):
            np.testing.assert_array_equal(a, p)
        self.assertGreater(float(np.abs(adapted[4]).sum()), 0.0)  # two rounds of 3: some perturbation won
        every = mm.hill_climb(params, family, tasks, rng, 3, 0.5, 1)[0]
        self.assertTrue(all((a != p).any() for a, p in zip(every, params)))  # None: every array is perturbed

    def test_es_gradient_on_a_quadratic(self):
        """The antithetic estimate of grad E f(theta + sigma eps), f = -|theta - c|^2, against the true -2 (theta - c),
        within four standard errors of its sampling (per coordinate: |grad| / sqrt(n) for a quadratic)."""
        rng = np.random.default_rng(0)
        theta, c = ([rng.normal(size=(3, 2)), rng.normal(size=4)] for _ in range(2))
        sigma, n = 0.1, 4000
        noise = [rng.standard_normal((n,) + p.shape) for p in theta]
        f = lambda ps: -sum(((p - ci) ** 2).reshape(p.shape[0], -1).sum(axis=1) for p, ci in zip(ps, c))
        fitness = f(mm.perturbed(theta, noise, sigma)).reshape(2, n)
        estimate = mm.es_gradient(fitness, noise, sigma)
        true = [-2 * (p - ci) for p, ci in zip(theta, c)]
        error = math.sqrt(sum(float((t ** 2).sum()) for t in true) / n)
        for e, t in zip(estimate, true):
            self.assertLess(np.abs(e - t).max(), 4 * error)
        ranks = mm.centred_ranks(np.array([3.0, -1.0, 10.0, 0.5]))
        np.testing.assert_allclose(ranks, [1 / 6, -0.5, 0.5, -1 / 6])

    def test_short_runs_resume_exactly_and_fail_cleanly(self):
        for algorithm in ("rl2", "es"):
            own = (["--meta-batch", "3", "--rl2-trials", "2"] if algorithm == "rl2" else
                   ["--es-population", "3", "--es-tasks", "2", "--es-perturbations", "2"])
            short = ["cartpole", "--algorithm", algorithm, "--hidden", "8", "--eval-tasks", "3", "--eval-batch", "2",
                     "--log-every", "1"] + own
            with self.subTest(algorithm=algorithm), tempfile.TemporaryDirectory() as d:
                ck, a, b = (os.path.join(d, n) for n in ("ck.npz", "a.json", "b.json"))
                status, out, err = _run_main(short + ["--iterations", "2", "--json", a])
                self.assertEqual(status, 0, err)
                self.assertIn("ETA", out)
                self.assertEqual(_run_main(short + ["--iterations", "1", "--save", ck])[0], 0)
                self.assertEqual(_run_main(short + ["--iterations", "2", "--load", ck, "--json", b])[0], 0)
                ra, rb = _read_json(a), _read_json(b)
                self.assertEqual(ra["return"], rb["return"])
                self.assertEqual(ra["env_steps"], rb["env_steps"])
                self.assertEqual(set(ra["return"]), {"0", "1", "2", "3"})
                self.assertEqual(ra["adaptation"], "in-context" if algorithm == "rl2" else "zero-order (hill climbing)")
                # The variants without the defaults' additions: plain RL^2, ES-MAML adapting every weight.
                plain = ["--rl2-task-loss", "0"] if algorithm == "rl2" else ["--es-adapt-params", "all"]
                self.assertEqual(_run_main(short + ["--iterations", "1"] + plain)[0], 0)
                # A learning rate that diverges stops in one line.
                flag = "--rl2-lr" if algorithm == "rl2" else "--es-lr"
                status, _, err = _run_main(short + ["--iterations", "1", flag, "1e39"])
                self.assertEqual(status, 2)
                self.assertIn("training diverged", err)
                self.assertEqual(len(err.strip().splitlines()), 1)
        status, _, err = _run_main(["cartpole", "--algorithm", "rl3"])
        self.assertEqual(status, 2)
        self.assertIn("invalid choice", err)
        status, _, err = _run_main(["nav2d", "--algorithm", "rl2"])
        self.assertEqual(status, 2)


# ----------------------------------------------------------------------------
# Any task family plugs in: one written here, neither CartPole nor nav2d.
# ----------------------------------------------------------------------------
class _ArmsEnv:
    """Episodes of `horizon` pulls of two arms, reward 1 for the task's arm; the observation is the
    fraction of the episode gone. Batched, Gymnasium's vector API, same-step autoreset."""

    def __init__(self, arms, horizon=10):
        self.arms, self.num_envs, self.horizon = np.asarray(arms), len(arms), horizon

    def reset(self, *, seed=None, options=None):
        self.t = np.zeros(self.num_envs, dtype=np.int64)
        return self._obs(), {}

    def _obs(self):
        return (self.t / self.horizon)[:, None].astype(np.float32)

    def step(self, actions):
        reward = (np.asarray(actions) == self.arms).astype(np.float32)
        self.t = self.t + 1
        truncated = self.t >= self.horizon
        final = self._obs()
        self.t[truncated] = 0
        return (self._obs(), reward, np.zeros(self.num_envs, bool), truncated,
                {"final_obs": final, "_final_obs": truncated})


def _arms_family(task_label=True):
    return mm.TaskFamily("arms", lambda rng, n: {"arm": rng.integers(0, 2, n)},
                         lambda tasks, episodes: _ArmsEnv(np.repeat(tasks["arm"], episodes)), obs_dim=1, horizon=10,
                         n_actions=2, task_label=(lambda tasks: tasks["arm"] == 1) if task_label else None)


class TestTaskFamily(unittest.TestCase):
    def test_maml_adapts_on_a_family_of_ones_own(self):
        family = _arms_family()
        config = mm.MetaRLConfig(iterations=8, meta_batch=8, fast_batch=5, hidden=8, log_every=4, eval_batch=5)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            meta, pretrained, extra = mm.meta_rl_train(family, config)
        self.assertIn("ETA", out.getvalue())
        self.assertEqual([row[0] for row in extra["curve"]], [4, 8])
        pre, post = np.mean([row[1] for row in extra["curve"]]), np.mean([row[2] for row in extra["curve"]])
        self.assertGreater(post, pre + 1.0)  # of 10: one policy-gradient step finds the task's arm
        tasks = family.sample_tasks(np.random.default_rng(1), 6)
        returns = mm.meta_rl_evaluate(meta, family, config, tasks, np.random.default_rng(2), config.inner_lr)
        self.assertGreater(float(returns["1"].mean()), float(returns["0"].mean()) + 1.0)
        self.assertEqual([p.shape for p in pretrained], [p.shape for p in meta])

    def test_rl2_and_es_train_on_it(self):
        config = mm.CartPoleConfig(iterations=2, meta_batch=3, rl2_trials=2, hidden=8, es_population=2, es_tasks=2,
                                   es_perturbations=2, log_every=1, eval_batch=2)
        for labelled in (True, False):
            with self.subTest(labelled=labelled), contextlib.redirect_stdout(io.StringIO()) as out:
                params, extra = mm.rl2_train(_arms_family(labelled), config)
                # [Wx, Wh, b, Wo, bo]: inputs obs 1 + actions 2 + reward + done; a task logit where labelled
                self.assertEqual(params[0].shape, (1 + 2 + 2, 24))
                self.assertEqual(params[-1].shape, (2 + labelled,))
                self.assertEqual(len(extra["curve"]), 2)
                self.assertEqual("task-inference loss is off" in out.getvalue(), not labelled)
        with contextlib.redirect_stdout(io.StringIO()):
            params, extra = mm.es_train(_arms_family(), config)
            returns = mm.es_evaluate(params, _arms_family(), config, {"arm": np.array([0, 1])},
                                     np.random.default_rng(0))
            self.assertEqual(set(returns), {"0", "1", "2", "3"})
            self.assertGreater(extra["env_steps"], 0)
            # A Gaussian family: ES-MAML's zero head is [mean, log_std], the log-std bias-only.
            params, _ = mm.es_train(mm.nav2d_family(), dataclasses.replace(config, iterations=1))
            self.assertEqual(len(params), 4)

    def test_bad_families_are_refused_clearly(self):
        with self.assertRaisesRegex(ValueError, "exactly one of n_actions= .* and action_dim="):
            mm.TaskFamily("both", lambda rng, n: {}, _ArmsEnv, obs_dim=1, horizon=5, n_actions=2, action_dim=1)
        with self.assertRaisesRegex(ValueError, "exactly one of"):
            mm.TaskFamily("neither", lambda rng, n: {}, _ArmsEnv, obs_dim=1, horizon=5)
        with self.assertRaisesRegex(ValueError, "horizon must be an integer >= 1"):
            mm.TaskFamily("short", lambda rng, n: {}, _ArmsEnv, obs_dim=1, horizon=0, n_actions=2)
        with self.assertRaisesRegex(TypeError, "make_env must be callable"):
            mm.TaskFamily("env", lambda rng, n: {}, None, obs_dim=1, horizon=5, n_actions=2)
        with self.assertRaisesRegex(ValueError, "needs n_actions"):
            mm.rl2_train(mm.nav2d_family(), mm.RL2Config(iterations=1))
        family = mm.nav2d_family()
        self.assertEqual((family.policy, family.loss, family.n_out, family.bias_outputs), ("gaussian", "gauss", 4, 2))


# ----------------------------------------------------------------------------
# Gymnasium's own environments as task families (skipped without Gymnasium),
# and the autoreset modes every reader of a batched env checks.
# ----------------------------------------------------------------------------
def _register_test_envs(gym):
    """Two small Gymnasium envs, defined here: ArmsEnv, the two arms of _ArmsEnv (the task's arm a make
    keyword, a bonus reward an attribute), and TargetEnv, a 1-D torque to match the task's target."""
    class ArmsEnv(gym.Env):
        def __init__(self, arm=0):
            self.arm, self.bonus = arm, 0.0
            self.observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
            self.action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.array([0.0], np.float32), {}

        def step(self, action):
            self.t += 1
            reward = float(action == self.arm) + self.bonus
            return np.array([self.t / 10], np.float32), reward, False, False, {}

    class TargetEnv(gym.Env):
        def __init__(self):
            self.target = 0.0
            self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
            self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.np_random.uniform(-1, 1, 2).astype(np.float32), {}

        def step(self, action):
            return np.zeros(2, np.float32), -float((action[0] - self.target) ** 2), False, False, {}

    class MultiEnv(TargetEnv):
        def __init__(self):
            super().__init__()
            self.action_space = gym.spaces.MultiDiscrete([2, 3])

    for name, cls, steps in (("Arms", ArmsEnv, 10), ("Target", TargetEnv, 5), ("Multi", MultiEnv, 5)):
        if f"metarl_test/{name}-v0" not in gym.registry:
            gym.register(f"metarl_test/{name}-v0", entry_point=cls, max_episode_steps=steps)


def _gym_arms(gym):
    _register_test_envs(gym)
    return mm.gymnasium_family("metarl_test/Arms-v0", lambda rng, n: {"arm": rng.integers(0, 2, n),
                                                                      "bonus": np.zeros(n)}, attributes=("bonus",))


class TestGymnasiumFamily(unittest.TestCase):
    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_a_gymnasium_env_goes_into_every_meta_rl_trainer(self):
        gym = _gymnasium()
        family = _gym_arms(gym)
        self.assertEqual((family.obs_dim, family.horizon, family.n_actions, family.policy), (1, 10, 2, "categorical"))
        env = family.make_env({"arm": np.array([0, 1]), "bonus": np.array([0.0, 0.5])}, 3)
        self.assertEqual(env.num_envs, 6)
        self.assertEqual(env.metadata["autoreset_mode"], gym.vector.AutoresetMode.SAME_STEP)
        self.assertEqual([(e.unwrapped.arm, e.unwrapped.bonus) for e in env.envs],
                         [(0, 0.0)] * 3 + [(1, 0.5)] * 3)  # task i's slots: its keyword and its attribute
        config = mm.MetaRLConfig(iterations=8, meta_batch=8, fast_batch=5, hidden=8, log_every=4, eval_batch=5)
        with contextlib.redirect_stdout(io.StringIO()):
            meta, _, extra = mm.meta_rl_train(family, config)
            again = mm.meta_rl_train(family, config)[0]  # same seed, same numbers
        pre, post = np.mean([row[1] for row in extra["curve"]]), np.mean([row[2] for row in extra["curve"]])
        self.assertGreater(post, pre + 1.0)  # as on _ArmsEnv: one policy-gradient step finds the task's arm
        for a, b in zip(meta, again):
            np.testing.assert_array_equal(a, b)
        small = mm.CartPoleConfig(iterations=2, meta_batch=3, rl2_trials=2, hidden=8, es_population=2, es_tasks=2,
                                  es_perturbations=2, log_every=1, eval_batch=2, proto_ways=2)
        with contextlib.redirect_stdout(io.StringIO()):
            for train in (mm.rl2_train, mm.es_train, mm.lstm_rl_train, mm.proto_rl_train):
                with self.subTest(train=train.__name__):
                    learner, extra = train(family, small)
                    self.assertGreater(extra["env_steps"], 0)
            for overrides in (dict(algorithm="reptile"), dict(outer="trpo"), dict(first_order=True)):
                with self.subTest(**overrides):
                    meta, _, extra = mm.meta_rl_train(family, dataclasses.replace(small, **overrides))
                    self.assertTrue(all(np.isfinite(p).all() for p in meta))

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_a_box_action_space_gives_a_gaussian_policy(self):
        gym = _gymnasium()
        _register_test_envs(gym)
        family = mm.gymnasium_family("metarl_test/Target-v0", lambda rng, n: {"target": rng.uniform(-1, 1, n)},
                                     attributes=("target",))
        self.assertEqual((family.obs_dim, family.action_dim, family.policy, family.horizon), (2, 1, "gaussian", 5))
        env = family.make_env({"target": np.array([0.5, -0.5, 0.25])}, 1)
        env.reset(seed=0)
        reward = env.step(np.array([[3.0], [-3.0], [0.75]], np.float32))[1]  # every env clipped to the box in one call
        self.assertEqual(reward.tolist(), [-0.25, -0.25, -0.25])  # (1 - 0.5)^2, (-1 + 0.5)^2, (0.75 - 0.25)^2
        config = mm.MetaRLConfig(iterations=2, meta_batch=3, fast_batch=2, hidden=8, log_every=1, outer="trpo")
        with contextlib.redirect_stdout(io.StringIO()):
            meta, _, _ = mm.meta_rl_train(family, config)
        self.assertEqual(meta[-1].shape, (2,))  # [mean, log_std]
        self.assertEqual(mm.gymnasium_family("metarl_test/Target-v0", lambda rng, n: {}, horizon=3).horizon, 3)

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_what_it_cannot_run_is_refused_in_one_clear_error(self):
        gym = _gymnasium()
        _register_test_envs(gym)
        none = lambda rng, n: {}
        with self.assertRaisesRegex(TypeError, r"action space MultiDiscrete\(\[2 3\]\) is neither Discrete \(a "
                                               r"categorical policy\) nor a 1-D Box \(a Gaussian one\)"):
            mm.gymnasium_family("metarl_test/Multi-v0", none)
        with self.assertRaisesRegex(ValueError, "'NoSuchEnv-v0' is not registered with Gymnasium"):
            mm.gymnasium_family("NoSuchEnv-v0", none)
        with self.assertRaisesRegex(ValueError, "metarl_test/Target-v0 has no attribute 'mass' to set"):
            mm.gymnasium_family("metarl_test/Target-v0", lambda rng, n: {"mass": np.ones(n)}, attributes=("mass",))
        with self.assertRaisesRegex(ValueError, r"does not take the task's keys \['mass'\].*attributes="):
            mm.gymnasium_family("metarl_test/Target-v0", lambda rng, n: {"mass": np.ones(n)})
        with self.assertRaisesRegex(TypeError, "attributes must be a sequence of key names"):
            mm.gymnasium_family("metarl_test/Target-v0", none, attributes="target")
        with unittest.mock.patch.object(mm, "xp", types.SimpleNamespace()):
            with self.assertRaisesRegex(ValueError, "needs the CPU backend"):
                mm.gymnasium_family("metarl_test/Target-v0", none).make_env({"x": np.zeros(1)}, 1)
        with unittest.mock.patch.dict(sys.modules, {"gymnasium": None}):
            with self.assertRaisesRegex(ImportError, "needs Gymnasium, which is not installed: pip install gymnasium"):
                mm.gymnasium_family("CartPole-v1", none)

    def test_the_commands_without_gymnasium_say_so_in_one_line(self):
        with unittest.mock.patch.dict(sys.modules, {"gymnasium": None}):
            _refused(self, [(["pendulum", "--iterations", "1"], "needs Gymnasium, which is not installed"),
                            (["cartpole", "--env", "gymnasium", "--iterations", "1"], "pip install gymnasium")])

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_the_commands_on_gymnasium_run_and_resume_exactly(self):
        for flags in (["pendulum", "--horizon", "8"], ["pendulum", "--task", "reversed", "--horizon", "8"],
                      ["cartpole", "--env", "gymnasium"]):
            with self.subTest(command=flags[0]):
                flags = flags + ["--meta-batch", "2", "--fast-batch", "2", "--eval-tasks", "2", "--val-tasks", "1",
                                 "--eval-batch", "2", "--hidden", "8", "--log-every", "1", "--iterations"]
                straight, resumed, out = _straight_and_resumed(self, flags, "2", "1")
                self.assertIn("gymnasium", out)
                for d in (straight, resumed):
                    d.pop("seconds")
                self.assertEqual(straight, resumed)

    def test_each_reader_refuses_an_autoreset_mode_it_would_misrecord(self):
        """A next-step env would put each reset step into a trial (RL^2's, ProtoNet's) or into the episodes
        after the first (rollout_min_steps): refused in one line; rollout keeps first episodes alone, the same."""
        params = mm.init_mlp((4, 8, 2), np.random.default_rng(0))
        tasks = cp.sample_tasks(np.random.default_rng(1), 4)
        envs = {mode: cp.VecCartPole(4, autoreset_mode=mode, **tasks) for mode in ("SameStep", "NextStep")}
        same, nxt = (mm.rollout(params, envs[m], 2, np.random.default_rng(2), 500) for m in ("SameStep", "NextStep"))
        np.testing.assert_array_equal(same["mask"], nxt["mask"])
        for k in same:  # each env's first episode, what rollout keeps
            np.testing.assert_array_equal(same[k][same["mask"]], nxt[k][same["mask"]])
        gru = mm.init_gru(4 + 2 + 2, 8, 2, np.random.default_rng(0))
        for call, caller in ((lambda: mm.rollout_trials(gru, envs["NextStep"], np.random.default_rng(0), 2, 2000),
                              r"a trial \(run_trials\)"),
                             (lambda: mm.rollout_min_steps(params, envs["NextStep"], 2, np.random.default_rng(0), 50,
                                                           500), "rollout_min_steps")):
            with self.assertRaisesRegex(ValueError, caller + " needs a vector env with SameStep autoreset; this one "
                                        "declares 'NextStep': next-step autoreset would record each env's reset step, "
                                        "its action ignored and its reward 0, as a step of the next episode"):
                call()
        self.assertEqual(mm.rollout_trials(gru, envs["SameStep"], np.random.default_rng(0), 2, 2000)["x"].shape[0], 4)
        gym = _gymnasium()
        if gym is None:
            return
        disabled = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2,
                                            autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        with self.assertRaisesRegex(ValueError, "rollout needs a vector env with SameStep or NextStep autoreset; this "
                                                "one declares 'Disabled'"):
            mm.rollout(params, disabled, 1, np.random.default_rng(0), 500)

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_gymnasiums_cartpole_family_is_the_reversed_family(self):
        """The same tasks as cartpole_family's (the same draws), and from the same states the same steps to the
        bit: Gymnasium's CartPole-v1, its physics set as attributes, the actuator reversed by the wrapper."""
        family, ours = mm.gymnasium_cartpole_family(), mm.cartpole_family("reversed")
        tasks, theirs = family.sample_tasks(np.random.default_rng(7), 12), ours.sample_tasks(np.random.default_rng(7), 12)
        np.testing.assert_array_equal(np.where(tasks["reversed"], -1.0, 1.0) * tasks["force_mag"], theirs["force_mag"])
        self.assertGreater(tasks["reversed"].sum(), 0)
        np.testing.assert_array_equal(family.task_label(tasks), ours.task_label(theirs))
        env, vec = family.make_env(tasks, 2), ours.make_env(theirs, 2)
        env.reset(seed=0)
        vec.reset(seed=0)
        for i, sub in enumerate(env.envs):
            sub.unwrapped.state = vec.state[i].copy()
        rng, alive = np.random.default_rng(8), np.ones(24, bool)
        for _ in range(200):
            actions = rng.integers(0, 2, 24)
            a, b = env.step(actions), vec.step(actions)
            np.testing.assert_array_equal(a[2][alive], b[2][alive])  # until each env's first episode ends
            alive &= ~(b[2] | b[3])
            np.testing.assert_array_equal(a[0][alive], b[0][alive])
        self.assertLess(alive.sum(), 24)

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_a_reversed_pendulum_is_its_mirror_image(self):
        """The torque reversed (register_reversible) is Pendulum-v1 seen in a mirror: from the mirrored start, a
        policy even in the state, u(-x) = u(x), earns on the reversed task what it earns on the task (to the
        last bits of the angle's wrapping), and an odd one, u(-x) = -u(x), does not: why an even policy needs
        no adaptation there, at whatever evenness costs it."""
        family = mm.pendulum_family()
        tasks = family.sample_tasks(np.random.default_rng(3), 6)
        starts = np.random.default_rng(9).uniform([-np.pi, -1.0], [np.pi, 1.0], (6, 2))  # (theta, theta_dot)
        even = lambda cos, sin, dot: np.clip(2 * cos + 0.5 * sin * dot, -2, 2)
        odd = lambda cos, sin, dot: np.clip(-6 * sin - 1.5 * dot, -2, 2)

        def returns(policy, reversed_, flip):
            env = family.make_env(dict(tasks, reversed=reversed_), 1)
            env.reset(seed=0)
            for sub, start in zip(env.unwrapped.envs, starts):
                sub.unwrapped.state = flip * start
            obs, total = np.stack([np.cos(flip * starts[:, 0]), np.sin(flip * starts[:, 0]), flip * starts[:, 1]], 1), 0
            for _ in range(100):
                obs, reward = env.step(policy(*obs.T)[:, None].astype(np.float32))[:2]
                total = total + reward
            return total

        np.testing.assert_allclose(returns(even, tasks["reversed"], 1), returns(even, ~tasks["reversed"], -1), 1e-12)
        self.assertGreater(np.abs(returns(odd, tasks["reversed"], 1) - returns(odd, ~tasks["reversed"], -1)).max(), 100)

    @unittest.skipUnless(_gymnasium(), "needs Gymnasium")
    def test_a_spinning_pendulum_pays_its_direction_times_its_speed(self):
        """spinning_pendulum_family: Gymnasium's Pendulum-v1, its physics set per task, rewarded direction * thetadot
        after each step; from the same start the same actions earn on direction -1 exactly minus what they earn on
        +1, so over the two directions any fixed policy earns nothing: only adaptation pays."""
        gym = _gymnasium()
        family = mm.spinning_pendulum_family(horizon=30)
        tasks = family.sample_tasks(np.random.default_rng(3), 6)
        np.testing.assert_array_equal(tasks["direction"] < 0, mm.sample_pendulum_tasks(np.random.default_rng(3),
                                                                                     6)["reversed"])
        self.assertEqual(sorted(set(tasks["direction"])), [-1.0, 1.0])
        np.testing.assert_array_equal(family.task_label(tasks), tasks["direction"] < 0)
        policy = lambda obs: np.clip(2 * obs[:, 2:] - obs[:, 1:2], -2, 2).astype(np.float32)  # an odd one: it spins

        def returns(direction):
            env = family.make_env(dict(tasks, direction=direction), 1)
            obs, total = env.reset(seed=4)[0], 0
            for t in range(30):
                obs, reward, terminated, truncated, info = env.step(policy(obs))
                seen = np.stack(info["final_obs"]) if truncated.all() else obs  # the last step: the obs before reset
                np.testing.assert_allclose(reward, direction * seen[:, 2], rtol=1e-6)  # direction * thetadot
                self.assertEqual(truncated.all(), t == 29)
                total = total + reward
            return total

        one_way = returns(np.ones(6))
        np.testing.assert_array_equal(returns(-np.ones(6)), -one_way)
        self.assertGreater(np.abs(one_way).min(), 1.0)
        for sub, task in zip(family.make_env(tasks, 1).unwrapped.envs, tasks["m"]):
            self.assertEqual(sub.unwrapped.m, task)
        self.assertEqual(gym.spec(mm.register_spinning()).max_episode_steps, gym.spec("Pendulum-v1").max_episode_steps)


# ----------------------------------------------------------------------------
# The book: its parts, chapters and rules, read off the source.
# ----------------------------------------------------------------------------
class TestBook(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import ast
        with open(os.path.join(HERE, "metarl_min.py")) as f:
            cls.source = f.read()
        cls.tree = ast.parse(cls.source)
        cls.lines = cls.source.splitlines()

    def _top_level(self):
        import ast
        defined = {}
        for node in self.tree.body:
            names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                     [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)])
            for name in names:
                defined.setdefault(name, node.lineno)
        return defined

    def test_no_function_takes_more_than_nine_parameters(self):
        import ast
        for node in ast.walk(self.tree):
            if isinstance(node, ast.FunctionDef):
                a = node.args
                n = len(a.posonlyargs + a.args + a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
                n -= bool(a.args) and a.args[0].arg == "self"
                self.assertLessEqual(n, 9, f"{node.name} (line {node.lineno}) takes {n} parameters")

    def test_it_reads_top_to_bottom(self):
        """Nothing uses a definition below it, but the input checks, which follow the entry points they
        guard, and the backend's fast paths, which plug themselves in at the end."""
        import ast
        defined = self._top_level()
        plugged = {"_CUPY_PATHS", "_PLAIN_PATHS"}
        for node in self.tree.body:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id in defined:
                    if defined[sub.id] > node.lineno and not sub.id.startswith("_check") and sub.id not in plugged:
                        if isinstance(node, ast.ClassDef) and sub.id in {a.arg for f in ast.walk(node)
                                                                          if isinstance(f, ast.FunctionDef)
                                                                          for a in f.args.args}:
                            continue  # a method's parameter of the same name
                        self.fail(f"line {node.lineno} uses {sub.id}, defined below it at line {defined[sub.id]}")

    def test_each_family_in_one_chapter(self):
        heads = {k: next(i for i, l in enumerate(self.lines) if l.startswith(k)) for k in
                 ("# II.1 ", "# II.2 ", "# II.3 ", "# II.4 ", "# II.5 ", "# II.6 ", "# II.7 ", "# PART III")}
        order = list(heads.values())
        self.assertEqual(order, sorted(order))
        defined = self._top_level()
        chapters = {"# II.1 ": ("maml_trpo_step", "meta_rl_train", "meta_rl_evaluate", "MetaRLConfig", "run_meta_rl"),
                    "# II.2 ": ("gru_forward", "gru_backward", "rollout_trials", "rl2_step", "rl2_train",
                                "rl2_evaluate", "RL2Config"),
                    "# II.3 ": ("es_gradient", "hill_climb", "es_train", "es_evaluate", "ESConfig"),
                    "# II.4 ": ("poly_features", "q_learn", "QLearnConfig", "run_qlearn"),
                    "# II.5 ": ("init_meta_lstm", "lstm_step", "lstm_step_backward", "lstm_meta_grad", "lstm_rl_train",
                                "lstm_rl_evaluate", "LSTMConfig"),
                    "# II.6 ": ("sample_sine_tasks", "sine_train", "sine_evaluate", "SineConfig", "run_sine"),
                    "# II.7 ": ("prototypes", "protonet_grad", "sample_few_shot", "protonet_train", "protonet_evaluate",
                                "ProtoNetConfig", "run_protonet", "rollout_proto_trials", "transition_episodes",
                                "proto_rl_train", "proto_rl_evaluate", "proto_identification", "ProtoRLConfig")}
        keys = list(heads)
        for head, names in chapters.items():
            start, end = heads[head], heads[keys[keys.index(head) + 1]]
            for name in names:
                self.assertTrue(start < defined[name] - 1 < end, f"{name} is outside its chapter {head.strip()}")
            lines = [defined[n] for n in names]
            self.assertLess(max(lines) - min(lines), 650, head)
        # The core's end is its banner; the module docstring names no line number.
        self.assertLess(max(defined[n] for n in ("adam_step", "maml_grad", "LowRank", "_check_meta_args")),
                        self.lines.index("# The end of the core. Below it: Part II, one chapter per family of"))
        self.assertIsNone(re.search(r"line \d", self.source[:self.source.index('"""', 3)]))

    def test_the_dense_path_gives_the_fast_paths_numbers(self):
        """The maths as written first (I.1-I.3), without the fast paths of I.5: the same meta-gradient."""
        rng = np.random.default_rng(0)
        params = mm.init_mlp((1, 12, 12, 1), rng, "relu", np.float64)
        x = rng.uniform(-5, 5, (4, 3, 1))
        batch = (x, np.sin(x))
        for steps, first_order in ((1, False), (2, False), (2, True)):
            fast = mm.maml_grad(params, batch, batch, "mse", 0.01, steps, first_order, "relu", factored=True)
            with unittest.mock.patch.dict(mm.__dict__, mm._DENSE_PATHS):
                self.assertIs(mm._mm, mm._DENSE_PATHS["_mm"])
                dense = mm.maml_grad(params, batch, batch, "mse", 0.01, steps, first_order, "relu", factored=True)
            self.assertIs(mm._mm, mm._FAST_PATHS["_mm"])
            self.assertAlmostEqual(fast[0], dense[0], places=12)
            self.assertLess(_rel_err(fast[1], dense[1]), 1e-12)


# ----------------------------------------------------------------------------
# Nothing a user types destroys a file or loses a run.
# ----------------------------------------------------------------------------
_TINY_SINE = ["sine", "--iterations", "2", "--eval-tasks", "2", "--eval-points", "2", "--log-every", "1"]


def _one_line(test, status, err, code=2):
    test.assertEqual(status, code, err)
    test.assertEqual(len(err.strip().splitlines()), 1, err)


class TestNothingLost(unittest.TestCase):
    def test_outputs_are_checked_before_any_work_and_nothing_is_touched(self):
        with tempfile.TemporaryDirectory() as d:
            x, ck = os.path.join(d, "x"), os.path.join(d, "ck.npz")
            with open(x, "w") as f:
                f.write("keep me")
            for argv, says in ((["--save", x, "--json", x], "the same file as --json"),
                               (["--json", x, "--save", os.path.join(d, "link")], None)):
                if says is None:  # a symbolic link to x is x
                    os.symlink(x, os.path.join(d, "link"))
                    says = "--save " + os.path.join(d, "link") + ": the same file as --json"
                status, out, err = _run_main(_TINY_SINE + argv)
                _one_line(self, status, err)
                self.assertIn(says, err)
                self.assertEqual(out, "")  # nothing ran
            with open(x) as f:
                self.assertEqual(f.read(), "keep me")
            self.assertEqual(_run_main(_TINY_SINE + ["--save", ck])[0], 0)
            before = pathlib.Path(ck).read_bytes()
            status, _, err = _run_main(_TINY_SINE + ["--load", ck, "--json", ck])
            _one_line(self, status, err)
            self.assertIn("the same file as --load", err)
            status, _, err = _run_main(_TINY_SINE + ["--load", ck, "--save", ck])
            _one_line(self, status, err)
            self.assertEqual(pathlib.Path(ck).read_bytes(), before)
            fifo = os.path.join(d, "fifo")
            os.mkfifo(fifo)
            for path in (fifo, os.devnull):
                status, _, err = _run_main(_TINY_SINE + ["--json", path])
                _one_line(self, status, err)
                self.assertIn("not a regular file", err)
            self.assertTrue(stat.S_ISFIFO(os.stat(fifo).st_mode))
            self.assertTrue(stat.S_ISCHR(os.stat(os.devnull).st_mode))
            status, _, err = _run_main(_TINY_SINE + ["--json", ""])
            _one_line(self, status, err)
            self.assertIn("--json: an empty path", err)
            with unittest.mock.patch.object(tempfile, "mkstemp", side_effect=PermissionError(13, "Permission denied")):
                status, out, err = _run_main(_TINY_SINE + ["--json", os.path.join(d, "r.json")])
            _one_line(self, status, err)
            self.assertIn("cannot write in", err)
            self.assertEqual(out, "")

    def test_a_symlink_is_followed_and_stays(self):
        with tempfile.TemporaryDirectory() as d:
            target, link = os.path.join(d, "target.json"), os.path.join(d, "link.json")
            open(target, "w").close()
            os.symlink(target, link)
            self.assertEqual(_run_main(_TINY_SINE + ["--json", link])[0], 0)
            self.assertTrue(os.path.islink(link))
            self.assertEqual(_read_json(target)["shots"], 5)
            self.assertEqual(sorted(os.listdir(d)), ["link.json", "target.json"])

    def test_a_checkpoint_held_by_another_run_is_refused_and_stale_temporary_files_go(self):
        with tempfile.TemporaryDirectory() as d:
            ck = os.path.join(d, "ck.npz")
            dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()  # a process that has ended
            stale = os.path.join(d, f".tmp-{dead}-abc123ck.npz")
            open(stale, "w").close()
            held = mm._lock(ck)
            try:
                status, out, err = _run_main(_TINY_SINE + ["--save", ck])
                _one_line(self, status, err)
                self.assertIn(f"another run (pid {os.getpid()}) is writing checkpoints there", err)
            finally:
                mm._unlock(held)
            self.assertTrue(os.path.exists(stale))  # the refused run touched nothing
            self.assertEqual(_run_main(_TINY_SINE + ["--save", ck])[0], 0)
            self.assertEqual(os.listdir(d), ["ck.npz"])  # the stale file and the lock are gone

    def test_ctrl_c_and_sigterm_say_how_to_resume(self):
        import signal
        for sig, code, how in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
            with self.subTest(how=how), tempfile.TemporaryDirectory() as d:
                ck = os.path.join(d, "ck.npz")
                argv = ["sine", "--iterations", "1000000", "--log-every", "20", "--eval-tasks", "2", "--save", ck]
                proc = subprocess.Popen([sys.executable, os.path.join(HERE, "metarl_min.py")] + argv, cwd=d,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
                for _ in range(600):  # the first checkpoint, then a little more
                    if os.path.exists(ck):
                        break
                    time.sleep(0.05)
                time.sleep(0.3)
                proc.send_signal(sig)
                out, err = proc.communicate(timeout=60)
                self.assertEqual(proc.returncode, code, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(f"stopped by {how} at iteration", err)
                resume = err.strip().split("resume with: ")[1]
                self.assertEqual(shlex.split(resume), ["python", "metarl_min.py", "sine", "--iterations", "1000000",
                                                       "--log-every", "20", "--eval-tasks", "2", "--load", ck])
                self.assertEqual([n for n in os.listdir(d) if n != "ck.npz"], [])  # no temporary file, no lock
                self.assertNotIn("Traceback", err)

    def test_a_signal_in_the_middle_of_a_checkpoint_arrives_after_it_is_written_and_recorded(self):
        import signal
        config, params = mm.SineConfig(), [np.arange(6.0).reshape(2, 3), np.ones(3)]
        real_savez = np.savez

        def savez_then_signal(sig):  # the signal arrives while the file is half-written
            def savez(f, **arrays):
                os.kill(os.getpid(), sig)
                real_savez(f, **arrays)
            return savez

        for sig, stop in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, mm._Stopped)):
            with self.subTest(sig=sig), tempfile.TemporaryDirectory() as d:
                ck = os.path.join(d, "ck.npz")
                mm.RUN.clear()
                previous = signal.signal(signal.SIGTERM, mm._on_sigterm)
                try:
                    with unittest.mock.patch.object(mm.np, "savez", savez_then_signal(sig)), self.assertRaises(stop):
                        mm.save_checkpoint(ck, config, 7, np.random.default_rng(0), {"meta": params},
                                           {"meta": mm.adam_init(params)})
                finally:
                    signal.signal(signal.SIGTERM, previous)
                self.assertEqual(mm.RUN["checkpoint"], (ck, 7))  # the stop line names the checkpoint on disk
                self.assertEqual(os.listdir(d), ["ck.npz"])
                iteration, _, models, _, _ = mm.load_checkpoint(ck, config)
                self.assertEqual(iteration, 7)
                np.testing.assert_array_equal(models["meta"][0], params[0])
        mm.RUN.clear()

    def test_an_interrupt_after_the_rename_leaves_the_file_and_raises_the_interrupt(self):
        real_replace = os.replace

        def replace_then_interrupt(src, dst):
            real_replace(src, dst)
            raise KeyboardInterrupt
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "out.json")
            with unittest.mock.patch.object(mm.os, "replace", replace_then_interrupt), \
                    self.assertRaises(KeyboardInterrupt):  # not the FileNotFoundError of removing a renamed file
                mm.write_json(path, {"a": 1})
            self.assertEqual(os.listdir(d), ["out.json"])
            with open(path) as f:
                self.assertEqual(json.load(f), {"a": 1})

    def test_sizes_that_cannot_fit_are_refused_at_once(self):
        for argv, flag in ((["sine", "--hidden", "30000"], "--hidden"), (["sine", "--eval-tasks", "100000000"],
                                                                          "--eval-tasks"),
                           (["sine", "--meta-batch", "100000000"], "--meta-batch"),
                           (["cartpole", "--fast-batch", "1000000"], "--fast-batch"),
                           (["cartpole", "--hidden", "100000000"], "--hidden"),
                           (["qlearn", "--rbf-per-dim", "100"], "--rbf-per-dim")):
            with self.subTest(argv=argv):
                status, out, err = _run_main(argv)
                _one_line(self, status, err)
                self.assertIn("these settings need about", err)
                self.assertIn(flag, err)
                self.assertEqual(out, "")

        def out_of_memory(*args, **kwargs):
            raise MemoryError
        with unittest.mock.patch.dict(mm.EXPERIMENTS, {"sine": (mm.SineConfig, out_of_memory)}):
            status, _, err = _run_main(_TINY_SINE)
        _one_line(self, status, err)
        self.assertIn("out of memory", err)

    def test_each_algorithm_takes_only_its_own_flags(self):
        for argv, says in ((["cartpole", "--rl2-lr", "5"], "--rl2-lr is read only by --algorithm rl2"),
                           (["cartpole", "--algorithm", "rl2", "--first-order"], "--first-order is read only by "
                                                                                 "--algorithm maml"),
                           (["cartpole", "--algorithm", "es", "--no-lvc"], "--lvc is read only"),
                           (["cartpole", "--algorithm", "rl2", "--es-sigma", "0.1"], "--es-sigma is read only by "
                                                                                    "--algorithm es"),
                           (["cartpole", "--algorithm", "es", "--es-sigma", "0"], "--es-sigma must be > 0.0"),
                           (["cartpole", "--algorithm", "es", "--es-lr", "inf"], "--es-lr must be a finite number"),
                           (["nav2d", "--meta-lr", "nan"], "--meta-lr must be a finite number"),
                           (["cartpole", "--rl2-l", "5"], "unrecognized arguments")):
            with self.subTest(argv=argv):
                status, out, err = _run_main(argv)
                _one_line(self, status, err)
                self.assertIn(says, err)
                self.assertEqual(out, "")
        status, out, _ = _run_main(["cartpole", "--help"])
        self.assertEqual(status, 0)
        for heading in ("settings:", "settings read only by --algorithm rl2:", "settings read only by --algorithm es:",
                        "settings read only by --algorithm maml:", "files and device:", "Example:"):
            self.assertIn(heading, out)

    def test_the_apis_edge_cases_are_named(self):
        rng = np.random.default_rng(0)
        params = mm.init_mlp((1, 4, 1), rng, "tanh", np.float64)
        empty = (np.zeros((0, 3, 1)), np.zeros((0, 3, 1)))
        with self.assertRaisesRegex(ValueError, r"query x must have shape \(T, K, 1\) with T >= 1 tasks"):
            mm.maml_grad(params, empty, empty)
        batch = (np.zeros((2, 3, 1)), np.zeros((2, 3, 1)))
        bad = [params[0], np.zeros(5), params[2], params[3]]
        with self.assertRaisesRegex(ValueError, r"params\[1\] must be a bias of shape \(4,\)"):
            mm.maml_grad(bad, batch, batch)
        with self.assertRaisesRegex(ValueError, r"params\[2\] must be a weight of shape \(4, out\)"):
            mm.maml_grad([params[0], params[1], np.zeros((3, 1)), params[3]], batch, batch)
        grads = [np.full(p.shape, np.nan) for p in params]
        with self.assertRaisesRegex(ValueError, r"grads\[0\] contains NaN or inf"):
            mm.adam_step(params, grads, mm.adam_init(params))
        with self.assertRaisesRegex(ValueError, r"grads\[1\] must have the shape of params\[1\]"):
            mm.adam_step(params, [params[0], np.zeros(3), params[2], params[3]], mm.adam_init(params))
        env = mm.cartpole_envs(cp.sample_tasks(rng, 2), 1)
        table = lambda obs: mm.discretize(obs, (1, 1, 6, 3))
        with self.assertRaisesRegex(ValueError, "one column per action of the env \\(2\\), got 3"):
            mm.q_learn(env, np.zeros((2, 18, 3)), table, rng, 1)
        with self.assertRaisesRegex(ValueError, "a row for each table row featurize gives"):
            mm.q_learn(env, np.zeros((2, 4, 2)), table, rng, 1)
        with self.assertRaisesRegex(ValueError, r"one row per feature of featurize \(15\)"):
            mm.q_learn(env, np.zeros((2, 14, 2)), lambda obs: mm.poly_features(obs, 2), rng, 1)

    def test_a_loss_of_ones_own_in_losses(self):
        """A new entry in LOSSES, as the README says: a weighted squared error, its target (y, w) stacked
        in one array (T, K, 2); maml_grad's meta-gradient through it against finite differences."""
        def value(out, target):
            return (target[..., 1:] * (out - target[..., :1]) ** 2).sum(axis=(-2, -1))

        def grad(out, target):
            return 2 * target[..., 1:] * (out - target[..., :1])

        def hess(out, target, r_out):
            return 2 * target[..., 1:] * r_out
        rng = np.random.default_rng(3)
        params = mm.init_mlp((1, 5, 5, 1), rng, "tanh", np.float64)
        x = rng.normal(size=(3, 4, 1))
        target = np.concatenate([np.sin(x), rng.uniform(0.5, 1.5, x.shape)], axis=-1)
        with unittest.mock.patch.dict(mm.LOSSES, {"weighted": (value, grad, hess)}):
            loss, grads = mm.maml_grad(params, (x, target), (x, target), "weighted", 0.1, 2)
            fd = _fd_grad(lambda p: mm.maml_grad(p, (x, target), (x, target), "weighted", 0.1, 2)[0], params)
            with self.assertRaisesRegex(ValueError, r"target for loss 'weighted' must be an array of shape \(3, 4"):
                mm.maml_grad(params, (x, target[:, :2]), (x, target), "weighted")
        self.assertLess(_rel_err(grads, fd), 1e-6)
        self.assertGreater(loss, 0)


# ----------------------------------------------------------------------------
# Copying: each file works alone, and so does the core of metarl_min.py.
# ----------------------------------------------------------------------------
_COPY_CHECK = """
import numpy as np, metarl_min as mm
rng = np.random.default_rng(0)
params = mm.init_mlp((1, 8, 1), rng, "relu", np.float64)
x = rng.uniform(-5, 5, (3, 4, 1))
batch = (x, np.sin(x))
loss, grads = mm.maml_grad(params, batch, batch, "mse", 0.01, 1, False, "relu")
_, _, lr_grads = mm.meta_sgd_grad(params, [np.full(p.shape, 0.01) for p in params], batch, batch, activation="relu")
_, direction = mm.reptile_grad(params, batch, batch, "mse", 0.01, 2, "relu")
new, _ = mm.adam_step(params, grads, mm.adam_init(params))
print(repr(loss), sum(float(g.sum()) for g in grads + lr_grads + direction + new))
"""


class TestCopying(unittest.TestCase):
    def _run(self, folder, *args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=folder, timeout=120,
                              env={**os.environ, "PYTHONPATH": ""})

    def test_metarl_min_alone_and_its_core_alone(self):
        here = self._run(HERE, "-c", _COPY_CHECK)
        self.assertEqual(here.returncode, 0, here.stderr)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(HERE, "metarl_min.py")) as f:
                source = f.read()
            with open(os.path.join(d, "metarl_min.py"), "w") as f:
                f.write(source)
            alone = self._run(d, "-c", "import sys, metarl_min\nassert 'cartpole' not in sys.modules\n" + _COPY_CHECK)
            self.assertEqual(alone.returncode, 0, alone.stderr)
            self.assertEqual(alone.stdout, here.stdout)  # the same numbers
            # The commands that need CartPole say so in one line; the others run.
            for command in ("cartpole", "qlearn"):
                with self.subTest(command=command):
                    proc = self._run(d, "metarl_min.py", command, "--iterations", "1")
                    self.assertEqual(proc.returncode, 2)
                    self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                    self.assertIn("needs cartpole.py", proc.stderr)
            proc = self._run(d, "metarl_min.py", "sine", "--iterations", "2", "--eval-tasks", "2", "--eval-points", "2")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            # The core: everything above its end's banner, and nothing else.
            lines = source.splitlines()
            end = lines.index("# The end of the core. Below it: Part II, one chapter per family of")
            self.assertTrue(lines[end - 1].startswith("# ====="))
            self.assertIn('the banner "The end of the core"', " ".join(source[:2000].split()))  # the docstring names it, no line number
            core = lines[:end - 1]
            with open(os.path.join(d, "metarl_min.py"), "w") as f:
                f.write("\n".join(core) + "\n")
            proc = self._run(d, "-c", _COPY_CHECK)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual(proc.stdout, here.stdout)

    def test_the_readmes_snippets_run_alone(self):
        """Each python block of README.md, as written, in a fresh interpreter beside the two files (NumPy only;
        a block that says it needs Gymnasium runs where Gymnasium is installed)."""
        with open(os.path.join(HERE, "README.md")) as f:
            blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
        self.assertGreaterEqual(len(blocks), 5)
        blocks = [b for b in blocks if _gymnasium() or "pip install gymnasium" not in b]
        procs = [subprocess.Popen([sys.executable, "-c", b], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for b in blocks]
        for block, proc in zip(blocks, procs):
            out, err = proc.communicate(timeout=180)
            self.assertEqual(proc.returncode, 0, f"{block}\n{err}")

    def test_cartpole_alone(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(HERE, "cartpole.py")) as f, open(os.path.join(d, "cartpole.py"), "w") as g:
                g.write(f.read())
            check = ("import numpy as np, cartpole\n"
                     "env = cartpole.VecCartPole(8, **cartpole.sample_tasks(np.random.default_rng(0), 8))\n"
                     "env.reset(seed=0)\n"
                     "for _ in range(30): obs, *_ = env.step(np.ones(8, int))\n"
                     "one = cartpole.CartPoleEnv(); one.reset(seed=0); one.step(1)\n"
                     "import sys; assert not {'gymnasium', 'cupy', 'metarl_min'} & set(sys.modules)\n"
                     "print(obs.shape, obs.dtype)")
            proc = self._run(d, "-c", check)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual(proc.stdout.strip(), "(8, 4) float32")


# ----------------------------------------------------------------------------
# The backend: xp is NumPy, an emulated device, or CuPy on a GPU.
# ----------------------------------------------------------------------------
def _on_host(obj, host_ok=False):
    """obj with its device arrays seen as NumPy arrays. A NumPy array in obj is a
    TypeError unless host_ok: CuPy's rule, as a host array mixed with device
    arrays would be a hidden copy."""
    kind = type(obj)
    if kind is _DeviceArray:
        return obj.view(np.ndarray)
    if kind is np.ndarray and not host_ok:
        raise TypeError(f"a host (NumPy) array of shape {obj.shape} mixed with device arrays")
    if kind is tuple or kind is list:
        return kind(_on_host(o, host_ok) for o in obj)
    if kind is dict:
        return {k: _on_host(v, host_ok) for k, v in obj.items()}
    return obj


def _on_device(obj):
    kind = type(obj)
    if kind is np.ndarray:
        return obj.view(_DeviceArray)
    if kind is tuple or kind is list:
        return kind(_on_device(o) for o in obj)
    return obj


class _DeviceArray(np.ndarray):
    """An array on an emulated device: NumPy's numbers, CuPy's strictness about host arrays."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        sequences = [type(i).__name__ for i in inputs if type(i) in (list, tuple)]
        if sequences:  # CuPy's operands are arrays and scalars
            raise TypeError(f"a {sequences[0]} operand of {ufunc.__name__} on the device")
        return _on_device(getattr(ufunc, method)(*_on_host(inputs), **_on_host(kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        return _on_device(func(*_on_host(args), **_on_host(kwargs)))

    def __getitem__(self, key):
        return _on_device(self.view(np.ndarray)[_on_host(key)])

    def __setitem__(self, key, value):
        self.view(np.ndarray)[_on_host(key)] = _on_host(value)


class _DeviceFunction:
    def __init__(self, fn, takes_host):
        self.fn, self.takes_host = fn, takes_host

    def __call__(self, *args, **kwargs):
        return _on_device(self.fn(*_on_host(args, self.takes_host), **_on_host(kwargs, self.takes_host)))


class _DeviceNamespace:
    """NumPy's functions (of `module`) returning device arrays; only the array
    constructors take host arrays, as in CuPy."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        obj = getattr(self._module, name)
        if callable(obj) and not isinstance(obj, type):
            return _DeviceFunction(obj, name in ("asarray", "array", "ascontiguousarray"))
        return obj


class _EmulatedDevice(_DeviceNamespace):
    """A stand-in for CuPy that runs anywhere: the project's code runs on it as on a
    GPU (device arrays, device RNG, asnumpy), and a NumPy array mixed in is a TypeError."""
    __name__ = "emulated device"
    ndarray = _DeviceArray

    def __init__(self):
        super().__init__(np)
        self.linalg = _DeviceNamespace(np.linalg)
        self.random = _DeviceNamespace(np.random)
        self.random.default_rng = lambda seed=None: _DeviceNamespace(np.random.default_rng(seed))

    def asnumpy(self, a):
        return np.array(_on_host(a))


def _cupy_with_gpu():
    try:
        return cp.array_module("gpu")
    except ImportError:
        return None


class TestBackend(unittest.TestCase):
    def tearDown(self):
        mm.set_array_module(np)

    def test_one_switch_for_both_files(self):
        """set_array_module and use_device switch this file and cartpole.py together, with the
        fast paths of the module: the core's plain ones except on CuPy."""
        for switch in (lambda: mm.use_device("cpu"), lambda: mm.set_array_module(_EmulatedDevice()),
                       lambda: mm.set_array_module(np), lambda: mm.set_array_module(_EmulatedDevice()),
                       lambda: mm.use_device("cpu")):
            switch()
            self.assertIs(cp.xp, mm.xp)
            self.assertIs(mm._matmul, mm._PLAIN_PATHS["_matmul"])
            self.assertIs(mm._sum_leading, mm._PLAIN_PATHS["_sum_leading"])
            self.assertIsInstance(cp.VecCartPole(2).reset(seed=0)[0], mm.xp.ndarray)

    def test_numpy_is_the_default_and_cupy_is_not_imported(self):
        self.assertIs(mm.xp, np)
        self.assertIs(cp.xp, np)
        proc = subprocess.run([sys.executable, "-c", "import sys, metarl_min; print('cupy' in sys.modules)"],
                              capture_output=True, text=True, cwd=HERE, timeout=60)
        self.assertEqual(proc.stdout.strip(), "False")

    def test_gpu_without_cupy_is_one_clear_line(self):
        with unittest.mock.patch.dict(sys.modules, {"cupy": None}):  # as if CuPy were not installed
            with self.assertRaisesRegex(ImportError, "needs CuPy, which is not installed: pip install cupy"):
                mm.use_device("gpu")
            for argv, env in ((["sine", "--device", "gpu"], {}), (["sine"], {"METARL_DEVICE": "gpu"})):
                with self.subTest(argv=argv, env=env), unittest.mock.patch.dict(os.environ, env):
                    status, out, err = _run_main(argv)
                    self.assertEqual(status, 2)
                    self.assertEqual(len(err.strip().splitlines()), 1)
                    self.assertIn("pip install cupy", err)
                    self.assertEqual(out, "")
        self.assertIs(mm.xp, np)  # a failed switch leaves NumPy in place
        with self.assertRaisesRegex(ValueError, "device must be one of"):
            mm.use_device("tpu")
        with unittest.mock.patch.dict(os.environ, {"METARL_DEVICE": "tpu"}):
            status, _, err = _run_main(["sine"])
        self.assertEqual(status, 2)
        self.assertIn("METARL_DEVICE must be one of cpu, gpu; got 'tpu'", err)

    def _check_same_as_numpy(self, module, rtol):
        """maml_grad and 20 VecCartPole steps with xp = module equal NumPy's, within rtol (0: bit for bit)."""
        rng = np.random.default_rng(0)
        params = mm.init_mlp((1, 40, 40, 1), rng, "relu", np.float64)
        support, query = _batch(rng, "mse", 50, 10, 1, 1), _batch(rng, "mse", 50, 10, 1, 1)
        tasks = cp.sample_tasks(np.random.default_rng(1), 1000)
        state = np.random.default_rng(2).uniform(-0.05, 0.05, (1000, 4))
        actions = (np.arange(20)[:, None] + np.arange(1000)) % 2  # alternating pushes

        def run():
            on_xp = lambda arrays: [mm.xp.asarray(a) for a in arrays]
            loss, grads = mm.maml_grad(on_xp(params), tuple(on_xp(support)), tuple(on_xp(query)), "mse", 0.01, 2)
            env = cp.VecCartPole(1000, **tasks)
            env.reset(seed=0)
            env.state = state
            ended = mm.xp.zeros(1000, dtype=bool)
            for a in actions:
                obs, _, terminated, truncated, _ = env.step(mm.xp.asarray(a))
                ended |= terminated | truncated
            return loss, grads, obs, ended
        host = run()
        mm.set_array_module(module)
        self.assertIs(cp.xp, module)
        loss, grads, obs, ended = run()
        self.assertIsInstance(obs, module.ndarray)
        self.assertIsInstance(grads[0], module.ndarray)
        close = lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12 if rtol else 0)
        close(loss, host[0])
        for g, h in zip(grads, host[1]):
            close(mm.to_host(g), h)
        # The same episodes end; a new one starts from the device's own reset draws, so
        # the observations are compared where no episode has ended (about 900 of 1000).
        np.testing.assert_array_equal(mm.to_host(ended), host[3])
        self.assertTrue(50 < host[3].sum() < 200)
        close(mm.to_host(obs)[~host[3]], host[2][~host[3]])

    def test_emulated_device_gives_numpy_numbers(self):
        """With xp an emulated device, the numbers are NumPy's bit for bit: the code
        makes every array with xp and never mixes in a host array."""
        self._check_same_as_numpy(_EmulatedDevice(), rtol=0)
        with self.assertRaisesRegex(TypeError, "host"):  # the emulator does catch a mixed-in host array
            mm.xp.ones(3) + np.ones(3)

    def test_training_runs_on_an_emulated_device(self):
        """Training, checkpoints, evaluation and JSON with every array on the emulated device.
        Rollouts draw from the device's own generator, so the numbers differ from the CPU's,
        but the seed fixes them and resuming ends where a straight run ends."""
        config = mm.CartPoleConfig(iterations=2, meta_batch=3, fast_batch=3, hidden=8, log_every=1)
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
            ck = os.path.join(d, "ck.npz")
            family = mm.cartpole_family()
            cpu, _, _ = mm.meta_rl_train(family, config)
            mm.set_array_module(_EmulatedDevice())
            straight, _, extra = mm.meta_rl_train(family, config)
            mm.meta_rl_train(family, dataclasses.replace(config, iterations=1), save=ck)
            resumed, _, extra_resumed = mm.meta_rl_train(family, config, load=ck)
            self.assertIsInstance(resumed[0], _DeviceArray)
            for s, r in zip(straight, resumed):
                np.testing.assert_array_equal(mm.to_host(s), mm.to_host(r))
            self.assertEqual(extra, extra_resumed)
            self.assertFalse(np.array_equal(mm.to_host(straight[0]), cpu[0]))  # the device's own stream
            # A whole command, the evaluation and JSON included (main keeps the emulated backend).
            path = os.path.join(d, "nav.json")
            with unittest.mock.patch.object(mm, "use_device", lambda device: None):
                status, _, err = _run_main(["nav2d", "--iterations", "1", "--meta-batch", "2", "--fast-batch", "2",
                                            "--eval-tasks", "2", "--val-tasks", "2", "--eval-batch", "2",
                                            "--eval-min-steps", "300", "--hidden", "8", "--json", path,
                                            "--outer", "trpo"])
            self.assertEqual(status, 0, err)
            self.assertEqual(set(_read_json(path)["return"]), {"0", "1", "2", "3"})
            # RL^2, ES-MAML, the meta-learner LSTM and ProtoNet, training and evaluation, every array on the device.
            own_flags = {"rl2": ["--meta-batch", "2", "--rl2-trials", "2"],
                         "es": ["--es-population", "2", "--es-tasks", "2", "--es-perturbations", "2"],
                         "lstm": ["--meta-batch", "2", "--fast-batch", "2", "--lstm-hidden", "3"],
                         "protonet": ["--meta-batch", "2", "--rl2-trials", "2", "--proto-ways", "2", "--eval-episodes",
                                      "4", "--encoder-episodes", "2"]}
            for algorithm, own in own_flags.items():
                with unittest.mock.patch.object(mm, "use_device", lambda device: None):
                    status, _, err = _run_main(["cartpole", "--algorithm", algorithm, "--iterations", "1",
                                                "--hidden", "8", "--eval-tasks", "2", "--eval-batch", "2",
                                                "--json", path] + own)
                self.assertEqual(status, 0, err)
                self.assertEqual(set(_read_json(path)["return"]), {"0", "1", "2", "3"})
            # The sinusoid by the LSTM and by Meta-SGD, and the protonet command.
            for args in (["sine", "--algorithm", "lstm", "--eval-tasks", "3"], ["sine", "--algorithm", "meta-sgd"],
                         ["protonet", "--eval-episodes", "4"]):
                with unittest.mock.patch.object(mm, "use_device", lambda device: None):
                    status, _, err = _run_main(args + ["--iterations", "2", "--log-every", "1", "--json", path])
                self.assertEqual(status, 0, err)
                self.assertIn("mse" if args[0] == "sine" else "accuracy", _read_json(path))
            # The qlearn command, evaluation included, on episodes cut at 10 steps.
            make_envs = mm.cartpole_envs

            def short_envs(tasks, episodes):
                env = make_envs(tasks, episodes)
                env.max_episode_steps = 10
                return env
            with unittest.mock.patch.object(mm, "use_device", lambda device: None), \
                    unittest.mock.patch.object(mm, "cartpole_envs", short_envs):
                status, _, err = _run_main(["qlearn", "--iterations", "1", "--meta-tasks", "2", "--meta-episodes", "100",
                                            "--eval-tasks", "2", "--episodes", "100", "--rbf-per-dim", "2"])
            self.assertEqual(status, 0, err)
            # Q-learning, table and kernel, on device envs.
            tasks = cp.sample_tasks(np.random.default_rng(0), 2, "sunblaze")
            for featurize, n_features in ((lambda obs: mm.discretize(obs, (1, 1, 6, 12)), 72),
                                          (lambda obs: mm.poly_features(obs, 2), 15)):
                weights = mm.xp.zeros((2, n_features, 2))
                W, returns = mm.q_learn(mm.cartpole_envs(tasks, 1), weights, featurize, np.random.default_rng(1), 3)
                self.assertEqual(W.shape, (2, n_features, 2))
                self.assertTrue((mm.to_host(returns) > 0).all())
                self.assertTrue(np.isinf(mm.to_host(mm.episodes_to_solve(returns, window=3))).all())

    @unittest.skipUnless(_cupy_with_gpu(), "needs CuPy and a GPU")
    def test_gpu_equals_cpu(self):
        self._check_same_as_numpy(_cupy_with_gpu(), rtol=1e-6)

    @unittest.skipUnless(_cupy_with_gpu(), "needs CuPy and a GPU")
    def test_gpu_matmul_equals_numpy(self):
        """_matmul's own cuBLAS call (transpose flags, leading dimensions, a matrix shared by all
        tasks) against NumPy's @, on transposed views, slices and length-1 axes."""
        gpu = _cupy_with_gpu()
        mm.set_array_module(gpu)
        rng = np.random.default_rng(0)
        for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
            for T, m, k, n in ((7, 10, 40, 40), (7, 40, 10, 40), (5, 1, 10, 40), (5, 10, 1, 40), (5, 40, 10, 1),
                               (6, 1, 1, 1)):
                for a_t, b_t, a_shared, b_shared in itertools.product((False, True), repeat=4):
                    if a_shared and b_shared:
                        continue
                    a = rng.standard_normal(((1,) if a_shared else (T,)) + ((k, m) if a_t else (m, k))).astype(dtype)
                    b = rng.standard_normal(((1,) if b_shared else (T,)) + ((n, k) if b_t else (k, n))).astype(dtype)
                    a, b = (x.swapaxes(-1, -2) if t else x for x, t in ((a, a_t), (b, b_t)))
                    a, b = (x[0] if shared else x for x, shared in ((a, a_shared), (b, b_shared)))
                    with self.subTest(dtype=dtype, shape=(T, m, k, n), transposed=(a_t, b_t), shared=(a_shared, b_shared)):
                        got = mm._matmul(gpu.asarray(a), gpu.asarray(b))
                        np.testing.assert_allclose(mm.to_host(got), a @ b, rtol=tol, atol=tol)
        x, w = gpu.asarray(rng.standard_normal((9, 12, 40))), gpu.asarray(rng.standard_normal((9, 40, 41)))
        for a, b in ((x[:, 2:], w[..., :40]), (x[1:], w[1:, :, 1:]), (x[..., :30], w[:, :30])):  # views inside a buffer
            np.testing.assert_allclose(mm.to_host(mm._matmul(a, b)), mm.to_host(a) @ mm.to_host(b), rtol=1e-12, atol=1e-12)

    @unittest.skipUnless(_cupy_with_gpu(), "needs CuPy and a GPU")
    def test_gpu_fused_step_equals_separate_operations(self):
        """VecCartPole's one-kernel step (cupy.fuse) against the same step as separate CuPy
        operations: both integrators, both rewards, with termination, truncation and autoreset."""
        gpu = _cupy_with_gpu()
        mm.set_array_module(gpu)
        tasks = cp.sample_tasks(np.random.default_rng(1), 1000)
        actions = np.random.default_rng(2).integers(0, 2, (60, 1000))
        for integrator in cp.INTEGRATORS:
            for sutton in (False, True):
                envs = [cp.VecCartPole(1000, kinematics_integrator=integrator, sutton_barto_reward=sutton,
                                       max_episode_steps=40, **tasks) for _ in range(2)]
                envs[1].fused = False
                self.assertTrue(envs[0].fused)
                for env in envs:
                    env.reset(seed=3)
                ended = np.zeros(2, int)  # episodes terminated, truncated
                for a in actions:
                    fused, separate = (env.step(gpu.asarray(a)) for env in envs)
                    for u, v in zip(fused[1:4] + (fused[4]["_final_obs"],), separate[1:4] + (separate[4]["_final_obs"],)):
                        np.testing.assert_array_equal(mm.to_host(u), mm.to_host(v))
                    # The kernel may contract a*b + c into one rounding (FMA): the last bits can differ.
                    for u, v in ((fused[0], separate[0]), (fused[4]["final_obs"], separate[4]["final_obs"])):
                        np.testing.assert_allclose(mm.to_host(u), mm.to_host(v), rtol=0, atol=1e-6)
                    np.testing.assert_allclose(mm.to_host(envs[0].state), mm.to_host(envs[1].state), rtol=0, atol=1e-9)
                    ended += [int(mm.to_host(fused[2]).sum()), int(mm.to_host(fused[3]).sum())]
                self.assertTrue((ended > 0).all(), ended)

    @unittest.skipUnless(_cupy_with_gpu(), "needs CuPy and a GPU")
    def test_gpu_commands_are_reproducible(self):
        argv = ["cartpole", "--device", "gpu", "--iterations", "2", "--meta-batch", "4", "--fast-batch", "4",
                "--eval-tasks", "4", "--eval-batch", "4", "--hidden", "8"]
        with tempfile.TemporaryDirectory() as d:
            a, b = os.path.join(d, "a.json"), os.path.join(d, "b.json")
            self.assertEqual(_run_main(argv + ["--json", a])[0], 0)
            self.assertEqual(_run_main(argv + ["--json", b])[0], 0)
            self.assertEqual(_read_json(a)["return"], _read_json(b)["return"])
        self.assertIs(mm.xp, np)  # main puts the backend back


if __name__ == "__main__":
    unittest.main()
