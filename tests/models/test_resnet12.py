"""ResNet-12: the standard shapes and size, and everything Conv4 supports (vmap, per-step batch
norm, MetaLearner, the CLI) works with it too."""

from __future__ import annotations

import doctest

import pytest
import torch
from episodes_for_tests import random_episodes, relative_error

import fewshot.models.resnet12
from fewshot.algorithms import MAML, MAMLPlusPlus
from fewshot.algorithms.mamlpp import use_per_step_batch_norm
from fewshot.cli import main
from fewshot.core.episode import Episodes
from fewshot.execution import Loop, Vmap, run_meta_batch
from fewshot.models import FewShotClassifier, ResNet12, TransductiveBatchNorm2d
from fewshot.models.per_step_batch_norm import PerStepBatchNorm2d
from fewshot.training.cli import build_cli
from fewshot.training.module import MetaLearner

EXECUTORS = {"vmap": Vmap, "loop": Loop}
TINY = (4, 8, 8, 16)


def standard_parameter_count(in_channels: int, channels: tuple[int, ...]) -> int:
    """Per block: three 3x3 convolutions and a 1x1 shortcut, without bias; four batch norms
    with a weight and a bias per channel."""
    total = 0
    for c_in, c_out in zip((in_channels, *channels[:-1]), channels, strict=True):
        convolutions = 9 * c_in * c_out + 2 * 9 * c_out * c_out + c_in * c_out
        total += convolutions + 4 * 2 * c_out
    return total


def tiny_network(ways: int = 3, seed: int = 0) -> FewShotClassifier:
    torch.manual_seed(seed)
    network = FewShotClassifier(ResNet12(1, TINY, image_size=16), ways).double()
    with torch.no_grad():  # non-trivial batch-norm affine values, so adapting them matters
        for module in network.modules():
            if isinstance(module, TransductiveBatchNorm2d):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return network


def meta_gradient(network, episodes, executor: str, steps: int = 2, first_order: bool = False):
    """MAML's meta-loss, meta-gradient and per-task results on ``network`` (built here)."""
    maml = MAML(inner_steps=steps, inner_lr=0.1, first_order=first_order)
    maml.build(network)
    results = run_meta_batch(maml, network, episodes, EXECUTORS[executor]())
    loss = maml.meta_loss(results, epoch=0)
    return loss, torch.autograd.grad(loss, list(network.parameters())), results


def test_standard_network_maps_84x84_to_5x5x640_and_640_features():
    features = ResNet12(in_channels=3, image_size=84)
    x = torch.rand(2, 3, 84, 84)
    with torch.no_grad():
        assert tuple(features.blocks(x).shape) == (2, 640, 5, 5)
        assert tuple(features(x).shape) == (2, 640) and features.out_features == 640
    flat = ResNet12(in_channels=3, image_size=84, avg_pool=False)
    assert flat.out_features == 640 * 5 * 5


@pytest.mark.parametrize(("image_size", "avg_pool", "features"),
                         [(16, True, 16), (16, False, 16), (32, False, 16 * 2 * 2), (28, True, 16)])
def test_small_images_and_tiny_channels(image_size, avg_pool, features):
    backbone = ResNet12(3, TINY, image_size=image_size, avg_pool=avg_pool)
    assert backbone.out_features == features
    assert tuple(backbone(torch.rand(2, 3, image_size, image_size)).shape) == (2, features)


def test_parameter_count_is_the_standard_one():
    assert standard_parameter_count(3, (64, 160, 320, 640)) == 12_424_320  # "12.4M"
    for in_channels, channels in ((3, (64, 160, 320, 640)), (1, TINY)):
        backbone = ResNet12(in_channels, channels)
        assert sum(p.numel() for p in backbone.parameters()) == standard_parameter_count(
            in_channels, channels)
    convolutions = [m for m in ResNet12().modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in ResNet12().modules() if isinstance(m, TransductiveBatchNorm2d)]
    assert len(convolutions) == 16 and len(norms) == 16
    assert all(c.bias is None for c in convolutions)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="need >= 16"):
        ResNet12(3, TINY, image_size=15)
    with pytest.raises(ValueError, match="4 positive block widths"):
        ResNet12(3, (4, 8, 16))


def test_norm_layer_is_injectable():
    backbone = ResNet12(1, TINY, image_size=16, norm_layer=torch.nn.BatchNorm2d)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules()) == 16


def test_docstring_example_runs():
    result = doctest.testmod(fewshot.models.resnet12)
    assert result.attempted >= 2 and result.failed == 0


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_and_loop_give_the_same_meta_gradient(first_order):
    network, episodes = tiny_network(), random_episodes(tasks=2, shots=1)
    (vmap_loss, vmap_grads, _), (loop_loss, loop_grads, _) = (
        meta_gradient(network, episodes, executor, first_order=first_order)
        for executor in ("vmap", "loop"))
    assert vmap_loss.item() == pytest.approx(loop_loss.item(), rel=1e-12)
    assert relative_error(vmap_grads, loop_grads) < 1e-8
    assert all(g.abs().sum() > 0 for g in loop_grads)  # every parameter is meta-learned


def test_per_step_batch_norm_replaces_all_sixteen_norms():
    network, episodes = tiny_network(), random_episodes(tasks=2)
    before = network(episodes.query_x[0])
    norms = use_per_step_batch_norm(network, slots=3, per_step_affine=True, mode="per_step_running")
    assert len(norms) == 16 and not any(isinstance(m, TransductiveBatchNorm2d)
                                        for m in network.modules())
    network.double()
    assert isinstance(network.features.blocks[3].shortcut[1], PerStepBatchNorm2d)
    # Every slot starts from the shared values (copied through float32), so the unadapted
    # network computes what it did.
    torch.testing.assert_close(network(episodes.query_x[0]), before, rtol=1e-5, atol=1e-5)
    vmap_loss, vmap_grads, results = meta_gradient(network, episodes, "vmap")
    loop_loss, loop_grads, loop_results = meta_gradient(network, episodes, "loop")
    assert vmap_loss.item() == pytest.approx(loop_loss.item(), rel=1e-12)
    assert relative_error(vmap_grads, loop_grads) < 1e-8
    statistics = results.batch_norm_statistics
    assert {key.split("/")[0] for key in statistics} == {norm.key for norm in norms}
    assert statistics.keys() == loop_results.batch_norm_statistics.keys()
    for key, value in loop_results.batch_norm_statistics.items():
        torch.testing.assert_close(statistics[key], value, rtol=1e-10, atol=1e-12, msg=key)
    assert all(key.startswith("inner_grad_norm/") for key in results.diagnostics)
    network.eval()  # queries now use the (untouched) running statistics of their slot
    maml = MAML(inner_steps=2, inner_lr=0.1)
    maml.build(network)
    evaluated = run_meta_batch(maml, network, episodes, Vmap(), training=False)
    assert evaluated.losses.shape == (2, 3) and torch.isfinite(evaluated.losses).all()


@pytest.mark.parametrize("mamlpp", [False, True])
def test_meta_learner_training_step_gives_finite_gradients(mamlpp):
    torch.manual_seed(0)
    algorithm = MAMLPlusPlus(inner_steps=2, inner_lr=0.1, per_step_bn_weights=True,
                             batch_norm="per_step_running", learned_rates="per_tensor",
                             multi_step_loss=True, derivative_order_annealing=False) if mamlpp \
        else MAML(inner_steps=2, inner_lr=0.1)
    learner = MetaLearner(backbone=ResNet12(1, TINY, image_size=16), ways=3, algorithm=algorithm)
    batch = random_episodes(tasks=2)
    batch = Episodes(batch.support_x.float(), batch.support_y, batch.query_x.float(), batch.query_y)
    loss, results = learner.meta_loss(batch, epoch=0)
    loss.backward()
    assert torch.isfinite(loss) and not learner.algorithm.first_order_at(0)
    assert results.objective.shape == (2, 3 if mamlpp else 1)  # MSL scores every step
    gradients = {name: p.grad for name, p in learner.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in gradients.values())
    assert gradients["network.features.blocks.0.conv1.weight"].abs().sum() > 0
    weights = learner.network.features.blocks[0].conv1.weight.detach().clone()
    learner.configure_optimizers().step()
    assert not torch.equal(weights, learner.network.features.blocks[0].conv1.weight)


def test_cli_links_data_sizes_into_the_backbone():
    cli = build_cli(["--model.backbone=fewshot.models.ResNet12", f"--model.backbone.channels={list(TINY)}",
                     "--model.backbone.avg_pool=false", "--data.image_size=32"], run=False)
    features = cli.model.network.features
    assert isinstance(features, ResNet12) and features.out_features == 16 * 2 * 2
    assert features.blocks[0].conv1.in_channels == 1  # data.channels of Omniglot


def test_fewshot_fit_accepts_the_backbone(fake_omniglot, tmp_path):
    root, cache = fake_omniglot
    main(["fit", f"--data.root={root}", f"--data.cache_dir={cache}", "--data.ways=3",
          "--data.queries=2", "--data.meta_batch_size=2", "--data.eval_queries=2",
          "--data.val_episodes=2", "--data.steps_per_epoch=1",
          "--model.backbone=fewshot.models.ResNet12", f"--model.backbone.channels={list(TINY)}",
          "--model.executor=fewshot.execution.Loop", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
          f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"])
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    assert checkpoint["global_step"] == 1
    state = checkpoint["state_dict"]
    assert state["network.features.blocks.3.shortcut.0.weight"].shape == (16, 8, 1, 1)
    assert state["network.head.weight"].shape == (3, 16)
