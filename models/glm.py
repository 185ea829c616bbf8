"""River's logistic regression learning one example, stepped by hand. Pure, no I/O.

River's ``LogisticRegression.learn_one`` builds a masked weight vector, a gradient vector and, with
AdaGrad, raises and catches an exception in ``Optimizer.step`` on every call: ~60 µs for 40 keys,
where the arithmetic is a few µs. :func:`learn_one` makes the same floating-point operations in the
same order on the same objects (weights, intercept, AdaGrad's sums, its iteration count), so the
model is the one River would have learned, to the bit, and stays a River object (checkpoints,
serving and River's own ``learn_one`` go on working on it). ~27 µs for 40 keys.

Only the configuration the tournament uses is stepped by hand (AdaGrad, the log loss, no L1, a
constant intercept rate, zero initial weights); any other goes to River's ``learn_one``.

>>> from river import linear_model, optim
>>> def model(l2):
...     return linear_model.LogisticRegression(optimizer=optim.AdaGrad(0.5), l2=l2, intercept_lr=0.02)
>>> for l2 in (1e-4, 0.0):
...     river, ours = model(l2), model(l2)
...     for i in range(300):
...         x = {"a": (i % 7) / 3, "b": -1.5 * (i % 5), f"c={i % 4}": 1.0, "big": 40.0 * (i % 2)}
...         river.learn_one(x, i % 3 == 0); learn_one(ours, x, i % 3 == 0)
...     print(dict(river.weights) == dict(ours.weights), river.intercept == ours.intercept,
...           dict(river.optimizer.g2) == dict(ours.optimizer.g2), river.optimizer.n_iterations == ours.optimizer.n_iterations)
True True True True
True True True True
"""

from __future__ import annotations

import math
from typing import Any

from river import linear_model, optim


def learn_one(model: linear_model.LogisticRegression, x: dict[str, float], y: bool) -> None:
    """``model.learn_one(x, y)``, the same bits (see the module's docstring)."""
    if not _by_hand(model):
        model.learn_one(x, y)
        return
    weights, opt, loss = model._weights, model.optimizer, model.loss
    # GLM._eval_gradient_one: the log loss's gradient at the raw score, weighted, clipped
    raw = weights.dot(x) + model.intercept
    weight = loss.weight_pos
    if y == 0:
        sign, weight = -1, loss.weight_neg
    else:
        sign = int(y)
    z = raw * sign
    if z > 18.0:
        gradient = weight * math.exp(-z) * -sign
    elif z < -18.0:
        gradient = weight * -sign
    else:
        gradient = weight * -sign / (math.exp(z) + 1.0)
    gradient = float(max(min(gradient, model.clip_gradient), -model.clip_gradient))
    # GLM._fit: the intercept first, then AdaGrad on every key of x (its L2 term on the same keys)
    model.intercept -= model.intercept_lr.get(opt.n_iterations) * gradient
    squares, rate, eps, l2 = opt.g2, opt.learning_rate, opt.eps, model.l2
    get = weights.get
    for k, v in x.items():
        w = get(k, 0.0)
        g = gradient * v + l2 * w if l2 else gradient * v
        s = squares[k] = squares[k] + g**2
        weights[k] = w - rate / (s + eps) ** 0.5 * g
    opt.n_iterations += 1


def _by_hand(model: Any) -> bool:
    return (type(model) is linear_model.LogisticRegression and type(model.optimizer) is optim.AdaGrad
            and type(model.loss) is optim.losses.Log and not model.l1
            and type(model.intercept_lr) is optim.schedulers.Constant
            and type(model.optimizer.lr) is optim.schedulers.Constant
            and type(model.initializer) is optim.initializers.Zeros)
