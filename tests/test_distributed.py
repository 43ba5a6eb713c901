"""Distributed meta-training: ``abmll train`` run unchanged by ``torchrun`` on 2 CPU processes (gloo, through
Accelerate's PartialState) gives the θ of a single-process run over the same tasks, seeds and meta-batch, with
the base model replicated and with it sharded by FSDP2 (``ACCELERATE_USE_FSDP=true``, as ``accelerate launch``
sets it); each rank computes its own share of the tasks of every meta-batch; and only rank 0 writes into the
output folder.

This file is also the worker that torchrun starts (``python tests/test_distributed.py SIDE train ...``): it
runs the real ``abmll train`` command in-process and records, in SIDE/rank-R.json, the rank, the world size,
the tasks this rank computed and every write it made into --out (seen through Python's audit hooks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve()
OMP = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TASKS = [f"fam{i}" for i in range(5)]
STEPS = 3
#: A meta-batch of 4 tasks: 2 per rank on 2 ranks, so each rank also sums tasks locally.
FAST = {
    "inner": {"inner_steps": 1, "backtrack": None},  # FSDP takes no backtracking step (template.inner_loop)
    "meta": {
        "meta_batch_size": 4, "micro_batch_size": 16, "support_size": 4, "query_size": 4, "checkpoint_every": 2,
        "outer_lr": 0.01,
    },
    "objective": {"beta": 1e-3},
    "lora": {"rank": 2, "sigma_init": 0.05},
    # one scoring path for every run: with gradient checkpointing (the FSDP run) the scorer takes the plain path
    "scoring": {"shared_prefix": False},
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the worker
def _worker(side: Path, args: list[str]) -> int:
    """Run ``abmll train ARGS`` in this process; record what this rank did in SIDE/rank-R.json."""
    out = Path(args[args.index("--out") + 1]).resolve()
    writes: list[str] = []

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(out)
        except (TypeError, ValueError):
            return False

    def audit(event: str, event_args: tuple) -> None:
        if event == "open":
            path, mode, flags = event_args
            writing = (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
            )
            if writing and inside(path):
                writes.append(f"open {path}")
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            if inside(event_args[0]):
                writes.append(f"{event} {event_args[0]}")
        elif event == "os.rename" and (inside(event_args[0]) or inside(event_args[1])):
            writes.append(f"{event} {event_args[1]}")

    from abmll.distributed import is_sharded
    from abmll.methods.abmll import ABMLL

    computed: list[list[int]] = []
    sharded: list[bool] = []
    real = ABMLL.task_gradient

    def recording(self, episode, step, task_index, weight):
        computed.append([step, task_index])
        sharded.append(is_sharded(self.model))
        return real(self, episode, step, task_index, weight)

    ABMLL.task_gradient = recording
    sys.addaudithook(audit)
    from typer.main import get_command

    from abmll.cli import app

    code = get_command(app).main(args=args, prog_name="abmll", standalone_mode=False) or 0
    import torch.distributed as dist

    from abmll.distributed import world

    rank, world_size = world()
    record = {
        "rank": rank,
        "world_size": world_size,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "computed": computed,
        "sharded": sorted(set(sharded)),
        "writes": writes,
        "exit_code": code,
    }
    side.mkdir(parents=True, exist_ok=True)
    (side / f"rank-{rank}.json").write_text(json.dumps(record))
    return int(code)


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1]), sys.argv[2:]))


# ------------------------------------------------------------------------------------------------- the tests
def _run(cmd: list[str], cwd: Path, **extra_env: str) -> None:
    env = {**os.environ, **OMP, **extra_env}
    env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None), env.pop("RANK", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"


def _side(folder: Path) -> dict[int, dict]:
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("rank-*.json"))]
    return {r["rank"]: r for r in records}


def _theta(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from abmll.checkpoint import PRIOR_FILE

    return load_file(str(folder / PRIOR_FILE))


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != ".lock")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same ``abmll train`` in a single process, on 2 ranks under torchrun, and on 2 ranks with the base
    model sharded by FSDP (and gradient checkpointing)."""
    from conftest import BAD, GOOD, family_task

    from abmll.tasks.readers import write_metaicl_task
    from abmll.tiny import tiny_llama

    root = tmp_path_factory.mktemp("dist")
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    pairs = list(zip(GOOD, BAD, strict=True))
    for i, name in enumerate(TASKS):
        write_metaicl_task(family_task(name, pairs[i : i + 2], 12, seed=i), root / "data", 16384, 100, "train")
    (root / "fast.json").write_text(json.dumps(FAST))

    def train_args(out: Path, *extra: str) -> list[str]:
        return [
            "train", "--model", str(root / "tiny"), "--data", str(root / "data"), "--tasks", ",".join(TASKS),
            "--config", str(root / "fast.json"), "--steps", str(STEPS), "--seed", "3", "--device", "cpu",
            "--out", str(out), *extra,
        ]  # fmt: skip

    _run([sys.executable, str(WORKER), str(root / "side1"), *train_args(root / "one")], root)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(WORKER), str(root / "side2"), *train_args(root / "two")], root)
    # FSDP, and gradient checkpointing on top (the recomputed layers are FSDP units)
    fsdp_args = train_args(root / "fsdp", "--set", "compute.gradient_checkpointing=true")
    _run([*torchrun, str(WORKER), str(root / "side3"), *fsdp_args], root, ACCELERATE_USE_FSDP="true")
    return root


def test_two_ranks_split_every_meta_batch(runs):
    one, two = _side(runs / "side1"), _side(runs / "side2")
    assert list(one) == [0] and one[0]["world_size"] == 1 and one[0]["backend"] is None
    assert sorted(two) == [0, 1], "torchrun did not start two ranks"
    for rank, record in two.items():
        assert record["world_size"] == 2 and record["backend"] == "gloo" and record["exit_code"] == 0
        # rank r computes tasks r, r + 2 of each of the 3 meta-batches of 4 tasks
        assert record["computed"] == [[s, i] for s in range(STEPS) for i in (rank, rank + 2)], rank
    assert one[0]["computed"] == [[s, i] for s in range(STEPS) for i in range(4)]
    assert one[0]["sharded"] == [False] and all(r["sharded"] == [False] for r in two.values())
    fsdp = _side(runs / "side3")
    assert sorted(fsdp) == [0, 1] and all(r["world_size"] == 2 and r["sharded"] == [True] for r in fsdp.values())
    assert [r["computed"] for r in fsdp.values()] == [r["computed"] for r in two.values()]


@pytest.mark.parametrize("run", ["two", "fsdp"])
def test_two_ranks_give_the_single_process_theta(runs, run):
    for folder in ("final", "checkpoints/step-000002"):
        single, double = _theta(runs / "one" / folder), _theta(runs / run / folder)
        assert single.keys() == double.keys() and single
        for key in single:
            assert single[key].dtype == torch.float32
            torch.testing.assert_close(double[key], single[key], rtol=1e-6, atol=1e-9, msg=f"{folder} {key}")
        # θ moved away from its initialisation: the comparison is not of two untouched priors
        assert any(float(t.abs().max()) > 0 for k, t in single.items() if k.endswith("mu_B"))
    log_one = [json.loads(line) for line in (runs / "one" / "log.jsonl").read_text().splitlines()]
    log_two = [json.loads(line) for line in (runs / run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_two] == list(range(1, STEPS + 1))  # one line per step: rank 1 wrote none
    assert [r["world_size"] for r in log_two] == [2] * STEPS and [r["world_size"] for r in log_one] == [1] * STEPS
    for a, b in zip(log_one, log_two, strict=True):
        for key in ("outer_nll", "kl", "grad_norm", "support_nll_first"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
    assert json.loads((runs / run / "config.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("run, side", [("two", "side2"), ("fsdp", "side3")])
def test_only_rank_zero_writes_the_output_folder(runs, run, side):
    records = _side(runs / side)
    assert records[1]["writes"] == [], records[1]["writes"]
    assert any("log.jsonl" in w for w in records[0]["writes"]) and any("final" in w for w in records[0]["writes"])
    # and the folder holds exactly what a single-process run writes
    assert _files(runs / run) == _files(runs / "one")


def test_a_non_main_rank_writes_nothing_in_process(tmp_path, monkeypatch):
    """The runner on a rank other than 0 (simulated in one process): no file, no folder, no progress call."""
    from conftest import BAD, GOOD, adapted_tiny, family_task, make_config

    import abmll.runner as runner
    from abmll.methods.abmll import ABMLL

    monkeypatch.setattr(runner, "is_main_process", lambda: False)
    config = make_config(**{"meta.meta_steps": 2, "meta.checkpoint_every": 1, "meta.support_size": 4,
                            "meta.query_size": 4, "inner.inner_steps": 1})  # fmt: skip
    model, scorer = adapted_tiny(config)
    method = ABMLL(model, scorer, config)
    pairs = list(zip(GOOD, BAD, strict=True))
    tasks = [family_task(f"t{i}", pairs[i : i + 2], 12, seed=i) for i in range(3)]
    calls: list[dict] = []
    out = tmp_path / "out"
    final = runner.meta_train_run(method, tasks, out, {"method": "abmll"}, progress=calls.append)
    assert method.step == 2 and final == out / "final"
    assert not out.exists() and calls == []


def test_example_accelerate_configs_set_what_abmll_reads(monkeypatch):
    """The example config files parse with Accelerate, and the environment ``accelerate launch`` derives from
    them is what abmll.distributed reads: FSDP on or off, bfloat16, the FSDP settings abmll accepts."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    from abmll import distributed

    folder = WORKER.parents[1] / "examples" / "accelerate"
    assert sorted(p.name for p in folder.glob("*.yaml")) == ["1gpu-bf16.yaml", "8gpu-ddp.yaml", "fsdp.yaml"]
    for path in folder.glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"accelerate launch --config_file examples/accelerate/{path.name}" in first
        args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "abmll.cli", "train"])
        args = _validate_launch_command(args)[0]
        if path.name == "1gpu-bf16.yaml":
            assert args.num_processes == 1
            env = prepare_simple_launcher_cmd_env(args)[1]
        else:
            assert args.num_processes == 8
            env = prepare_multi_gpu_env(args)
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
                m.delenv(key)
            for key, value in env.items():
                if key.startswith(("ACCELERATE_", "FSDP_")):
                    m.setenv(key, value)
            assert distributed.launcher_dtype() == "bfloat16"
            assert distributed.fsdp_requested() == (path.name == "fsdp.yaml")
            distributed.check_fsdp_settings()  # no setting abmll rejects


def test_fsdp_settings_abmll_cannot_honour_are_refused(monkeypatch):
    from abmll.distributed import check_fsdp_settings
    from abmll.errors import ConfigError

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ConfigError, match="set fsdp_cpu_ram_efficient_loading: false"):
        check_fsdp_settings()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params is not supported"):
        check_fsdp_settings()
