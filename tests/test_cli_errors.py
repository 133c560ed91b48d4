"""A researcher's mistakes on `python -m unimoe.main` end with one line each naming what to change
and exit code 2, before anything trains, with no traceback (`--debug` shows it)."""

import subprocess
import sys

import pytest

TINY = '--config=configs/unimoe_tiny.py:mode=test'


def _main(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'unimoe.main', *args, f'--config.data.data_dir={tmp_path}/data']
        if args[0] == TINY
        else [sys.executable, '-m', 'unimoe.main', *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    'args, errors',
    [
        (
            # Every problem at once, each under its config path (the run and --dry_run alike).
            (
                '--config.stages.s3_moe.learning_rate=-1',
                '--config.stages.s2_audio.batch_size=0',
                '--config.stages.s2_image.micro_batches=5',
                '--config.eval.tasks=text_qa,bogus',
                '--dry_run',
            ),
            [
                'error: config.stages.s2_image.micro_batches=5 must be >= 1 and divide '
                'batch_size=32',
                'error: config.stages.s2_audio.batch_size=0 must be >= 1',
                'error: config.stages.s3_moe.learning_rate must be > 0, got -1.0',
                "error: config.eval.tasks names unknown tasks ['bogus']; the built-in ones: ",
            ],
        ),
        (('--config.checkpoint_every=0', '--dry_run'), ['error: config.checkpoint_every=0 must be >= 1']),
        (
            # A partial stage order would train, then fail to evaluate stages it never ran.
            ('--config.stage_order=s0_llm', '--workdir={tmp}/run'),
            ["error: config.eval.stages names ['s2_image', 's2_video', 's2_speech', 's2_audio', "],
        ),
        (('--config.foo=3', '--dry_run'), ["error: the config has no field 'foo'"]),
        (
            ('--config.model.moe.top_kk=1', '--dry_run'),
            ["error: the config has no field 'top_kk' (did you mean top_k?): check the --config"],
        ),
    ],
)
def test_config_mistakes_are_one_line_each_with_exit_code_2(args, errors, tmp_path):
    result = _main(TINY, *(a.format(tmp=tmp_path) for a in args), tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(lines) == len(errors)
    for line, expected in zip(lines, errors):
        assert line.startswith(expected), line
    assert 'Traceback' not in result.stderr + result.stdout
    # Nothing was prepared, trained or written.
    assert not (tmp_path / 'data').exists() and not (tmp_path / 'run').exists()


def test_a_missing_config_file_and_the_debug_flag(tmp_path):
    result = _main('--config=configs/nope.py', '--dry_run', tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: [Errno 2] No such file or directory: 'configs/nope.py'"
    )
    assert 'Traceback' not in result.stderr
    debug = _main(TINY, '--config.stages.s3_moe.learning_rate=-1', '--dry_run', '--debug', tmp_path=tmp_path)
    assert debug.returncode == 2 and 'Traceback' in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith('error: config.stages.s3_moe.learning_rate')


@pytest.mark.parametrize(
    'module, args, error',
    [
        (
            'unimoe.eval',
            ('--config=configs/nope.py', '--checkpoint=x', '--benchmark=aokvqa', '--data=y'),
            "error: [Errno 2] No such file or directory: 'configs/nope.py'",
        ),
        (
            'unimoe.train.lower',
            ('--config=configs/paper_scale.py:size=test', '--config.foo=1'),
            "error: the config has no field 'foo': check the --config.* flags",
        ),
        (
            'unimoe.train.lower',
            ('--config=configs/paper_scale.py:size=test', '--config.target_device=h800'),
            "error: config.target_device='h800': expected one of "
            "['a100', 'h100', 'h200', 'v4', 'v5e', 'v5p']",
        ),
    ],
)
def test_the_other_command_lines_report_config_mistakes_alike(module, args, error):
    result = subprocess.run(
        [sys.executable, '-m', module, *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == error
    assert 'Traceback' not in result.stderr


def test_eval_checks_its_files_before_building_the_model(tmp_path):
    (tmp_path / 'media.zip').write_bytes(b'PK\x03\x04 truncated')
    args = [
        TINY,
        f'--checkpoint={tmp_path}/run/s3_moe',
        '--benchmark=aokvqa',
        '--data=/nope.json',
        f'--answers={tmp_path}',
        f'--media-root={tmp_path}/media.zip',
    ]
    result = subprocess.run(
        [sys.executable, '-m', 'unimoe.eval', *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'error: --data /nope.json does not exist: give a file',
        f'error: --answers {tmp_path} is a directory: give a file',
        f'error: media root {tmp_path}/media.zip is a file but not a zip archive (corrupt or '
        'truncated?)',
    ]
