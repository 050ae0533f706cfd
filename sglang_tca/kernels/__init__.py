"""Triton kernels for TCA sparse attention inside SGLang.

* `tca_sparse_attention`: one kernel for extend (prefill chunks) and decode over SGLang's token pool. Each query sees
  the sink block, the kept tokens of its KV head in the compressed blocks, and the dense window
  (see `sglang_tca.algorithm.visible`).
* `select_blocks`: per-(block, KV head) token selection of the blocks a forward completes (`sglang_tca.algorithm.select`
  for one block at a time), writing each block's keep mask into the compressed store's table.
* `compaction.compact_blocks`: copies the kept rows of those blocks into the compressed store.
* `kept_lists.kept_lists`: the kept-token lists a batch's queries read from the store.
* `device.sm_count`: the SM count the launch heuristics size their grids by.

Only torch, triton and sglang_tca's reference algorithm are imported here (no sglang), so the kernels also run on a
bare GPU box and on CPU under TRITON_INTERPRET=1 (fp32 / fp16 only there).
"""
from sglang_tca.kernels.selection import select_blocks
from sglang_tca.kernels.sparse_attention import tca_sparse_attention, tca_sparse_attention_ref

__all__ = ["tca_sparse_attention", "tca_sparse_attention_ref", "select_blocks"]
