"""Launch-environment detection: torchrun, srun (SLURM) and single process, and the inconsistent cases."""

import pytest

from dinov2_repro.distributed.env import (
    DistEnvError,
    detect_env,
    expand_hostlist,
    init_distributed,
    parse_tasks_per_node,
    teardown,
)


def test_single_process_without_launcher_variables():
    env = detect_env({"PATH": "/usr/bin"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")
    assert env.is_main and not env.is_distributed


def test_torchrun_variables():
    env = detect_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                      "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.source) == ("node7", 29400, "torchrun")
    assert not env.is_main and env.is_distributed


def test_torchrun_wins_over_slurm_inside_an_allocation():
    # `srun torchrun --nproc-per-node 4`: one SLURM task per node, but torchrun's ranks are the real ones.
    env = detect_env({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1",
                      "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (6, 8, 2, "torchrun")


@pytest.mark.parametrize("environ, words", [
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, ["RANK=3", "WORLD_SIZE=2"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, ["MASTER_ADDR"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, ["MASTER_PORT"]),
    ({"RANK": "0"}, ["WORLD_SIZE"]),
    ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK", "'x'"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
      "MASTER_PORT": "1"}, ["LOCAL_RANK=2"]),
])
def test_inconsistent_torchrun_env_is_named(environ, words):
    with pytest.raises(DistEnvError) as info:
        detect_env(environ)
    for word in words:
        assert word in str(info.value)


def _slurm(**extra):
    base = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
            "SLURM_JOB_NODELIST": "gpu[07-08]"}
    base.update(extra)
    return base


def test_srun_without_torchrun():
    env = detect_env(_slurm())
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu07" and env.source == "slurm"
    assert env.master_port == 20000 + 123456 % 20000  # derived from the job id, identical on every task


def test_srun_uneven_tasks_per_node_and_explicit_master():
    env = detect_env(_slurm(SLURM_PROCID="8", SLURM_NTASKS="9", SLURM_LOCALID="0", SLURM_NODEID="2",
                            SLURM_TASKS_PER_NODE="4(x2),1", MASTER_ADDR="login1", MASTER_PORT="4242"))
    assert (env.world_size, env.local_world_size, env.master_addr, env.master_port) == (9, 1, "login1", 4242)


def test_batch_script_is_a_single_process():
    # sbatch's script and salloc shells carry SLURM_PROCID/NTASKS but are no job step: one process.
    env = detect_env({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"})
    assert env.source == "single" and env.world_size == 1


@pytest.mark.parametrize("extra, words", [
    (dict(SLURM_PROCID="8"), ["SLURM_PROCID=8", "SLURM_NTASKS=8"]),
    (dict(SLURM_TASKS_PER_NODE="4,3"), ["SLURM_TASKS_PER_NODE", "sums to 7", "SLURM_NTASKS=8"]),
    (dict(SLURM_NPROCS="4"), ["SLURM_NPROCS=4", "SLURM_NTASKS=8"]),
    (dict(SLURM_LOCALID="4"), ["SLURM_LOCALID=4"]),
    (dict(SLURM_JOB_NODELIST="gpu[08-07]"), ["gpu[08-07]"]),
])
def test_inconsistent_slurm_env_is_named(extra, words):
    with pytest.raises(DistEnvError) as info:
        detect_env(_slurm(**extra))
    for word in words:
        assert word in str(info.value)


def test_slurm_uniform_tasks_per_node_must_match_ntasks():
    environ = _slurm(SLURM_NTASKS_PER_NODE="3", SLURM_JOB_NUM_NODES="2")
    del environ["SLURM_TASKS_PER_NODE"]
    with pytest.raises(DistEnvError, match="SLURM_NTASKS_PER_NODE=3 x 2 nodes != SLURM_NTASKS=8"):
        detect_env(environ)


@pytest.mark.parametrize("hostlist, hosts", [
    ("node1", ["node1"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[9-11],b2", ["a9", "a10", "a11", "b2"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x[008-010]", ["x008", "x009", "x010"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(DistEnvError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node("2(3)")


def test_single_env_creates_no_process_group():
    import torch.distributed as dist

    assert init_distributed(detect_env({}), device_type="cpu") is None
    assert not dist.is_initialized()
    teardown()  # harmless without a group
