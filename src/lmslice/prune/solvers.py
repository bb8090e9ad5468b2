"""The elimination solvers: channels and heads removed with the others refit by damped least squares,
and the refit itself; the criteria that choose channels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmslice.errors import LmsliceError
from lmslice.prune.shapes import HeadShape


CRITERIA = ("obs", "energy", "leverage")


DEFAULT_CRITERION = "obs"


# λ = DEFAULT_DAMPING · mean diag G where channels and heads are chosen (OBS on G + λI), REFIT_DAMPING · mean
# diag G[S, S] in the consumer's refit toward its own weights (`refit`): the objective ‖ΔY‖² + λ‖ΔW‖².
# A larger λ makes the choice see less of the calibration text's own correlations; these values did best
# in and across domains of the grid measured with benchmarks/cross_domain.py (docs/method.md).
DEFAULT_DAMPING = 0.1


REFIT_DAMPING = 0.3


def damping_shift(matrix: torch.Tensor, channels: int, damping: float) -> torch.Tensor:
    """λ = damping · the mean of the first `channels` diagonal entries of G (not the constant one's), or
    λ = damping where that mean is 0: an MLP whose input is all zero (G = 0) then refits its consumer to
    its own weights (it wrote zero and still does) instead of inverting a zero matrix."""
    return _shift(matrix.diagonal()[:channels], damping)


def _shift(diagonal: torch.Tensor, damping: float) -> torch.Tensor:
    mean = diagonal.mean()
    return damping * (mean if mean > 0 else torch.ones_like(mean))


# Which channels and heads to remove is a ranking of their costs against each other, so the eliminations
# that choose them (and the plan's paths) run in float32: half the memory of float64 (at Llama-3-70B's MLP
# width one 28672² matrix is 3.3 GB instead of 6.6 GB) and many times faster on accelerators. The refits
# that write the weights stay float64 (`refit`). See docs/large-models.md for what it changes.
ELIMINATION_DTYPE = torch.float32


def damped_inverse(matrix: torch.Tensor, channels: int, damping: float,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """(G + λI)⁻¹ in `dtype` (default ELIMINATION_DTYPE), λ on the first `channels` entries
    (`damping_shift`), through the Cholesky factor of one copy of G: besides G, no more than two matrices
    of its size: the factor and the inverse overwrite the copy. G is symmetric, so the copy is taken as its
    transpose, column-major as LAPACK works, and the result's transpose is the (symmetric) inverse:
    row-major, no temporary of G's size (at Llama-3-70B's MLP width one float32 copy is 3.3 GB)."""
    regularised = matrix.to(dtype or ELIMINATION_DTYPE, copy=True).mT
    regularised.diagonal()[:channels] += damping_shift(regularised, channels, damping)
    factor = torch.linalg.cholesky(regularised, out=regularised)
    return torch.cholesky_inverse(factor, out=factor).mT


def keep_channels(weight: torch.Tensor, matrix: torch.Tensor, channels: int, keep: int, criterion: str,
                  damping: float) -> torch.Tensor:
    """The sorted indices of the `keep` channels to keep out of `channels`.

    - "energy": what each channel writes, alone: G_jj · ‖W[:, j]‖².
    - "leverage": ridge leverage of each channel's activations, diag(G (G + λI)⁻¹) (as MoDeGPT);
      blind to the consumer's weights.
    - "obs": greedy backward elimination, optimal-brain-surgeon style: remove the channels whose
      deletion, with the others refit by least squares, raises the output error least
      (‖W[:, j]‖² / (G⁻¹)_jj), update W and G⁻¹, repeat.
    """
    if criterion not in CRITERIA:
        raise LmsliceError(f"unknown channel criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if keep >= channels or keep == 0:
        return torch.arange(min(keep, channels), device=matrix.device)
    if criterion == "energy":
        scores = matrix.diagonal()[:channels] * weight[:, :channels].pow(2).sum(0)
    elif criterion == "leverage":  # diag(G (G + λI)⁻¹), both symmetric
        scores = (matrix * damped_inverse(matrix, channels, damping, matrix.dtype)).sum(0)[:channels]
    else:
        # Channels leave in steps of about 1/16 of the cut: 16 block updates instead of one per channel,
        # at an output error close to finer steps' (docs/method.md).
        step = max(1, math.ceil((channels - keep) / 16))
        return eliminate(weight.to(ELIMINATION_DTYPE), damped_inverse(matrix, channels, damping), channels,
                         channels - keep, step)[0]
    return torch.sort(torch.topk(scores, keep).indices).values


def eliminate(weight: torch.Tensor, inverse: torch.Tensor, channels: int, remove: int, step: int,
              ) -> tuple[torch.Tensor, list[float]]:
    """Optimal-brain-surgeon elimination from (G + λI)⁻¹ (`damped_inverse`, which it uses up): removes
    `remove` channels, `step` at a time, each step the cheapest by their single-channel cost
    ‖W[:, j]‖² / (G⁻¹)_jj, then W and G⁻¹ are updated jointly for the removed set. Returns the kept
    channels and the output error (tr ΔW G ΔWᵀ) after each step.

    Each step is one step of a blocked, pivoted Cholesky elimination of G⁻¹: the removed channels are
    swapped to the front of the channels left (only their rows and columns move) and the update is a
    product into the trailing square, a view in place. Later steps work on the channels left alone, and
    no step copies the inverse."""
    weight = weight.clone()
    order = torch.arange(len(inverse), device=inverse.device)  # the channel each row of `inverse` stands for
    errors: list[float] = []
    error = 0.0
    start = 0  # rows before `start` are the channels removed so far
    while remove > 0:
        left = slice(start, None)
        costs = weight[:, left].pow(2).sum(0) / inverse.diagonal()[left].clamp_min(torch.finfo(inverse.dtype).tiny)
        costs[order[left] >= channels] = math.inf  # the constant channel of a bias is never removed
        count = min(step, remove)
        removed = torch.topk(costs, count, largest=False).indices + start
        _swap_to(start, removed, weight, inverse, order)
        end = start + count
        pivot = torch.linalg.inv(inverse[start:end, start:end])
        scaled = weight[:, start:end] @ pivot
        error += (scaled * weight[:, start:end]).sum().item()
        errors.append(error)
        rows = inverse[start:end, end:]
        weight[:, end:].addmm_(scaled, rows, alpha=-1)
        inverse[end:, end:].addmm_(inverse[end:, start:end] @ pivot, rows, alpha=-1)
        start, remove = end, remove - count
    return torch.sort(order[start:][order[start:] < channels]).values, errors


def _swap_to(start: int, chosen: torch.Tensor, weight: torch.Tensor, inverse: torch.Tensor,
             order: torch.Tensor) -> None:
    """Moves the rows and columns at positions `chosen` (all ≥ `start`) to `start`, `start` + 1, …, each
    swapped with whichever position it displaces: W's columns, G⁻¹'s rows and columns and `order`."""
    source, target = _swaps(start, chosen)
    inverse[target] = inverse[source]
    inverse[:, target] = inverse[:, source]
    weight[:, target] = weight[:, source]
    order[target] = order[source]


def _swaps(start: int, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions to copy from and to that bring `chosen` (all ≥ `start`) to `start`, `start` + 1, …
    by swapping each with the position it displaces (those already there stay)."""
    front = torch.arange(start, start + len(chosen), device=chosen.device)
    outside = chosen[chosen >= start + len(chosen)]
    taken = torch.zeros(len(chosen), dtype=torch.bool, device=chosen.device)
    taken[chosen[chosen < start + len(chosen)] - start] = True
    vacated = front[~taken]
    return torch.cat([outside, vacated]), torch.cat([vacated, outside])


@dataclass(frozen=True)
class InputRows:
    """What a consumer read, X [tokens, channels], kept instead of G = XᵀX where the tokens are fewer than
    the channels (a plan's few windows before a wide MLP): `eliminate_from_rows` then never forms a
    channels² matrix."""

    rows: torch.Tensor


def rows_are_cheaper(tokens: int, channels: int) -> bool:
    """Whether eliminating from the inputs X themselves (`eliminate_from_rows`, tokens × channels² work)
    beats eliminating from G (channels³): at most a quarter as many tokens as channels."""
    return 4 * tokens <= channels


def eliminate_from_rows(weight: torch.Tensor, inputs: InputRows, remove: int, step: int, damping: float,
                        ) -> list[float]:
    """`eliminate`'s errors on G = XᵀX + λI from X itself (no constant channel), in the dtype of `weight`
    and X, with the t×t matrices in float64: (G_S + λI)⁻¹ = (I − X_Sᵀ M X_S) / λ, M = (λI + X_S X_Sᵀ)⁻¹,
    and removing channels R updates M ← M + P A⁻¹ Pᵀ (P = M X_R, A = I − X_Rᵀ P = λ (G_S + λI)⁻¹_RR). The
    same channels leave as in `eliminate` at a cost of tokens × channels² instead of channels³."""
    rows = inputs.rows.to(weight.dtype, copy=True)
    shift = _shift(rows.pow(2).sum(0, dtype=torch.float64), damping).item()  # G's diagonal: X's column norms²
    weight = weight.clone()
    wide = rows.double()
    inner = wide @ wide.T
    inner.diagonal().add_(shift)
    within = torch.cholesky_inverse(torch.linalg.cholesky(inner))  # M
    explained = ((within @ wide) * wide).sum(0)  # x_jᵀ M x_j: the damped inverse's diagonal is (1 − it) / λ
    del wide, inner
    errors: list[float] = []
    error = 0.0
    start = 0
    while remove > 0:
        left = slice(start, None)
        diagonal = ((1 - explained[left]) / shift).clamp_min(torch.finfo(torch.float64).tiny)
        costs = weight[:, left].pow(2).sum(0).double() / diagonal
        count = min(step, remove)
        source, target = _swaps(start, torch.topk(costs, count, largest=False).indices + start)
        rows[:, target], weight[:, target], explained[target] = rows[:, source], weight[:, source], explained[source]
        end = start + count
        removed_rows = rows[:, start:end].double()  # X_R
        projected = within @ removed_rows  # P
        pivot = torch.linalg.inv(torch.eye(count, dtype=torch.float64, device=rows.device)
                                 - removed_rows.T @ projected)  # A⁻¹
        removed = weight[:, start:end].double()
        scaled = removed @ pivot
        error += shift * (scaled * removed).sum().item()
        errors.append(error)
        reach = projected.T.to(rows.dtype) @ rows[:, end:]  # Pᵀ X_S = −λ (G_S + λI)⁻¹_RS
        weight[:, end:].addmm_(scaled.to(weight.dtype), reach)
        wide_reach = reach.double()
        explained[end:] += (wide_reach * (pivot @ wide_reach)).sum(0)
        within.addmm_(projected @ pivot, projected.T)
        start, remove = end, remove - count
    return errors


def remove_jointly(weight: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor) -> float:
    """Removes the input columns `removed` of W with the others refit by least squares: updates W and
    G⁻¹ in place (the removed entries become zero) and returns the output error that adds,
    tr(W_S ((G⁻¹)_SS)⁻¹ W_Sᵀ)."""
    pivot = torch.linalg.inv(inverse[removed][:, removed])
    added = torch.trace(weight[:, removed] @ pivot @ weight[:, removed].T).item()
    rows = inverse[removed]  # copies: the in-place products below overwrite what they were taken from
    weight.addmm_(weight[:, removed] @ pivot, rows, alpha=-1)
    inverse.addmm_(inverse[:, removed] @ pivot, rows, alpha=-1)  # no temporary of the inverse's size
    return added


def head_elimination(weight: torch.Tensor, matrix: torch.Tensor, shape: HeadShape, steps: int, damping: float,
                     ) -> tuple[list[int], list[float]]:
    """Takes `steps` steps of the shape's elimination path: while the groups hold several query heads,
    one from every key/value group, in each the head whose removal (its columns of the output
    projection W, the others refit by least squares) costs least alone, tr(W_S ((G⁻¹)_SS)⁻¹ W_Sᵀ); then
    the whole group whose one head costs least. W and G⁻¹ (of G damped by `damping`) are updated jointly
    after each step, as in `eliminate`. Returns the kept heads and the output error after each step."""
    inverse = damped_inverse(matrix, shape.heads * shape.head_dim, damping)
    weight = weight.to(inverse.dtype, copy=True)
    per_group = shape.per_group
    alive = [list(range(group * per_group, (group + 1) * per_group)) for group in range(shape.groups)]
    errors: list[float] = []
    error = 0.0

    for _ in range(steps):
        heads = [head for group in alive for head in group]
        costs = dict(zip(heads, head_costs(weight, inverse, shape, heads).tolist()))
        if len(alive[0]) > 1:
            removed = [group.pop(min(range(len(group)), key=lambda i: costs[group[i]])) for group in alive]
        else:
            removed = alive.pop(min(range(len(alive)), key=lambda i: costs[alive[i][0]]))
        error += remove_jointly(weight, inverse, shape.columns(removed, weight.device))
        errors.append(error)
    return sorted(head for group in alive for head in group), errors


def head_costs(weight: torch.Tensor, inverse: torch.Tensor, shape: HeadShape, heads: list[int]) -> torch.Tensor:
    """The cost of removing each of `heads` alone, tr(W_h ((G⁻¹)_hh)⁻¹ W_hᵀ) over its head_dim columns h,
    for all of them in one batched solve (a head already removed has zero entries: leave it out)."""
    width = shape.head_dim
    index = torch.tensor(heads, device=inverse.device)
    features = shape.heads * width
    blocks = inverse[:features, :features].reshape(shape.heads, width, shape.heads, width)
    blocks = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)[index]  # [heads, width, width]
    columns = weight[:, :features].reshape(len(weight), shape.heads, width).permute(1, 2, 0)[index]  # W_hᵀ
    return (columns * torch.linalg.solve(blocks, columns)).sum((1, 2))


# The refit takes W's rows, and G's, in bands of about this many entries of W G (float64: 256 MB).
REFIT_ELEMENTS = 2**25


def refit(weight: torch.Tensor, matrix: torch.Tensor, kept: torch.Tensor, channels: int,
          damping: float) -> torch.Tensor:
    """W' = (W G[:, S] + λ W[:, S]) (G[S, S] + λI)⁻¹ = argmin ‖W'X_S − WX‖² + λ‖W' − W[:, S]‖²: the
    consumer on the kept channels S (and the constant one, if any, which is not damped) closest in
    output, over the calibration tokens, to the consumer on all channels, pulled toward its own weights
    on S (λ = `damping_shift`; λ → ∞ deletes the other channels' columns, λ = 0 is plain least squares).
    At the same λ it is the update OBS elimination (`eliminate`, `head_elimination`) makes with
    the damped G + λI (there λ is from every channel's mean diagonal). The ridge toward zero,
    W G[:, S] (G[S, S] + λI)⁻¹, learns the calibration text instead: see REFIT_DAMPING.

    `matrix` is used up (its storage holds the factor of G[S, S] afterwards); `kept` is ascending.

    The target is the block's own dense output on the stream it reads now: it generalises better than a
    target of the dense model's consumer output on the dense stream (which would also undo the earlier
    blocks' error; measured in docs/method.md)."""
    columns = torch.cat([kept, torch.arange(channels, len(matrix), device=kept.device)])
    shift = _shift(matrix.diagonal()[kept], damping)
    # W G[:, S] + λ W[:, S] a band of W's rows at a time, into the output that will hold W' (W may be
    # float32: its values are exact in float64, the products are taken there)
    solution = matrix.new_empty(len(weight), len(columns))
    step = max(1, REFIT_ELEMENTS // len(matrix))
    for start in range(0, len(weight), step):
        rows = weight[start:start + step].to(matrix.dtype)
        solution[start:start + step] = (rows @ matrix)[:, columns]
        solution[start:start + step, :len(kept)] += shift * rows[:, kept]
    sub = _gather_over(matrix, columns, step)
    sub.diagonal()[:len(kept)] += shift
    factor = torch.linalg.cholesky(sub, out=sub)
    for start in range(0, len(weight), step):
        solution[start:start + step] = torch.cholesky_solve(solution[start:start + step].T, factor).T
    return solution


def _gather_over(matrix: torch.Tensor, columns: torch.Tensor, step: int) -> torch.Tensor:
    """G[S, S] for ascending S, written over the start of G's own storage (at Llama-3-70B's MLP width G is
    6.6 GB and G[S, S] 4.2 GB: no second matrix), `step` rows at a time. Row i comes from row S_i ≥ i, at or
    after where it goes, and every band of rows is read before it is written: nothing is overwritten before
    it is read."""
    if len(columns) > 1 and not bool((columns[1:] > columns[:-1]).all()):
        raise ValueError("the kept channels must be ascending")
    size = len(columns)
    flat = matrix.view(-1)
    for start in range(0, size, step):
        band = matrix[columns[start:start + step]][:, columns]
        flat[start * size:(start + len(band)) * size] = band.reshape(-1)
    return flat[:size * size].view(size, size)
