"""ScheduleBatch.check_decode_mem (AFTER): the next decode step fits only if the compressed store can also reserve the
worst case of the blocks it completes (what `CompressedStore.begin_forward` will take). The admission accounting
(`CompressedStore.token_capacity`) already holds those pages back, so this is the guard for a shortfall it did not
foresee: SGLang's decode check fails, so SGLang retracts requests, and aborts the last one with an error ("Out of
memory even after retracting all other requests") while the server goes on, instead of a forward that raises
`StoreExhausted` and stops the scheduler."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook
from sglang_tca.serving.selection import decode_block_ends

TARGET = "sglang.srt.managers.schedule_batch.ScheduleBatch.check_decode_mem"


def hook(result, self, selected_indices=None, *args, **kwargs):
    store = getattr(self.token_to_kv_pool_allocator, "store", None)
    if not result or store is None:
        return result
    reqs = self.reqs if selected_indices is None else [self.reqs[i] for i in selected_indices]
    lens = [r.kv_committed_len + 1 for r in reqs]        # the next decode writes position kv_committed_len
    return store.can_reserve([lens[i] == store.block for i in decode_block_ends(lens, store.block)])


def install():
    install_hook(TARGET, hook, HookType.AFTER)
