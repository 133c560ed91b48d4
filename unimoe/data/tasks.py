"""The built-in multimodal tasks: what each record asks, shows, says and answers.

Every task is small enough for a tiny model to learn on a CPU, yet each one needs its modality:
the answer of a QA task is a single word or digit that only the image / video / speech / sound
determines, so exact-match accuracy against the task's chance level shows whether the modality
path works. Caption tasks pair each modality with a description (Uni-MoE stage-1 alignment data);
QA tasks are the instruction data of stages 2-3 and have a held-out eval split.

Records use Uni-MoE's `conversations` format (`[{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "red"}]`, stored as a JSON string).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from unimoe.data import media
from unimoe.data.conversation import SYSTEM_PROMPT

MODALITIES: tuple[str, ...] = ("text", "image", "video", "speech", "audio", "image_speech")

TASKS: dict[str, str] = {
    "text_qa": "text",
    "image_caption": "image",
    "image_qa": "image",
    "video_caption": "video",
    "video_qa": "video",
    "speech_transcript": "speech",
    "speech_qa": "speech",
    "audio_caption": "audio",
    "audio_qa": "audio",
    "image_speech_qa": "image_speech",
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
ALIGNMENT_TASKS: tuple[str, ...] = (
    "image_caption",
    "video_caption",
    "speech_transcript",
    "audio_caption",
)
INSTRUCTION_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t not in ALIGNMENT_TASKS)
# Uni-MoE's modality experts (one stage-2 model each) and the data each is trained on.
EXPERT_MODALITIES: tuple[str, ...] = ("image", "video", "speech", "audio")
EXPERT_TASKS: dict[str, tuple[str, ...]] = {
    "image": ("image_qa", "image_caption", "text_qa"),
    "video": ("video_qa", "video_caption", "text_qa"),
    "speech": ("speech_qa", "speech_transcript", "image_speech_qa", "text_qa"),
    "audio": ("audio_qa", "audio_caption", "text_qa"),
}
# Tasks whose every record carries a stage-0 encoder label (the others carry -1).
IMAGE_LABEL_TASKS: tuple[str, ...] = tuple(
    t for t, m in TASKS.items() if m in ("image", "image_speech")
)
AUDIO_LABEL_TASKS: tuple[str, ...] = tuple(
    t for t, m in TASKS.items() if m in ("speech", "audio", "image_speech")
)

COLOR_NAMES: tuple[str, ...] = tuple(media.COLORS)
DIGIT_WORDS: tuple[str, ...] = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
COUNT_QUESTION = "how many objects are there"
# Spoken questions of `image_speech_qa`, also transcribed in `speech_transcript` so stage-1
# alignment teaches the audio connector whole questions, not only single words.
SPOKEN_QUESTIONS: tuple[str, ...] = (
    *(f"what color is the {shape}" for shape in media.SHAPES),
    *(f"what shape is the {color} object" for color in COLOR_NAMES),
    COUNT_QUESTION,
)
SPOKEN_KEYWORDS: tuple[str, ...] = (*COLOR_NAMES, *media.SHAPES, *DIGIT_WORDS)
# Every utterance the dataset speaks; `audio_label` of a speech record is its index here.
SPOKEN_VOCAB: tuple[str, ...] = (*SPOKEN_KEYWORDS, *SPOKEN_QUESTIONS)

NUM_IMAGE_LABELS = len(media.COLORS) * len(media.SHAPES)
NUM_AUDIO_LABELS = len(SPOKEN_VOCAB) + len(media.SOUND_KINDS) * len(media.PITCHES)

# Question types of each QA task with the number of possible answers of each; types are drawn
# uniformly, so the chance accuracy is the mean of 1 / #answers.
_PLUS_PAIRS = tuple((a, b) for a in range(1, 10) for b in range(1, 10) if a + b <= 9)
_MINUS_PAIRS = tuple((a, b) for a in range(1, 10) for b in range(1, 10) if b < a)
QUESTION_TYPES: dict[str, dict[str, int]] = {
    "text_qa": {
        "plus": len({a + b for a, b in _PLUS_PAIRS}),
        "minus": len({a - b for a, b in _MINUS_PAIRS}),
    },
    "image_qa": {"color": len(media.COLORS), "shape": len(media.SHAPES), "count": 3},
    "video_qa": {"color": len(media.COLORS), "shape": len(media.SHAPES), "axis": 2},
    "speech_qa": {
        "color": len(media.COLORS),
        "shape": len(media.SHAPES),
        "number": len(DIGIT_WORDS),
    },
    "audio_qa": {"kind": len(media.SOUND_KINDS), "pitch": len(media.PITCHES)},
    "image_speech_qa": {"color": len(media.COLORS), "shape": len(media.SHAPES), "count": 3},
}

IMAGE_CAPTION_PROMPT = "Describe the image briefly."
VIDEO_CAPTION_PROMPT = "Describe the video briefly."
TRANSCRIBE_PROMPT = "Transcribe the speech."
AUDIO_CAPTION_PROMPT = "Describe the sound briefly."
IMAGE_SPEECH_PROMPT = "Answer the spoken question about the image."
DIGIT_SUFFIX = " Answer with a digit."
SPEECH_QUESTIONS = {
    "color": "Which color did the speaker say?",
    "shape": "Which shape did the speaker say?",
    "number": "What number did the speaker say?" + DIGIT_SUFFIX,
}
AUDIO_QUESTIONS = {"kind": "What kind of sound is this?", "pitch": "Is the sound high or low?"}
VIDEO_QUESTIONS = {
    "color": "What color is the moving object?",
    "shape": "What shape is the moving object?",
    # Video features are averaged over frames, so only the axis of motion is recoverable.
    "axis": "Is the object moving horizontally or vertically?",
}
_AXIS = {"left": "horizontally", "right": "horizontally", "up": "vertically", "down": "vertically"}
_MAX_OBJECTS = 3


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
    """Media sizes of generated records (fixed per builder config)."""

    image_size: int = 32
    num_frames: int = 4
    clip_samples: int = 3 * media.SAMPLE_RATE  # audio clip length; 3 s = 300 Whisper frames

    def __post_init__(self):
        for name in ("image_size", "num_frames", "clip_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExampleConfig.{name} must be >= 1, got {getattr(self, name)}")


def chance_accuracy(task: str) -> float:
    """Expected exact-match accuracy of guessing uniformly among the answers of each question type."""
    if task not in QUESTION_TYPES:
        raise ValueError(
            f"task {task!r} has no chance accuracy: QA tasks are {tuple(QUESTION_TYPES)}"
        )
    counts = QUESTION_TYPES[task].values()
    return float(np.mean([1.0 / n for n in counts]))


def image_label(obj: media.SceneObject) -> int:
    return COLOR_NAMES.index(obj.color) * len(media.SHAPES) + media.SHAPES.index(obj.shape)


def sound_label(kind: str, pitch: str) -> int:
    return (
        len(SPOKEN_VOCAB)
        + media.SOUND_KINDS.index(kind) * len(media.PITCHES)
        + media.PITCHES.index(pitch)
    )


def describe_objects(objects: list[media.SceneObject]) -> str:
    """'a red circle', 'a red circle and a blue square', 'a, b and c' listed left to right."""
    phrases = [f"a {o.color} {o.shape}" for o in sorted(objects, key=lambda o: o.x)]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _conversation(human: str, gpt: str) -> str:
    return json.dumps([{"from": "human", "value": human}, {"from": "gpt", "value": gpt}])


def _choice(rng: np.random.Generator, options) -> Any:
    return options[int(rng.integers(len(options)))]


def _scene_question(rng: np.random.Generator, image_size: int):
    """Draws a question type, then a scene in which that question has exactly one answer.

    Returns (objects, question_type, subject, answer): subject is the shape (colour question) or the
    colour (shape question) named in the question, empty for counting.
    """
    question_type = _choice(rng, tuple(QUESTION_TYPES["image_qa"]))
    while True:
        objects = media.random_objects(rng, int(rng.integers(1, _MAX_OBJECTS + 1)), image_size)
        if question_type == "count":
            return objects, question_type, "", str(len(objects))
        key = "shape" if question_type == "color" else "color"
        values = [getattr(o, key) for o in objects]
        unique = [o for o in objects if values.count(getattr(o, key)) == 1]
        if unique:
            target = _choice(rng, unique)
            return objects, question_type, getattr(target, key), getattr(target, question_type)


def _clip(wave: np.ndarray, rng: np.random.Generator, cfg: ExampleConfig) -> np.ndarray:
    """Random offset / gain / noise, stored as int16 up to the last valid sample (the rest is silence)."""
    clip, num_valid = media.place_in_clip(wave, cfg.clip_samples, rng)
    return np.round(np.clip(clip[:num_valid], -1.0, 1.0) * 32767.0).astype(np.int16)


@dataclasses.dataclass
class _Drawn:
    """What one task's generator drew: the turn, its answer, and the media it uses."""

    human: str
    answer: str
    image: np.ndarray | None = None
    video: np.ndarray | None = None
    audio: np.ndarray | None = None
    image_label: int = -1
    audio_label: int = -1


def _text_example(
    task: str, rng: np.random.Generator, synth: media.SpeechSynthesizer, cfg: ExampleConfig
) -> _Drawn:
    if rng.integers(2) == 0:
        a, b = _choice(rng, _PLUS_PAIRS)
        return _Drawn(f"What is {a} plus {b}?", str(a + b))
    a, b = _choice(rng, _MINUS_PAIRS)
    return _Drawn(f"What is {a} minus {b}?", str(a - b))


def _image_example(
    task: str, rng: np.random.Generator, synth: media.SpeechSynthesizer, cfg: ExampleConfig
) -> _Drawn:
    size, audio, audio_label = cfg.image_size, None, -1
    if task == "image_caption":
        objects = media.random_objects(rng, int(rng.integers(1, _MAX_OBJECTS + 1)), size)
        human, answer = f"<image>\n{IMAGE_CAPTION_PROMPT}", describe_objects(objects)
    else:
        objects, question_type, subject, answer = _scene_question(rng, size)
        question = {
            "color": f"what color is the {subject}",
            "shape": f"what shape is the {subject} object",
            "count": COUNT_QUESTION,
        }[question_type]
        if task == "image_qa":
            suffix = DIGIT_SUFFIX if question_type == "count" else ""
            human = f"<image>\n{question[0].upper()}{question[1:]}?{suffix}"
        else:
            human = f"<image>\n<audio>\n{IMAGE_SPEECH_PROMPT}"
            audio = _clip(synth.synthesize(question), rng, cfg)
            audio_label = SPOKEN_VOCAB.index(question)
    image = media.render_scene(objects, size, rng)[None]
    return _Drawn(
        human,
        answer,
        image=image,
        audio=audio,
        image_label=image_label(objects[0]),
        audio_label=audio_label,
    )


def _video_example(
    task: str, rng: np.random.Generator, synth: media.SpeechSynthesizer, cfg: ExampleConfig
) -> _Drawn:
    obj = media.random_objects(rng, 1, cfg.image_size)[0]
    direction = _choice(rng, media.DIRECTIONS)
    video = media.render_video(obj, direction, cfg.num_frames, cfg.image_size, rng)
    if task == "video_caption":
        human = f"<video>\n{VIDEO_CAPTION_PROMPT}"
        return _Drawn(human, f"a {obj.color} {obj.shape} moving {direction}", video=video)
    question_type = _choice(rng, tuple(VIDEO_QUESTIONS))
    answer = {"color": obj.color, "shape": obj.shape, "axis": _AXIS[direction]}[question_type]
    return _Drawn(f"<video>\n{VIDEO_QUESTIONS[question_type]}", answer, video=video)


def _speech_example(
    task: str, rng: np.random.Generator, synth: media.SpeechSynthesizer, cfg: ExampleConfig
) -> _Drawn:
    if task == "speech_transcript":
        # Two thirds single keywords, one third the spoken questions of image_speech_qa.
        words = SPOKEN_KEYWORDS if rng.integers(3) else SPOKEN_QUESTIONS
        spoken = _choice(rng, words)
        human, answer = f"<audio>\n{TRANSCRIBE_PROMPT}", spoken
    else:
        question_type = _choice(rng, tuple(SPEECH_QUESTIONS))
        spoken = _choice(
            rng,
            {"color": COLOR_NAMES, "shape": media.SHAPES, "number": DIGIT_WORDS}[question_type],
        )
        answer = str(DIGIT_WORDS.index(spoken) + 1) if question_type == "number" else spoken
        human = f"<audio>\n{SPEECH_QUESTIONS[question_type]}"
    audio = _clip(synth.synthesize(spoken), rng, cfg)
    return _Drawn(human, answer, audio=audio, audio_label=SPOKEN_VOCAB.index(spoken))


def _sound_example(
    task: str, rng: np.random.Generator, synth: media.SpeechSynthesizer, cfg: ExampleConfig
) -> _Drawn:
    kind, pitch = _choice(rng, media.SOUND_KINDS), _choice(rng, media.PITCHES)
    seconds = float(rng.uniform(0.5, 1.5)) * cfg.clip_samples / (3 * media.SAMPLE_RATE)
    audio = _clip(media.synth_sound(kind, pitch, seconds, rng), rng, cfg)
    label = sound_label(kind, pitch)
    if task == "audio_caption":
        human, answer = f"<audio>\n{AUDIO_CAPTION_PROMPT}", f"a {pitch} {kind}"
    else:
        question_type = _choice(rng, tuple(AUDIO_QUESTIONS))
        human = f"<audio>\n{AUDIO_QUESTIONS[question_type]}"
        answer = kind if question_type == "kind" else pitch
    return _Drawn(human, answer, audio=audio, audio_label=label)


# Each task's generator: (task, rng, synth, cfg) -> _Drawn. The draws' order is the dataset.
_GENERATORS = {
    "text_qa": _text_example,
    "image_caption": _image_example,
    "image_qa": _image_example,
    "image_speech_qa": _image_example,
    "video_caption": _video_example,
    "video_qa": _video_example,
    "speech_transcript": _speech_example,
    "speech_qa": _speech_example,
    "audio_caption": _sound_example,
    "audio_qa": _sound_example,
}


def generate_example(
    task: str,
    index: int,
    rng: np.random.Generator,
    synth: media.SpeechSynthesizer,
    cfg: ExampleConfig,
    *,
    split: str = "train",
) -> dict[str, Any]:
    """One raw record of `task`, drawn from `rng` (the caller seeds it per record for determinism).

    Media slots always exist so every record has the same structure: `image` uint8 [0 or 1, S, S, 3],
    `video` uint8 [0 or F, S, S, 3], `audio` int16 [n] (n = 0 when absent).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {task!r}")
    drawn = _GENERATORS[task](task, rng, synth, cfg)
    no_frames = np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8)
    return {
        "id": f"{split}-{task}-{index:06d}",
        "task": task,
        "modality": TASKS[task],
        "conversations": _conversation(drawn.human, drawn.answer),
        "answer": drawn.answer,
        "image": no_frames if drawn.image is None else drawn.image,
        "video": no_frames if drawn.video is None else drawn.video,
        "audio": np.zeros((0,), np.int16) if drawn.audio is None else drawn.audio,
        "image_label": np.int32(drawn.image_label),
        "audio_label": np.int32(drawn.audio_label),
    }


def tokenizer_corpus() -> list[str]:
    """Every text the dataset can produce, in Vicuna-template form, for training the tokenizer."""
    pairs: list[tuple[str, str]] = []
    pairs += [(f"What is {a} plus {b}?", str(a + b)) for a, b in _PLUS_PAIRS]
    pairs += [(f"What is {a} minus {b}?", str(a - b)) for a, b in _MINUS_PAIRS]
    single = [media.SceneObject(s, c, 0.0, 0.0, 1.0) for c in COLOR_NAMES for s in media.SHAPES]
    for n in range(
        1, _MAX_OBJECTS + 1
    ):  # captions listing n objects (repeated ones cover the same words)
        pairs += [
            (
                IMAGE_CAPTION_PROMPT,
                describe_objects([dataclasses.replace(o, x=float(i)) for i in range(n)]),
            )
            for o in single
        ]
    for shape in media.SHAPES:
        pairs += [(f"What color is the {shape}?", color) for color in COLOR_NAMES]
    for color in COLOR_NAMES:
        pairs += [(f"What shape is the {color} object?", shape) for shape in media.SHAPES]
    pairs += [
        (f"How many objects are there?{DIGIT_SUFFIX}", str(n)) for n in range(1, _MAX_OBJECTS + 1)
    ]
    pairs += [
        (VIDEO_CAPTION_PROMPT, f"a {c} {s} moving {d}")
        for c in COLOR_NAMES
        for s in media.SHAPES
        for d in media.DIRECTIONS
    ]
    pairs += [(VIDEO_QUESTIONS["color"], c) for c in COLOR_NAMES]
    pairs += [(VIDEO_QUESTIONS["shape"], s) for s in media.SHAPES]
    pairs += [(VIDEO_QUESTIONS["axis"], a) for a in sorted(set(_AXIS.values()))]
    pairs += [(TRANSCRIBE_PROMPT, spoken) for spoken in SPOKEN_VOCAB]
    pairs += [(SPEECH_QUESTIONS["color"], c) for c in COLOR_NAMES]
    pairs += [(SPEECH_QUESTIONS["shape"], s) for s in media.SHAPES]
    pairs += [(SPEECH_QUESTIONS["number"], str(d)) for d in range(1, len(DIGIT_WORDS) + 1)]
    pairs += [
        (AUDIO_CAPTION_PROMPT, f"a {p} {k}") for k in media.SOUND_KINDS for p in media.PITCHES
    ]
    pairs += [(AUDIO_QUESTIONS["kind"], k) for k in media.SOUND_KINDS]
    pairs += [(AUDIO_QUESTIONS["pitch"], p) for p in media.PITCHES]
    pairs += [(IMAGE_SPEECH_PROMPT, a) for a in (*COLOR_NAMES, *media.SHAPES, "1", "2", "3")]
    return [f"{SYSTEM_PROMPT} USER: \n{question} ASSISTANT: {answer}" for question, answer in pairs]
