"""The training recipe on test_vit at 32 px: the starting point, phase 2's selection and keys, the guards."""

from __future__ import annotations

import torch

from lpt.backbone import load_backbone
from lpt.init import init_prompt_set
from trainer.config import TrainConfig
from trainer.data import synthetic_long_tailed
from trainer.loop import Trainer
from trainer.prompt_init import class_mean_head, per_class_sample, prompt_features
from trainer.prompt_module import PromptModule

SMALL = dict(epochs1=2, epochs2=3, batch_size=16, prompt_length=2, pool_size=4, top_k=2, share_blocks=2, progress=False)


def backbone():
    return load_backbone("test_vit", weights="random:0", img_size=32)


def trainer(bb, logs=None, **overrides) -> Trainer:
    train = synthetic_long_tailed(num_classes=4, n_max=24, imbalance_ratio=6, img_size=32, seed=0)
    val = synthetic_long_tailed(num_classes=4, n_max=6, imbalance_ratio=1, img_size=32, seed=1)
    sink = logs.append if logs is not None else (lambda _m: None)
    return Trainer(bb, train, val, TrainConfig(**{**SMALL, **overrides}), log=sink)


def test_normal_init_is_the_authors_small_truncated_normal_with_unit_head_rows():
    info = backbone().info
    ps = init_prompt_set(info, ["a", "b", "c"], prompt_length=2, pool_size=4, share_blocks=2, style="normal")
    for t in (ps.shared_prompt, ps.group_prompts, ps.group_keys):
        assert float(t.abs().max()) <= 0.04 + 1e-7
        assert 0.01 < float(t.std()) < 0.02
    assert torch.allclose(ps.head_weight.norm(dim=1), torch.ones(3))
    vpt = init_prompt_set(info, ["a", "b", "c"], prompt_length=2, pool_size=4, share_blocks=2, style="vpt")
    assert float(vpt.group_keys.norm(dim=1).mean()) > 10 * float(ps.group_keys.norm(dim=1).mean())


def test_class_mean_head_rows_are_the_normalised_class_means():
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    head = class_mean_head(f, torch.tensor([0, 0, 1]), 3, fallback=torch.tensor([[9.0, 9], [9, 9], [0, -5]]))
    assert torch.allclose(head, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))


def test_per_class_sample_caps_each_class_and_is_seeded():
    targets = [0] * 10 + [1] * 3
    picked = per_class_sample(targets, 4, seed=0)
    assert sorted(targets[i] for i in picked) == [0, 0, 0, 0, 1, 1, 1]
    assert picked == per_class_sample(targets, 4, seed=0) and picked != per_class_sample(targets, 4, seed=1)


def test_class_mean_head_starts_at_the_class_means_of_the_starting_features():
    bb = backbone()
    t = trainer(bb, head_init="class-mean")
    start = t._fresh_checkpoint()
    indices = per_class_sample(t.train_set.targets, 64, 0)
    feats = prompt_features(bb, t.train_set, t.template, start.params["shared_prompt"], indices, t.cfg, t.ctx.device)
    want = class_mean_head(feats, torch.tensor([t.train_set.targets[i] for i in indices]), 4, t.template.head_weight)
    assert torch.allclose(start.params["head_weight"], want, atol=1e-6)
    random = trainer(bb, head_init="random")._fresh_checkpoint()
    assert torch.equal(random.params["head_weight"], t.template.head_weight)


def test_head_dropout_only_while_training():
    bb = backbone()
    t = trainer(bb).template
    tensors = {"shared_prompt": t.shared_prompt, "head_weight": t.head_weight}
    module = PromptModule(bb.model, tensors, ("shared_prompt", "head_weight"), 2, 1, 20.0, head_dropout=0.5)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a, _ = module(x, with_pool=False)
    b, _ = module(x, with_pool=False)
    assert not torch.allclose(a, b)  # a fresh dropout mask each call
    module.eval()
    c, _ = module(x, with_pool=False)
    d, _ = module(x, with_pool=False)
    assert torch.equal(c, d)


def test_phase2_keys_move_and_the_selection_depends_on_the_image():
    bb = backbone()
    result = trainer(bb).fit()
    phase2 = result.report["phase2"]
    assert phase2["key_angle_deg"]["mean"] > 1.0  # the authors' small keys turn toward their queries
    assert phase2["pool_size"] == 4
    assert 2 <= phase2["pool_used"] <= 4  # top-2 of 4: more than one pair in use across images
    assert set(phase2["entropy_bits"]) == {"many", "medium", "few"}
    assert sum(phase2["per_class_entries"]) > 4  # not every image of every class picks the same two


def test_a_collapsed_start_is_reported_in_plain_words():
    logs: list[str] = []
    t = trainer(backbone(), logs=logs, epochs1=1, epochs2=0)
    t._check_collapse(torch.ones(8, 5) + 1e-4 * torch.randn(8, 5), state := {"warnings": []})
    assert state["start_feature_cosine"] > 0.99
    assert state["warnings"] and "nearly identical" in state["warnings"][0]
    assert any(line.startswith("WARNING:") for line in logs)


def test_not_learning_after_the_first_epoch_is_warned_and_reported():
    logs: list[str] = []
    t = trainer(backbone(), logs=logs)
    ckpt = t._fresh_checkpoint()
    t._check_learning(ckpt, {"phase": 1, "epoch": 1, "train_acc": 30.0})  # 4 classes: chance 25 %
    assert len(ckpt.state["warnings"]) == 1 and "not learning" in ckpt.state["warnings"][0]
    assert any("not learning" in line for line in logs)
    for row in ({"phase": 1, "epoch": 1, "train_acc": 60.0}, {"phase": 1, "epoch": 2, "train_acc": 20.0}):
        t._check_learning(ckpt, row)  # learning, or past the first epoch: no new warning
    assert len(ckpt.state["warnings"]) == 1


def test_a_normal_run_with_progress_bars_raises_no_warning(recwarn):
    trainer(backbone(), epochs1=1, epochs2=1, progress=True).fit()
    assert not [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]
