"""Tests of vqvae_lib.checkpoint: atomic writes, round trips, and refusing every kind of bad file clearly."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vqvae_lib import checkpoint as C
from vqvae_lib.checkpoint import CheckpointError, config_diff, load_checkpoint, load_model, save_checkpoint
from vqvae_lib.model import VQVAE, ModelConfig

TINY = ModelConfig(hidden=16, res_hidden=8, codebook_size=32, embed_dim=8)


class Note:
    """A custom class: unpickling its instances needs code from outside torch, which weights_only refuses."""

    def __init__(self, text: str) -> None:
        self.text = text


class Gadget:
    """A pickle that runs code when loaded, as a malicious checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)  # unpickling would create the marker file


def payload_of(model: VQVAE, **extra) -> dict:
    return {"model_config": model.config.to_dict(), "train_config": {"lr": 1e-3, "epochs": 1},
            "model_state": model.state_dict(), "epoch": 1, "history": [{"epoch": 1, "val_ssim": 0.5}], **extra}


@pytest.fixture
def model() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(TINY)


@pytest.fixture
def saved(tmp_path, model) -> Path:
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    save_checkpoint(path, payload_of(model, rng={"torch": torch.get_rng_state()}))
    return path


def test_round_trip_restores_the_model_exactly(saved, model):
    payload = load_checkpoint(saved)
    assert payload["format"] == C.FORMAT == "hipmri-vqvae/1"
    assert payload["history"] == [{"epoch": 1, "val_ssim": 0.5}]
    loaded, payload = load_model(saved, expect_config=TINY)
    assert loaded.config == TINY and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 1, 64, 32)
    model.eval()
    torch.testing.assert_close(loaded(x).recon, model(x).recon, rtol=0, atol=0)


def test_save_is_atomic_and_leaves_no_temp_files(saved, model, monkeypatch):
    assert [p.name for p in saved.parent.iterdir()] == ["last.pt"]
    before = saved.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    monkeypatch.setattr(C.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, payload_of(model, epoch=2))
    assert saved.read_bytes() == before                   # the previous checkpoint is untouched
    assert [p.name for p in saved.parent.iterdir()] == ["last.pt"]
    monkeypatch.undo()
    save_checkpoint(saved, payload_of(model, epoch=2))
    assert load_checkpoint(saved)["epoch"] == 2
    assert [p.name for p in saved.parent.iterdir()] == ["last.pt"]


def test_save_refuses_values_that_weights_only_loading_would_refuse(tmp_path, model):
    with pytest.raises(TypeError, match=r"payload\['history'\]\[0\]\['ssim'\] is a numpy.float64"):
        save_checkpoint(tmp_path / "x.pt", payload_of(model, history=[{"ssim": np.float64(0.5)}]))
    with pytest.raises(ValueError, match="lacks history"):
        save_checkpoint(tmp_path / "x.pt", {k: v for k, v in payload_of(model).items() if k != "history"})
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope.pt'} does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("garbage", "is not a checkpoint: it is not a file written by torch.save"),
    ("random bytes", "is not a checkpoint: it is not a file written by torch.save"),
    ("empty", "is not a checkpoint: it is not a file written by torch.save"),
    ("plain pickle", "is not a checkpoint: it is not a file written by torch.save"),
    ("truncated", "is not a readable PyTorch checkpoint \\(corrupt or truncated\\?\\)"),
])
def test_corrupt_and_truncated_files_are_refused(saved, damage, message):
    content = saved.read_bytes()
    random_bytes = np.random.default_rng(0).bytes(4096)
    assert random_bytes[:4] not in (b"PK\x03\x04", b"\x80\x02\x8a\x0a")
    saved.write_bytes({"garbage": b"not a checkpoint at all " * 40, "truncated": content[:len(content) // 2],
                       "random bytes": random_bytes, "empty": b"", "plain pickle": pickle.dumps([1, 2, 3])}[damage])
    with pytest.raises(CheckpointError, match=f"{saved} {message}"):
        load_checkpoint(saved)


@pytest.mark.parametrize("field, value, message", [
    ("epoch", "three", "epoch is 'three', not a whole number >= 0"),
    ("epoch", 2.5, "epoch is 2.5, not a whole number >= 0"),
    ("epoch", True, "epoch is True, not a whole number >= 0"),
    ("epoch", -1, "epoch is -1, not a whole number >= 0"),
    ("kind", 3, "kind is 3, not a string"),
    ("history", [{"epoch": "1"}], "history\\[0\\] is not an epoch record"),
    ("history", [{"epoch": 1, "val_ssim": "high"}], "history\\[0\\]\\['val_ssim'\\] is 'high', not a number"),
    ("model_state", {"w": [1.0]}, "model_state holds values that are not tensors"),
])
def test_fields_of_the_wrong_type_are_refused(tmp_path, model, field, value, message):
    path = tmp_path / "odd.pt"
    torch.save({**payload_of(model), "format": C.FORMAT, field: value}, path)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: {message}"):
        load_checkpoint(path)


def test_custom_objects_are_refused(tmp_path, model):
    path = tmp_path / "note.pt"
    torch.save({**payload_of(model), "format": C.FORMAT, "note": Note("hello")}, path)
    with pytest.raises(CheckpointError, match=f"refusing to unpickle objects in checkpoint {path}") as info:
        load_checkpoint(path)
    assert "test_checkpoint.Note" in str(info.value)      # names what it refused


def test_code_in_a_pickle_is_never_run(tmp_path, model):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({**payload_of(model), "format": C.FORMAT, "extra": Gadget(marker)}, path)
    with pytest.raises(CheckpointError, match=f"refusing to unpickle objects in checkpoint {path}"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):                  # also when not a dict of ours at all
        torch.save(Gadget(marker), path)
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (torch.zeros(3), "holds a Tensor, not a hipmri-vqvae/1 checkpoint"),
    ({"model_state": {}}, "is not a hipmri-vqvae/1 checkpoint \\(format marker: None\\)"),
    ({"format": "other/2"}, "format marker: 'other/2'"),
    ({"format": C.FORMAT, "model_config": {}, "epoch": 1}, "lacks the keys train_config, model_state, history"),
    ({"format": C.FORMAT, "model_config": [], "train_config": {}, "model_state": {}, "epoch": 1, "history": []},
     "model_config is a list, not a dict"),
])
def test_files_without_the_expected_content_are_refused(tmp_path, content, message):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_checkpoint_of_another_config_names_the_differing_fields(saved):
    other = ModelConfig(hidden=16, res_hidden=8, codebook_size=64, embed_dim=8, downsample=8)
    with pytest.raises(CheckpointError, match=f"checkpoint {saved} was made with another model config") as info:
        load_model(saved, expect_config=other)
    text = str(info.value)
    assert "codebook_size: checkpoint 32, requested 64" in text and "downsample: checkpoint 4, requested 8" in text
    assert "hidden" not in text and "embed_dim" not in text


def test_weights_that_do_not_fit_their_own_config_are_refused(tmp_path, model):
    path = tmp_path / "mixed.pt"
    save_checkpoint(path, payload_of(model, model_config={**TINY.to_dict(), "hidden": 32}))
    with pytest.raises(CheckpointError, match=f"weights in checkpoint {path} do not fit the model of its own config"):
        load_model(path)
    save_checkpoint(path, payload_of(model, model_config={**TINY.to_dict(), "colour": "blue"}))
    with pytest.raises(CheckpointError, match="invalid model config: unknown ModelConfig keys: colour"):
        load_model(path)


def test_config_diff():
    assert config_diff({"a": 1, "b": 2}, {"a": 1, "b": 2}) == []
    assert config_diff({"a": 1, "b": 2, "c": 3}, {"a": 5, "b": 2, "d": 4}, ignore=("a",)) == [
        "c: checkpoint 3, requested '<missing>'", "d: checkpoint '<missing>', requested 4"]
