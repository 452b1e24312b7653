"""Mixed-precision allocation: matches exhaustive search up to its stated cost rounding,
never exceeds the budget, and refuses budgets nothing fits."""

import itertools
import random

import pytest

from compress.quant import allocate


def _random_problem(rng: random.Random, modules: int, convex: bool):
    """Per module: options with increasing cost and decreasing loss (as bits vs error
    behave); `convex` makes the loss per extra bit shrink with each upgrade."""
    losses, costs = {}, {}
    for m in range(modules):
        name = f"layer{m}"
        size = rng.choice([64, 128, 256])
        cost, loss, rate = float(size * 2), rng.uniform(1, 10), rng.uniform(0.3, 0.7)
        losses[name], costs[name] = {}, {}
        for o in range(4):
            losses[name][f"o{o}"], costs[name][f"o{o}"] = loss, cost
            cost += size * rng.choice([1, 2])
            loss *= rate if convex else rng.uniform(0.1, 0.95)
    return losses, costs


def _brute_force(losses, costs, budget):
    names = list(losses)
    best = None
    for combo in itertools.product(*(list(losses[n]) for n in names)):
        cost = sum(costs[n][o] for n, o in zip(names, combo, strict=True))
        if cost > budget:
            continue
        loss = sum(losses[n][o] for n, o in zip(names, combo, strict=True))
        if best is None or loss < best[0]:
            best = (loss, dict(zip(names, combo, strict=True)))
    return best


def _total(table, choice):
    return sum(table[n][o] for n, o in choice.items())


@pytest.mark.parametrize("seed", range(30))
def test_allocation_is_optimal_up_to_the_cost_rounding(seed):
    rng = random.Random(seed)
    losses, costs = _random_problem(rng, modules=5, convex=seed % 2 == 0)
    cheapest = sum(min(c.values()) for c in costs.values())
    dearest = sum(max(c.values()) for c in costs.values())
    budget = rng.uniform(cheapest, dearest)
    resolution = 1000
    choice = allocate.allocate(losses, costs, budget, resolution=resolution)
    assert set(choice) == set(losses)
    assert _total(costs, choice) <= budget
    # No worse than the exact optimum for the budget less one rounding unit per module,
    # and never better than the exact optimum for the full budget.
    unit = (budget - cheapest) / resolution
    assert _total(losses, choice) <= _brute_force(losses, costs, budget - 5 * unit)[0] + 1e-9
    assert _total(losses, choice) >= _brute_force(losses, costs, budget)[0] - 1e-9


def test_budget_exactly_at_a_combination_is_found():
    losses = {"a": {"lo": 10.0, "hi": 1.0}, "b": {"lo": 4.0, "hi": 3.0}}
    costs = {"a": {"lo": 100.0, "hi": 200.0}, "b": {"lo": 100.0, "hi": 200.0}}
    assert allocate.allocate(losses, costs, 300) == {"a": "hi", "b": "lo"}
    assert allocate.allocate(losses, costs, 400) == {"a": "hi", "b": "hi"}
    assert allocate.allocate(losses, costs, 299) == {"a": "lo", "b": "lo"}


def test_a_greedy_trap_is_avoided():
    # Loss per bit favours a's upgrade, which strands the budget; b + c save more.
    losses = {"a": {"lo": 10.0, "hi": 0.0}, "b": {"lo": 6.0, "hi": 0.0},
              "c": {"lo": 6.0, "hi": 0.0}}
    costs = {"a": {"lo": 0.0, "hi": 9.0}, "b": {"lo": 0.0, "hi": 6.0},
             "c": {"lo": 0.0, "hi": 6.0}}
    assert allocate.allocate(losses, costs, 12.0) == {"a": "lo", "b": "hi", "c": "hi"}


def test_budget_below_the_cheapest_options_is_refused():
    losses = {"a": {"x": 1.0}, "b": {"x": 1.0}}
    costs = {"a": {"x": 10.0}, "b": {"x": 10.0}}
    with pytest.raises(ValueError, match="cheapest options need 20 bits"):
        allocate.allocate(losses, costs, 19.0)
