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


def test_cpu_kernels_section_measures_both_modes_in_fresh_processes(tiny_dataset, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(tiny_dataset, tmp_path / "unused", "data.batch_unlabeled=2"), config)
    out = tmp_path / "speed.md"
    argv = ["bench", "speed", "--config", str(config), "--repeat", "1", "--warmup", "0", "--sections", "cpu-kernels",
            "--rounds", "1", "--out", str(out)]
    assert main(argv) == 0
    text = out.read_text()
    assert "## (g) cpu_kernels: portable against fast" in text and "## (a) step cost" not in text
    rows = [ln.split("|") for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert [r[1].strip() for r in rows] == ["supervised", "sparse", "dtg", "lower bound"]
    for r in rows:
        fast, port, ratio = float(r[2]), float(r[3]), float(r[4])
        rounding = 0.0005 * (1 / fast + port / fast**2) + 0.005  # times printed to 3 decimals, the ratio to 2
        assert fast > 0 and port > 0 and ratio == pytest.approx(port / fast, abs=rounding)


def test_kernel_modes_alternate_their_order():
    from dtg.bench.speed_kernels import ratio_table, round_order

    assert [round_order(r) for r in range(3)] == [("fast", "portable"), ("portable", "fast"), ("fast", "portable")]
    table = ratio_table({"fast": [{"dtg": 1.0}, {"dtg": 2.0}, {"dtg": 1.2}], "portable": [{"dtg": 1.1}, {"dtg": 2.4}, {"dtg": 1.2}]})
    assert "| dtg | 1.200 | 1.200 | 1.00 | 1.10, 1.20, 1.00 |" in table
