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


def _tree_meta(folder) -> dict:
    import json

    return json.loads((folder / "state.json").read_text())


def _rewrite_tensors(folder, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / _tree_meta(folder)["tensors"]
    save_file(edit(load_file(path)), path)


ALTERED = {  # name: (change the saved pair of files, text of the refusal)
    "a tensor +0.5": (lambda d: _rewrite_tensors(d, lambda t: {k: v + 0.5 for k, v in t.items()}), "SHA-256 differs"),
    "tensors cast to bf16": (lambda d: _rewrite_tensors(d, lambda t: {k: v.bfloat16() for k, v in t.items()}),
                             "SHA-256 differs"),
    "a value edited in the JSON": (lambda d: (d / "state.json").write_text(
        (d / "state.json").read_text().replace('"step": 3', '"step": 4')), "was altered after tsopsd wrote it"),
    "a value of the wrong type": (lambda d: (d / "state.json").write_text(
        (d / "state.json").read_text().replace('"step": 3', '"step": "3"')), "was altered after tsopsd wrote it"),
    "the seal removed": (lambda d: (d / "state.json").write_text(
        (d / "state.json").read_text().replace('"seal"', '"unsealed"')), "was altered after tsopsd wrote it"),
}


@pytest.mark.parametrize("case", ALTERED)
def test_a_saved_tree_refuses_what_changed_after_it_was_written(tmp_path, case):
    change, message = ALTERED[case]
    save_tree({"step": 3, "w": torch.arange(6.0)}, tmp_path, "state")
    assert load_tree(tmp_path, "state")["step"] == 3
    change(tmp_path)
    with pytest.raises(TsopsdError, match=message):
        load_tree(tmp_path, "state")


def test_another_saves_tensor_file_under_this_ones_name_is_refused(tmp_path):
    """Two saves of the same shapes: each JSON accepts its own tensor file only."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save_tree({"w": torch.zeros(4)}, a, "state")
    save_tree({"w": torch.ones(4)}, b, "state")
    (a / _tree_meta(a)["tensors"]).write_bytes((b / _tree_meta(b)["tensors"]).read_bytes())
    with pytest.raises(TsopsdError, match="is not the tensor file tsopsd saved"):
        load_tree(a, "state")
    seal = save_tree({"w": torch.zeros(4)}, a, "state")  # a caller that recorded the seal refuses another pair
    with pytest.raises(TsopsdError, match="was altered"):
        load_tree(a, "state", expected=_tree_meta(b)["seal"])
    assert torch.equal(load_tree(a, "state", expected=seal)["w"], torch.zeros(4))


def test_file_and_folder_digests_match_a_plain_sha256(tmp_path, monkeypatch):
    """Hashed in pieces on several threads, the digest is the SHA-256 of the pieces' SHA-256s, in order, whatever
    the pieces' sizes relative to the file (none, one, several, a partial last one)."""
    import hashlib
    import json

    from tsopsd import saved

    monkeypatch.setattr(saved, "CHUNK", 7)
    data = os.urandom(7 * 5 + 3)
    for size in (0, 5, 7, 14, len(data)):
        (tmp_path / "f").write_bytes(data[:size])
        pieces = [data[:size][i:i + 7] for i in range(0, size, 7)] or [b""]
        expect = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()
        assert saved.file_digest(tmp_path / "f") == expect, size
    folder = tmp_path / "ck"
    (folder / "sub").mkdir(parents=True)
    (folder / "b").write_bytes(data)
    (folder / "sub" / "a").write_bytes(b"x")
    listing = [[name, saved.file_digest(folder / name)] for name in ("b", "sub/a")]
    assert saved.folder_digest(folder) == hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    (folder / "sub" / "a").write_bytes(b"y")
    assert saved.folder_digest(folder) != hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def test_the_stop_rules_refuse_a_saved_value_out_of_form():
    from tsopsd.config import StopConfig
    from tsopsd.stop import StopRules

    rules = StopRules(StopConfig())
    good = rules.state_dict() | {"window": [[0.1, 0.3]], "steered": [-1, None]}
    StopRules(StopConfig()).load_state_dict(good)
    for key, bad in [("window", [["a", 0.3]]), ("gaps", [float("nan")]), ("last_good_step", "3"),
                     ("steered", [1.5, None]), ("lr_factor", True), ("paced", [3])]:
        with pytest.raises(ValueError, match=f"stop rules' {key} is out of form"):
            StopRules(StopConfig()).load_state_dict(good | {key: bad})
