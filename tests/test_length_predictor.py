"""Response-length predictor: shared-prefix skip, online learning, hint as a prior."""
import numpy as np

from conserve_jax.scheduling.length_predictor import LengthPredictor

SYSTEM = list(range(100, 140))  # a 40-token shared "system prompt + chat template"


def prompt(rng, kind):
    return SYSTEM + [10 + kind, 20 + kind, 30 + kind] + [int(x) for x in rng.integers(300, 900, rng.integers(10, 60))]


def run(pred, rng, n, lengths, hint_noise=None, hint_bias=1.0, spread=0.1):
    errs = []
    for _ in range(n):
        kind = int(rng.integers(0, len(lengths)))
        actual = max(1, int(lengths[kind] * np.exp(rng.normal(0, spread))))
        hint = None
        if hint_noise is not None:
            hint = max(1, int(actual * hint_bias * np.exp(rng.normal(0, hint_noise))))
        f = pred.features(prompt(rng, kind), 512, "t", hint)
        p = pred.predict(f)
        assert 1 <= p.point <= p.high <= 512
        errs.append(abs(p.point - actual))
        pred.observe(f, actual)
    return errs


def test_skips_shared_prefix_and_keeps_content():
    pred = LengthPredictor()
    rng = np.random.default_rng(0)
    starts = [pred.features(prompt(rng, 0), 64).content_start for _ in range(6)]
    # the first prompts cannot know what is shared; from the third on the prefix is skipped
    assert starts[0] == 0
    assert all(s == 40 for s in starts[3:]), starts
    # a prompt made only of the shared prefix keeps at least one piece of content
    f = pred.features(SYSTEM, 64)
    assert f.content_start < len(SYSTEM)


def test_features_again_without_registering_leave_the_prefix_counts_alone():
    """A caller that registered a prompt at submit and extracts its features again to
    observe the actual length (register=False) does not count the prompt twice: the
    second prompt sharing a prefix is no more "shared" than without the extra calls."""
    rng = np.random.default_rng(1)
    prompts = [prompt(rng, 0) for _ in range(3)]
    a, b = LengthPredictor(), LengthPredictor()
    for p in prompts[:2]:
        a.features(p, 64)
        b.features(p, 64)
        for _ in range(5):
            b.features(p, 64, register=False)
    assert b._prompts_seen == a._prompts_seen == 2 and b._prefix_counts == a._prefix_counts
    assert a.features(prompts[2], 64).content_start == b.features(prompts[2], 64).content_start


def test_learns_lengths_by_first_words_better_than_running_mean():
    pred = LengthPredictor()
    rng = np.random.default_rng(1)
    errs = run(pred, rng, 400, [8, 40, 200])
    s = pred.stats
    assert s.observed == 400
    assert s.mae < 0.5 * s.baseline_mae  # far better than always predicting the mean
    assert np.mean(errs[-100:]) < np.mean(errs[:20])  # it learned
    assert s.within_25_frac > 0.6


def test_reliable_hint_dominates_and_biased_hint_is_corrected():
    rng = np.random.default_rng(2)
    good = LengthPredictor()
    run(good, rng, 200, [50], hint_noise=0.05, spread=0.8)  # lengths vary, hints are exact
    f = good.features(prompt(rng, 0), 512, "t", hint=300)  # the hint says 300, the bucket ~50
    assert good.predict(f).point > 220
    biased = LengthPredictor()
    run(biased, rng, 200, [50, 150], hint_noise=0.05, hint_bias=2.0)  # hints always 2x too long
    f = biased.features(prompt(rng, 1), 512, "t", hint=300)
    assert 110 <= biased.predict(f).point <= 190  # scaled back to ~150


def test_noisy_hint_is_not_trusted_blindly():
    rng = np.random.default_rng(3)
    pred = LengthPredictor()
    run(pred, rng, 300, [60], hint_noise=1.5)
    f = pred.features(prompt(rng, 0), 512, "t", hint=500)
    assert pred.predict(f).point < 150


def test_extend_and_clamps():
    pred = LengthPredictor()
    rng = np.random.default_rng(4)
    run(pred, rng, 100, [20, 300])
    f = pred.features(prompt(rng, 0), 400, "t")
    p = pred.predict(f)
    assert p.point < 60
    grown = pred.extend(f, p.high)
    assert p.high < grown <= 400
    f = pred.features(prompt(rng, 1), 16, "t")  # max_tokens caps everything
    assert pred.predict(f).high <= 16 and pred.extend(f, 16) == 16
