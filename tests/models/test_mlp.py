"""The sine-wave network: MLP features and the one-output regression head (MAML's 1-40-40-1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewshot.algorithms import ANIL, MAML
from fewshot.models import MLP, FewShotRegressor, backbone_settings, build_backbone


def test_mlp_with_the_regression_head_is_mamls_1_40_40_1_relu_network():
    network = FewShotRegressor(MLP(1, [40, 40]))
    shapes = [tuple(p.shape) for p in network.parameters()]
    assert shapes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    x = torch.linspace(-5, 5, 7)[:, None]
    layers = network.features.layers
    by_hand = network.head(F.relu(layers[2](F.relu(layers[0](x)))))
    torch.testing.assert_close(network(x), by_hand)
    assert network(x).shape == (7, 1)
    assert network.head_parameter_names() == {"head.weight", "head.bias"}
    assert network.task_loss is F.mse_loss


def test_mlp_is_rebuilt_from_its_settings():
    mlp = MLP(in_features=3, hidden_features=[8, 4, 2])
    settings = backbone_settings(mlp)
    assert settings == {"class_path": "fewshot.models.mlp.MLP",
                        "init_args": {"in_features": 3, "hidden_features": [8, 4, 2]}}
    rebuilt = build_backbone(settings)
    assert rebuilt.out_features == 2
    assert rebuilt(torch.zeros(5, 3, 1, 1)).shape == (5, 2)  # trailing singletons flattened
    assert build_backbone("fewshot.models.MLP").out_features == 40


@pytest.mark.parametrize(("arguments", "message"), [
    ({"in_features": 0}, "in_features=0"),
    ({"hidden_features": []}, "at least one positive hidden width"),
    ({"hidden_features": [40, 0]}, r"hidden_features=\[40, 0\]"),
])
def test_bad_sizes_are_refused_by_name(arguments, message):
    with pytest.raises(ValueError, match=message):
        MLP(**arguments)
    with pytest.raises(ValueError, match="at least 1 output"):
        FewShotRegressor(MLP(), outputs=0)


@pytest.mark.parametrize("algorithm", [MAML(inner_steps=2, inner_lr=0.01), ANIL(inner_steps=2, inner_lr=0.01)],
                         ids=["MAML", "ANIL"])
def test_algorithms_built_with_a_regressor_adapt_by_mean_squared_error(algorithm):
    """The loss follows the network: SGD steps on the support MSE, scored by the query MSE."""
    torch.manual_seed(0)
    network = FewShotRegressor(MLP())
    algorithm.build(network)
    params = dict(network.named_parameters())
    task = (torch.rand(5, 1), torch.rand(5, 1), torch.rand(10, 1), torch.rand(10, 1))
    result = algorithm.evaluation_tasks()(network, (params, {}), task)
    adapted = {n: p.detach() for n, p in params.items()}
    expected = []
    for step in range(3):
        expected.append(F.mse_loss(torch.func.functional_call(network, adapted, (task[2],)), task[3]))
        if step == 2:
            break
        names = [n for n in adapted if not isinstance(algorithm, ANIL) or n.startswith("head.")]
        for name in names:
            adapted[name].requires_grad_()
        loss = F.mse_loss(torch.func.functional_call(network, adapted, (task[0],)), task[1])
        grads = torch.autograd.grad(loss, [adapted[n] for n in names])
        adapted = {**{n: p.detach() for n, p in adapted.items()},
                   **{n: (adapted[n] - 0.01 * g).detach() for n, g in zip(names, grads, strict=True)}}
    torch.testing.assert_close(result.losses, torch.stack(expected))
    assert result.accuracies.isnan().all()  # accuracy means nothing for real-valued targets
