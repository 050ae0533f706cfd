"""The serving path of sglang-tca: what runs inside SGLang's scheduler processes.

    backend.py    the "tca" attention backend (selection, sparse prefill, pruned decode)
    selection.py  the server-side block selection (vectorised torch, graph-safe shapes)

The reference algorithm (`sglang_tca.algorithm`) and the budgets format (`sglang_tca.budgets`) live outside this
package: they are the spec every kernel and this package are tested against.
"""
