"""`wsi tile` as a SLURM array: --shard splits the sorted slides, `submit --task wsi_tile` shows and submits one
array (fake sbatch), and each pickled task tiles its own share, resumably."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytest.importorskip("tiffslide")
from test_launch_submit import _fake_slurm  # noqa: E402
from wsi_slides import draw_slide, write_slide  # noqa: E402

from dinov2_repro.distributed import submit as S  # noqa: E402
from dinov2_repro.wsi.cli import main as wsi_main  # noqa: E402


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    for i in range(3):
        write_slide(folder / f"s{i}.tif", draw_slide(768, 512, seed=i)[0], mpp=0.5, n_levels=2)
    return folder


TILE = ["--mpp", "0.5", "--tile-size", "64", "--no-progress"]


def test_shards_split_the_sorted_slides_and_bad_shards_are_refused(slides, tmp_path, capsys):
    out = tmp_path / "tiles"
    assert wsi_main(["tile", str(slides), "--out", str(out), *TILE, "--shard", "1/2"]) == 0
    assert sorted(p.name for p in out.glob("*.done.json")) == ["s1.done.json"]  # [s0, s1, s2][1::2]
    assert wsi_main(["tile", str(slides), "--out", str(out), *TILE, "--shard", "0/2"]) == 0
    assert sorted(p.name for p in out.glob("*.done.json")) == ["s0.done.json", "s1.done.json", "s2.done.json"]
    for bad in ("2/2", "x"):
        with pytest.raises(SystemExit):
            wsi_main(["tile", str(slides), "--out", str(out), "--shard", bad])
        assert "--shard" in capsys.readouterr().err


def test_dry_run_shows_the_array_and_each_tasks_command(slides, tmp_path, capsys):
    out = tmp_path / "tiles"
    argv = ["--task", "wsi_tile", "--array-tasks", "2", "--time", "60", "--dry-run", "--",
            str(slides), "--out", str(out), *TILE]
    assert S.main(argv) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --array=0-1%2" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "an array of 2 task(s) over 3 slide(s)" in text and "--shard I/2" in text
    assert not out.exists()  # a dry run writes nothing
    assert S.main(["--task", "wsi_tile", "--dry-run", "--", str(slides), "--out", str(out), *TILE]) == 0
    assert "#SBATCH --array=0-2%3" in capsys.readouterr().out  # default: one task per slide
    assert S.main(["--task", "wsi_tile", "--dry-run", "--", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "nothing" in capsys.readouterr().err


def test_submitted_array_tasks_tile_their_share_and_resume(slides, tmp_path, monkeypatch, capsys):
    received = _fake_slurm(tmp_path, monkeypatch, job_id="9001")
    out = tmp_path / "tiles"
    argv = ["--task", "wsi_tile", "--array-tasks", "2", "--", str(slides), "--out", str(out), *TILE]
    expected = S.render_sbatch(S.prepare_submission(argv))
    assert S.main(argv) == 0
    assert received.read_text() == expected  # the dry run shows exactly what sbatch gets
    assert "submitted job 9001" in capsys.readouterr().out
    record = S.read_job_records(out)[0]
    assert (record["task"], record["array_tasks"]) == ("wsi_tile", 2)
    jobs = S.prepare_submission(argv).job
    assert [job.argv[-1] for job in jobs] == ["0/2", "1/2"]
    jobs[1]()  # what array task 1 runs on its node
    assert sorted(p.name for p in out.glob("*.done.json")) == ["s1.done.json"]
    jobs[0]()
    jobs[0]()  # a requeued task finds its slides done
    assert sorted(p.name for p in out.glob("*.done.json")) == ["s0.done.json", "s1.done.json", "s2.done.json"]
    assert "already done" in capsys.readouterr().out
