"""Applying closed-form key/value edits to every selected cross-attention projection."""

from __future__ import annotations

from conceptedit.engine.context import EditContext
from conceptedit.engine.kv_solver import KVEdit, KVSolver
from conceptedit.errors import EditError


def apply_kv_edit(ctx: EditContext, edit: KVEdit) -> list[str]:
    """Solve ``edit`` for each selected projection and write the new weights; returns their names."""
    layers = ctx.cross_attention_layers()
    if edit.layers is not None:
        wanted = set(edit.layers)
        unknown = wanted - {layer.name for layer in layers}
        if unknown:
            raise EditError(f"{edit.label}: no cross-attention layer named {sorted(unknown)[0]!r}")
        layers = [layer for layer in layers if layer.name in wanted]
    solver = KVSolver(edit, ctx.adapter.text_dim)
    names = []
    jobs = [(layer, which) for layer in layers for which in edit.projections]
    with ctx.run.reporter.task(f"{ctx.label}: solve {edit.label}", len(jobs)) as bar:
        for layer, which in jobs:
            name = layer.parameter_name(which)
            weight = layer.projection(which).weight
            ctx.run.ledger.set(name, solver.solve(name, weight))
            names.append(name)
            bar.advance()
    return names
