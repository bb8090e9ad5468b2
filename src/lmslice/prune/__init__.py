"""Structured pruning of MLP channels (and attention query heads) with a least-squares refit of the
layer that reads them.

A channel of an MLP is one output row of each producer (gate and up projections, or fc1) and the
matching input column of the consumer (down projection, or fc2). Deleting channels makes the MLP
narrower (down to none: the block's whole MLP, and with its attention the whole block); with equal
widths the model stays the family's own architecture with a smaller intermediate size. A query head
is head_dim rows of the query projection and the matching columns of the output projection, its
consumer; heads leave one from every key/value group at a time, keys and values staying, down to one
query head per group, then whole groups (the group's key and value rows with its one query head).

Blocks are pruned in order on the already-pruned calibration stream: for each block, the Gram matrix
G = Σ hᵀh (float64) of the consumer's input is accumulated over the calibration tokens, channels are
chosen from it, the consumer is refit by damped least squares to reproduce what it wrote with every
channel (W·G[:, S]·(G[S, S] + λI)⁻¹), and the stream is carried on to the *finished* block's output, so
the next block sees what the pruned model will really feed it.

The output error is weighted per feature by the diagonal Fisher of what the consumer writes into the
residual stream (one backward pass of the dense model on the calibration text), which makes it an
estimate of the loss a cut costs: it chooses the channels and heads, and, comparable across blocks and
kinds of cut, it spends a budget on per-block widths.

The package: `shapes` (what a group is and costs), `measure` (Gram and Fisher), `solvers` (elimination and
refit), `plan` (spending a budget), `surgery` (cutting a block), `passes` (the walk over the blocks).
"""

from lmslice.prune.shapes import (mlp_of, mlp_width, channel_cost, narrowest_width, attention_of, attention_removable,
                                  mlp_removable, HeadShape, check_consumer)
from lmslice.prune.measure import (observe_consumer, consumer_input, output_sensitivity, consumer_sensitivity,
                                   consumer_weight, silent_inputs, PLANNING_WINDOWS, first_windows)
from lmslice.prune.solvers import (CRITERIA, DEFAULT_CRITERION, DEFAULT_DAMPING, REFIT_DAMPING, damping_shift,
                                   damped_inverse, ELIMINATION_DTYPE, eliminate, keep_channels, remove_jointly,
                                   head_elimination,
                                   refit)
from lmslice.prune.plan import (WIDTHS, CutPath, WidthPlan, check_pruning, head_shapes, per_block_skeleton,
                                plan_uniform, plan_by_importance, mlp_path, spend)
from lmslice.prune.config import PruneConfig
from lmslice.prune.passes import PASSES, PruneResult, prune_blocks_to_budget, prune_model, prune_to_budget
from lmslice.prune.surgery import prune_block_heads, prune_block_mlp

__all__ = ["CRITERIA", "CutPath", "DEFAULT_CRITERION", "DEFAULT_DAMPING", "HeadShape", "PASSES", "PLANNING_WINDOWS",
           "PruneConfig", "PruneResult", "prune_blocks_to_budget", "spend",
           "REFIT_DAMPING", "WIDTHS", "WidthPlan", "attention_of", "attention_removable", "channel_cost",
           "check_consumer", "check_pruning", "consumer_input", "consumer_sensitivity", "consumer_weight", "damped_inverse", "ELIMINATION_DTYPE",
           "damping_shift", "eliminate", "first_windows", "head_elimination", "head_shapes", "keep_channels",
           "mlp_of", "mlp_path", "mlp_removable", "mlp_width", "narrowest_width",
           "observe_consumer", "output_sensitivity", "per_block_skeleton", "plan_by_importance", "plan_uniform",
           "prune_block_heads", "prune_block_mlp", "prune_model", "prune_to_budget", "refit", "remove_jointly",
           "silent_inputs"]
