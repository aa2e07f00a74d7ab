"""``tumorseg train --init-from``: fine-tuning a registered model on a small dataset of another convention.

A parent is trained and registered on generated BraTS 2021 data (4 mm); a second site's data are
generated in the MSD layout (other label codes, one 4-D image per case, other seed). With the same
small budget, the run that starts from the registered parent (first encoder level frozen, the rest of
the encoder at a tenth of the learning rate) scores a better held-out Dice than the run from scratch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from sites import ROOT, generate_site

from tumorseg.cli import main
from tumorseg.config import apply_overrides, read_params


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fine_tuning_a_registered_model_beats_training_from_scratch(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.training.train import train

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    parent_params = generate_site(tmp_path / "site-a", uri, "brats2021", seed=5)
    p = ["--params", str(parent_params)]
    long_run = ["-S", "train.max_epochs=4", "-S", "train.steps_per_epoch=20"]
    assert main(["train", *p, *long_run]) == 0
    assert main(["evaluate-model", *p]) == 0  # registers tumorseg version 1
    assert main(["promote", *p]) == 0
    capsys.readouterr()

    child_params = generate_site(tmp_path / "site-b", uri, "msd", seed=11)
    budget = {"train.max_epochs": 1, "train.steps_per_epoch": 6}
    params = read_params(child_params)
    scratch = train(apply_overrides(params, budget), source=str(child_params))
    tuned = train(
        apply_overrides(
            params,
            {
                **budget,
                "train.init_from": "models:/tumorseg@champion",
                "train.freeze_encoder_stages": 1,
                "train.encoder_lr_scale": 0.1,
                "train.out_dir": str(tmp_path / "site-b" / "tuned"),
                # the project's model: section is another network: the parent's is trained
                "model.unet.channels": [4, 8, 16],
            },
        ),
        source=str(child_params),
    )
    assert tuned.test_dice["dice_mean"] > scratch.test_dice["dice_mean"] + 0.05, (
        tuned.test_dice,
        scratch.test_dice,
    )

    # the parent's network was trained, its first encoder level untouched
    parent = load_trained_network(tmp_path / "site-a" / "models" / "checkpoints" / "best.ckpt")
    child = load_trained_network(tuned.best_checkpoint)
    assert child.config["model"]["unet"]["channels"] == [8, 16, 32]
    first = "model.0.conv.unit0.conv.weight"
    assert torch.equal(
        dict(child.network.named_parameters())[first], dict(parent.network.named_parameters())[first]
    )
    decoder = [n for n, _ in child.network.named_parameters()][-1]
    assert not torch.equal(
        dict(child.network.named_parameters())[decoder], dict(parent.network.named_parameters())[decoder]
    )
    # the parent belongs to its run: the next run in this process trains its own network from scratch
    plain_overrides = {
        **budget,
        "model.unet.channels": [4, 8, 16],
        "train.out_dir": str(tmp_path / "site-b" / "plain"),
    }
    plain = train(apply_overrides(params, plain_overrides), source=str(child_params))
    assert load_trained_network(plain.best_checkpoint).config["model"]["unet"]["channels"] == [4, 8, 16]

    # the lineage: the run and the registered child version name the parent
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    tag = client.get_run(tuned.mlflow_run_id).data.tags["tumorseg.parent_model"]
    assert tag.startswith("models:/tumorseg@champion (version 1")


def test_a_2d_run_cannot_start_from_a_parent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(read_params(ROOT / "params.yaml")))
    rc = main(["train", "--dims", "2", "--init-from", "models:/x@champion", "--params", str(params_file)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--init-from" in err
