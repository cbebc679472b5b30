"""The exact lab (covrl.transformer.tree and .exact) against independent references: the tree's
layout against the network's own forward pass, the enumeration against a sampler, the expected
loss's gradient against float64 finite differences of the objectives it follows, the checks'
NumPy references against trees solved by hand, and the population against a large sample."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl.experiments.claims import exact_references as te
from covrl.transformer import exact, sampling, tree
from covrl.transformer.model import TransformerPolicy

SMALL = tree.TreeTask(num_prompts=3, prompt_length=2, response_length=2, num_tokens=3)
DEEP = tree.TreeTask(num_prompts=2, prompt_length=1, response_length=3, num_tokens=2)


def _config(task, **kw):
  return exact.ExactConfig(task, task.model_config(d_model=8, num_heads=2, num_layers=1,
                                                   init_scale=0.5), **kw)


@pytest.mark.parametrize("task", [SMALL, DEEP], ids=["V3T2", "V2T3"])
def test_token_logits_are_the_forward_pass_of_each_response(task):
  config = _config(task)
  params = exact.init(config, jax.random.key(0))
  got = tree.tree_logits(TransformerPolicy(config.model), params, task)  # [P, N, T, V]
  for p in range(task.num_prompts):
    prompts = jnp.repeat(jnp.asarray(task.prompts[p:p + 1]), task.num_responses, axis=0)
    want = sampling.response_logits(TransformerPolicy(config.model), params, prompts,
                                     jnp.asarray(task.responses))
    np.testing.assert_allclose(got[p], want, rtol=1e-5, atol=1e-6)


def test_task_is_seeded_distinct_and_has_a_unique_best():
  a, b = tree.TreeTask(seed=3), tree.TreeTask(seed=3)
  np.testing.assert_array_equal(a.rewards, b.rewards)
  assert len({tuple(p) for p in a.prompts}) == a.num_prompts
  top = np.sort(a.rewards, axis=1)[:, -2:]
  assert np.all(top[:, 1] - top[:, 0] >= a.min_margin)
  np.testing.assert_array_equal(a.responses[0], [0] * a.response_length)
  with pytest.raises(ValueError, match="distinct prompts"):
    tree.TreeTask(num_prompts=9, prompt_length=1, num_tokens=8)
  with pytest.raises(ValueError, match="vocab_size"):
    exact.ExactConfig(a, dataclasses.replace(a.model_config(), vocab_size=a.num_tokens + 1))


def test_enumeration_matches_a_sampler():
  """Response frequencies of covrl.transformer.sample (temperature 1) converge to the enumerated
  pi(y | p): every deviation within 5 standard errors."""
  task = SMALL
  config = _config(task)
  params = exact.init(config, jax.random.key(1))
  probs = np.exp(exact.response_log_probs(config, params))
  n = 20000
  model = TransformerPolicy(config.model)
  for p in range(task.num_prompts):
    prompts = jnp.repeat(jnp.asarray(task.prompts[p:p + 1]), n, axis=0)
    out = sampling.sample(model, params, prompts, jax.random.key(p),
                          response_length=task.response_length)
    index = np.asarray(out.responses) @ (task.num_tokens ** np.arange(task.response_length)[::-1])
    freq = np.bincount(index, minlength=task.num_responses) / n
    se = np.sqrt(probs[p] * (1 - probs[p]) / n)
    assert np.all(np.abs(freq - probs[p]) <= 5 * se + 1e-9)


def test_node_log_probs_are_the_response_distributions_conditionals():
  config = _config(DEEP)
  params = exact.init(config, jax.random.key(2))
  nodes = exact.node_log_probs(config, params)
  logp = exact.response_log_probs(config, params)
  np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, rtol=1e-12)
  for got, want in zip(te.node_conditionals(logp, DEEP.num_tokens, DEEP.response_length), nodes):
    np.testing.assert_allclose(got, want, atol=1e-12)


# ---------------------------------------------------------------- gradients (float64)


def _objectives(task, model, alpha):
  """J(theta) = mean_p [E_pi R + alpha H(pi(. | p))] by enumeration, and the same with each
  node's entropy weighted by the reach probabilities of `reach_params` (held fixed)."""
  rewards = jnp.asarray(task.rewards)

  def nodes(params):
    logits = model.apply({"params": params}, jnp.asarray(tree.prefix_sequences(task)))
    return [jax.nn.log_softmax(z) for z in tree.node_logits(task, logits)]

  def responses(params):
    out = 0.0
    for d, lp in enumerate(nodes(params)):
      flat = lp.reshape(task.num_prompts, -1)
      out = out + jnp.repeat(flat, task.num_tokens ** (task.response_length - 1 - d), axis=1)
    return out

  def soft(params):
    lp = responses(params)
    return jnp.mean(jnp.sum(jnp.exp(lp) * (rewards - alpha * lp), axis=1))

  def per_token(params, reach_params):
    lp = responses(params)
    value = jnp.mean(jnp.sum(jnp.exp(lp) * rewards, axis=1))
    reach = jnp.zeros((task.num_prompts, 1))
    for node, fixed in zip(nodes(params), nodes(reach_params)):
      h = -jnp.sum(jnp.exp(node) * node, axis=-1)
      value = value + alpha * jnp.mean(jnp.sum(jnp.exp(reach) * h, axis=1))
      reach = (reach[..., None] + fixed).reshape(task.num_prompts, -1)
    return value

  return soft, per_token


@pytest.mark.float64
@pytest.mark.parametrize("form", ["return", "per_token"])
def test_expected_gradient_matches_finite_differences(form):
  """The expected loss's gradient is -1/T times the gradient of the objective it follows: E R +
  alpha H of the responses (entropy in the return), or E R + alpha sum_s reach(s) H(pi_s) with
  the rollout's reach held fixed (verl's bonus); along a random direction, in float64."""
  task, alpha = DEEP, 0.3
  config = _config(task, control=covrl.EntropyBonus(alpha if form == "per_token" else 0.0),
                   return_entropy=alpha if form == "return" else 0.0)
  config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                 param_dtype="float64"))
  params = exact.init(config, jax.random.key(3))
  grad = jax.jit(jax.grad(lambda p: exact.expected_loss(
      config, p, config.control, None, return_entropy=config.return_entropy)[0]))(params)
  soft, per_token = _objectives(task, TransformerPolicy(config.model), alpha)
  objective = jax.jit(soft if form == "return" else (lambda p: per_token(p, params)))
  leaves, treedef = jax.tree.flatten(params)
  direction = jax.tree.unflatten(treedef, [
      jax.random.normal(jax.random.key(i), x.shape, x.dtype) for i, x in enumerate(leaves)])
  h = 1e-5
  move = lambda s: jax.tree.map(lambda x, d: x + s * d, params, direction)
  numeric = (objective(move(h)) - objective(move(-h))) / (2 * h)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                 jax.tree.leaves(direction)))
  np.testing.assert_allclose(-task.response_length * analytic, numeric, rtol=1e-6)


def test_population_advantages_of_equal_returns_are_exactly_zero():
  probs = jnp.asarray([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], jnp.float32)
  rewards = jnp.full((2, 3), 0.7, jnp.float32)
  for normalize in (False, True):
    assert float(jnp.max(jnp.abs(exact.advantages(rewards, probs, normalize)))) == 0.0


def test_population_converges_to_a_sampled_batch():
  """The weighted population's loss is the limit of a sampled batch with the same advantages:
  KL-Cov off-policy, within 5 standard errors of the sample's token losses."""
  task = SMALL
  config = _config(task)
  params = exact.init(config, jax.random.key(4))
  batch = exact.population(config, params)
  moved = jax.tree.map(lambda x: x * 1.05, params)  # a second, off-policy update's policy
  control = covrl.KLCov(kl_cov_ratio=0.2, ppo_kl_coef=1.0)
  exact_loss = float(exact.expected_loss(config, moved, control, batch)[0])
  n = 8192
  rng = np.random.default_rng(0)
  probs = np.asarray(jnp.exp(batch.response_log_prob))
  picks = np.stack([rng.choice(task.num_responses, n, p=probs[p] / probs[p].sum())
                    for p in range(task.num_prompts)])  # [P, n]
  logits = tree.tree_logits(TransformerPolicy(config.model), moved, task)
  new = sampling.token_log_probs(logits, jnp.broadcast_to(jnp.asarray(task.responses),
                                                          logits.shape[:3]))
  rows = lambda x: np.concatenate([np.asarray(x)[p, picks[p]] for p in range(task.num_prompts)])
  old, lp, adv = (jnp.asarray(rows(x)) for x in (batch.old_log_prob, new, batch.advantages))
  adv = jnp.broadcast_to(adv[:, None], lp.shape)
  sampled, _ = covrl.policy_loss(control, old, lp, adv, jnp.ones(lp.shape))
  plain = np.asarray(-adv * jnp.exp(lp - old))
  se = plain.std() / np.sqrt(plain.size)
  assert abs(float(sampled) - exact_loss) <= 5 * se + 1e-3 * abs(exact_loss)


# ---------------------------------------------------------------- the references, by hand


def test_references_on_a_two_step_tree_solved_by_hand():
  """V = 2, T = 2: the soft optimum is softmax(R / alpha) and its recursion; verl's bonus's fixed
  point takes softmax(R[a, .] / alpha) at each second node, then softmax(Q / alpha) at the root
  with Q(a) the unregularised expectation under it."""
  r = np.array([[0.9, 0.1, 0.6, 0.5]])
  alpha = 0.2
  soft = np.exp(te.soft_optimum(r, alpha))
  np.testing.assert_allclose(soft, np.exp(r / alpha) / np.exp(r / alpha).sum())
  nodes = te.soft_bellman(r, alpha, 2, 2)
  np.testing.assert_allclose(np.exp(te.responses_from_nodes(nodes, 2, 2)), soft, rtol=1e-12)
  second = [np.exp(r[0, 2 * a:2 * a + 2] / alpha) / np.exp(r[0, 2 * a:2 * a + 2] / alpha).sum()
            for a in range(2)]
  q = np.array([second[a] @ r[0, 2 * a:2 * a + 2] for a in range(2)])
  root = np.exp(q / alpha) / np.exp(q / alpha).sum()
  want = np.concatenate([root[a] * second[a] for a in range(2)])
  got, iterations = te.myopic_fixed_point(r, alpha, 2, 2)
  np.testing.assert_allclose(np.exp(te.responses_from_nodes(got, 2, 2))[0], want, rtol=1e-12)
  assert iterations <= 3  # the iteration is exact after T sweeps, plus one to see no move
  gap = r.max() - want @ r[0]
  np.testing.assert_allclose(te.gaps(r, np.log(want)[None]), gap)


def test_t24_identity_on_random_policies():
  rng = np.random.default_rng(5)
  r = rng.uniform(size=(3, 27))
  for alpha in (0.05, 0.5):
    logp = te.log_softmax(rng.normal(size=(3, 27)) * 2)
    nodes = te.node_conditionals(logp, 3, 3)
    lhs = te.soft_objective(r, te.soft_optimum(r, alpha), alpha) - te.soft_objective(
        r, logp, alpha)
    rhs = alpha * te.trajectory_kl(nodes, te.soft_bellman(r, alpha, 3, 3), 3)
    np.testing.assert_allclose(lhs, rhs, atol=1e-12)
    np.testing.assert_allclose(lhs, alpha * te.kl(logp, te.soft_optimum(r, alpha)), atol=1e-12)


def test_dr_grpo_scales_the_policy_gradient():
  """Dr. GRPO's group-centred advantages, averaged over every group of G i.i.d. responses of a
  softmax policy, give (G - 1) / G times the exact policy gradient (proofs' T2.tf): enumerated
  exactly for N = 4 responses and G = 3 (64 groups), in float64 NumPy."""
  rng = np.random.default_rng(6)
  n, group = 4, 3
  z, r = rng.normal(size=n), rng.uniform(size=n)
  p = np.exp(z - z.max())
  p /= p.sum()
  score = np.eye(n) - p  # row y: d log pi(y) / dz
  exact_pg = sum(p[y] * (r[y] - p @ r) * score[y] for y in range(n))
  expected = np.zeros(n)
  for ys in np.ndindex(*(n,) * group):
    weight = np.prod(p[list(ys)])
    mean = np.mean(r[list(ys)])
    expected += weight * sum((r[y] - mean) * score[y] for y in ys) / group
  np.testing.assert_allclose(expected, (group - 1) / group * exact_pg, rtol=1e-12, atol=1e-15)
