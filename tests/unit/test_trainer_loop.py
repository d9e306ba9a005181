"""The training loop on test_vit at 32 px: frozen backbone, valid output, exact resume, the CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lpt.backbone import Backbone, load_backbone
from lpt.forward import PromptBank, prompted_forward
from lpt.prompt_set import decode, validate
from tests.support.ports import free_port
from tests.support.trainer_cli import train_argv
from trainer import cli
from trainer.config import TrainConfig
from trainer.data import synthetic_long_tailed, write_image_folder
from trainer.loop import Trainer
from trainer.prompt_module import PromptModule

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(epochs1=2, epochs2=2, batch_size=16, prompt_length=2, pool_size=4, top_k=2, share_blocks=2, progress=False)


def data(seed: int = 0):
    train = synthetic_long_tailed(num_classes=4, n_max=24, imbalance_ratio=6, img_size=32, seed=seed)
    val = synthetic_long_tailed(num_classes=4, n_max=6, imbalance_ratio=1, img_size=32, seed=seed + 1)
    return train, val


def make_trainer(backbone: Backbone, checkpoint=None, **overrides) -> Trainer:
    train, val = data()
    return Trainer(
        backbone, train, val, TrainConfig(**{**SMALL, **overrides}), checkpoint=checkpoint, log=lambda _m: None
    )


def test_backbone_is_bit_identical_after_training(backbone):
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    result = make_trainer(backbone).fit()
    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for p in backbone.model.parameters())
    assert result.finished
    # ... while the prompts did move away from their init
    init = make_trainer(backbone).template
    assert not torch.equal(result.prompt_set.shared_prompt, init.shared_prompt)
    assert not torch.equal(result.prompt_set.group_prompts, init.group_prompts)
    assert torch.equal(result.prompt_set.shared_prompt, result.phase1_prompt_set.shared_prompt)  # frozen in phase 2


def test_only_the_phase_tensors_are_parameters(backbone):
    t = make_trainer(backbone).template
    tensors = {
        "shared_prompt": t.shared_prompt,
        "head_weight": t.head_weight,
        "group_prompts": t.group_prompts,
        "group_keys": t.group_keys,
    }
    phase1 = PromptModule(backbone.model, tensors, ("shared_prompt", "head_weight"), 2, 2, 20.0)
    phase2 = PromptModule(backbone.model, tensors, ("group_prompts", "group_keys", "head_weight"), 2, 2, 20.0)
    assert sum(p.numel() for p in phase1.parameters()) == t.shared_prompt.numel() + t.head_weight.numel()
    assert {n for n, _ in phase2.named_parameters()} == {
        "prompts.group_prompts",
        "prompts.group_keys",
        "prompts.head_weight",
    }


def test_output_validates_and_serves_the_reported_top1(backbone):
    trainer = make_trainer(backbone)
    result = trainer.fit()
    ps = decode(encode_roundtrip(result.prompt_set))
    validate(ps, backbone.info)
    assert ps.pool_size == 4 and ps.top_k == 2 and ps.class_names == trainer.class_names
    images = torch.stack([trainer.val_set[i][0] for i in range(len(trainer.val_set))])
    with torch.inference_mode():
        pred = prompted_forward(backbone.model, images, PromptBank.stack([ps])).logits.argmax(1).tolist()
    assert pred == result.predictions
    report = result.report
    assert set(report) >= {"overall", "many", "medium", "few", "phase1", "per_class", "history"}
    assert [h["phase"] for h in report["history"]] == [1, 1, 2, 2]
    assert [h["ib_weight"] for h in report["history"]] == [0.5, 0.25, 0.5, 0.25]


def encode_roundtrip(ps):
    from lpt.prompt_set import encode

    return encode(ps)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(backbone, tmp_path):
    whole = make_trainer(backbone, checkpoint=tmp_path / "a.ckpt").fit()
    ckpt = tmp_path / "b.ckpt"
    assert not make_trainer(backbone, checkpoint=ckpt).fit(stop_after_epochs=1).finished  # mid phase 1
    assert not make_trainer(backbone, checkpoint=ckpt).fit(resume=True, stop_after_epochs=2).finished  # mid phase 2
    resumed = make_trainer(backbone, checkpoint=ckpt).fit(resume=True)
    for name, tensor in whole.prompt_set.tensors().items():
        assert torch.equal(tensor, resumed.prompt_set.tensors()[name]), name
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in whole.report["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.report["history"]]
    assert whole.report["phase1"] == resumed.report["phase1"]
    assert whole.predictions == resumed.predictions


def test_resume_refuses_a_checkpoint_of_other_settings(backbone, tmp_path):
    ckpt = tmp_path / "c.ckpt"
    make_trainer(backbone, checkpoint=ckpt).fit(stop_after_epochs=1)
    with pytest.raises(ValueError, match="other settings"):
        make_trainer(backbone, checkpoint=ckpt, batch_size=8).fit(resume=True)


def test_checkpoint_holds_only_prompt_tensors(backbone, tmp_path):
    import safetensors

    ckpt = tmp_path / "d.ckpt"
    make_trainer(backbone, checkpoint=ckpt).fit(stop_after_epochs=1)
    with safetensors.safe_open(str(ckpt), framework="pt") as fh:
        names = set(fh.keys())
    assert names == {
        "param/shared_prompt",
        "param/head_weight",
        "param/group_prompts",
        "param/group_keys",
        "momentum/shared_prompt",
        "momentum/head_weight",
    }


def test_pool_size_zero_gives_deep_vpt(backbone):
    result = make_trainer(backbone, pool_size=0, epochs2=3).fit()
    assert result.prompt_set.pool_size == 0
    assert [h["phase"] for h in result.report["history"]] == [1, 1]
    validate(result.prompt_set, backbone.info)


def test_cli_with_yaml_config_and_folder_data(tmp_path):
    train, val = data()
    write_image_folder(train, tmp_path / "train")
    write_image_folder(val, tmp_path / "val")
    config = {
        "backbone": "test_vit",
        "backbone-weights": "random:0",
        "img-size": 32,
        "epochs1": 1,
        "epochs2": 1,
        "batch_size": 8,
        "prompt-length": 2,
        "pool-size": 3,
        "share-blocks": 2,
        "no-progress": True,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    out, report_path = tmp_path / "out" / "ps.safetensors", tmp_path / "out" / "report.json"
    argv = [
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--train",
        str(tmp_path / "train"),
        "--val",
        str(tmp_path / "val"),
        "--out",
        str(out),
        "--report",
        str(report_path),
        "--plot",
        str(tmp_path / "out" / "p.png"),
        "--device",
        "cpu",
        "--top-k",
        "1",
    ]
    assert cli.main(argv) == 0
    ps = decode(out.read_bytes())
    validate(ps, load_backbone("test_vit", "random:0", img_size=32).info)
    assert ps.top_k == 1 and ps.pool_size == 3  # the flag beat the config file's default
    evaluation = json.loads(ps.extra["evaluation"])
    report = json.loads(report_path.read_text())
    for key in ("overall", "many", "medium", "few"):
        assert evaluation[key] == report[key]
        assert key in report["phase1"]
    assert len(report["per_class"]) == 4 and (tmp_path / "out" / "p.png").exists()


def test_cli_reports_missing_required_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--train", "x"])
    assert "--backbone" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_a_valid_prompt_set(tmp_path):
    out = tmp_path / "ddp.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "trainer.cli",
        *train_argv("synthetic:4:24:6", "synthetic:4:6:1", out, tmp_path / "r.json", batch_size=16, pool_size=4),
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ps = decode(out.read_bytes())
    validate(ps, load_backbone("test_vit", "random:0", img_size=32).info)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["val"]["images"] == 24 and sum(r["test_count"] for r in report["per_class"]) == 24


def test_data_prompt_init_starts_at_the_mean_patch_tokens(backbone, tmp_path):
    from trainer.prompt_init import mean_patch_tokens, sample_images

    trainer = make_trainer(backbone, prompt_init="data", epochs1=1, epochs2=1, checkpoint=tmp_path / "e.ckpt")
    fresh = trainer._fresh_checkpoint()
    images = sample_images(trainer.train_set, backbone.eval_transform, 256, 0)
    means = mean_patch_tokens(backbone.model, images)
    assert torch.allclose(
        fresh.params["shared_prompt"] - trainer.template.shared_prompt, means[:, None, :].expand(-1, 2, -1)
    )
    result = trainer.fit()
    validate(result.prompt_set, backbone.info)
    resumed = make_trainer(backbone, prompt_init="data", epochs1=1, epochs2=1, checkpoint=tmp_path / "e.ckpt")
    again = resumed.fit(resume=True)  # finished checkpoint: evaluates the saved parameters only
    assert torch.equal(again.prompt_set.group_prompts, result.prompt_set.group_prompts)
