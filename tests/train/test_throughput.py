"""Rates of the training log: step time, examples and tokens per second, MFU where the peak is
known. Only relations between the rates are asserted, never their speed."""

import dataclasses

import numpy as np
import pytest

from unimoe.train import throughput


@dataclasses.dataclass
class FakeDevice:
    device_kind: str


@pytest.mark.parametrize(
    'kinds, peak',
    [
        (['NVIDIA H100 80GB HBM3'], 989e12),
        (['NVIDIA H100 PCIe'], 756e12),
        (['TPU v5 lite'] * 4, 4 * 197e12),
        (['TPU v5'], 459e12),
        (['cpu'], None),
        (['NVIDIA A100-SXM4-40GB', 'cpu'], None),  # one unknown device: no peak at all
    ],
)
def test_peak_flops_only_for_recognised_devices(kinds, peak):
    assert throughput.peak_flops([FakeDevice(k) for k in kinds]) == peak


def batch(real_tokens: int) -> dict[str, np.ndarray]:
    attn_mask = np.zeros((2, 8), bool)
    attn_mask.flat[:real_tokens] = True
    return {'tokens': np.zeros((2, 8), np.int32), 'attn_mask': attn_mask}


def test_rates_count_non_padding_tokens_since_the_first_step_and_give_mfu():
    meter = throughput.StepMeter(batch_size=2, flops_per_token=6e3, peak=1e9)
    meter.count(batch(16))  # the first step: left out by `restart_after`
    assert meter.restart_after(np.zeros(3)) >= 0
    assert meter.rates() == {}  # no step since
    for real_tokens in (5, 9, 10):
        meter.count(batch(real_tokens))
    rates = meter.rates()
    seconds = rates['step_time_s'] * 3
    assert seconds > 0
    np.testing.assert_allclose(rates['tokens_per_s'] * seconds, 24)
    np.testing.assert_allclose(rates['examples_per_s'] * seconds, 6)
    np.testing.assert_allclose(rates['mfu'], rates['tokens_per_s'] * 6e3 / 1e9)
    assert meter.rates() == {}  # the next interval starts empty


def test_without_text_or_peak_the_unknown_rates_are_left_out():
    no_text = throughput.StepMeter(batch_size=2, flops_per_token=None, peak=1e9)
    no_text.count({'image': np.zeros((2, 3))})
    assert set(no_text.rates()) == {'step_time_s', 'examples_per_s'}
    no_peak = throughput.StepMeter(batch_size=2, flops_per_token=6e3, peak=None)
    no_peak.count(batch(4))
    assert set(no_peak.rates()) == {'step_time_s', 'examples_per_s', 'tokens_per_s'}
