"""The 8- and 64-GPU presets and docs/launching.md: snippets load, numbers add up, documented commands run."""

import re
import shlex
from pathlib import Path

import pytest

from dinov2_repro.distributed import submit as S
from dinov2_repro.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "launching.md"


@pytest.mark.parametrize("preset, world, batch, lr, momentum, prototypes, parallelism", [
    ("vitb14_8gpu.yaml", 8, 512, 0.004 * 0.5 ** 0.5, 0.996, 32768, "ddp"),
    ("vitl14_64gpu.yaml", 64, 2048, 0.004 * 2 ** 0.5, 0.992, 65536, "fsdp"),
])
def test_multi_gpu_presets(preset, world, batch, lr, momentum, prototypes, parallelism):
    cfg = load_config(REPO / "configs" / "train" / preset)
    got_batch, got_lr, _ = S.effective_batch_and_lr(cfg, world)
    assert got_batch == batch and got_lr == pytest.approx(lr)
    assert cfg.teacher.momentum_teacher == momentum
    assert cfg.dino.head_n_prototypes == cfg.ibot.head_n_prototypes == prototypes
    assert cfg.compute.parallelism == parallelism and cfg.student.patch_size == 14
    assert cfg.crops.local_crops_size % 14 == 0 and cfg.crops.global_crops_size % 14 == 0


def _yaml_blocks(text):
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


def test_doc_snippets_load_and_match_their_stated_batch(tmp_path):
    snippets = _yaml_blocks(DOC.read_text())
    assert len(snippets) == 3
    rows = []
    for i, snippet in enumerate(snippets):
        header = re.match(r"# (\d+) GPUs?, effective batch (\d+)", snippet)
        assert header, snippet.splitlines()[0]
        gpus, batch = int(header.group(1)), int(header.group(2))
        path = tmp_path / f"snippet{i}.yaml"
        path.write_text(snippet)
        cfg = load_config(path)
        assert S.effective_batch_and_lr(cfg, gpus)[0] == batch
        rows.append((batch, cfg.teacher.momentum_teacher, cfg.dino.head_n_prototypes))
    # the advice: the smaller the batch, the slower the teacher and the fewer the prototypes
    rows.sort()
    assert [r[0] for r in rows] == [64, 512, 2048]
    assert all(a[1] > b[1] and a[2] < b[2] for a, b in zip(rows, rows[1:]))


def test_doc_snippets_equal_the_preset_files(tmp_path):
    snippets = {int(re.match(r"# (\d+) GPU", s).group(1)): s for s in _yaml_blocks(DOC.read_text())}
    for gpus, preset in [(8, "vitb14_8gpu.yaml"), (64, "vitl14_64gpu.yaml")]:
        path = tmp_path / f"s{gpus}.yaml"
        path.write_text(snippets[gpus])
        from_doc = load_config(path, ["data.kind=auto", "data.num_workers=8",
                                      f"train.output_dir=runs/{preset[:-5]}", "checkpoint.keep_last=3"])
        from_file = load_config(REPO / "configs" / "train" / preset)
        assert config_to_dict(from_doc) == config_to_dict(from_file), preset


def _commands(text, prefix):
    joined = text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith(prefix)]


@pytest.mark.parametrize("doc, at_least", [(DOC, 3), (REPO / "README.md", 2)])
def test_documented_submit_commands_dry_run(capsys, doc, at_least):
    commands = _commands(doc.read_text(), "dinov2-repro submit")
    assert len(commands) >= at_least, doc
    for command in commands:
        argv = shlex.split(command)[2:]
        cut = argv.index("--")
        if "--dry-run" not in argv[:cut]:
            argv.insert(cut, "--dry-run")
        assert S.main(argv) == 0, command
        assert "#SBATCH --nodes=" in capsys.readouterr().out
