"""Kaldi filterbanks against kaldi-native-fbank (an independent C++ port of Kaldi), and BEATs'
chunking and padding mask against the reference's rules written out in numpy."""

import functools

import kaldi_native_fbank as knf
import numpy as np
import pytest

from unimoe.data import fbank, media, speech

RATE = 16000
LOG_FLOOR = np.log(np.finfo(np.float32).eps)
# kaldi-native-fbank (like torchaudio, BEATs' reference) computes in float32, `kaldi_fbank` in
# float64: a bin far below its frame's loudest carries the reference's roundoff (measured: up to
# 3.4e-3 on clean synthesized speech at 23 nats down, 1e-4 within 14 nats). Parity is 1e-3 within
# this many nats (87 dB) of the frame's peak, `_LOOSE` on every bin.
_RANGE_NATS = 20.0
_LOOSE = 5e-3


def _mel(hz):
    return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


def _hz(mel):
    return 700.0 * np.expm1(np.asarray(mel, np.float64) / 1127.0)


def _knf_fbank(wave: np.ndarray, total_bins: int, first: int, count: int) -> np.ndarray:
    """Bins first..first+count-1 of a `total_bins` Kaldi filterbank, by kaldi-native-fbank.

    Kaldi refuses a bank with an empty triangle, which BEATs' 128 bins of a 512-point FFT have
    (torchaudio allows it); a bank of `count` bins whose band edges are those bins' edges has
    the same triangles, so the rest is checked a run of bins at a time.
    """
    edges_mel = np.linspace(_mel(20.0), _mel(RATE / 2), total_bins + 2)
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = RATE
    opts.mel_opts.num_bins = count
    opts.mel_opts.low_freq = float(_hz(edges_mel[first]))
    opts.mel_opts.high_freq = float(_hz(edges_mel[first + count + 1]))
    online = knf.OnlineFbank(opts)
    online.accept_waveform(RATE, wave.tolist())
    online.input_finished()
    frames = [online.get_frame(i) for i in range(online.num_frames_ready)]
    return np.asarray(frames, np.float32).reshape(len(frames), count)


def _empty_bins(total_bins: int, fft_size: int = 512) -> list[int]:
    """Triangles with no FFT bin strictly inside (weight 0 everywhere), from the bin frequencies."""
    edges_mel = np.linspace(_mel(20.0), _mel(RATE / 2), total_bins + 2)
    bins_mel = _mel(np.arange(fft_size // 2) * RATE / fft_size)
    return [
        m
        for m in range(total_bins)
        if not ((bins_mel > edges_mel[m]) & (bins_mel < edges_mel[m + 2])).any()
    ]


def _kaldi_reference(wave: np.ndarray, total_bins: int) -> np.ndarray:
    """[frames, total_bins]: knf over each run of non-empty bins, the floor on empty ones."""
    empty = _empty_bins(total_bins)
    frames = fbank.num_frames(len(wave))
    out = np.full((frames, total_bins), LOG_FLOOR, np.float32)
    bounds = [-1, *empty, total_bins]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop - start > 1:
            out[:, start + 1 : stop] = _knf_fbank(wave, total_bins, start + 1, stop - start - 1)
    return out


@functools.lru_cache(maxsize=1)
def _speech() -> np.ndarray:
    """Speech synthesized by espeak-ng (no recording in the fixtures), as BEATs sees it: x 2^15."""
    words = "the quick brown fox jumps over the lazy dog, then counts to seven"
    return speech.SpeechSynthesizer().synthesize(words) * np.float32(fbank.BEATS_WAVE_SCALE)


def _signal(name: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if name == "speech":
        return _speech()
    if name == "recorded_speech":  # as the built-in dataset records it: gain, -46 dBFS noise
        clip, _ = media.place_in_clip(_speech() / 2**15, len(_speech()), rng)
        return clip * np.float32(2**15)
    if name == "noise_45s":  # more frames than one block (`_BLOCK_FRAMES`)
        return (rng.standard_normal(45 * RATE) * 0.1 * 2**15).astype(np.float32)
    if name == "odd_length_speech":
        return _speech()[:12_347]
    if name == "silence_then_tone":  # digital silence: every bin at Kaldi's floor
        tone = 3000 * np.sin(2 * np.pi * 440 * np.arange(4001) / RATE)
        tone += 3 * rng.standard_normal(4001)  # a recording's noise floor, 3 LSB
        return np.concatenate([np.zeros(2 * RATE + 3), tone]).astype(np.float32)
    raise ValueError(name)


def _assert_parity(ours: np.ndarray, expected: np.ndarray) -> None:
    diff = np.abs(ours - expected)
    in_range = expected > expected.max(axis=1, keepdims=True) - _RANGE_NATS
    assert diff[in_range].max(initial=0) <= 1e-3 and diff.max(initial=0) <= _LOOSE


def test_beats_mel_bank_has_exactly_one_empty_triangle():
    """What makes Kaldi refuse BEATs' setting; bin 3 must come out at the log floor."""
    assert _empty_bins(128) == [3] and _empty_bins(80) == []


@pytest.mark.parametrize(
    "name", ["speech", "recorded_speech", "noise_45s", "odd_length_speech", "silence_then_tone"]
)
def test_kaldi_fbank_matches_kaldi_native_fbank_at_beats_settings(name):
    wave = _signal(name)
    ours = fbank.kaldi_fbank(wave)
    expected = _kaldi_reference(wave, 128)
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape == (fbank.num_frames(len(wave)), 128)
    _assert_parity(ours, expected)
    assert (ours[:, 3] == np.float32(LOG_FLOOR)).all()


@pytest.mark.parametrize("length", [400, 401, 559, 560, 1999])
def test_kaldi_fbank_matches_kaldi_native_fbank_with_80_bins_on_odd_lengths(length):
    """A plain Kaldi bank (no empty triangle), compared whole; 560 is where frame 2 starts."""
    wave = _speech()[5000 : 5000 + length]
    ours = fbank.kaldi_fbank(wave, num_mel_bins=80)
    expected = _knf_fbank(wave, 80, 0, 80)
    assert ours.shape == expected.shape == (1 + (length - 400) // 160, 80)
    _assert_parity(ours, expected)


@pytest.mark.parametrize("length", [0, 1, 399])
def test_a_clip_shorter_than_one_window_has_no_frames_as_in_kaldi(length):
    wave = _speech()[:length]
    assert fbank.kaldi_fbank(wave).shape == (0, 128)
    assert _knf_fbank(wave, 80, 0, 80).shape == (0, 80)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="wave must be 1-D"):
        fbank.kaldi_fbank(np.zeros((2, 800)))
    with pytest.raises(ValueError, match="num_mel_bins=3 must be >= 4"):
        fbank.kaldi_fbank(np.zeros(800), num_mel_bins=3)
    with pytest.raises(ValueError, match="chunk_samples=399 is shorter than one 400-sample"):
        fbank.beats_features(np.zeros(800), chunk_samples=399)
    with pytest.raises(ValueError, match="at least one sample"):
        fbank.beats_features(np.zeros(0))


def _official_frame_mask(sample_mask_cs: np.ndarray, frames: int) -> np.ndarray:
    """BEATs.forward_padding_mask on a [C, S] sample mask: trim S % frames samples, view as
    [C, frames, rest], all()."""
    extra = sample_mask_cs.shape[1] % frames
    if extra > 0:
        sample_mask_cs = sample_mask_cs[:, :-extra]
    return sample_mask_cs.reshape(len(sample_mask_cs), frames, -1).all(-1)


def _official_chunks(wave: np.ndarray, chunk: int, most: int):
    """The reference's loop (`Uni_MoE_audio/train/data.py`): whole chunks while more than one
    chunk is left, then the rest padded with its last sample; at most `most` chunks."""
    chunks, sample_masks, rest = [], [], wave
    while len(rest) > 0 and len(chunks) < most:
        if len(rest) > chunk:
            chunks.append(rest[:chunk])
            sample_masks.append(np.zeros(chunk, bool))
            rest = rest[chunk:]
        else:
            chunks.append(np.pad(rest, (0, chunk - len(rest)), mode="edge"))
            sample_masks.append(np.arange(chunk) >= len(rest))
            rest = rest[:0]
    return chunks, np.stack(sample_masks)


@pytest.mark.parametrize(
    "length,count",
    [(3 * 8000 - 1, 1), (3 * 8000, 1), (3 * 8000 + 1, 2), (4 * 3 * 8000 + 5, 3)],
    ids=["chunk-1", "chunk", "chunk+1", "past_max_chunks"],
)
def test_beats_features_chunks_pads_and_masks_as_the_reference(length, count):
    """1.5-s chunks (odd frame math: 148 frames of 162 samples each in BEATs' mask view), at
    most 3: the features are the Kaldi bank of each reference chunk, normalised.

    Constant frames (the padding repeats the last real sample) are at the log floor: the
    reference's float32 frame mean leaves a roundoff residue there (knf's and torch's differ);
    the exact value has none.
    """
    chunk = 3 * 8000
    wave = np.random.default_rng(length).uniform(-0.5, 0.5, length).astype(np.float32)
    features, mask = fbank.beats_features(wave, chunk_samples=chunk, max_chunks=3)
    chunks, sample_masks = _official_chunks(wave, chunk, 3)
    assert features.shape == (count, 148, 128) and mask.shape == (count, 148)
    np.testing.assert_array_equal(mask, _official_frame_mask(sample_masks, 148))
    floor = (LOG_FLOOR - 15.41663) / (2 * 6.55582)
    for c, samples in enumerate(chunks):
        bank = _kaldi_reference(samples * np.float32(2**15), 128)
        frames = np.lib.stride_tricks.sliding_window_view(samples, 400)[::160]
        varies = frames.max(axis=1) > frames.min(axis=1)
        _assert_parity(features[c][varies] * (2 * 6.55582) + 15.41663, bank[varies])
        np.testing.assert_allclose(features[c][~varies], floor, rtol=0, atol=1e-6)
    real_frames = (~mask).sum(axis=1)
    in_last = length - (count - 1) * chunk  # past max_chunks: a whole chunk, the rest dropped
    assert real_frames[-1] == min(148, -(-in_last // 162))
    assert (real_frames[:-1] == 148).all()


def test_thirty_second_chunks_give_2998_frames_and_the_160_sample_mask_rule():
    chunk = 480000
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, chunk + 16_001).astype(np.float32)
    features, mask = fbank.beats_features(wave)
    assert features.shape == (2, 2998, 128) and mask.shape == (2, 2998)
    _, sample_masks = _official_chunks(wave, chunk, 20)
    np.testing.assert_array_equal(mask, _official_frame_mask(sample_masks, 2998))
    assert not mask[0].any() and (~mask[1]).sum() == 101  # ceil(16001 / 160)


def test_frame_padding_mask_equals_the_reference_rule_for_every_real_length():
    chunk, frames = 4000, fbank.num_frames(4000)  # 23 frames, groups of 173 samples
    for num_real in range(1, chunk + 1):
        sample_mask = (np.arange(chunk) >= num_real)[None]
        expected = _official_frame_mask(sample_mask, frames)[0]
        np.testing.assert_array_equal(fbank.frame_padding_mask(num_real, chunk, frames), expected)
