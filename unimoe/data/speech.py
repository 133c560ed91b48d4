"""Offline text-to-speech: espeak-ng (from the `espeakng-loader` wheel) through ctypes, resampled to 16 kHz.

espeak-ng keeps its whole state in C globals, so the process holds one engine, created on first use
and driven under a lock. Two pieces of that state survive between utterances (and even
`espeak_Terminate`): the pitch-flutter phase and the roughness cycle counter in wavegen.c. With
them the same text sounds slightly different every time, so voices are loaded from a generated
voice file with `flutter 0` and `roughness 0`, which makes output a pure function of the text.
"""

from __future__ import annotations

import ctypes
import fractions
import functools
import os
import tempfile
import threading

import numpy as np

__all__ = ["SAMPLE_RATE", "SpeechSynthesizer", "resample"]

SAMPLE_RATE = 16000

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_MIN_RATE_WPM, _MAX_RATE_WPM = 80, 450
# espeak pads utterances with silence; anything quieter than this fraction of the peak is trimmed.
_SILENCE_FRACTION = 0.01

# Fraction of the output Nyquist band kept, and sinc zero crossings per side of the kernel: at
# 22050 -> 16000 Hz this passes up to ~7.5 kHz and reaches the stopband before 8 kHz.
_RESAMPLE_ROLLOFF = 0.94
_RESAMPLE_ZERO_CROSSINGS = 48
_KAISER_BETA = 8.6

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@functools.lru_cache(maxsize=4)
def _polyphase_kernel(up: int, down: int) -> np.ndarray:
    """[up, 2*half_width] kernel taps for resampling by up/down, one row per output phase.

    Output n sits at input time n*down/up = base + phase/up and reads inputs base-half_width+1 ..
    base+half_width; only `up` distinct phases exist, so the kernel is tabulated once per phase.
    """
    cutoff = 0.5 * min(1.0, up / down) * _RESAMPLE_ROLLOFF  # cycles per input sample
    half_width = int(np.ceil(_RESAMPLE_ZERO_CROSSINGS / (2 * cutoff)))
    taps = np.arange(-half_width + 1, half_width + 1)
    dist_pt = (np.arange(up) / up)[:, None] - taps[None, :]
    window_pt = np.i0(_KAISER_BETA * np.sqrt(np.clip(1 - (dist_pt / half_width) ** 2, 0, None)))
    return 2 * cutoff * np.sinc(2 * cutoff * dist_pt) * window_pt / np.i0(_KAISER_BETA)


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """float32 `wave` resampled by a Kaiser-windowed sinc, low-passed below the lower Nyquist rate."""
    wave = np.asarray(wave, np.float64)
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D, got shape {wave.shape}")
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"orig_rate={orig_rate} and target_rate={target_rate} must be positive")
    if orig_rate == target_rate:
        return wave.astype(np.float32)
    ratio = fractions.Fraction(target_rate, orig_rate)
    up, down = ratio.numerator, ratio.denominator
    kernel_pt = _polyphase_kernel(up, down)
    half_width = kernel_pt.shape[1] // 2
    padded = np.pad(wave, (half_width, half_width + 1))
    # Output n reads padded[base + 1 : base + 1 + 2*half_width]. Outputs n = r + up*m share the
    # phase (r*down) % up and their bases step by `down`: one strided view times one kernel row.
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half_width)
    num_out = -(-len(wave) * up // down)
    out = np.empty(num_out)
    for r in range(min(up, num_out)):
        base, phase = divmod(r * down, up)
        out[r::up] = windows[base + 1 :: down][: len(range(r, num_out, up))] @ kernel_pt[phase]
    return out.astype(np.float32)


class _EspeakEngine:
    """The process-wide espeak-ng instance; every method must be called with `_ENGINE_LOCK` held."""

    def __init__(self) -> None:
        try:
            import espeakng_loader

            self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_path = espeakng_loader.get_data_path()
        except (ImportError, OSError, RuntimeError) as err:
            raise RuntimeError(
                f"cannot load espeak-ng from the espeakng-loader package ({err}); "
                "install it with `pip install espeakng-loader`"
            ) from err
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByFile.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0
        )
        if self.sample_rate <= 0:
            raise RuntimeError(
                f"espeak_Initialize failed (returned {self.sample_rate}) with data path {data_path}"
            )
        self._chunks: list[np.ndarray] = []
        # ctypes frees a callback whose Python object dies, so the engine keeps it.
        self._callback = _SynthCallback(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None
        self._voice_files = {
            name.lower(): os.path.join(folder, name)
            for folder, _, names in os.walk(os.path.join(data_path, "lang"))
            for name in names
        }

    def _collect(
        self, wav: "ctypes._Pointer[ctypes.c_short]", num_samples: int, _events: int | None
    ) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = keep synthesising

    def use_voice(self, voice: str) -> None:
        """Load the language voice file named `voice`, with pitch flutter and roughness turned off."""
        if voice == self._voice:
            return
        voice_path = self._voice_files.get(voice.lower())
        if voice_path is None:
            raise ValueError(
                f"voice={voice!r} is not an espeak-ng language voice; examples: "
                f"{sorted(self._voice_files)[:8]}"
            )
        with open(voice_path, encoding="utf-8") as f:
            # Later keywords override earlier ones, so appending is enough.
            definition = f.read() + "\nflutter 0\nroughness 0\n"
        with tempfile.NamedTemporaryFile("w", prefix="unimoe_voice_", delete=False) as voice_file:
            voice_file.write(definition)
        try:
            status = self._lib.espeak_SetVoiceByFile(voice_file.name.encode())
        finally:
            os.unlink(voice_file.name)
        if status != 0:
            self._voice = None
            raise RuntimeError(
                f"espeak_SetVoiceByFile failed with status {status} for voice={voice!r}"
            )
        self._voice = voice

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> np.ndarray:
        """int16 samples at `self.sample_rate`, leading/trailing silence included."""
        self.use_voice(voice)
        lib = self._lib
        lib.espeak_SetParameter(_PARAM_RATE, rate_wpm, 0)
        # espeak's breath noise uses its own generator; a fixed seed keeps it repeatable.
        lib.espeak_ng_SetRandSeed(0)
        encoded = text.encode("utf-8") + b"\0"
        self._chunks = []
        status = lib.espeak_Synth(
            encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        lib.espeak_Synchronize()
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} for text={text!r}")
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


_ENGINE_LOCK = threading.Lock()
_engine: _EspeakEngine | None = None


def _get_engine() -> _EspeakEngine:
    """The shared engine, created on first use; call with `_ENGINE_LOCK` held."""
    global _engine
    if _engine is None:
        _engine = _EspeakEngine()
    return _engine


class SpeechSynthesizer:
    """Deterministic offline speech: float32 mono in [-1, 1] at SAMPLE_RATE, cached per text.

    Raises RuntimeError on construction if espeak-ng cannot be loaded or initialised, and
    ValueError for an unknown `voice` or a `rate_wpm` outside espeak's 80-450 words per minute.
    """

    def __init__(self, voice: str = "en", rate_wpm: int = 175):
        if not _MIN_RATE_WPM <= rate_wpm <= _MAX_RATE_WPM:
            raise ValueError(
                f"rate_wpm={rate_wpm} must be within [{_MIN_RATE_WPM}, {_MAX_RATE_WPM}]"
            )
        self.voice = voice
        self.rate_wpm = rate_wpm
        self._cache: dict[str, np.ndarray] = {}
        with _ENGINE_LOCK:
            _get_engine().use_voice(voice)

    def synthesize(self, text: str) -> np.ndarray:
        """Speech for `text` with leading/trailing silence removed (a fresh copy on every call)."""
        if not text.strip():
            raise ValueError("text must contain something to say")
        if text not in self._cache:
            with _ENGINE_LOCK:
                engine = _get_engine()
                pcm = engine.synthesize(text, self.voice, self.rate_wpm)
                native_rate = engine.sample_rate
            magnitude = np.abs(pcm.astype(np.int32))  # int16 abs(-32768) would overflow
            loud = np.flatnonzero(magnitude > _SILENCE_FRACTION * magnitude.max(initial=0))
            if len(loud) == 0:
                raise ValueError(f"espeak-ng produced no audible speech for text={text!r}")
            speech = pcm[loud[0] : loud[-1] + 1].astype(np.float64) / 32768.0
            self._cache[text] = np.clip(resample(speech, native_rate, SAMPLE_RATE), -1.0, 1.0)
        return self._cache[text].copy()
