import json
import re

import numpy as np
import pytest

from unimoe.data import media, tasks

CFG = tasks.ExampleConfig(image_size=32, num_frames=5, clip_samples=48000)


@pytest.fixture(scope="module")
def synth():
    return media.SpeechSynthesizer()


def _records(task, synth, n, seed=0):
    return [
        tasks.generate_example(task, i, np.random.default_rng((seed, i)), synth, CFG)
        for i in range(n)
    ]


def _human_and_answer(record):
    human, gpt = json.loads(record["conversations"])
    assert (human["from"], gpt["from"]) == ("human", "gpt")
    assert gpt["value"] == record["answer"]
    return human["value"], record["answer"]


def test_chance_accuracy_is_mean_over_question_types():
    assert tasks.chance_accuracy("text_qa") == pytest.approx(1 / 8)  # sums 2..9, differences 1..8
    assert tasks.chance_accuracy("image_qa") == pytest.approx((1 / 6 + 1 / 3 + 1 / 3) / 3)
    assert tasks.chance_accuracy("video_qa") == pytest.approx((1 / 6 + 1 / 3 + 1 / 2) / 3)
    assert tasks.chance_accuracy("speech_qa") == pytest.approx((1 / 6 + 1 / 3 + 1 / 9) / 3)
    assert tasks.chance_accuracy("audio_qa") == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert tasks.chance_accuracy("image_speech_qa") == pytest.approx((1 / 6 + 1 / 3 + 1 / 3) / 3)
    with pytest.raises(ValueError, match="image_caption"):
        tasks.chance_accuracy("image_caption")


def test_task_tables():
    assert set(tasks.TASKS.values()) == set(tasks.MODALITIES)
    assert set(tasks.ALIGNMENT_TASKS) | set(tasks.INSTRUCTION_TASKS) == set(tasks.TASKS)
    assert set(tasks.INSTRUCTION_TASKS) == set(tasks.QUESTION_TYPES)
    assert tasks.NUM_IMAGE_LABELS == 18
    # 6 colours + 3 shapes + 9 digits + 10 spoken questions, then 4 kinds x 2 pitches.
    assert tasks.NUM_AUDIO_LABELS == 28 + 8


def test_generate_example_is_deterministic(synth):
    for task in tasks.TASKS:
        a = tasks.generate_example(task, 3, np.random.default_rng(7), synth, CFG)
        b = tasks.generate_example(task, 3, np.random.default_rng(7), synth, CFG)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{task}/{key}")
    first = tasks.generate_example("image_qa", 3, np.random.default_rng(7), synth, CFG)
    second = tasks.generate_example("image_qa", 3, np.random.default_rng(8), synth, CFG)
    assert not np.array_equal(first["image"], second["image"])


def test_media_slots_and_labels_follow_the_modality(synth):
    for task, modality in tasks.TASKS.items():
        for record in _records(task, synth, 4):
            assert record["task"] == task and record["modality"] == modality
            assert record["image"].dtype == np.uint8 and record["video"].dtype == np.uint8
            assert record["audio"].dtype == np.int16 and record["audio"].ndim == 1
            assert record["image"].shape == ((1 if "image" in modality else 0), 32, 32, 3)
            assert record["video"].shape == ((5 if modality == "video" else 0), 32, 32, 3)
            has_audio = modality in ("speech", "audio", "image_speech")
            assert (len(record["audio"]) > 0) == has_audio
            assert len(record["audio"]) <= CFG.clip_samples
            assert (
                (record["image_label"] >= 0)
                == (task in tasks.IMAGE_LABEL_TASKS)
                == ("image" in modality)
            )
            assert (record["audio_label"] >= 0) == (task in tasks.AUDIO_LABEL_TASKS) == has_audio
            assert -1 <= record["image_label"] < tasks.NUM_IMAGE_LABELS
            assert -1 <= record["audio_label"] < tasks.NUM_AUDIO_LABELS
            human, _ = _human_and_answer(record)
            assert ("<image>" in human) == ("image" in modality)
            assert ("<video>" in human) == (modality == "video")
            assert ("<audio>" in human) == has_audio


def test_text_qa_answers_are_the_arithmetic(synth):
    for record in _records("text_qa", synth, 30):
        human, answer = _human_and_answer(record)
        a, op, b = re.fullmatch(r"What is (\d) (plus|minus) (\d)\?", human).groups()
        expected = int(a) + int(b) if op == "plus" else int(a) - int(b)
        assert answer == str(expected) and 1 <= expected <= 9


def test_scene_questions_have_exactly_one_answer():
    rng = np.random.default_rng(0)
    for _ in range(60):
        objects, question_type, subject, answer = tasks._scene_question(rng, 32)
        if question_type == "count":
            assert answer == str(len(objects))
        else:
            key = "shape" if question_type == "color" else "color"
            matches = [o for o in objects if getattr(o, key) == subject]
            assert len(matches) == 1 and getattr(matches[0], question_type) == answer


def test_image_label_is_the_first_object_and_appears_in_the_image(synth):
    for record in _records("image_qa", synth, 12):
        label = int(record["image_label"])
        color = tasks.COLOR_NAMES[label // 3]
        distance = np.abs(record["image"][0].astype(int) - np.array(media.COLORS[color])).sum(-1)
        assert (distance < 40).sum() >= 4, color  # solid pixels of that colour exist
    assert tasks.image_label(media.SceneObject("triangle", "blue", 5.0, 5.0, 7.0)) == 2 * 3 + 2


def test_video_axis_answer_matches_the_motion(synth):
    checked = 0
    for record in _records("video_qa", synth, 40):
        human, answer = _human_and_answer(record)
        if "horizontally" not in human:
            continue
        bright_fhw = record["video"].max(-1) > 100
        ys, xs = [], []
        for frame in bright_fhw:
            yy, xx = np.nonzero(frame)
            ys.append(yy.mean())
            xs.append(xx.mean())
        dx, dy = abs(xs[-1] - xs[0]), abs(ys[-1] - ys[0])
        assert answer == ("horizontally" if dx > dy else "vertically")
        checked += 1
    assert checked >= 5


def test_speech_labels_match_answers(synth):
    for record in _records("speech_transcript", synth, 12):
        assert tasks.SPOKEN_VOCAB[record["audio_label"]] == record["answer"]
    for record in _records("speech_qa", synth, 20):
        human, answer = _human_and_answer(record)
        spoken = tasks.SPOKEN_VOCAB[record["audio_label"]]
        if "number" in human:
            assert human.endswith("Answer with a digit.")
            assert answer == str(tasks.DIGIT_WORDS.index(spoken) + 1)
        else:
            assert answer == spoken
    for record in _records("image_speech_qa", synth, 12):
        spoken = tasks.SPOKEN_VOCAB[record["audio_label"]]
        assert spoken in tasks.SPOKEN_QUESTIONS
        if spoken == tasks.COUNT_QUESTION:
            assert record["answer"] in ("1", "2", "3")
        elif spoken.startswith("what color"):
            assert record["answer"] in tasks.COLOR_NAMES
        else:
            assert record["answer"] in media.SHAPES


def test_sound_labels_match_captions(synth):
    offset = len(tasks.SPOKEN_VOCAB)
    for record in _records("audio_caption", synth, 12):
        kind_index, pitch_index = divmod(int(record["audio_label"]) - offset, 2)
        assert record["answer"] == f"a {media.PITCHES[pitch_index]} {media.SOUND_KINDS[kind_index]}"


def test_augmentation_makes_repeated_words_differ(synth):
    records = [r for r in _records("speech_transcript", synth, 60) if r["answer"] == "red"]
    assert len(records) >= 2
    assert not np.array_equal(records[0]["audio"], records[1]["audio"])


def test_every_utterance_fits_the_clip(synth):
    longest = max(len(synth.synthesize(text)) for text in tasks.SPOKEN_VOCAB)
    assert longest <= CFG.clip_samples


def test_corpus_covers_every_generated_text(synth):
    corpus_words = set(
        " ".join(tasks.tokenizer_corpus()).replace("?", " ").replace(".", " ").split()
    )
    for task in tasks.TASKS:
        for record in _records(task, synth, 8):
            human, answer = _human_and_answer(record)
            text = re.sub("<image>|<video>|<audio>", " ", f"{human} {answer}")
            words = set(text.replace("?", " ").replace(".", " ").replace(",", " ").split())
            assert words <= corpus_words, words - corpus_words


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="task"):
        tasks.generate_example("ocr", 0, np.random.default_rng(0), None, CFG)
    with pytest.raises(ValueError, match="image_size"):
        tasks.ExampleConfig(image_size=0)
