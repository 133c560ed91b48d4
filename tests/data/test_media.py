"""Tests for unimoe.data.media / unimoe.data.speech: synthetic images, video, sounds, speech, features."""

import fractions
import itertools

import numpy as np
import pytest

from unimoe.data import media, speech
from unimoe.data.media import SAMPLE_RATE, SceneObject


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _dominant_hz(wave: np.ndarray) -> float:
    return float(np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)[np.argmax(np.abs(np.fft.rfft(wave)))])


# ----------------------------------------------------------------------------- images


def test_palette_has_six_distinct_named_colors():
    assert set(media.COLORS) == {"red", "green", "blue", "yellow", "white", "purple"}
    for (name_a, rgb_a), (name_b, rgb_b) in itertools.combinations(media.COLORS.items(), 2):
        assert np.abs(np.subtract(rgb_a, rgb_b)).sum() >= 100, (name_a, name_b)


@pytest.mark.parametrize("seed", range(6))
def test_random_objects_are_valid_and_deterministic(seed):
    n = 1 + seed % 4
    objects = media.random_objects(_rng(seed), n, 32)
    assert objects == media.random_objects(_rng(seed), n, 32)
    assert len(objects) == n
    assert len({(o.shape, o.color) for o in objects}) == n
    for obj in objects:
        assert obj.size >= 32 / 5
        assert (
            obj.size / 2 <= obj.x <= 32 - obj.size / 2
            and obj.size / 2 <= obj.y <= 32 - obj.size / 2
        )
    for a, b in itertools.combinations(objects, 2):
        gap = (a.size + b.size) / 2
        assert abs(a.x - b.x) >= gap or abs(a.y - b.y) >= gap


def test_random_objects_rejects_impossible_requests():
    with pytest.raises(ValueError, match="n=0"):
        media.random_objects(_rng(), 0, 32)
    with pytest.raises(ValueError, match="n=19"):
        media.random_objects(_rng(), 19, 32)
    with pytest.raises(ValueError, match="could not place n=18"):
        media.random_objects(_rng(), 18, 32)
    with pytest.raises(ValueError, match="image_size=4"):
        media.random_objects(_rng(), 1, 4)


def test_scene_object_rejects_unknown_fields():
    with pytest.raises(ValueError, match="shape"):
        SceneObject("hexagon", "red", 5, 5, 6)
    with pytest.raises(ValueError, match="color"):
        SceneObject("circle", "orange", 5, 5, 6)
    with pytest.raises(ValueError, match="size"):
        SceneObject("circle", "red", 5, 5, 0)


def test_render_scene_paints_object_colors_at_centres_on_dark_background():
    objects = [
        SceneObject("circle", "red", 8.0, 8.0, 8.0),
        SceneObject("square", "blue", 24.0, 9.0, 7.0),
        SceneObject("triangle", "yellow", 15.0, 24.0, 9.0),
    ]
    image = media.render_scene(objects, 32, _rng(1))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    for obj in objects:
        row, col = int(obj.y), int(obj.x)
        centre_rgb = image[row - 1 : row + 2, col - 1 : col + 2].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(centre_rgb, media.COLORS[obj.color], atol=6)
    # Every pixel at least one size away from all objects is background: dark and grey.
    rows, cols = np.mgrid[:32, :32] + 0.5
    far = np.all(
        [np.maximum(np.abs(cols - o.x), np.abs(rows - o.y)) > o.size for o in objects], axis=0
    )
    assert far.sum() > 100
    background = image[far].astype(float)
    assert background.max() <= 35 + 4 * 4 + 1
    assert np.abs(background.mean(axis=0) - background.mean()).max() < 1.5
    assert 1.0 < background.std() < 8.0  # mild per-pixel noise


@pytest.mark.parametrize(
    "shape,expected_area",
    [("circle", np.pi * 10.5**2), ("square", 21.0**2), ("triangle", 21.0**2 / 2)],
)
def test_shape_areas(shape, expected_area):
    red = media.render_scene([SceneObject(shape, "red", 32.0, 31.0, 21.0)], 64, _rng(2))[
        ..., 0
    ].astype(float)
    box = (slice(18, 46), slice(19, 47))  # the 21-pixel box plus margin
    outside = np.ones_like(red, bool)
    outside[box] = False
    background = red[outside].mean()
    # Anti-aliased pixels blend linearly, so the red excess over the background sums to the area.
    coverage = (red[box] - background) / (media.COLORS["red"][0] - background)
    assert abs(coverage.sum() - expected_area) < 0.02 * expected_area


def _centroid(frame_hwc: np.ndarray, color: str) -> tuple[float, float]:
    distance = np.abs(frame_hwc.astype(float) - media.COLORS[color]).sum(axis=-1)
    rows, cols = np.nonzero(distance < 60)
    return float(cols.mean()), float(rows.mean())


@pytest.mark.parametrize("direction", media.DIRECTIONS)
def test_render_video_moves_steadily_in_direction(direction):
    obj = SceneObject("square", "green", 20.0, 11.0, 7.0)
    video = media.render_video(obj, direction, 7, 32, _rng(3))
    assert video.shape == (7, 32, 32, 3) and video.dtype == np.uint8
    centres = np.array([_centroid(frame, "green") for frame in video])  # [F, (x, y)]
    axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[direction]
    steps = np.diff(centres[:, axis]) * sign
    assert np.all(steps > 1.0)
    assert steps.max() - steps.min() <= 1.0  # constant speed, up to pixel rounding
    np.testing.assert_allclose(centres[:, 1 - axis], (obj.y, obj.x)[axis] - 0.5, atol=0.6)
    # The object never touches the border.
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
    assert border.max() < 60


def test_render_video_rejects_bad_arguments():
    obj = SceneObject("circle", "white", 16.0, 16.0, 7.0)
    with pytest.raises(ValueError, match="direction"):
        media.render_video(obj, "sideways", 4, 32, _rng())
    with pytest.raises(ValueError, match="num_frames=1"):
        media.render_video(obj, "left", 1, 32, _rng())
    with pytest.raises(ValueError, match="obj.size"):
        media.render_video(SceneObject("circle", "white", 16.0, 16.0, 28.0), "left", 4, 32, _rng())


def test_rendering_is_deterministic_per_seed():
    obj = SceneObject("triangle", "purple", 10.0, 20.0, 8.0)
    np.testing.assert_array_equal(
        media.render_scene([obj], 32, _rng(5)), media.render_scene([obj], 32, _rng(5))
    )
    np.testing.assert_array_equal(
        media.render_video(obj, "up", 4, 32, _rng(5)), media.render_video(obj, "up", 4, 32, _rng(5))
    )
    assert not np.array_equal(
        media.render_scene([obj], 32, _rng(5)), media.render_scene([obj], 32, _rng(6))
    )


def test_normalize_image_matches_clip_formula():
    pixel = np.array([[[255, 0, 128]]], np.uint8)
    expected = [
        (1.0 - 0.48145466) / 0.26862954,
        (0.0 - 0.4578275) / 0.26130258,
        (128 / 255 - 0.40821073) / 0.27577711,
    ]
    out = media.normalize_image(np.broadcast_to(pixel, (2, 3, 1, 1, 3)))
    assert out.dtype == np.float32 and out.shape == (2, 3, 1, 1, 3)
    np.testing.assert_allclose(out[1, 2, 0, 0], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="images_uint8"):
        media.normalize_image(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="images_uint8"):
        media.normalize_image(np.zeros((2, 2, 4), np.uint8))


# ----------------------------------------------------------------------------- sounds


@pytest.mark.parametrize("kind", media.SOUND_KINDS)
def test_synth_sound_pitch_bands_duration_and_amplitude(kind):
    for seed, pitch in itertools.product(range(3), media.PITCHES):
        wave = media.synth_sound(kind, pitch, 1.0, _rng(seed))
        assert wave.dtype == np.float32
        assert 0.8 * SAMPLE_RATE - 1 <= len(wave) <= SAMPLE_RATE
        assert 0.5 <= np.abs(wave).max() <= 0.9 + 1e-6
        dominant = _dominant_hz(wave)
        assert (dominant > 1000) if pitch == "high" else (dominant < 1000), (seed, pitch, dominant)
    np.testing.assert_array_equal(
        media.synth_sound(kind, "low", 0.5, _rng(7)), media.synth_sound(kind, "low", 0.5, _rng(7))
    )
    # The shortest allowed sound still keeps its pitch band.
    assert _dominant_hz(media.synth_sound(kind, "low", 0.1, _rng(8))) < 1000
    assert _dominant_hz(media.synth_sound(kind, "high", 0.1, _rng(8))) > 1000


def test_chirp_rises_and_beep_has_three_to_five_pulses():
    chirp = media.synth_sound("chirp", "high", 1.0, _rng(1))
    half = len(chirp) // 2
    assert _dominant_hz(chirp[:half]) < _dominant_hz(chirp[half:])
    pulse_counts = set()
    for seed in range(8):
        beep = media.synth_sound("beep", "low", 1.0, _rng(seed))
        # 20 ms moving RMS separates pulses from gaps.
        energy = np.convolve(beep.astype(float) ** 2, np.ones(320) / 320, mode="same")
        on = energy > 0.1 * energy.max()
        pulse_counts.add(int(np.sum(on[1:] & ~on[:-1]) + on[0]))
    assert pulse_counts <= {3, 4, 5} and len(pulse_counts) > 1


def test_synth_sound_rejects_bad_arguments():
    for kwargs, field in [
        (dict(kind="bark"), "kind"),
        (dict(pitch="mid"), "pitch"),
        (dict(seconds=0.05), "seconds"),
    ]:
        args = dict(kind="tone", pitch="low", seconds=1.0) | kwargs
        with pytest.raises(ValueError, match=field):
            media.synth_sound(**args, rng=_rng())


def test_place_in_clip_offsets_gain_and_padding():
    wave = np.linspace(0.1, 0.5, 100).astype(np.float32)
    offsets = set()
    for seed in range(5):
        clip, valid = media.place_in_clip(wave, 1000, _rng(seed), noise_level=0.0)
        assert clip.dtype == np.float32 and clip.shape == (1000,)
        offset = valid - len(wave)
        offsets.add(offset)
        assert np.all(clip[:offset] == 0) and np.all(clip[valid:] == 0)
        gain = clip[offset:valid] / wave
        assert 0.5 <= gain[0] <= 1.0
        np.testing.assert_allclose(gain, gain[0], rtol=1e-5)
    assert len(offsets) == 5
    noisy, valid = media.place_in_clip(wave, 1000, _rng(0))
    assert np.all(noisy[valid:] == 0)
    assert 0.003 < noisy[: valid - len(wave)].std() < 0.007
    with pytest.raises(ValueError, match="wave length 100 exceeds num_samples=99"):
        media.place_in_clip(wave, 99, _rng())


# ----------------------------------------------------------------------------- features


def test_log_mel_matches_hugging_face_whisper():
    import transformers  # test-only dependency: a missing one must fail the parity check

    t = np.arange(int(2.3 * SAMPLE_RATE)) / SAMPLE_RATE
    wave = (
        0.5 * np.sin(2 * np.pi * 440 * t)
        + 0.2 * np.sin(2 * np.pi * 3100 * t) * (t > 1)
        + 0.05 * _rng(0).standard_normal(len(t))
    ).astype(np.float32)
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    expected = extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][
        0
    ].T
    features = media.log_mel(wave, 80, 3000)
    assert features.shape == (3000, 80) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, atol=1e-4)


def test_log_mel_hand_values_and_trimming():
    # Silence hits the 1e-10 floor everywhere: (log10(1e-10) + 4) / 4 = -1.5.
    np.testing.assert_allclose(media.log_mel(np.zeros(100), 32, 300), -1.5)
    wave = media.synth_sound("noise", "high", 1.0, _rng(0))
    features = media.log_mel(wave, 32, 50)
    assert features.shape == (50, 32)
    np.testing.assert_array_equal(features, media.log_mel(wave[: 50 * 160], 32, 50))
    assert features.max() - features.min() <= 2.0 + 1e-6  # the max - 8 floor, after the /4
    with pytest.raises(ValueError, match="num_mel_bins"):
        media.log_mel(wave, 0, 50)
    with pytest.raises(ValueError, match="wave"):
        media.log_mel(wave.reshape(2, -1), 32, 50)


def _resample_reference(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Every output against every input sample, with the kernel written out directly."""
    ratio = fractions.Fraction(target_rate, orig_rate)
    cutoff = 0.5 * min(1.0, float(ratio)) * 0.94
    half_width = int(np.ceil(48 / (2 * cutoff)))
    times = np.arange(-(-len(wave) * ratio.numerator // ratio.denominator)) / float(ratio)
    dist = times[:, None] - np.arange(len(wave))[None, :]
    window = np.i0(8.6 * np.sqrt(np.clip(1 - (dist / half_width) ** 2, 0, None))) / np.i0(8.6)
    return (2 * cutoff * np.sinc(2 * cutoff * dist) * window * (np.abs(dist) <= half_width)) @ wave


@pytest.mark.parametrize("orig_rate,target_rate", [(22050, 16000), (16000, 22050), (8000, 12000)])
def test_resample_matches_direct_windowed_sinc(orig_rate, target_rate):
    wave = _rng(1).standard_normal(701)
    np.testing.assert_allclose(
        speech.resample(wave, orig_rate, target_rate),
        _resample_reference(wave, orig_rate, target_rate),
        atol=2e-5,
    )


def test_resample_keeps_passband_and_removes_aliases():
    t_in = np.arange(22050) / 22050
    t_out = np.arange(16000) / 16000
    interior = slice(400, -400)
    kept = speech.resample(np.sin(2 * np.pi * 1000 * t_in), 22050, 16000)
    assert kept.shape == (16000,)
    np.testing.assert_allclose(
        kept[interior], np.sin(2 * np.pi * 1000 * t_out)[interior], atol=2e-3
    )
    # 9.5 kHz would alias to 6.5 kHz at 16 kHz; it must be filtered out instead.
    removed = speech.resample(np.sin(2 * np.pi * 9500 * t_in), 22050, 16000)
    assert np.sqrt(np.mean(removed[interior] ** 2)) < 1e-3


# ----------------------------------------------------------------------------- speech


@pytest.fixture(scope="module")
def synthesizer():
    return media.SpeechSynthesizer()


def test_speech_is_plausible_and_deterministic(synthesizer):
    text = "what color is the circle"
    first = synthesizer.synthesize(text)
    assert first.dtype == np.float32 and first.ndim == 1
    assert 0.2 <= len(first) / SAMPLE_RATE <= 3.0
    assert np.abs(first).max() <= 1.0 and np.sqrt(np.mean(first**2)) > 0.02
    # Silence was stripped: both ends start loud within 50 ms.
    edge = SAMPLE_RATE // 20
    assert np.abs(first[:edge]).max() > 0.01 and np.abs(first[-edge:]).max() > 0.01
    synthesizer.synthesize("is the sound high or low")  # engine state between the two syntheses
    fresh = media.SpeechSynthesizer().synthesize(text)  # a new cache, so espeak runs again
    np.testing.assert_array_equal(first, fresh)
    cached = synthesizer.synthesize(text)
    cached[:] = 0
    np.testing.assert_array_equal(synthesizer.synthesize(text), first)


def test_speech_rate_changes_duration(synthesizer):
    text = "the square moves to the left"
    slow = media.SpeechSynthesizer(rate_wpm=120).synthesize(text)
    fast = media.SpeechSynthesizer(rate_wpm=300).synthesize(text)
    assert len(fast) < 0.7 * len(slow)


def test_speech_rejects_bad_arguments(synthesizer):
    with pytest.raises(ValueError, match="rate_wpm=10"):
        media.SpeechSynthesizer(rate_wpm=10)
    with pytest.raises(ValueError, match="voice='zz'"):
        media.SpeechSynthesizer(voice="zz")
    with pytest.raises(ValueError, match="text"):
        synthesizer.synthesize("   ")


def test_speech_reports_missing_library(monkeypatch):
    import espeakng_loader

    monkeypatch.setattr(speech, "_engine", None)
    monkeypatch.setattr(espeakng_loader, "get_library_path", lambda: "/nonexistent/libespeak-ng.so")
    with pytest.raises(RuntimeError, match="cannot load espeak-ng"):
        media.SpeechSynthesizer()
