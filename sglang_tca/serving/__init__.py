"""The serving path of sglang-tca: what runs inside SGLang's scheduler processes.

    backend.py    the "tca" attention backend (selection, compaction, sparse prefill, pruned decode)
    selection.py  the host side of the block selection: which tokens of a batch end a block; mask bit packing
                  (the selection itself is the Triton kernel sglang_tca/kernels/selection.py)
    sizing.py     the memory plan: SGLang's KV budget split into dense pool, compressed store, tables and buffers
    store.py      the compressed store: per logical page, its record's kept rows; page accounting on the host
    observe.py    the question-aware end of prompt on freed memory: who observes and where its chunks may end
                  (scheduler side); in the forward, the last queries re-choose the prompt's blocks from its
                  still-dense K/V, re-attend, and its records are rebuilt
    pool.py       the KV pool: one arena holding the store pages and the dense pool (SGLang's MHA pool as views)
    allocator.py  SGLang's hybrid-SWA allocator over logical ids ("full") and dense slots ("swa"), admitting by the
                  store's real free memory
    radix.py      SGLang's hybrid-SWA radix cache (and chunk cache) that shares compressed prefixes
    memory.py     the glue the patches call: plan, pool, allocator, the scheduler's environment

The reference algorithm (`sglang_tca.algorithm`) and the budgets format (`sglang_tca.budgets`) live outside this
package: they are the spec every kernel and this package are tested against.
"""
