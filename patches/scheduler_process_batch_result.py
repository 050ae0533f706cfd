"""Scheduler.process_batch_result (BEFORE): settle the TCA store's page reservations of the batch's forward (it has
finished: its results are being processed) before SGLang releases the batch's finished requests."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.managers.scheduler.Scheduler.process_batch_result"


def hook(self, batch, result, *args, **kwargs):
    pending = getattr(result, "tca_pending", None)
    if pending:
        store = self.token_to_kv_pool_allocator.store
        for p in pending:
            store.settle(p)
    return None


def install():
    install_hook(TARGET, hook, HookType.BEFORE)
