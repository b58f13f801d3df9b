"""verl FSDP actor checkpoints in: rank shards from a real 2-rank FSDP2 run (gloo) load, measure and reheat
like the model they were saved from; broken shard sets give one line and exit 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner
from verl_layout import INPUT_IDS

from tsopsd.checkpoint import load_checkpoint
from tsopsd.cli import app
from tsopsd.errors import ExitCode
from tsopsd.folders import loadable_folder
from tsopsd.lab.tiny import build_tokenizer, model_config, sharpen_
from tsopsd.trajectory import find_checkpoints

runner = CliRunner()
TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"


class NotATensor:  # what a shard must not smuggle in: weights_only refuses to build it
    pass


@pytest.fixture(scope="module")
def verl(tmp_path_factory):
    """{hf, full, lora}: a tiny Qwen3 folder (tied embeddings, odd MLP width) and its verl saves (global_step_3)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("verl")
    tok = build_tokenizer()
    cfg = model_config("qwen3", len(tok), eos_id=tok.eos_token_id)
    cfg.intermediate_size, cfg.tie_word_embeddings = 91, True  # 91: an uneven split over 2 ranks
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sharpen_(model, 8.0)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(str(root / "hf"))
    tok.save_pretrained(str(root / "hf"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "verl_layout.py"), str(root / "hf"), str(root / "saves")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-6000:]
    return {"hf": root / "hf", "full": root / "saves" / "full", "lora": root / "saves" / "lora"}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).logits


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_rank_shards_load_as_the_model_they_were_saved_from(verl, kind):
    step = verl[kind] / "global_step_3"
    reference = torch.load(verl[kind] / "reference_logits.pt")  # the unsharded model, before FSDP
    for path in (step, step / "actor"):  # the step folder or its actor/
        ck = load_checkpoint(path, device="cpu", dtype="float32")
        assert ck.path == step / "actor" and ck.config_dir == step / "actor" / "huggingface"
        assert "2 FSDP rank shard(s)" in ck.source and ("lora_adapter" in ck.source) == (kind == "lora")
        assert (logits(ck.model) - reference).abs().max() <= 1e-5
    shards = [torch.load(f, weights_only=False) for f in sorted((step / "actor").glob("model_world_size_2_*.pt"))]
    placements = {str(v.placements) for v in shards[0].values()}
    assert placements == {"(Shard(dim=0),)", "(Shard(dim=1),)"}  # the loader followed both
    uneven = [k for k, v in shards[0].items() if v.to_local().shape != shards[1][k].to_local().shape]
    assert uneven, "the odd MLP width should split 46/45"
    assert loadable_folder(step) is None  # an adapter output could not name it as its base


def test_lora_run_is_base_shards_plus_its_adapter(verl):
    """The adapter is applied: the loaded policy differs from the base (and equals base + adapter, above)."""
    ck = load_checkpoint(verl["lora"] / "global_step_3", device="cpu", dtype="float32")
    plain = load_checkpoint(verl["hf"], device="cpu", dtype="float32")
    assert (logits(ck.model) - logits(plain.model)).abs().max() > 1e-2


@pytest.mark.parametrize("mesh_shape", [(2,), (3,), (2, 2), (2, 3)])
def test_each_ranks_piece_is_where_torch_puts_it(mesh_shape, tmp_path):
    """`_region` against torch's own DTensor arithmetic: 1-D and 2-D (HSDP) meshes, uneven and empty pieces."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    from tsopsd.verl_fsdp import _region

    mesh = torch.arange(torch.Size(mesh_shape).numel()).reshape(mesh_shape)
    options = [Shard(0), Shard(1), Replicate()]
    layouts = [(p,) for p in options] if len(mesh_shape) == 1 else [(a, b) for a in options for b in options]
    for shape in [(7, 5), (2, 9), (1, 4), (12, 12)]:
        for placements in layouts:
            covered = 0
            for rank in range(mesh.numel()):
                coord = (mesh == rank).nonzero()[0].tolist()
                size, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, coord, placements)
                region = _region(torch.Size(shape), mesh, placements, rank, tmp_path)
                assert tuple(s.start for s in region) == tuple(offset) or 0 in size, (shape, placements, rank)
                assert tuple(s.stop - s.start for s in region) == tuple(size), (shape, placements, rank)
                covered += torch.Size(size).numel()
            copies = torch.Size([n for n, p in zip(mesh_shape, placements) if isinstance(p, Replicate)]).numel()
            assert covered == torch.Size(shape).numel() * copies


def copy_actor(verl, tmp_path, kind="full"):
    actor = tmp_path / "global_step_3" / "actor"
    shutil.copytree(verl[kind] / "global_step_3" / "actor", actor)
    return actor


def tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def one_line(res) -> str:
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.exit_code == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("tsopsd: error: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    return lines[0]


def measure(path, *extra):
    return runner.invoke(app, ["measure-entropy", str(path), "--prompts", str(Path(path).parent / "p.txt"),
                               "--max-new-tokens", "6", "--samples-per-prompt", "2", "--device", "cpu",
                               "--dtype", "float32", "--quiet", *extra])


def break_partial(actor):
    (actor / "model_world_size_2_rank_1.pt").unlink()


def break_world(actor):
    (actor / "fsdp_config.json").write_text('{"FSDP_version": 2, "world_size": 4}')


def break_mixed(actor):
    shutil.copy(actor / "model_world_size_2_rank_0.pt", actor / "model_world_size_1_rank_0.pt")


def break_pickle(actor):
    torch.save({"model.norm.weight": NotATensor()}, actor / "model_world_size_2_rank_1.pt")


def break_no_adapter(actor):
    shutil.rmtree(actor / "lora_adapter")


def break_unknown(actor):
    shutil.rmtree(actor)
    actor.mkdir()
    for r in range(2):
        (actor / f"__{r}_0.distcp").write_bytes(b"\0" * 16)
    (actor / ".metadata").write_bytes(b"\0")


@pytest.mark.parametrize("case,kind,message", [
    (break_partial, "full", "partial verl checkpoint"),
    (break_world, "full", "world-size mismatch"),
    (break_mixed, "full", "mixes shards of world sizes [1, 2]"),
    (break_pickle, "full", "NotATensor, which tsopsd does not unpickle; convert the checkpoint with "
                           "`python -m verl.model_merger merge --backend fsdp --local_dir"),
    (break_no_adapter, "lora", "hold a LoRA model but lora_adapter/ is missing"),
    (break_unknown, "full", "a torch.distributed.checkpoint (DCP) save; use `python -m verl.model_merger merge"),
])
def test_broken_shard_sets_give_one_line_and_exit_2(verl, tmp_path, case, kind, message):
    actor = copy_actor(verl, tmp_path, kind)
    (tmp_path / "p.txt").write_text("the cat\n")
    case(actor)
    assert message in one_line(measure(tmp_path / "global_step_3"))


def saved_from(verl, kind, tmp_path) -> Path:
    """The model the shards were saved from, as an ordinary folder: the base, or base + adapter merged by peft."""
    if kind == "full":
        shutil.copytree(verl["hf"], tmp_path / "hf")
        return tmp_path / "hf"
    adapter = tmp_path / "adapter"
    shutil.copytree(verl["lora"] / "global_step_3" / "actor" / "lora_adapter", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(verl["hf"])}))
    res = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.stderr
    return tmp_path / "hf"


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_measure_entropy_of_the_shards_equals_the_saved_model(verl, tmp_path, kind):
    actor = copy_actor(verl, tmp_path, kind)
    original = saved_from(verl, kind, tmp_path)
    (tmp_path / "p.txt").write_text("the cat sat on\none two three\ngive me a number\n")
    a, b = measure(actor.parent, "--json"), measure(original, "--json")
    assert a.exit_code == 0 and b.exit_code == 0, a.stderr + b.stderr
    ma, mb = json.loads(a.stdout)["metrics"], json.loads(b.stdout)["metrics"]
    assert ma["entropy"] == pytest.approx(mb["entropy"], abs=1e-5) and ma["entropy"]["mean"] > 0.1
    assert ma["tokens"] == mb["tokens"] and ma["distinct_2"] == mb["distinct_2"]  # the same completions


def reheat(path, out, *extra):
    prompts = Path(out).parent / "p.txt"
    return runner.invoke(app, ["reheat", str(path), "--prompts", str(prompts), "--out", str(out), "--config", str(TINY),
                               "--steps", "2", "--set", "output.eval_prompts=0", "--seed", "5", "--quiet",
                               "--set", "stop.min_top1_agreement=0", *extra])  # trained, not rolled back to the input


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_reheat_of_the_shards_equals_reheat_of_the_saved_model(verl, tmp_path, kind):
    actor = copy_actor(verl, tmp_path, kind)
    original = saved_from(verl, kind, tmp_path)
    (tmp_path / "p.txt").write_text("".join(f"{w} {n}\n" for w in ("the cat", "one two", "a number") for n in range(3)))
    res = reheat(actor, tmp_path / "from-shards", "--save", "adapter")
    assert "reheat it with --save merged" in one_line(res) and not (tmp_path / "from-shards").exists()
    a, b = reheat(actor, tmp_path / "from-shards"), reheat(original, tmp_path / "from-hf")
    assert a.exit_code == b.exit_code == ExitCode.GOAL_NOT_MET, a.stderr + b.stderr  # 2 steps: written, not converged
    wa, wb = load_file(tmp_path / "from-shards" / "model.safetensors"), load_file(tmp_path / "from-hf" / "model.safetensors")
    assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wb)
    ma = (tmp_path / "from-shards" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "from-hf" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["train/loss"] for x in ma] == pytest.approx([json.loads(x)["train/loss"] for x in mb], abs=1e-6)
    assert tree(actor) == tree(verl[kind] / "global_step_3" / "actor")  # the input is untouched


def test_huggingface_weights_are_used_when_saved(verl, tmp_path):
    """verl's `save_contents: [hf_model]`: huggingface/ holds the weights, the adapter output names that folder."""
    actor = copy_actor(verl, tmp_path)
    for f in actor.glob("model_world_size_*.pt"):
        f.unlink()
    load_checkpoint(verl["hf"], device="cpu", dtype="float32").model.save_pretrained(str(actor / "huggingface"))
    ck = load_checkpoint(actor.parent, device="cpu", dtype="float32")
    assert ck.path == actor / "huggingface" and "huggingface/ weights" in ck.source
    assert loadable_folder(actor) == actor / "huggingface"
    assert (logits(ck.model) - torch.load(verl["full"] / "reference_logits.pt")).abs().max() <= 1e-5


def test_a_run_of_verl_steps_is_found_in_step_order(verl, tmp_path):
    run = tmp_path / "checkpoints" / "proj" / "exp"
    for step in (40, 8):
        shutil.copytree(verl["full"] / "global_step_3", run / f"global_step_{step}")
    (run / "latest_checkpointed_iteration.txt").write_text("40")
    assert find_checkpoints([run]) == [(8, run / "global_step_8" / "actor"), (40, run / "global_step_40" / "actor")]
