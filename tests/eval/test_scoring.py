import pytest

from unimoe.eval import scoring


@pytest.mark.parametrize(
    'text, expected',
    [
        ('Cat', 'cat'),
        ('  The Cat. ', 'cat'),
        ('a red   car!', 'red car'),
        ('An apple?!', 'apple'),
        ('Three', '3'),
        ('the ten dogs', '10 dogs'),
        ('Zero.', '0'),
        ('eleven', 'eleven'),
        ('A', 'a'),  # a lone article is a choice letter, not dropped
        ('B.', 'b'),
        ('3.5', '3.5'),  # only trailing punctuation goes
        ('U.S. army', 'u.s. army'),
        ('the the end', 'the end'),
        ('someone', 'someone'),  # number words are whole words only
        ('', ''),
        ('...', ''),
    ],
)
def test_normalize_answer(text, expected):
    assert scoring.normalize_answer(text) == expected


@pytest.mark.parametrize(
    'prediction, answer, expected',
    [
        ('The dog.', 'dog', True),
        ('two', '2', True),
        ('Yes', 'yes', True),
        ('dogs', 'dog', False),
        ('', 'a', False),
        ('a', 'b', False),
    ],
)
def test_exact_match(prediction, answer, expected):
    assert scoring.exact_match(prediction, answer) is expected


def test_score_per_task_modality_and_overall():
    records = [
        {'task': 'image_qa', 'modality': 'image', 'prediction': 'A cat', 'answer': 'cat'},
        {'task': 'image_qa', 'modality': 'image', 'prediction': 'dog', 'answer': 'cat'},
        {'task': 'image_cap', 'modality': 'image', 'prediction': 'four', 'answer': '4'},
        {'task': 'audio_qa', 'modality': 'audio', 'prediction': 'bark', 'answer': 'Bark.'},
    ]
    assert scoring.score(records) == {
        'tasks': {
            'image_qa': {'accuracy': 0.5, 'n': 2},
            'image_cap': {'accuracy': 1.0, 'n': 1},
            'audio_qa': {'accuracy': 1.0, 'n': 1},
        },
        # Micro average: 2 of 3 image examples, not the mean (0.75) of the two image tasks.
        'modalities': {'image': {'accuracy': 2 / 3, 'n': 3}, 'audio': {'accuracy': 1.0, 'n': 1}},
        'overall': {'accuracy': 0.75, 'n': 4},
    }


def test_score_rejects_missing_fields_and_empty_input():
    with pytest.raises(ValueError, match='answer'):
        scoring.score([{'task': 't', 'modality': 'm', 'prediction': 'x'}])
    with pytest.raises(ValueError, match='empty'):
        scoring.score([])
