"""Training checkpoints: atomic saves, rotation, and what resuming unpickles (the restricted unpickler only)."""

import json
import pickle
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from models.training import (
    AugmentRNG,
    TrainConfig,
    latest_checkpoint,
    load_training_state,
    save_training_state,
    weights_only_loads,
)


class Payload:
    """A pickle that runs code when fully unpickled: it creates the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def run(tmp_path):
    """A prepared tiny model, optimizer and scheduler, and the TrainConfig of a run in tmp_path."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    config = TrainConfig(output_dir=str(tmp_path / "run"), save_total_limit=2)
    yield accelerator, model, optimizer, config, AugmentRNG(accelerator.device, seed=1)
    accelerator.free_memory()


def test_resume_restores_optimizer_rng_and_augmentation_states(run):
    accelerator, model, optimizer, config, rng = run
    checkpoint = save_training_state(accelerator, config, 1, rng)
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "augment_rng_0.safetensors", "checkpoint.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl",
        "scheduler.bin",
    ]  # fmt: skip
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=rng.generator))
    saved_state = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    optimizer.step()
    assert load_training_state(accelerator, checkpoint, rng) == 1
    # RNG states (random_states_0.pkl holds numpy arrays) went through weights_only=True and were restored
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2]) and torch.equal(torch.rand(1, generator=rng.generator), expected[3])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, saved_state[key]), key


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_pickle_that_runs_code_is_never_run(run, tmp_path, name):
    accelerator, _, _, config, rng = run
    checkpoint = save_training_state(accelerator, config, 1, rng)
    ran = tmp_path / f"ran-{name}"
    torch.save({"state": Payload(ran)}, checkpoint / name)
    # negative control: a full unpickle of that file runs the payload
    control = tmp_path / "control"
    torch.save({"state": Payload(control)}, tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert control.exists()
    # accelerate itself only logs a failed RNG-state load: the resume refuses it instead
    error = ValueError if name == "random_states_0.pkl" else pickle.UnpicklingError
    with pytest.raises(error):
        load_training_state(accelerator, checkpoint, rng)
    assert not ran.exists()


def test_full_unpickling_is_refused_inside_a_resume(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "plain.bin")
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        torch.load(tmp_path / "plain.bin", weights_only=False)
    with weights_only_loads():
        assert torch.equal(torch.load(tmp_path / "plain.bin")["a"], torch.ones(1))
    assert torch.load(tmp_path / "plain.bin", weights_only=False)  # restored after the block


def test_checkpoints_without_safetensors_or_with_custom_pickles_are_refused(run):
    accelerator, _, _, config, rng = run
    checkpoint = save_training_state(accelerator, config, 1, rng)
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl"):
        load_training_state(accelerator, checkpoint, rng)
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only read from safetensors"):
        load_training_state(accelerator, checkpoint, rng)


def test_saves_are_atomic_and_rotated(run, monkeypatch):
    accelerator, _, _, config, rng = run
    for step in (1, 2, 3):
        save_training_state(accelerator, config, step, rng)
    root = latest_checkpoint(config.output_dir).parent
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]  # save_total_limit=2

    def crash(*args, **kwargs):
        (root / ".step_4.partial" / "optimizer.bin").write_bytes(b"half")
        raise OSError("killed")

    monkeypatch.setattr(accelerator, "save_state", crash)
    with pytest.raises(OSError):
        save_training_state(accelerator, config, 4, rng)
    assert latest_checkpoint(config.output_dir).name == "step_3"  # the partial save is not a checkpoint
    # a step_N folder without its marker (left by a copy or an older writer) is not one either
    (root / "step_5").mkdir()
    (root / "step_9").mkdir()
    (root / "step_9" / "checkpoint.json").write_text(json.dumps({"step": 8}))
    assert latest_checkpoint(config.output_dir).name == "step_3"
    monkeypatch.undo()
    save_training_state(accelerator, config, 4, rng)  # the same step again: the stale partial is replaced
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4", "step_5", "step_9"]
    assert json.loads((root / "step_4" / "checkpoint.json").read_text()) == {"step": 4, "num_processes": 1}
