"""Resumable state: one dataclass saved and loaded whole; signals held while a step lands."""

import os
import signal

import pytest
import torch

from tsopsd.errors import TsopsdError
from tsopsd.saved import load_tree, save_tree
from tsopsd.state import STATE_FILE, RunState, interrupts


def test_run_state_round_trips_every_field(tmp_path):
    state = RunState(next_step=7, tau=1.37, tau_source="target_entropy", target=0.5, before={"entropy": {"mean": 0.2}},
                     world_size=2, config={"seed": 3}, stop={"window": [(0.1, 0.3)], "last_good_step": 6},
                     scheduler={"last_epoch": 7}, trainable={"trainable": {"w": torch.arange(3.0)}},
                     stop_reason=None, kept_step=None)
    state.save(tmp_path)
    loaded = RunState.load(tmp_path)
    assert loaded.__dict__.keys() == state.__dict__.keys()
    for k, v in state.__dict__.items():
        if k == "trainable":
            assert torch.equal(loaded.trainable["trainable"]["w"], v["trainable"]["w"])
        else:
            assert getattr(loaded, k) == v, k
    assert not (tmp_path / (STATE_FILE + ".tmp")).exists()


def test_a_state_file_of_another_shape_is_refused(tmp_path):
    save_tree({"step": 3}, tmp_path, STATE_FILE.removesuffix(".json"))
    with pytest.raises(TsopsdError, match="another version of tsopsd"):
        RunState.load(tmp_path)


def test_the_state_is_json_and_safetensors_and_keeps_tuples_and_int_keys(tmp_path):
    """What an optimizer's state_dict holds (int keys, tuples, 0-dim tensors) comes back as it was, with no pickle."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    save_tree({"optimizer": opt.state_dict()}, tmp_path, "state")
    back = load_tree(tmp_path, "state")["optimizer"]
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["param_groups"][0]["betas"], tuple)
    assert set(back["state"]) == {0} and torch.equal(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]


def test_save_removes_sharded_folders_it_no_longer_names(tmp_path):
    for name in ("sharded-1", "sharded-2"):
        (tmp_path / name).mkdir()
    RunState(0, 1.5, "temperature", None, None, 1, {}, trainable={"folder": "sharded-2"}).save(tmp_path)
    assert [p.name for p in tmp_path.glob("sharded-*")] == ["sharded-2"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_held_waits_for_the_block_to_end(sig):
    done = []
    with interrupts() as signals, pytest.raises(KeyboardInterrupt):
        with signals.held():
            os.kill(os.getpid(), sig)
            done.append("update")  # still runs: the signal waits
            done.append("counter")
        done.append("after")  # never runs: the held signal is raised as the block ends
    assert done == ["update", "counter"]
    with interrupts(), pytest.raises(KeyboardInterrupt):  # outside a held block it is immediate
        os.kill(os.getpid(), sig)
        done.append("never")
    assert done == ["update", "counter"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
