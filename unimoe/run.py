"""One experiment end to end: data, every stage in order (resuming / skipping), evaluation."""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import ml_collections

from unimoe import compilation_cache, storage
from unimoe.data import builtin
from unimoe.data.tokenizer import TextTokenizer
from unimoe.experiment import ExperimentConfig
from unimoe.eval import evaluate
from unimoe.train import trainer, validate, workdir as workdir_lib

log = logging.getLogger(__name__)

def prepare_data(experiment: ExperimentConfig) -> TextTokenizer:
    """The tokenizer of the experiment's data.

    With `config.tokenizer` (stages reading Uni-MoE JSON data, prepared with
    `data.json_builder`): that pretrained LM tokenizer. Otherwise builds the built-in dataset if
    it is missing and returns the tokenizer stored beside it.
    """
    data = experiment.data
    if not experiment.tokenizer:
        builtin.prepare(data.data_dir, data.builder_config)
    return builtin.experiment_tokenizer(
        experiment.tokenizer, data.data_dir, on_missing='train_and_save'
    )


def run_experiment(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains the stages `config.stage_order` lists, evaluates, and returns the results table.

    `config` is where an experiment enters: it is typed and checked here, once
    (`validate.validate_experiment`), and against what `workdir` has trained (`train.workdir`). Raises `unimoe.train.preemption.Preempted` if SIGTERM /
    SIGINT stopped training (after a checkpoint); calling it again resumes.
    """
    experiment = validate.validate_experiment(config)
    workdir_path = pathlib.Path(workdir)
    storage.check_writable(workdir_path, '--workdir')
    # Refused before anything is written: config.json keeps saying what was trained.
    workdir_lib.check_unchanged(experiment, workdir_path)
    if jax.process_index() == 0:
        with storage.storage_errors(workdir_path, lambda: 'free space and run again'):
            workdir_lib.write_run_config(config, workdir_path)
    compilation_cache.enable(experiment.compilation_cache_dir)
    started = time.perf_counter()
    tokenizer = prepare_data(experiment)
    trainer.run_stages(experiment, workdir_path, tokenizer)
    table = ''
    if experiment.eval.stages:
        table = evaluate.evaluate(experiment, workdir_path, tokenizer)
    log.info('experiment finished in %.0f s', time.perf_counter() - started)
    log.info('%s', compilation_cache.summary())
    (workdir_path / 'timing.json').write_text(
        json.dumps({'seconds': time.perf_counter() - started}) + '\n'
    )
    return table
