"""Loss benchmark: covrl's jitted losses against verl's PyTorch ones, forward plus backward.

For each size [batch, time] every contestant runs on the same inputs, interleaved round by round
(`benchmarks.common.interleaved`):

  covrl/<loss>  covrl, jitted value_and_grad (gradient wrt log pi; wrt the logits for the bonus),
                returning the metrics verl computes (clip fraction, approximate KL, ...): the
                like-for-like comparison the targets are measured on;
  covrl_all/<loss>  the same returning every covrl metric (entropy, covariance mean and max,
                selected fraction, non-finite count, ...), which costs extra reductions;
  verl/<loss>   verl 0.9's function on torch tensors, then backward();
Ratios (covrl/verl, cost against PPO, fraction of memcpy) are medians over rounds of the ratio
of the two samples taken in the same round (`common.paired_ratio`). The cost of Clip-Cov and
KL-Cov against PPO comes from a second set of rounds with covrl's three losses alone: a covrl
call right after a torch call runs 30-50% slower (cold caches, threads to wake), and in the shared
rounds only some losses follow a verl call, which would bias the ratio between covrl's own.
  memcpy        np.copyto of as many bytes as the loss must move at least (its inputs read once,
                its gradient written once): the physical limit of a memory-bound loss on this
                machine at this working-set size, measured in the same rounds.

Bytes a loss must move: a policy loss reads old_log_prob, log_prob, advantages and the mask
(4 x 4 bytes per token, float32) and writes d loss / d log_prob (4 bytes): 20 bytes per token.
The entropy bonus reads the [B, T, V] logits and the mask and writes d loss / d logits:
8 V + 4 bytes per token. (Clip-Cov and KL-Cov must in fact read their inputs twice, since the
batch means enter every c_i; the bound counts one read.)

Selection settings are verl's defaults (ratio 2e-4 for Clip-Cov and KL-Cov, ppo_kl_coef 0.1):
covrl selects globally, which on one device and one micro-batch is what verl does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks import common
from benchmarks import contestants as C
from benchmarks import inputs as I

SIZES = {"small": (64, 1024), "large": (256, 2048)}
# Vocabulary of the entropy-bonus logits. At (256, 2048) a 1,024-entry vocabulary is 2 GiB of
# float32 logits, and verl's forward plus backward keeps about five such arrays alive (logits,
# log-sum-exp and softmax temporaries, gradient): ~10 GiB, too much for a shared 24 GiB
# machine. V = 128 there keeps the logits at 256 MiB, the same as (64, 1024) with V = 1,024.
ENTROPY_VOCAB = {"small": 1024, "large": 128}


def policy_bytes(batch: int, time: int) -> int:
  return 20 * batch * time


def entropy_bytes(batch: int, time: int, vocab: int) -> int:
  return (8 * vocab + 4) * batch * time


def _memcpy(num_bytes: int):
  n = max(1, num_bytes // 8)  # a copy of n floats moves 8 n bytes (read + write)
  src = np.ones(n, np.float32)
  dst = np.empty_like(src)
  return lambda: np.copyto(dst, src)


def _row(size, name, tokens, num_bytes, t: dict[str, common.Timing],
         alone: dict[str, common.Timing] | None) -> dict[str, Any]:
  cv, vl, cp = t[f"covrl/{name}"], t[f"verl/{name}"], t["memcpy"]
  ca = t.get(f"covrl_all/{name}", cv)
  return {
      "size": size, "loss": name, "tokens": tokens,
      "covrl": cv.as_dict(), "covrl_all_metrics": ca.as_dict(), "verl": vl.as_dict(),
      "memcpy": cp.as_dict(),
      "speedup_vs_verl": common.paired_ratio(vl, cv)["median"],
      "speedup_all_metrics_vs_verl": common.paired_ratio(vl, ca)["median"],
      "speedup_vs_verl_quartiles": common.paired_ratio(vl, cv),
      "covrl_tokens_per_s": tokens / cv.median, "verl_tokens_per_s": tokens / vl.median,
      # From the covrl-only rounds: in the rounds shared with verl, a covrl call that follows a
      # torch call runs 30-50% slower (cold caches, woken threads), and which losses follow
      # verl's depends on the order, which would bias a ratio between covrl's own losses.
      "cost_vs_ppo": None if alone is None else common.paired_ratio(
          alone[f"covrl/{name}"], alone["covrl/ppo"])["median"],
      "covrl_alone": None if alone is None else alone[f"covrl/{name}"].as_dict(),
      "bytes_moved": num_bytes,
      "memcpy_bytes_per_s": num_bytes / cp.median,
      "fraction_of_memcpy": common.paired_ratio(cp, cv)["median"],
  }


def run(sizes=("small", "large"), *, rounds: int = 21, entropy_rounds: int = 5,
        entropy_sizes=("small", "large"), seed: int = 0, log=print) -> dict[str, Any]:
  """Time every loss at every size; returns the rows for the table and the JSON."""
  s = C.Settings()
  rows = []
  for size in sizes:
    batch, time = SIZES[size]
    x = I.policy_inputs(batch, time, seed)
    data = C.policy_data(x)
    group = {"memcpy": _memcpy(policy_bytes(batch, time))}
    for name in C.POLICY_LOSSES:
      group[f"covrl/{name}"] = C.covrl_call(name, s, data, seed=seed)
      group[f"covrl_all/{name}"] = C.covrl_call(name, s, data, seed=seed, metrics="all")
      group[f"verl/{name}"] = C.verl_call(name, s, data)
    log(f"  policy losses at {size} {batch}x{time}: {rounds} interleaved rounds")
    t = common.interleaved(group, rounds=rounds)
    log(f"  covrl's policy losses alone at {size}: {rounds} interleaved rounds (cost vs PPO)")
    alone = common.interleaved({f"covrl/{n}": group[f"covrl/{n}"] for n in C.POLICY_LOSSES},
                               rounds=rounds)
    for name in C.POLICY_LOSSES:
      rows.append(_row(size, name, batch * time, policy_bytes(batch, time), t, alone))
    del group
    if size in entropy_sizes:
      vocab = ENTROPY_VOCAB[size]
      logits, mask = I.logits_inputs(batch, time, vocab, seed)
      group = {
          "memcpy": _memcpy(entropy_bytes(batch, time, vocab)),
          "covrl/entropy": C.covrl_call("entropy", s, (logits, mask)),
          "verl/entropy": C.verl_call("entropy", s, (logits, mask)),
      }
      log(f"  entropy bonus at {size} {batch}x{time}x{vocab}: {entropy_rounds} rounds")
      t = common.interleaved(group, rounds=entropy_rounds, target_s=0.0, warmup=1)
      row = _row(size, "entropy", batch * time, entropy_bytes(batch, time, vocab), t, None)
      row["vocab"] = vocab
      rows.append(row)
      del group, logits
  return {"rows": rows, "settings": C.Settings().__dict__, "sizes": {k: SIZES[k] for k in sizes},
          "entropy_vocab": {k: ENTROPY_VOCAB[k] for k in entropy_sizes if k in sizes}}
