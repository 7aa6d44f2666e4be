"""Tests for metarl-min: ``python -m unittest`` (or ``pytest``), NumPy only.

Reference numbers from libraries the project does not import (Gymnasium,
PyTorch) were generated once in a scratch virtualenv and are embedded here;
the script that made each set is described beside it.
"""

import hashlib
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


def _reference_policy(kind, obs, rng):
    if kind == "random":
        return int(rng.integers(2))
    x, x_dot, theta, theta_dot = obs
    return int(0.02 * x + 0.2 * x_dot + 4.0 * theta + 1.0 * theta_dot > 0)


class TestCartPoleMatchesGymnasium(unittest.TestCase):
    def test_trajectories_bit_identical(self):
        for ref in GYMNASIUM_TRAJECTORIES:
            with self.subTest(seed=ref["seed"], integrator=ref["integrator"], physics=ref["physics"]):
                env = cp.CartPoleEnv(kinematics_integrator=ref["integrator"],
                                     sutton_barto_reward=ref["sutton_barto"], **ref["physics"])
                obs, info = env.reset(seed=ref["seed"])
                self.assertEqual(info, {})
                rng = np.random.default_rng(ref["seed"])
                observations, rewards, extra = [obs], [], ref["extra"]
                while True:
                    obs, reward, terminated, truncated, _ = env.step(_reference_policy(ref["policy"], obs, rng))
                    observations.append(obs)
                    rewards.append(reward)
                    self.assertIsInstance(reward, float)
                    if terminated or truncated:
                        if extra == 0:
                            break
                        extra -= 1
                self.assertEqual(len(rewards), ref["steps"])
                self.assertEqual((terminated, truncated), (ref["terminated"], ref["truncated"]))
                self.assertEqual(sum(rewards), ref["reward_sum"])
                self.assertEqual(rewards[-4:], ref["last_rewards"])
                self.assertEqual(obs.tolist(), ref["final_obs"])
                self.assertEqual(obs.dtype, np.float32)
                self.assertEqual(env.state.dtype, np.float64)
                digest = hashlib.sha256(np.array(observations, np.float32).tobytes()).hexdigest()[:32]
                self.assertEqual(digest, ref["sha256"])

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


if __name__ == "__main__":
    unittest.main()
