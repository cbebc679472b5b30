"""The covariance regime (issue 11): the lab's per-step diagnostics against independent
computations, the vmapped sweep against single runs, and the regime claims' criteria."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl.transformer import GRPOConfig, get_trainer, sampling, tasks
from covrl.transformer.model import ModelConfig
from covrl.transformer.sweep import sweep


def _tiny(**kw) -> GRPOConfig:
  task = tasks.ForkCopy(num_symbols=4, length=8, num_forks=1)
  model = ModelConfig(task.vocab_size, task.context_length, num_layers=1, d_model=16,
                      num_heads=2)
  return GRPOConfig(task, model, num_steps=2, prompts_per_step=4, group_size=4,
                    num_minibatches=2, token_ratio_bound=0.05, sft=None, **kw)


@pytest.mark.slow
def test_diagnostics_match_an_independent_computation():
  config = _tiny(diagnostics=True, control=covrl.KLCov(kl_cov_ratio=0.05, ppo_kl_coef=1.0))
  trainer = get_trainer(config)
  state = trainer.init(jax.random.key(0))
  _, metrics, aux = trainer.step(state)
  r = aux.rollout
  rewards = np.asarray(aux.rewards)
  mask = r.response_mask
  adv = covrl.grpo_advantages(jnp.asarray(rewards).reshape(4, 4)).reshape(-1)
  adv = jnp.where(mask, adv[:, None], 0.0)
  model = trainer.model

  def logits_of(p):
    return sampling.response_logits(model, p, r.prompts, r.responses, config.temperature)

  def pg(p):  # the on-policy policy gradient surrogate, token mean
    lp = sampling.token_log_probs(logits_of(p), r.responses)
    return jnp.sum(jnp.where(mask, -adv * jnp.exp(lp - jax.lax.stop_gradient(lp)), 0.0)) / (
        jnp.sum(mask))

  def ent(p):
    return jnp.sum(jnp.where(mask, covrl.entropy(logits_of(p)), 0.0)) / jnp.sum(mask)

  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(
      np.float64)
  g_pg, g_h = flat(jax.grad(pg)(state.params)), flat(jax.grad(ent)(state.params))
  expected = g_pg @ g_h / (g_h @ g_h)
  assert float(metrics["balance_coefficient"]) == pytest.approx(expected, rel=1e-3, abs=1e-6)
  # pass@k with k = group size: a group passes when any response is right.
  right = rewards.reshape(4, 4) >= 1
  assert float(metrics["pass_at_k"]) == pytest.approx(right.any(1).mean())
  # Tokens acted on per mini-batch, from the step's selection masks.
  sel = np.asarray(aux.selected)
  assert float(metrics["selected_per_minibatch"]) == pytest.approx(sel.sum((-2, -1)).mean())
  for name in ("cov_share_top_0.2%", "cov_share_top_2%"):
    assert 0.0 <= float(metrics[name]) <= 1.0


@pytest.mark.slow
def test_sweep_equals_single_runs():
  config = _tiny()
  controls = {"a": covrl.EntropyBonus(0.01), "b": covrl.EntropyBonus(0.3),
              "none": covrl.NoControl()}
  comp = sweep(config, controls, 2, jax.random.key(3))
  assert comp.labels == ["a", "b", "none"]
  for label, control in controls.items():
    trainer = get_trainer(dataclasses.replace(config, control=control))
    for s in range(2):
      k = jax.random.fold_in(jax.random.key(3), s)
      params = trainer.warm_start(k)
      _, out = trainer.run(trainer.init(k, params, control=control), config.num_steps)
      for name in ("reward", "entropy", "loss"):
        np.testing.assert_allclose(comp.metrics[label][name][s], np.asarray(out[name]),
                                   rtol=2e-4, atol=1e-5, err_msg=f"{label} {name} seed {s}")


def test_sweep_rejects_bad_input():
  with pytest.raises(ValueError, match="controls"):
    sweep(_tiny(), {}, 1, jax.random.key(0))
  with pytest.raises(ValueError, match="num_seeds"):
    sweep(_tiny(), {"none": covrl.NoControl()}, 0, jax.random.key(0))
  with pytest.raises(TypeError, match="diagnostics"):
    _tiny(diagnostics=1)


@pytest.mark.slow
def test_regime_claims_measure_and_follow_their_criteria():
  from covrl.experiments.claims import registry

  results = {cid: registry.run(cid, "test") for cid in ("T4.4.fork", "T4.5.fork", "T4.6.fork",
                                                        "T4.3.fork")}
  for cid, result in results.items():
    m = result.measurement
    assert result.kind == "empirical" and result.status in ("reproduced", "not reproduced")
    assert m.measured and m.predicted and m.summary, cid
  m = results["T4.3.fork"].measurement
  lower = m.measured["entropy_minus_none_lower95"]
  assert m.passed == (lower["clip_cov"] > 0 and lower["kl_cov"] > 0)
  # KL-Cov at k = 2e-3 selects max(floor(k N), 1) per mini-batch, acting from the second one.
  n = m.measured["tokens_per_minibatch"]
  assert m.measured["selected_per_minibatch"]["kl_cov"] == max(math.floor(2e-3 * n), 1)
  t2 = results["T4.4.fork"].measurement
  assert set(t2.measured["reward_gap_vs_none"]) == {"0.003", "0.01", "0.02", "0.05", "0.1",
                                                    "0.2", "0.5"}
  frontier = results["T4.6.fork"].measurement.measured["frontier"]
  assert {"none", "entropy@0.01", "clip_cov@0.0002", "kl_cov@1"} <= set(frontier)


def test_regime_schedules_decay_as_one_over_time():
  # The annealed strengths follow v / (1 + t / t0) with t0 = num_steps / 10; the constant Clip-Cov
  # ratios (power-0 decays, to share the annealed one's compiled family) stay constant.
  from covrl.experiments.claims import regime

  controls = regime.sweep_controls(60)
  t = np.arange(60)
  expected = 1.0 / (1.0 + t / 6.0)
  annealed = {"entropy_annealed@0.1": lambda c: c.entropy_coeff,
              "clip_cov_annealed@0.01": lambda c: c.clip_cov_ratio,
              "kl_cov_annealed@1": lambda c: c.ppo_kl_coef}
  for label, strength in annealed.items():
    sched = strength(controls[label])
    values = np.array([float(sched(s)) for s in t])
    np.testing.assert_allclose(values, values[0] * expected, rtol=1e-6, err_msg=label)
  for r in regime.CLIP_COV:
    sched = controls[f"clip_cov@{r:g}"].clip_cov_ratio
    assert {float(sched(s)) for s in (0, 30, 59)} == {float(np.float32(r))}


def test_every_method_is_on_the_regime_sweep_with_its_dose():
  # Issue 12: every control method of covrl.methods on the dose-response and the frontier (the
  # adaptive bonus is a controller's, measured by the C claims). The dose is the distance from
  # the method's "off" setting, so each method's doses are positive and none's is 0.
  from covrl.experiments.claims import regime

  controls = regime.sweep_controls(60)
  classes = {type(c) for c in controls.values()}
  expected = set(covrl.METHODS.values()) - {covrl.AdaptiveEntropyBonus}
  assert classes == expected
  assert regime.dose("none") == 0.0
  for name, (cls, field, values) in regime.OTHERS.items():
    for v in values:
      control = controls[f"{name}@{v:g}"]
      assert isinstance(control, cls) and getattr(control, field) == v
  assert regime.dose("forking@0.2") == pytest.approx(0.8)
  assert regime.dose("clip_higher@0.28") == pytest.approx(0.08)
  assert regime.dose("entropy_adv@0.4") == pytest.approx(0.4)
  assert regime.dose("kl_cov@3") == pytest.approx(3.0)
  assert all(regime.dose(k) > 0 for k in controls if k != "none")
  # The "test" size leaves the other methods out (one compiled family each).
  assert set(regime.sweep_controls(8, others=False)) < set(controls)


def test_regime_figures_draw_every_method():
  # The dose and frontier figures from a series with every label of the sweep (values made up
  # here: the figures' code, not a measurement).
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib.figure import Figure

  from covrl.experiments.claims import regime, regime_plots
  from covrl.experiments.claims.registry import Measurement

  rng = np.random.default_rng(0)
  labels = list(regime.sweep_controls(60))
  rows = {k: {"kept": float(rng.uniform(0.01, 0.1)), "reward": float(rng.uniform(0, 1)),
              "reward_ci95": 0.6, "pass_at_k": float(rng.uniform(0, 1)), "final_entropy": 0.05,
              "dose": regime.dose(k)} for k in labels}
  # Two runs whose entropy exploded: far to the right, they must not set the axis.
  for k in ("entropy@0.2", "entropy@0.5"):
    rows[k].update(kept=1.5, final_entropy=1.9)
  curve = {"entropy": rng.uniform(0.01, 1, (2, 8)), "reward": rng.uniform(0, 1, (2, 8))}
  curves = {k: curve for k in ("none", "entropy@0.01", "clip_cov@0.0002", "kl_cov@1",
                                "entropy_annealed@0.1", "clip_cov_annealed@0.01",
                                "kl_cov_annealed@1")}
  m = Measurement(True, {}, {}, "", series={"dose": {"rows": rows, "curves": curves},
                                            "rows": rows, "explosion_entropy": 1.04})
  fig = Figure()
  regime_plots.plot_dose(m, fig)
  names = {line.get_label() for line in fig.axes[0].get_lines()}
  # The bonus is called the bonus, not "entropy".
  assert {"bonus", "clip_cov", "kl_cov", *regime.OTHERS} <= names and "entropy" not in names
  # Every error bar stays inside the reward's range [0, 1].
  for container in fig.axes[1].containers:
    for segments in container.lines[2]:
      ys = np.concatenate([seg[:, 1] for seg in segments.get_segments()])
      assert ys.min() >= 0.0 and ys.max() <= 1.0
  fig = Figure()
  regime_plots.plot_frontier(m, fig)
  assert len(fig.axes[0].collections) >= len(rows)
  assert fig.axes[0].get_xlim()[1] < 1.0  # the calm points' scale, not the exploded runs'
  legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert any("exploded" in t and "bonus@0.2" in t and "bonus@0.5" in t for t in legend)
  drawn = []
  for plot in (regime_plots.plot_paper_curves, regime_plots.plot_annealed_curves):
    fig = Figure()
    plot(m, fig)
    drawn.append({line.get_label() for line in fig.axes[0].get_lines()})
  # T4.3.fork and T4.5.fork draw different runs (one figure each, not one shared).
  assert drawn[0] == {"none", "bonus@0.01", "clip_cov@0.0002", "kl_cov@1"}
  assert drawn[1] == {"none", "bonus_annealed@0.1", "clip_cov_annealed@0.01", "kl_cov_annealed@1"}


def test_report_titles_are_wrapped_to_the_figure(tmp_path, monkeypatch):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.figure

  from covrl.experiments import report
  from covrl.experiments.claims import registry

  def plot(m, fig):
    fig.subplots().plot([0, 1])

  claim = registry.Claim("T0.1", "a title " * 30, "fake", lambda s, k: None, plot)
  result = registry.ClaimResult("T0.1", claim.title, "test", 0.0,
                                registry.Measurement(True, {}, {}, ""))
  titles, real = [], matplotlib.figure.Figure.suptitle
  monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                      lambda self, text, **kw: titles.append(text) or real(self, text, **kw))
  assert report._figure(claim, result, str(tmp_path / "f.png")) is None
  lines = titles[0].splitlines()
  assert len(lines) >= 2 and max(len(line) for line in lines) <= 110
