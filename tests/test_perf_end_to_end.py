"""benchmarks/end_to_end.py on CPU: the real loader (CPU or device-side augmentation) feeds the real step.
Checks that it runs and reports consistent timings; no speed is asserted."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import end_to_end  # noqa: E402

TINY = ["--device", "cpu", "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--global-size", "28",
        "--local-size", "14", "--local-crops", "2", "--batch-size", "2", "--iters", "2", "--warmup", "1",
        "--n-prototypes", "32", "--precision", "fp32", "--num-workers", "0", "--n-images", "6", "--image-size", "48",
        "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        "ibot.head_bottleneck_dim=16"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: threads only add barrier waits
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("extra", [[], ["--gpu-augment", "--augmentation", "mri"]])
def test_end_to_end_runs_and_reports(tmp_path, capsys, extra):
    out_json = tmp_path / "e2e.json"
    assert end_to_end.main(TINY + extra + ["--json-out", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "device waits for data:" in printed and "images/s" in printed
    result = json.loads(out_json.read_text())
    assert result["dataset"]["n_images"] == 6
    iterations = result["iterations"]
    assert len(iterations) == 3 and result["warmup"] == 1
    for record in iterations:  # the parts add up to the iteration
        parts = record["data_wait_s"] + record["augment_s"] + record["step_s"]
        assert parts == pytest.approx(record["iter_s"], rel=1e-6, abs=1e-6)
    assert result["mean_iter_s"] == pytest.approx(sum(r["iter_s"] for r in iterations[1:]) / 2)
    assert result["device_waits_for_data"] == (result["data_wait_fraction"] > end_to_end.WAIT_THRESHOLD)
    assert (result["mean_augment_s"] > 0) == bool(extra)
