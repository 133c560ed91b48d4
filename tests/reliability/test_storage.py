"""A workdir that runs out of storage, or cannot be written at all, stops the run with one line
naming the path and the free space; the last good checkpoint survives, and once space is freed
the same command resumes and ends exactly where an uninterrupted run does.

The small filesystems are real: a tmpfs of a few MiB (or a few inodes) mounted in a private mount
namespace (`unshare -Urm`), which goes away with the test's shell.
"""

import shlex
import shutil
import subprocess

import pytest

from tests.reliability.conftest import ROOT, assert_same_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which('unshare') is None
        or subprocess.run(['unshare', '-Urm', 'true'], capture_output=True).returncode != 0,
        reason='needs a private mount namespace (unshare -Urm) to mount a small tmpfs',
    ),
]


def _in_small_filesystem(runner, tmp_path, size: str, *hooks: str) -> dict:
    """Runs the experiment (with the driver's `hooks`) on a tmpfs of `size`, then frees space
    (a bigger tmpfs, without what the hooks wrote) and runs the same command again; returns both
    runs' exit codes and output, and a copy of the workdir."""
    mount, out = tmp_path / 'mount', tmp_path / 'out'
    mount.mkdir()
    out.mkdir()
    workdir = mount / 'w'
    script = f"""
        set -u
        mount -t tmpfs -o size={size} tmpfs {mount}
        {shlex.join(runner.command(workdir, *hooks))} > {out}/first.log 2>&1
        echo $? > {out}/first.rc
        rm -f {workdir}.filler && mount -o remount,size=64m {mount}
        {shlex.join(runner.command(workdir))} > {out}/second.log 2>&1
        echo $? > {out}/second.rc
        cp -r {workdir} {out}/w
    """
    subprocess.run(
        ['unshare', '-Urm', 'bash', '-c', script], cwd=ROOT, env=runner.env(), check=True,
        timeout=900,
    )
    return {
        run: (int((out / f'{run}.rc').read_text()), (out / f'{run}.log').read_text())
        for run in ('first', 'second')
    } | {'workdir': out / 'w'}


def _one_error_line(output: str) -> str:
    assert 'Traceback' not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def test_a_full_disk_stops_at_the_checkpoint_and_the_run_resumes(runner, reference_run, tmp_path):
    # Room for the first checkpoint (step 3) and the logs, not for the second (step 6): refused
    # before a byte of it is written.
    runs = _in_small_filesystem(runner, tmp_path, '4000k')
    code, output = runs['first']
    assert code == 2, output[-3000:]
    error = _one_error_line(output)
    assert 'needed for the next checkpoint' in error and 'free of' in error, error
    assert '/w/s/checkpoints' in error and 'last good checkpoint (step 3) is kept' in error, error
    code, output = runs['second']
    assert code == 0, output[-3000:]
    assert 'resumed at step 3' in output
    assert_same_run(runs['workdir'], reference_run)


def test_a_disk_filling_up_while_logging_is_one_line_and_resumes(runner, reference_run, tmp_path):
    # Another program takes the space after step 4: the metrics write of step 5 fails (ENOSPC).
    runs = _in_small_filesystem(runner, tmp_path, '16m', '--fill_disk_after_step=4')
    code, output = runs['first']
    assert code == 2, output[-3000:]
    error = _one_error_line(output)
    assert '/mount/w/s' in error and 'no space left on the device (0.0 MiB free of' in error, error
    assert 'last good checkpoint (step 3) is kept' in error, error
    code, output = runs['second']
    assert code == 0, output[-3000:]
    assert 'resumed at step 3' in output
    assert_same_run(runs['workdir'], reference_run)


def test_a_read_only_or_file_workdir_is_refused_before_training(runner, tmp_path):
    mount = tmp_path / 'mount'
    mount.mkdir()
    (tmp_path / 'a_file').write_text('')
    read_only = subprocess.run(
        [
            'unshare', '-Urm', 'bash', '-c',
            f'mount -t tmpfs -o size=1m,ro tmpfs {mount} && '
            + shlex.join(runner.command(mount / 'w')),
        ],
        cwd=ROOT, env=runner.env(), capture_output=True, text=True, timeout=600,
    )
    assert read_only.returncode == 2, read_only.stderr[-3000:]
    error = _one_error_line(read_only.stdout + read_only.stderr)
    assert f'{mount}/w' in error and 'read-only' in error and '--workdir' in error, error
    as_file = runner(tmp_path / 'a_file')
    assert as_file.returncode == 2, as_file.stderr[-3000:]
    error = _one_error_line(as_file.stdout + as_file.stderr)
    assert f'{tmp_path / "a_file"} is a file, not a directory' in error, error
