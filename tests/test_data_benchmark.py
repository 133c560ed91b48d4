"""`benchmarks/data_pipeline.py --quick` still runs end to end and ends with its RESULT line.

Only the format is checked: timings on a shared CPU do not belong in tests.
"""

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "data_pipeline.py"


def test_data_pipeline_benchmark_quick_run_ends_with_result_line():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    fields = dict(item.split("=") for item in last.removeprefix("RESULT ").split())
    assert list(fields) == ["pipeline_samples_per_s", "step_samples_per_s", "ratio"]
    values = {k: float(v) for k, v in fields.items()}
    assert all(v > 0 for v in values.values()), fields
    ratio = values["pipeline_samples_per_s"] / values["step_samples_per_s"]
    assert abs(values["ratio"] - ratio) <= 0.01 * ratio + 0.01, fields
