"""The whole recipe at test size: every stage trains, checkpoints, resumes, and is evaluated."""

import json
import shutil

import numpy as np

from unimoe import checkpoint, factory, run
from unimoe.eval import evaluate
from unimoe.train import metrics


def test_recipe_trains_every_stage_resumes_and_evaluates(tiny_recipe_run, tmp_path):
    config, shared_workdir, table = tiny_recipe_run
    workdir = tmp_path / 'run'
    shutil.copytree(shared_workdir, workdir)  # the interruption below must not touch the original

    stage_names = config.stage_order.split(',')
    for name in stage_names:
        logged = metrics.read_metrics(workdir / name)
        assert logged and logged[-1]['step'] == config.stages[name].steps, name
        assert all(np.isfinite(row['loss']) for row in logged), name
        assert list((workdir / name).glob('events.out.tfevents.*')), name
        # No logged step is the first (it compiles), so each has its rates; classification
        # stages run no text through the LM, so they have no tokens per second.
        has_text = config.stages[name].mode in ('chat', 'lm_text')
        for row in logged:
            assert row['step_time_s'] > 0 and row['examples_per_s'] > 0, name
            assert ('tokens_per_s' in row) == has_text and row.get('tokens_per_s', 1) > 0, name
    # Each source contributes what it trained: the LM of s0_llm, the ViT of s0_vision, not their
    # random copies of each other's parts.
    s0_llm, s0_vision = (
        factory.final_params(workdir, 's0_llm'),
        factory.final_params(workdir, 's0_vision'),
    )
    s1 = factory.final_params(workdir, 's1_align')
    assert 'vision/patch_embedding/kernel' not in s0_llm
    np.testing.assert_array_equal(s1['llm/embed/embedding'], s0_llm['llm/embed/embedding'])
    np.testing.assert_array_equal(
        s1['vision/patch_embedding/kernel'], s0_vision['vision/patch_embedding/kernel']
    )
    s3_log = metrics.read_metrics(workdir / 's3_moe')[-1]
    moe = config.model.moe
    assert np.asarray(s3_log['expert_load']).shape == (config.model.llm.num_layers, moe.num_experts)
    assert s3_log['balance_loss'] > 0

    results = json.loads((workdir / 'results.json').read_text())
    assert list(results['models']) == ['s2_image', 's2_video', 's2_speech', 's2_audio', 's3_moe']
    for scores in results['models'].values():
        assert set(scores['tasks']) == set(config.eval.tasks.split(','))
        assert all(s['n'] == 8 for s in scores['tasks'].values())
    assert (workdir / 'results.md').read_text() == table
    assert table.splitlines()[-1].startswith('| chance |')

    # Interrupt the last stage: drop its final checkpoint and completion marker, keep step 10.
    first_run = factory.final_params(workdir, 's3_moe')
    ckpt_dir = workdir / 's3_moe' / 'checkpoints'
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ['10', '12']
    shutil.rmtree(ckpt_dir / '12')
    (ckpt_dir / checkpoint.DONE_FILE).unlink()
    s0_log_lines = (workdir / 's0_llm' / 'metrics.jsonl').read_text()

    cached = {
        name: (workdir / name / evaluate.SCORES_FILE).read_text() for name in results['models']
    }
    resumed_table = run.run_experiment(config, str(workdir))
    resumed = factory.final_params(workdir, 's3_moe')
    # Unchanged stage-2 models reuse their scores; the retrained s3_moe is evaluated again.
    for name, text in cached.items():
        assert ((workdir / name / evaluate.SCORES_FILE).read_text() == text) == (name != 's3_moe')
    assert resumed_table.splitlines()[:-2] == table.splitlines()[:-2]
    assert (workdir / 's0_llm' / 'metrics.jsonl').read_text() == s0_log_lines  # skipped
    assert resumed.keys() == first_run.keys()
    for key, value in first_run.items():
        np.testing.assert_allclose(resumed[key], value, atol=1e-6, err_msg=key)
