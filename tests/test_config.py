"""The configuration: each loss declares its hyperparameters once (models.losses ``HParams``), and
the flags, YAML keys and constructor arguments all come from that declaration."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from config import build_parser, loss_hparams, parse_config
from models.losses import LOSSES, build_loss


def test_every_loss_hyperparameter_is_a_flag_with_its_declared_default():
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    for name, cls in LOSSES.items():
        for field in dataclasses.fields(cls.HParams):
            assert field.name in defaults, f"{name}: no flag --{field.name}"
            assert defaults[field.name] == field.default, f"{name}: --{field.name}"
            help_text = next(a.help for a in parser._actions if a.dest == field.name)
            assert help_text == field.metadata["help"]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_loss_gets_exactly_its_own_hyperparameters(name, tiny_dataset, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sogclr_gamma": 0.5, "temp": 0.07, "tau_init": 0.02}))
    cfg = parse_config(
        [
            "--config",
            str(config),
            "--ita_type",
            name,
            "--data_path",
            str(tiny_dataset),
            "--train_data",
            "train",
            "--ann_path",
            "clip_train",
            "--val_coco_file",
            "",
            "--test_coco_file",
            "",
            "--device",
            "cpu",
        ]
    )
    hp = loss_hparams(cfg)
    assert set(hp) == {f.name for f in dataclasses.fields(LOSSES[name].HParams)}
    loss_fn = build_loss(name, data_size=10, **hp)
    if "temp" in hp:  # the temperature, or the initial value of a learned global one
        temp = torch.as_tensor(getattr(loss_fn, "temp", getattr(loss_fn, "tau", None)))
        assert float(temp.detach()) == pytest.approx(0.07)
    if "sogclr_gamma" in hp:
        assert loss_fn.gamma == 0.5


def test_flags_that_nothing_reads_are_gone(capsys):
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {"--lr_tau", "--rho"} <= flags  # back with the losses that read them (fastclip_v2/v3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--opt", "sgd"])
    assert "argument --opt: invalid choice: 'sgd'" in capsys.readouterr().err
    assert parser.parse_args(["--opt", "adamW"]).opt == "adamw"  # the original spelling still works


def _tiny_args(tiny_dataset) -> list[str]:
    data = ["--data_path", str(tiny_dataset), "--train_data", "train", "--ann_path", "clip_train"]
    return [*data, "--val_coco_file", "", "--test_coco_file", "", "--device", "cpu"]


def test_a_loss_name_brings_its_presets_below_yaml_and_flags(tiny_dataset, tmp_path):
    cfg = parse_config(["--ita_type", "fastclip_v1", *_tiny_args(tiny_dataset)])
    assert cfg.ita_type == "sogclr"  # an alias: the saved config names the loss that ran
    assert (cfg.gamma_schedule, cfg.sogclr_gamma, cfg.gamma_decay_epochs) == ("cosine", 0.2, 18)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"ita_type": "fastclip_v2", "gamma_decay_epochs": 4}))
    cfg = parse_config(["--config", str(config), "--tau_min", "0.005", *_tiny_args(tiny_dataset)])
    # the YAML's value and a flag set to the general default both win over the presets
    assert (cfg.ita_type, cfg.gamma_decay_epochs, cfg.tau_min, cfg.sogclr_gamma) == ("fastclip_v2", 4, 0.005, 0.2)
    assert parse_config(["--ita_type", "fastclip_v2", *_tiny_args(tiny_dataset)]).tau_min == 0.01
    assert parse_config(["--ita_type", "sogclr", *_tiny_args(tiny_dataset)]).gamma_schedule == "constant"
