"""What pruning measures on the calibration text: the consumer's input Gram G (one walk per block)
and the diagonal Fisher of what each consumer writes (a forward and a backward walk over the blocks)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lmslice.adapters import Experts, Mlp, ModelAdapter
from lmslice.calibration import (BlockInput, StopForward, add_gram, capture_block_inputs, run_block, walk,
                                 window_loss)
from lmslice.modeling import get_module
from lmslice.prune.shapes import mlp_of, mlp_writers
from lmslice.prune.solvers import InputRows, rows_are_cheaper
from lmslice.walk import Run, walk_blocks


def gram_of_input(consumer: nn.Linear) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], None]]:
    """G (float64, zero) for the input h of `consumer`, with a constant 1 appended to h where the consumer
    has a bias (so a refit can move the bias too), and the function adding the (hidden, mask) of one
    batch to it. Each batch's product is taken in float32 (`add_gram`) and summed in float64: several times
    faster than float64 throughout, at a relative difference in G within float32's rounding."""
    width = consumer.in_features + (consumer.bias is not None)
    matrix = torch.zeros(width, width, dtype=torch.float64, device=consumer.weight.device)

    def add(hidden: torch.Tensor, mask: torch.Tensor) -> None:
        rows = hidden.detach().reshape(-1, hidden.shape[-1])[mask.reshape(-1).to(hidden.device)].float()
        if consumer.bias is not None:
            rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
        add_gram(matrix, rows)

    return matrix, add


def expert_inputs(experts: nn.Module, paths: Experts, expert: int, hidden: torch.Tensor) -> torch.Tensor:
    """What the consumer (down projection) of expert `expert` reads for the tokens `hidden` [tokens, hidden]:
    activation(gate) x up, gate and up the two stacked halves of its producer rows."""
    gate, up = F.linear(hidden, getattr(experts, paths.producers)[expert]).chunk(2, dim=-1)
    return getattr(experts, paths.activation_attribute)(gate) * up


def gram_of_experts(experts: nn.Module, paths: Experts) -> tuple[torch.Tensor, Callable[[tuple[Any, ...], torch.Tensor], None]]:
    """Each expert's G = Σ w² h hᵀ (float64, [experts, width, width], zero) over the tokens routed to it, h
    what its down projection reads (`expert_inputs`), w the token's routing weight for it: the expert's
    output reaches the block's scaled by w, so a cut's error there is w² ‖ΔW h‖². And the function adding
    the experts' arguments (hidden [tokens, hidden], top-k expert indices, their weights) and the mask of
    one batch to it."""
    consumer = getattr(experts, paths.consumer)
    count, width = consumer.shape[0], consumer.shape[-1]
    matrices = torch.zeros(count, width, width, dtype=torch.float64, device=consumer.device)

    def add(args: tuple[Any, ...], mask: torch.Tensor) -> None:
        hidden, index, weights = (argument.detach() for argument in args[:3])
        real = mask.reshape(-1).to(hidden.device).bool()
        for expert in range(count):
            token, slot = torch.where(index == expert)
            routed = real[token]
            token, slot = token[routed], slot[routed]
            if len(token):
                rows = (expert_inputs(experts, paths, expert, hidden[token]) * weights[token, slot, None]).float()
                add_gram(matrices[expert], rows)

    return matrices, add


def real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of `hidden` [tokens, hidden] (a batch's tokens, flattened) that are real tokens of `mask`."""
    return hidden.detach()[mask.reshape(-1).to(hidden.device).bool()]


def observe_router_inputs(block: nn.Module, paths: Experts, streams: list[BlockInput]) -> torch.Tensor:
    """What the block's router reads [tokens, hidden] on the real calibration tokens of `streams` (the
    block's input), run up to the experts: the streams stay where they are."""
    inputs: list[torch.Tensor] = []

    def accumulate(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], stream: BlockInput) -> None:
        inputs.append(real_tokens(args[0], stream.mask))
        raise StopForward

    walk(streams, lambda stream: run_block(block, stream, stream.hidden),
         [(get_module(block, paths.module), accumulate)])
    return torch.cat(inputs)


@contextlib.contextmanager
def _router_keeping(router: nn.Module, paths: Experts, kept: list[int]) -> Iterator[None]:
    """The router with only the rows of the experts `kept`: its own forward then routes among them."""
    weight, count = router.weight, getattr(router, paths.count_attribute)
    router.weight = nn.Parameter(weight[kept], weight.requires_grad)
    setattr(router, paths.count_attribute, len(kept))
    try:
        yield
    finally:
        router.weight = weight
        setattr(router, paths.count_attribute, count)


@torch.no_grad()
def expert_removal(block: nn.Module, paths: Experts, tokens: torch.Tensor, sensitivity: torch.Tensor | None,
                   steps: int | None = None) -> tuple[list[int], list[float]]:
    """The block's experts, the cheapest to remove first, and the output error after removing the first
    1, 2, ... `steps` of them (default: down to as many experts as a token is routed to, which keeps the
    top-k valid). The error of removing a set is Σ_tokens Σ_f F_f Δy_f² over `tokens` (the router's
    inputs, `observe_router_inputs`), Δy the change in what the experts write when the router, the
    removed experts' rows gone, routes among the rest (renormalising as the family's router does), F the
    Fisher `sensitivity` of what the experts write (1 where None), as the channels' paths weigh theirs.
    Each expert's cost alone orders them; the errors are of the sets removed together."""
    router, experts = get_module(block, paths.router), get_module(block, paths.module)
    count, top_k = getattr(router, paths.count_attribute), getattr(router, paths.top_k_attribute)
    _, weights, index = router(tokens)
    # What each token's experts write, slot by slot (one expert per token a call): a token routed to the
    # same experts after a removal, only their weights changed, needs no expert run again.
    slots = torch.stack([experts(tokens, index[:, [slot]], torch.ones_like(weights[:, [slot]]))
                         for slot in range(index.shape[1])], dim=1)
    dense = (slots * weights[..., None]).sum(dim=1)
    scale = torch.ones_like(dense[0]) if sensitivity is None else sensitivity.to(dense)

    def error(removed: list[int]) -> float:
        kept = [expert for expert in range(count) if expert not in removed]
        with _router_keeping(router, paths, kept):
            _, new_weights, new_index = router(tokens)
        new_index = torch.tensor(kept, device=index.device)[new_index]
        same = (new_index == index).all(dim=1)
        output = (slots * new_weights[..., None]).sum(dim=1)
        output[~same] = experts(tokens[~same], new_index[~same], new_weights[~same])
        return ((output - dense).pow(2) * scale).sum().item()

    alone = [error([expert]) for expert in range(count)]
    order = sorted(range(count), key=alone.__getitem__)
    steps = count - top_k if steps is None else steps
    return order, [error(order[:removed]) for removed in range(1, steps + 1)]


def observe_experts(block: nn.Module, paths: Experts, streams: list[BlockInput]) -> torch.Tensor:
    """`gram_of_experts` of the block's experts over the calibration tokens of `streams` (the block's
    input), run up to the experts: the streams stay where they are."""
    matrices, add = gram_of_experts(get_module(block, paths.module), paths)

    def accumulate(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], stream: BlockInput) -> None:
        add(args, stream.mask)
        raise StopForward

    walk(streams, lambda stream: run_block(block, stream, stream.hidden),
         [(get_module(block, paths.module), accumulate)])
    return matrices


def observe_consumer(block: nn.Module, path: str, streams: list[BlockInput], *, keep_inputs: bool = False,
                     advance: bool = True) -> torch.Tensor:
    """Runs the block on every stream, which moves on to the block's output, and returns G = Σ h hᵀ
    (float64, `gram_of_input`) of the input h of the block's linear layer at `path` (the consumer) over the
    calibration tokens. With `keep_inputs`, each stream keeps h beside it (`consumer_input`), so that a
    pruned consumer's change can be added to the output without running the block again. Without
    `advance`, the block runs only up to the consumer and the streams stay where they are."""
    consumer = get_module(block, path)
    matrix, add = gram_of_input(consumer)

    def accumulate(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], stream: BlockInput) -> None:
        add(args[0], stream.mask)
        if not advance:
            raise StopForward
        if keep_inputs:
            stream.store.put(consumer_input(stream), args[0])

    def forward(stream: BlockInput) -> None:
        stream.hidden = run_block(block, stream, stream.hidden)

    walk(streams, forward, [(consumer, accumulate)])
    return matrix


def consumer_input(stream: BlockInput) -> str:
    return f"{stream.name}-consumer-input"


Sensitivities = dict[str, list[torch.Tensor | None]]  # consumer path -> per block (None: no such layer)
Observer = Callable[[int, nn.Module, dict[str, torch.Tensor | None], dict[str, torch.Tensor | InputRows]], None]


def output_sensitivity(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                       run: Run | None = None) -> list[torch.Tensor]:
    """`consumer_sensitivity` of every block's MLP consumer (its experts, in a block of experts)."""
    mlp = mlp_of(adapter)
    return mlp_sensitivity(consumer_sensitivity(model, adapter, batches, mlp_writers(mlp), run), mlp)


def consumer_sensitivity(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                         paths: list[str], run: Run | None = None, *, observe: Observer | None = None,
                         grams: tuple[str, ...] = (), fisher: bool = True,
                         experts: Experts | None = None, rows: tuple[str, ...] = ()) -> Sensitivities:
    """For each linear layer `path` of every block that writes the residual stream, Σ over the
    calibration tokens of (∂L/∂y)² for each feature y it writes (L: the summed next-token loss of the
    model), float64: the diagonal Fisher that turns an error in what the layer writes into an estimate of
    the loss it costs, comparable across blocks. For an MLP consumer of a dense model this is the Fisher
    of the block's output.

    Block by block, so no more than one block needs to be on the compute device: a forward walk keeps
    each block's input (in `run`'s activation store), the model's own tail (final norm, head, loss)
    gives the gradient at the last block's output, and a backward walk recomputes each block from its
    input with gradients, fed the gradient from the block after it. Equal to one backward through the
    whole model (`tests/test_prune.py`). In the backward walk, `observe(index, block, sensitivities,
    grams)` sees each block with its sensitivities and the Gram matrices (`gram_of_input`, on the
    block's own input stream) of the linear layers at `grams` (at `experts.module`, the experts'
    `gram_of_experts`, and at `experts.router` what the router reads, `observe_router_inputs`); at the
    paths of `rows`, the inputs themselves (`InputRows`) instead where the calibration tokens are at most
    a quarter of the layer's input width and it has no bias. Without `fisher` nothing is differentiated
    and the sensitivities are None."""
    run = run or Run(0)
    store = run.store()
    streams = capture_block_inputs(model, adapter, batches, store)

    def keep_input(index: int, block: nn.Module) -> bool:
        for stream in streams:
            hidden = stream.hidden
            store.put(_block_input(stream, index), hidden)
            stream.hidden = run_block(block, stream, hidden)
        return False

    with torch.no_grad():
        walk_blocks(model, run, keep_input, "fisher (forward)", streams=streams)
    tokens = sum(int(stream.mask.sum()) for stream in streams)
    sums: Sensitivities = {path: [None] * len(get_module(model, adapter.blocks)) for path in paths}
    with _activations_only(model):
        if fisher:
            for stream in streams:
                hidden = stream.hidden
                gradient = torch.zeros_like(hidden)
                for row in range(len(hidden)):
                    window = hidden[row:row + 1].detach().requires_grad_()
                    window_loss(model, adapter, stream.input_ids[row:row + 1], stream.mask[row:row + 1],
                                window).backward()
                    gradient[row] = window.grad[0]
                store.put(_gradient(stream), gradient)

        def backward(index: int, block: nn.Module) -> bool:
            present = [path for path in paths if _holds(block, path)]  # no output projection once attention is gone
            squares: dict[str, torch.Tensor | None] = {path: None for path in present}
            matrices: dict[str, torch.Tensor | InputRows] = {}
            router_inputs: list[torch.Tensor] = []
            inputs: dict[str, list[torch.Tensor]] = {}
            current: list[BlockInput] = []  # the stream the block is running on, whose mask the Grams need
            handles = []
            for path in present:
                handles.append(get_module(block, path).register_forward_hook(_squared_gradients(squares, path)))
            for path in grams:
                if _holds(block, path):
                    module = get_module(block, path)
                    if experts is not None and path == experts.module:
                        matrices[path], add_grams = gram_of_experts(module, experts)

                        def add(args: tuple[Any, ...], mask: torch.Tensor, add_grams=add_grams) -> None:
                            add_grams(args, mask)
                            router_inputs.append(real_tokens(args[0], mask))
                    elif path in rows and module.bias is None and rows_are_cheaper(tokens, module.in_features):
                        kept = inputs.setdefault(path, [])

                        def add(args: tuple[Any, ...], mask: torch.Tensor, kept=kept) -> None:
                            kept.append(real_tokens(args[0].reshape(-1, args[0].shape[-1]), mask).float())
                    else:
                        matrices[path], add_input = gram_of_input(module)
                        add = lambda args, mask, add_input=add_input: add_input(args[0], mask)  # noqa: E731
                    handles.append(module.register_forward_pre_hook(
                        lambda module, args, add=add: add(args, current[0].mask)))
            try:
                for stream in streams:
                    current[:] = [stream]
                    stream.at = index
                    hidden = store.take(_block_input(stream, index))
                    if fisher:
                        hidden.requires_grad_()
                        with torch.enable_grad():
                            run_block(block, stream, hidden).backward(store.take(_gradient(stream)))
                        store.put(_gradient(stream), hidden.grad)
                    else:
                        with torch.no_grad():
                            run_block(block, stream, hidden)
            finally:
                for handle in handles:
                    handle.remove()
            for path in present:
                sums[path][index] = squares[path]
            if router_inputs:
                matrices[experts.router] = torch.cat(router_inputs)
            for path, kept in inputs.items():
                matrices[path] = InputRows(torch.cat(kept))
            if observe is not None:
                observe(index, block, {path: sums[path][index] for path in paths}, matrices)
            return False

        walk_blocks(model, run, backward, "fisher (backward)" if fisher else "measuring", reverse=True)
    for stream in streams:
        stream.store.forget(stream.name)
        if fisher:
            store.forget(_gradient(stream))
    return sums


def mlp_sensitivity(sensitivities: Sensitivities, mlp: Mlp) -> list[torch.Tensor | None]:
    """Per block, the sensitivity of what its MLP writes: its dense consumer's, or its experts'."""
    per_writer = [sensitivities[path] for path in mlp_writers(mlp)]
    return [next((found for found in block if found is not None), None) for block in zip(*per_writer)]


def _block_input(stream: BlockInput, index: int) -> str:
    return f"{stream.name}-input-{index}"


def _gradient(stream: BlockInput) -> str:
    return f"{stream.name}-gradient"


def _squared_gradients(squares: dict[str, torch.Tensor | None], path: str) -> Callable[..., None]:
    """A forward hook on the layer at `path` adding (∂L/∂y)² of each feature y of its output to squares[path]."""
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if not output.requires_grad:
            return

        def accumulate(gradient: torch.Tensor) -> None:
            added = gradient.double().pow(2).reshape(-1, gradient.shape[-1]).sum(dim=0)
            squares[path] = added if squares[path] is None else squares[path] + added

        output.register_hook(accumulate)
    return hook


@contextlib.contextmanager
def _activations_only(model: nn.Module) -> Iterator[None]:
    """Gradients flow to the activations only: the model's parameters stop requiring them for the body."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def _holds(block: nn.Module, path: str) -> bool:
    try:
        get_module(block, path)
    except AttributeError:
        return False
    return True


def consumer_weight(consumer: nn.Linear) -> torch.Tensor:
    """[W b] in float32 (float64 where the consumer is): the bias is the weight of the constant channel that
    `observe_consumer` appends. Its values are exact in the solvers' float64; at Llama-3-70B's widths a
    float64 copy would be 1.9 GB per copy."""
    dtype = torch.promote_types(consumer.weight.dtype, torch.float32)
    weight = consumer.weight.detach().to(dtype)  # no copy of a float32 weight: no solver writes to it
    return weight if consumer.bias is None else torch.cat([weight, consumer.bias.detach().to(dtype)[:, None]], dim=1)


def sensitivity_weighted(weight: torch.Tensor, sensitivity: torch.Tensor | None) -> torch.Tensor:
    """The consumer's weight with each output row scaled by the square root of its Fisher, where measured:
    what channels and heads are chosen by (the refit is per output row and does not depend on it)."""
    return weight if sensitivity is None else weight * sensitivity.sqrt()[:, None].to(weight)


def silent_inputs(matrix: torch.Tensor, channels: int) -> bool:
    """Whether the consumer's input was zero on every calibration token (G = 0)."""
    return not bool(matrix.diagonal()[:channels].any())


# Windows the plan (Fisher and per-block widths) is measured on; the pruning itself uses every window.
# A plan from a few windows is as good as one from all of them, for a fraction of the planning time
# (docs/method.md).
PLANNING_WINDOWS = 8


def first_windows(batches: list[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` calibration windows (rows), batched as given."""
    taken = []
    for batch in batches:
        if count <= 0:
            break
        taken.append({key: value[:count] for key, value in batch.items()})
        count -= len(batch["input_ids"])
    return taken
