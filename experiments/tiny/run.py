r"""Runs the tiny ablation arms and writes their comparison table and expert-usage heatmaps.

  python -m experiments.tiny.run --workdir=runs/tiny_claims [--arms=moe4,dense,...]
      [--base_workdir=runs/demo] [--figures_dir=experiments/tiny]

The base arm (`moe4`, the recipe `make demo` runs) trains stages 0-3 in `<workdir>/moe4`, or is
read from `--base_workdir` (e.g. a finished `make demo`); every other arm links the base arm's
stages 0-2 into `<workdir>/<arm>` and trains only its own stage 3. Finished stages are skipped, so
an interrupted run continues where it stopped. Writes `<workdir>/summary.md` and `summary.json`,
and `expert_usage.png` (per modality, per arm) and `expert_usage_layers.png` (the base arm, per
layer) into `--figures_dir` (default: the workdir).
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from experiments.tiny import config as arms_config
from unimoe import experiment, run
from unimoe.data import pipeline, tasks as tasks_lib
from unimoe.eval import evaluate
from unimoe.eval.routing_analysis import expert_usage_by_layer
from unimoe.experiment import ExperimentConfig

_WORKDIR = flags.DEFINE_string('workdir', 'runs/tiny_claims', 'One subdirectory per arm.')
_ARMS = flags.DEFINE_list('arms', list(arms_config.ARMS), 'Arms to run, from ARMS.')
_MODE = flags.DEFINE_enum('mode', 'demo', ['demo', 'test'], 'The tiny config arm (test: seconds).')
_BASE_WORKDIR = flags.DEFINE_string(
    'base_workdir', None, 'A finished run of configs/unimoe_tiny.py to use as the moe4 arm.'
)
_FIGURES_DIR = flags.DEFINE_string('figures_dir', None, 'Where the PNGs go (default: workdir).')

USAGE_FILE = 'expert_usage.json'
log = logging.getLogger('unimoe')


def link_shared_stages(
    config: ExperimentConfig,
    base_config: ExperimentConfig,
    arm_dir: pathlib.Path,
    base_dir: pathlib.Path,
) -> list[str]:
    """Symlinks into `arm_dir` every stage of `config` that the base arm also defines; returns them.

    A shared stage must be configured exactly as in the base arm, or its checkpoint would not be
    what this arm's config says it is.
    """
    arm_dir.mkdir(parents=True, exist_ok=True)
    shared = [s for s in config.stage_order if s in base_config.stages]
    for name in shared:
        if config.stage(name) != base_config.stage(name):
            raise ValueError(f'stage {name!r} differs from the base arm; give it its own name')
        link = arm_dir / name
        if not link.exists():
            link.symlink_to((base_dir / name).resolve(), target_is_directory=True)
    return shared


def save_expert_usage(
    config: ExperimentConfig, stage: str, arm_dir: pathlib.Path, tokenizer: Any
) -> dict[str, list]:
    """The stage's share of routed assignments per modality, layer and expert on the eval split."""
    model = evaluate.load_finished_stage(config, stage, arm_dir, tokenizer)
    examples = pipeline.load_eval_examples(config.data, tokenizer, list(config.eval.tasks))
    batch_size = config.eval.batch_size
    usage = expert_usage_by_layer(model, pipeline.collate(examples, batch_size))
    result = {modality: u.tolist() for modality, u in usage.items()}
    (arm_dir / USAGE_FILE).write_text(json.dumps(result) + '\n')
    return result


def last_expert_load(arm_dir: pathlib.Path, stage: str) -> list[list[float]] | None:
    """The last logged training `expert_load` [layers, experts] of a stage (None if dense)."""
    lines = (arm_dir / stage / 'metrics.jsonl').read_text().splitlines()
    loads = [json.loads(line)['expert_load'] for line in lines if '"expert_load"' in line]
    return loads[-1] if loads else None


def summarize(
    results: Mapping[str, Mapping[str, Any]],
    chance: Mapping[str, float],
    loads: Mapping[str, list[list[float]] | None],
) -> tuple[str, dict[str, dict[str, float]]]:
    """Markdown table of the arms: per-task accuracy, mean, and the performance-bias measures.

    Skill is accuracy rescaled so chance is 0 and perfect is 1, `(acc - chance) / (1 - chance)`,
    which makes tasks of different difficulty comparable; the skill range (best task minus worst)
    is the per-modality spread the paper calls performance bias. Max load is the largest share of
    training assignments any expert of any layer received in the last logged step.
    """
    tasks = list(chance)
    header = ['arm', *tasks, 'mean acc', 'mean skill', 'min skill', 'skill range', 'max load']
    lines = ['| ' + ' | '.join(header) + ' |', '|---' + '|---:' * (len(header) - 1) + '|']
    numbers = {}
    for arm, scores in results.items():
        accuracy = [scores['tasks'][t]['accuracy'] for t in tasks]
        skill = [(a - chance[t]) / (1 - chance[t]) for a, t in zip(accuracy, tasks)]
        load = loads.get(arm)
        numbers[arm] = {
            'mean_accuracy': float(np.mean(accuracy)),
            'mean_skill': float(np.mean(skill)),
            'min_skill': float(np.min(skill)),
            'skill_range': float(np.max(skill) - np.min(skill)),
            'max_load': float(np.max(load)) if load else float('nan'),
            'num_experts': len(load[0]) if load else 0,
        }
        n = numbers[arm]
        cells = [f'{100 * a:.1f}' for a in accuracy]
        cells += [f"{100 * n['mean_accuracy']:.1f}", f"{n['mean_skill']:.3f}"]
        cells += [f"{n['min_skill']:.3f}", f"{n['skill_range']:.3f}"]
        cells.append(f"{n['max_load']:.2f} (1/{n['num_experts']})" if load else '-')
        lines.append('| ' + ' | '.join([arm, *cells]) + ' |')
    lines.append('| chance | ' + ' | '.join(f'{100 * chance[t]:.1f}' for t in tasks) + ' |')
    return '\n'.join(lines) + '\n', numbers


def draw_heatmaps(
    panels: Sequence[tuple[str, np.ndarray, Sequence[str]]],
    modalities: Sequence[str],
    path: pathlib.Path,
) -> None:
    """Side-by-side heatmaps of (title, grid [modalities, experts], expert names), one PNG."""
    widths = [len(names) for _, _, names in panels]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(0.5 * sum(widths) + 0.6 * len(panels) + 2, 3.4),
        squeeze=False,
        gridspec_kw={'width_ratios': widths, 'wspace': 0.15},
    )
    for i, ((title, grid, names), ax) in enumerate(zip(panels, axes[0])):
        image = ax.imshow(grid, vmin=0, vmax=0.6, cmap='viridis', aspect='auto')
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(modalities)), modalities if i == 0 else [], fontsize=7)
        for (row, col), share in np.ndenumerate(grid):
            ax.text(col, row, f'{share:.2f}', ha='center', va='center', fontsize=6, color='w')
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label='share of routed assignments')
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def plot_usage(
    usage: Mapping[str, Mapping[str, list]],
    expert_names: Mapping[str, Sequence[str]],
    figures_dir: pathlib.Path,
) -> None:
    """`expert_usage.png`: per arm, the share averaged over MoE layers; and, for the base arm,
    `expert_usage_layers.png`: one panel per MoE layer."""
    modalities = sorted(next(iter(usage.values())))
    panels = []
    for arm, by_modality in usage.items():
        grid = np.stack([np.mean(by_modality[m], axis=0) for m in modalities])
        panels.append((arm, grid, expert_names[arm]))
    draw_heatmaps(panels, modalities, figures_dir / 'expert_usage.png')
    if 'moe4' in usage:
        layers = np.stack([usage['moe4'][m] for m in modalities], axis=1)  # [L, M, E]
        panels = [(f'moe4, MoE layer {i}', g, expert_names['moe4']) for i, g in enumerate(layers)]
        draw_heatmaps(panels, modalities, figures_dir / 'expert_usage_layers.png')


def run_arms(
    arms: Sequence[str],
    workdir: pathlib.Path,
    mode: str,
    base_workdir: pathlib.Path | None,
    figures_dir: pathlib.Path,
) -> str:
    """Trains and evaluates `arms` (the base arm first); writes the summary and figures."""
    base_config = experiment.from_config_dict(arms_config.get_config(f'arm=moe4,mode={mode}'))
    base_dir = base_workdir or workdir / 'moe4'
    tokenizer = run.prepare_data(base_config)
    order = ['moe4'] + [a for a in arms if a != 'moe4']
    results, loads, usage, expert_names = {}, {}, {}, {}
    for arm in order:
        config_dict = arms_config.get_config(f'arm={arm},mode={mode}')
        config = experiment.from_config_dict(config_dict)
        arm_dir = base_dir if arm == 'moe4' else workdir / arm
        if arm != 'moe4':
            link_shared_stages(config, base_config, arm_dir, base_dir)
        log.info('arm %s in %s', arm, arm_dir)
        run.run_experiment(config_dict, str(arm_dir))
        if arm not in arms:
            continue
        stage = arms_config.stage3_name(arm)
        results[arm] = json.loads((arm_dir / 'results.json').read_text())['models'][stage]
        loads[arm] = last_expert_load(arm_dir, stage)
        if config.stage(stage).moe:
            usage[arm] = save_expert_usage(config, stage, arm_dir, tokenizer)
            sources = list(config.stage(stage).experts_from)
            if len(sources) == 1:  # copies of one FFN
                sources = [f'copy{e}' for e in range(config.model.llm.moe.num_experts)]
            expert_names[arm] = [s.removeprefix('s2_') for s in sources]
    tasks = list(base_config.eval.tasks)
    chance = {t: tasks_lib.chance_accuracy(t) for t in tasks}
    table, numbers = summarize(results, chance, loads)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'summary.md').write_text(table)
    (workdir / 'summary.json').write_text(json.dumps({'arms': numbers, 'results': results}) + '\n')
    figures_dir.mkdir(parents=True, exist_ok=True)
    if usage:
        plot_usage(usage, expert_names, figures_dir)
    return table


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger('unimoe').setLevel(logging.INFO)
    unknown = [a for a in _ARMS.value if a not in arms_config.ARMS]
    if unknown:
        raise app.UsageError(f'--arms: unknown {unknown}; known: {arms_config.ARMS}')
    workdir = pathlib.Path(_WORKDIR.value)
    base = pathlib.Path(_BASE_WORKDIR.value) if _BASE_WORKDIR.value else None
    figures = pathlib.Path(_FIGURES_DIR.value) if _FIGURES_DIR.value else workdir
    print(run_arms(_ARMS.value, workdir, _MODE.value, base, figures))


if __name__ == '__main__':
    app.run(main)
