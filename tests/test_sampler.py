import numpy as np
import pytest

from belle_edge.errors import InputError
from belle_edge.runtime.sampler import Sampler, SamplingConfig

LOGITS = np.log(np.array([0.05, 0.4, 0.3, 0.15, 0.1], dtype=np.float32))


def draws(cfg, n=400, logits=LOGITS, context=None):
    s = Sampler(cfg)
    return [s(logits, context) for _ in range(n)]


def test_greedy_takes_the_argmax():
    assert set(draws(SamplingConfig(), 5)) == {1}


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    cfg = SamplingConfig(temperature=1.0, seed=7)
    assert draws(cfg) == draws(cfg)
    assert draws(cfg) != draws(SamplingConfig(temperature=1.0, seed=8))


def test_top_k_keeps_only_the_k_most_likely():
    assert set(draws(SamplingConfig(temperature=1.0, top_k=2, seed=0))) == {1, 2}


def test_top_p_keeps_the_smallest_head_reaching_p():
    # 0.4 + 0.3 = 0.7 >= 0.6: tokens 1 and 2 only
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.6, seed=0))) == {1, 2}
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.3, seed=0))) == {1}


def test_sampling_follows_the_distribution():
    counts = np.bincount(draws(SamplingConfig(temperature=1.0, seed=1), n=4000), minlength=5) / 4000
    assert np.abs(counts - np.exp(LOGITS)).max() < 0.03


def test_repetition_penalty_moves_away_from_seen_tokens():
    logits = np.array([1.0, 2.0, 1.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingConfig())(logits, np.array([1])) == 1
    assert Sampler(SamplingConfig(repetition_penalty=1.3))(logits, np.array([1])) == 2


@pytest.mark.parametrize("kwargs,field", [({"temperature": -1}, "temperature"), ({"top_k": -1}, "top_k"),
                                          ({"top_p": 0}, "top_p"), ({"repetition_penalty": 0}, "repetition_penalty")])
def test_sampling_config_rejects_bad_values(kwargs, field):
    with pytest.raises(InputError, match=field):
        SamplingConfig(**kwargs)
