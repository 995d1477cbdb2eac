"""Bring-your-own public teachers: the official TRADES WRN-34-10 state dict and a RobustBench-style
one (``model.``/``module.`` prefixes, no normalisation buffers) load onto ``wrn34_10`` with
``normalize: none`` and compute what the directly loaded model computes."""
from __future__ import annotations

import pytest
import torch

from derd import config
from derd.artifacts import CheckpointError, load_into
from derd.models import build_model

WIDEN, N_PER_STAGE = 10, 5  # WRN-34-10: (34 - 4) / 6 = 5 blocks per stage


def trades_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of TRADES' models/wideresnet.py WideResNet(34, 10):
    conv1, block{1,2,3}.layer.{j}.{bn1,relu1,conv1,bn2,relu2,conv2,convShortcut}, the unused sub_block1
    (same shapes as block1), the final bn1 and fc."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def bn(prefix, c):
        out[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        out[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)
        out[f"{prefix}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        out[f"{prefix}.running_var"] = 1 + torch.rand(c, generator=g)
        out[f"{prefix}.num_batches_tracked"] = torch.tensor(100)

    def conv(name, cout, cin, k):
        out[name] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5

    channels = [16, 16 * WIDEN, 32 * WIDEN, 64 * WIDEN]
    conv("conv1.weight", channels[0], 3, 3)
    for name, stage in (("block1", 1), ("sub_block1", 1), ("block2", 2), ("block3", 3)):
        for j in range(N_PER_STAGE):
            cin = channels[stage - 1] if j == 0 else channels[stage]
            cout = channels[stage]
            bn(f"{name}.layer.{j}.bn1", cin)
            conv(f"{name}.layer.{j}.conv1.weight", cout, cin, 3)
            bn(f"{name}.layer.{j}.bn2", cout)
            conv(f"{name}.layer.{j}.conv2.weight", cout, cout, 3)
            if cin != cout:  # equalInOut is False: a 1x1 convShortcut
                conv(f"{name}.layer.{j}.convShortcut.weight", cout, cin, 1)
    bn("bn1", channels[3])
    out["fc.weight"] = 0.01 * torch.randn(10, channels[3], generator=g)
    out["fc.bias"] = torch.zeros(10)
    return out


def _ours(normalize: str = "none"):
    return build_model("wrn34_10", 3, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), 32, normalize=normalize).eval()


def _direct(trades: dict) -> torch.nn.Module:
    """The same weights placed by hand: our module names, written out independently of io.map_wrn_keys."""
    model = _ours()
    own = model.state_dict()
    placed = {}
    for k, v in trades.items():
        parts = k.split(".")
        if parts[0] in ("block1", "block2", "block3"):
            index = (int(parts[0][-1]) - 1) * N_PER_STAGE + int(parts[2])
            part = {"convShortcut": "shortcut"}.get(parts[3], parts[3])
            placed[".".join(["net", "layers", str(index), part, *parts[4:]])] = v
        elif parts[0] == "conv1":
            placed["net.stem.weight"] = v
        elif parts[0] == "bn1":
            placed["net.final.0." + parts[1]] = v
        elif parts[0] == "fc":
            placed["net." + k] = v
    assert set(placed) | {"normalize.mean", "normalize.std"} == set(own)
    model.load_state_dict({**own, **placed})
    return model


def test_trades_and_robustbench_checkpoints_load_onto_wrn34_10(tmp_path):
    trades = trades_state_dict()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _direct(trades)(x)
        torch.save(trades, tmp_path / "trades.pt")
        assert torch.equal(load_into(_ours(), tmp_path / "trades.pt")(x), expected)
        # RobustBench style: wrapped in {"state_dict": ...}, DataParallel under a ``model.`` wrapper
        robustbench = {"state_dict": {f"model.module.{k}": v for k, v in trades.items() if not k.startswith("sub_")}}
        torch.save(robustbench, tmp_path / "rb.pt")
        assert torch.equal(load_into(_ours(), tmp_path / "rb.pt")(x), expected)
        # normalize none really is the identity: the dataset-normalised model computes something else
        assert not torch.allclose(load_into(_ours("dataset"), tmp_path / "trades.pt")(x), expected)


def test_trades_keys_of_another_depth_fail_clearly(tmp_path):
    trades = {k: v for k, v in trades_state_dict().items() if ".layer.4." not in k}  # a WRN-28-10
    torch.save(trades, tmp_path / "wrn28.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_into(_ours(), tmp_path / "wrn28.pt")


def test_normalize_is_a_teacher_key():
    cfg = config.parse({"teachers": {"robust": {"normalize": "none"}}})
    assert cfg.teachers.robust.normalize == "none" and cfg.teachers.natural.normalize == "dataset"
    with pytest.raises(config.ConfigError, match="teachers.natural.normalize"):
        config.parse({"teachers": {"natural": {"normalize": "imagenet"}}})
