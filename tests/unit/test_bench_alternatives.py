"""The accuracy benchmark's alternatives on test_vit: full fine-tuning, the service's scores of zipped images, and
the serving comparison (prompt sets on one backbone against one model per task)."""

from __future__ import annotations

import zipfile

import torch

from bench.alternatives import FineTuned, fine_tune, served_scores, serving_throughput
from lpt.forward import PromptBank
from tests.support.prompt_sets import make_set
from trainer.calibration import calibrated_probabilities
from trainer.data import load_dataset, synthetic_long_tailed, write_image_folder
from trainer.evaluate import evaluate, prompt_predictor


def test_fine_tuning_trains_a_copy_and_leaves_the_backbone_alone(backbone):
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    train = synthetic_long_tailed(num_classes=3, n_max=12, imbalance_ratio=4, img_size=32, seed=0)
    model = fine_tune(backbone, train, 1, 2, 8, lr=0.05, weight_decay=0.0, min_crop_scale=0.5, seed=0,
                      device="cpu", log=lambda _m: None)  # fmt: skip
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    moved = [k for k, v in model.model.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and model.head.weight.abs().sum() > 0  # every weight trains, the head from zero
    assert model.nbytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_served_scores_are_the_calibrated_probabilities_of_the_zipped_images(backbone, tmp_path):
    val = synthetic_long_tailed(num_classes=4, n_max=3, imbalance_ratio=1, img_size=32, seed=1)
    folder = write_image_folder(val, tmp_path / "val")
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, f"val/{path.relative_to(folder)}")
    zipped = load_dataset(f"{tmp_path / 'set.zip'}/val", "val")
    ps = make_set(backbone.info, classes=zipped.class_names, seed=2)
    ps.temperature = 2.5
    served = served_scores(backbone, ps, zipped, "cpu", batch=5)
    zipped.transform = backbone.eval_transform
    counts = evaluate(
        prompt_predictor(backbone.model, PromptBank.stack([ps])), zipped, 4, torch.device("cpu"), keep_logits=True
    )
    expected = calibrated_probabilities(counts.logits, 2.5)
    assert torch.allclose(served, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(served, calibrated_probabilities(counts.logits, 1.0), atol=1e-3)


def test_serving_comparison_runs_both_sides_on_the_same_batches(backbone):
    ps = make_set(backbone.info, classes=3)
    model = FineTuned(backbone, 3)
    out = serving_throughput(backbone, ps, model, torch.randn(6, 3, 32, 32), tasks=4, batches=2, device="cpu")
    assert out["prompt_sets_images_per_s"] > 0 and out["models_images_per_s"] > 0
    assert 1 <= out["distinct_tasks_per_batch"] <= 4
    assert out["model_bytes"] == model.nbytes and 0 < out["prompt_set_resident_bytes"] < out["model_bytes"]
