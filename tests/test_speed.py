"""``dtg bench speed`` smoke test on the tiny dataset (a benchmark is run by hand; this only checks it runs)."""

import pytest

from dtg.cli import main
from dtg.config import save_config

from conftest import tiny_config

pytestmark = pytest.mark.slow


def test_speed_bench_step_profile_and_gpu_line_on_tiny_sizes(tiny_dataset, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(tiny_dataset, tmp_path / "unused", "data.batch_unlabeled=2"), config)
    out = tmp_path / "speed.md"
    argv = ["bench", "speed", "--config", str(config), "--repeat", "1", "--warmup", "0", "--profile",
            "--profile-steps", "1", "--sections", "step", "gpu", "--nms-sizes", "100",
            "--anchors", "500", "--aug-images", "1", "--loader-batches", "1", "--out", str(out)]
    assert main(argv) == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    for heading in ("## (a) step cost", "## profile of 1 dtg steps", "host reads of tensor values",
                    "## (f) GPU"):
        assert heading in text
    for method in ("supervised", "sparse", "dtg", "lower bound"):
        assert f"| {method} |" in text
    assert "dtg / lower bound = " in text and "load average" in text
