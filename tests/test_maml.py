"""The functional MAML core against hand-written autograd references, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fewshot.core.episode import Episodes
from fewshot.maml import adapt, meta_batch_metrics, resolve_batching, task_query_metrics
from fewshot.models import Conv4, FewShotClassifier


def tiny_model(ways: int = 3, seed: int = 0) -> FewShotClassifier:
    torch.manual_seed(seed)
    model = FewShotClassifier(Conv4(in_channels=1, hidden_channels=4, image_size=16), ways)
    model = model.double()
    with torch.no_grad():  # non-trivial affine values, so adapting them matters
        for name, p in model.named_parameters():
            if "blocks.1." in name or "blocks.5." in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def random_episodes(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2) -> Episodes:
    generator = torch.Generator().manual_seed(1)
    def images(n: int) -> torch.Tensor:
        return torch.rand(tasks, n, 1, 16, 16, generator=generator, dtype=torch.float64)
    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1)
    return Episodes(images(ways * shots), labels(shots), images(ways * queries), labels(queries))


def reference_meta_gradient(model, episodes, steps, lr, first_order):
    """Per-task MAML written with plain ``torch.autograd.grad``, as in the paper."""
    names = [name for name, _ in model.named_parameters()]
    meta_params = [p for _, p in model.named_parameters()]
    total = 0.0
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        fast = list(meta_params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=True)), (sx,)), sy)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        total = total + F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=True)), (qx,)), qy)
    meta_loss = total / episodes.num_tasks
    return meta_loss, torch.autograd.grad(meta_loss, meta_params)


def core_meta_gradient(model, episodes, steps, lr, first_order, batching):
    params = dict(model.named_parameters())
    losses, _, _ = meta_batch_metrics(
        model, params, episodes, steps=steps, lr=lr, first_order=first_order, batching=batching
    )
    meta_loss = losses[:, -1].mean()
    return meta_loss, torch.autograd.grad(meta_loss, list(params.values()))


def relative_error(actual, expected) -> float:
    a = torch.cat([g.flatten() for g in actual])
    e = torch.cat([g.flatten() for g in expected])
    return ((a - e).norm() / e.norm()).item()


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_autograd_reference(batching, steps, first_order):
    model, episodes = tiny_model(), random_episodes()
    ref_loss, ref_grads = reference_meta_gradient(model, episodes, steps, 0.4, first_order)
    loss, grads = core_meta_gradient(model, episodes, steps, 0.4, first_order, batching)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert relative_error(grads, ref_grads) < 1e-8


def test_batch_norm_affine_parameters_are_adapted_and_get_second_order_gradients():
    # The trap this guards: vmap + fused batch norm gives wrong second-order gradients for the
    # adapted affine parameters. Their meta-gradient must match the loop reference exactly.
    model, episodes = tiny_model(), random_episodes()
    names = [name for name, _ in model.named_parameters()]
    _, ref = reference_meta_gradient(model, episodes, 2, 0.4, False)
    _, vmapped = core_meta_gradient(model, episodes, 2, 0.4, False, "vmap")
    for name, r, v in zip(names, ref, vmapped, strict=True):
        if name.endswith(("1.weight", "1.bias")):  # the first block's batch norm
            assert v.abs().sum() > 0
            torch.testing.assert_close(v, r, rtol=1e-9, atol=1e-12, msg=name)


def smooth_tiny_model() -> FewShotClassifier:
    """The tiny model with ReLU and max-pool swapped for smooth ops: the inner gradient of a
    ReLU net jumps at kinks, which would break a finite-difference check of its derivative."""
    model = tiny_model()
    for index, layer in enumerate(model.features.blocks):
        if isinstance(layer, torch.nn.ReLU):
            model.features.blocks[index] = torch.nn.Softplus()
        elif isinstance(layer, torch.nn.MaxPool2d):
            model.features.blocks[index] = torch.nn.AvgPool2d(2)
    return model


def test_second_order_matches_directional_finite_difference():
    model, episodes = smooth_tiny_model(), random_episodes(tasks=2)
    params = dict(model.named_parameters())
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def meta_loss(p):
        losses, _, _ = meta_batch_metrics(model, p, episodes, steps=2, lr=0.4, batching="vmap")
        return losses.mean()

    grads = torch.autograd.grad(meta_loss(params), list(params.values()))
    analytic = sum((g * direction[k]).sum() for g, k in zip(grads, params, strict=True))
    eps = 1e-6
    with torch.no_grad():
        plus = {k: v + eps * direction[k] for k, v in params.items()}
        minus = {k: v - eps * direction[k] for k, v in params.items()}
    numeric = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-6)


def test_first_order_differs_from_second_order():
    model, episodes = tiny_model(), random_episodes()
    _, second = core_meta_gradient(model, episodes, 2, 0.4, False, "vmap")
    _, first = core_meta_gradient(model, episodes, 2, 0.4, True, "vmap")
    assert relative_error(first, second) > 1e-3


def test_zero_steps_is_plain_query_loss():
    model, episodes = tiny_model(), random_episodes(tasks=1)
    params = dict(model.named_parameters())
    losses, _, _ = task_query_metrics(model, params, *(t[0] for t in episodes), steps=0, lr=0.4)
    logits = model(episodes.query_x[0])
    assert losses.item() == pytest.approx(F.cross_entropy(logits, episodes.query_y[0]).item())


def test_every_step_scores_before_and_after_each_step_and_adaptation_fits_support():
    model, episodes = tiny_model(), random_episodes(tasks=2)
    params = dict(model.named_parameters())
    # Score the support set as the query: loss must fall step by step.
    support_as_query = Episodes(*episodes[:2], *episodes[:2])
    losses, accuracies, _ = meta_batch_metrics(
        model, params, support_as_query, steps=4, lr=0.1, every_step=True, batching="loop"
    )
    assert losses.shape == accuracies.shape == (2, 5)
    assert (losses[:, 1:] < losses[:, :-1]).all()
    adapted = adapt(model, params, episodes.support_x[0], episodes.support_y[0], steps=4, lr=0.1)
    final = F.cross_entropy(functional_call(model, adapted, (episodes.support_x[0],)), episodes.support_y[0])
    assert final.item() == pytest.approx(losses[0, -1].item(), rel=1e-12)


def test_accuracy_is_fraction_of_correct_query_predictions():
    model, episodes = tiny_model(), random_episodes(tasks=1)
    params = dict(model.named_parameters())
    _, accuracy, _ = task_query_metrics(model, params, *(t[0] for t in episodes), steps=0, lr=0.0)
    predictions = model(episodes.query_x[0]).argmax(-1)
    expected = (predictions == episodes.query_y[0]).double().mean().item()
    assert accuracy.item() == pytest.approx(expected)


def test_vmap_chunking_gives_the_same_result():
    model, episodes = tiny_model(), random_episodes(tasks=3)
    _, full = core_meta_gradient(model, episodes, 1, 0.4, False, "vmap")
    params = dict(model.named_parameters())
    losses, _, _ = meta_batch_metrics(model, params, episodes, steps=1, lr=0.4, batching="vmap", chunk_size=2)
    chunked = torch.autograd.grad(losses.mean(), list(params.values()))
    assert relative_error(chunked, full) < 1e-12


def test_resolve_batching(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert resolve_batching("auto", torch.device("cpu"), images_per_task=10) == "threads"
    assert resolve_batching("auto", torch.device("cpu"), images_per_task=300) == "threads"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert resolve_batching("auto", torch.device("cpu"), images_per_task=10) == "vmap"
    assert resolve_batching("auto", torch.device("cpu"), images_per_task=30) == "loop"
    assert resolve_batching("auto", torch.device("cuda"), images_per_task=300) == "vmap"
    assert resolve_batching("vmap", torch.device("cpu")) == "vmap"
    with pytest.raises(ValueError, match="'sequential'"):
        resolve_batching("sequential", torch.device("cpu"))


def test_the_readme_core_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
              if "meta_batch_metrics(" in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["metrics"].losses.shape == (4, 1)
    assert all(p.grad is not None for p in namespace["model"].parameters())
