"""Float64 NumPy references for the exact-network claims (covrl.experiments.claims.exact_t2 and
exact_t3), computed from the reward table alone, independently of the lab.

A tree has P prompts and responses of T tokens over V ids; a node policy is given per depth d as
[P, V^d, V] log-probabilities (node i is the prefix of lexicographic index i), a response
distribution as [P, V^T] log-probabilities::

  soft_optimum        softmax(R / alpha): the stationary point of E[R] + alpha H (T2.1)
  soft_bellman        the same through the soft Bellman recursion, node by node
  myopic_fixed_point  verl's per-token bonus: pi_s = softmax(Q^pi(s, .) / alpha) at every node,
                      Q^pi unregularised (proofs' T2.6 correction), by iterating to 1e-12
  t23_bound           T2.3's bound on the soft optimum's gap
  trajectory_kl       E_{tau ~ pi} sum_t KL(pi(. | s_t) || ref(. | s_t)) (T2.4 along trajectories)
"""

from __future__ import annotations

import numpy as np

from covrl.transformer.tree import TreeTask


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = x - np.max(x, axis=axis, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))


def soft_optimum(rewards: np.ndarray, alpha: float) -> np.ndarray:
  """[P, N] log softmax(R / alpha): the maximiser of E[R] + alpha H over responses (T2.1)."""
  return log_softmax(np.asarray(rewards, np.float64) / alpha)


def responses_from_nodes(node_logp: list[np.ndarray], v: int, t: int) -> np.ndarray:
  """Response log-probabilities from node conditionals d -> [P, V^d, V] (a sum along y)."""
  out = 0.0
  for d, lp in enumerate(node_logp):
    out = out + np.repeat(lp.reshape(lp.shape[0], v ** (d + 1)), v ** (t - 1 - d), axis=1)
  return out


def soft_bellman(rewards: np.ndarray, alpha: float, v: int, t: int) -> list[np.ndarray]:
  """Node policies of the soft Bellman recursion on the tree, d -> [P, V^d, V]:
  Q(s, a) = R at the last depth, else V_soft(s a); V_soft(s) = alpha log sum_a exp(Q / alpha);
  pi(a | s) = exp((Q(s, a) - V_soft(s)) / alpha)."""
  q = np.asarray(rewards, np.float64).reshape(rewards.shape[0], -1, v)  # depth t - 1
  nodes = [None] * t
  for d in reversed(range(t)):
    nodes[d] = log_softmax(q / alpha)
    value = alpha * np.log(np.sum(np.exp(q / alpha - np.max(q / alpha, -1, keepdims=True)), -1))
    value = value + np.max(q, -1)
    if d:
      q = value.reshape(value.shape[0], -1, v)
  return nodes


def myopic_fixed_point(rewards: np.ndarray, alpha: float, v: int, t: int,
                       tol: float = 1e-12) -> tuple[list[np.ndarray], int]:
  """The stationary point of verl's per-token bonus: pi_s = softmax(Q^pi(s, .) / alpha) at every
  node, Q^pi the unregularised expected reward, found by iterating the map on the whole tree
  from the uniform policy until no node's probabilities move by more than `tol`.

  Returns (node log-policies d -> [P, V^d, V], iterations)."""
  p = rewards.shape[0]
  nodes = [np.full((p, v ** d, v), -np.log(v)) for d in range(t)]
  for it in range(1, 1000):
    q = np.asarray(rewards, np.float64).reshape(p, -1, v)
    new = [None] * t
    for d in reversed(range(t)):  # Q^pi from the current policy, then the softmax step
      new[d] = log_softmax(q / alpha)
      if d:
        q = np.sum(np.exp(nodes[d]) * q, axis=-1).reshape(p, -1, v)
    moved = max(np.max(np.abs(np.exp(a) - np.exp(b))) for a, b in zip(new, nodes))
    nodes = new
    if moved < tol:
      return nodes, it
  raise RuntimeError("the fixed-point iteration did not converge")


def node_conditionals(logp: np.ndarray, v: int, t: int) -> list[np.ndarray]:
  """Node log-policies d -> [P, V^d, V] of a response distribution [P, V^T] (marginals)."""
  p = logp.shape[0]
  out = []
  for d in range(t):
    prefix = logp.reshape(p, v ** (d + 1), v ** (t - 1 - d))
    m = np.max(prefix, axis=-1, keepdims=True)
    marginal = (m + np.log(np.sum(np.exp(prefix - m), axis=-1, keepdims=True)))[..., 0]
    marginal = marginal.reshape(p, v ** d, v)
    out.append(marginal - (np.max(marginal, -1, keepdims=True) + np.log(np.sum(
        np.exp(marginal - np.max(marginal, -1, keepdims=True)), -1, keepdims=True))))
  return out


def gaps(rewards: np.ndarray, logp: np.ndarray) -> np.ndarray:
  """[P] r* - E_pi[R]."""
  return np.max(rewards, axis=1) - np.sum(np.exp(logp) * rewards, axis=1)


def kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
  """[P] KL(p || q) of response distributions."""
  return np.sum(np.exp(p_log) * (p_log - q_log), axis=1)


def t23_bound(rewards: np.ndarray, alpha: float) -> np.ndarray:
  """[P] T2.3's bound on the soft optimum's gap: min(alpha log N, sum_y Delta_y exp(-Delta_y /
  alpha)), Delta_y = r* - R[p, y]."""
  delta = np.max(rewards, axis=1, keepdims=True) - rewards
  return np.minimum(alpha * np.log(rewards.shape[1]),
                    np.sum(delta * np.exp(-delta / alpha), axis=1))


def trajectory_kl(nodes: list[np.ndarray], ref: list[np.ndarray], v: int) -> np.ndarray:
  """[P] E_{tau ~ pi} sum_t KL(pi(. | s_t) || ref(. | s_t)): node KLs weighted by reach under pi."""
  p = nodes[0].shape[0]
  reach = np.zeros((p, 1))  # log reach of the depth-d nodes
  total = np.zeros(p)
  for d, (lp, lr) in enumerate(zip(nodes, ref)):
    node_kl = np.sum(np.exp(lp) * (lp - lr), axis=-1)  # [P, V^d]
    total += np.sum(np.exp(reach) * node_kl, axis=1)
    reach = (reach[..., None] + lp).reshape(p, v ** (d + 1))
  return total


def soft_objective(rewards: np.ndarray, logp: np.ndarray, alpha: float) -> np.ndarray:
  """[P] E_pi[R] + alpha H(pi) over responses."""
  prob = np.exp(logp)
  return np.sum(prob * rewards, axis=1) - alpha * np.sum(prob * logp, axis=1)


def references(task: TreeTask, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """([P, N] soft optimum, [P, N] verl's bonus's fixed point) response log-probabilities."""
  v, t = task.num_tokens, task.response_length
  myopic, _ = myopic_fixed_point(task.rewards, alpha, v, t)
  return soft_optimum(task.rewards, alpha), responses_from_nodes(myopic, v, t)


def bonus_fixed_point_gap(task: TreeTask, alpha: float) -> float:
  """Mean gap of verl's bonus's closed-form stationary point (`myopic_fixed_point`)."""
  return float(gaps(task.rewards, references(task, alpha)[1]).mean())
