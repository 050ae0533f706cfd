"""Scheduler.get_internal_state (AFTER): with TCA, add the memory split and the compressed store's use to what
/get_server_info (and Engine.get_server_info) report under "internal_states" -> "tca"."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"


def hook(result, self, *args, **kwargs):
    stats = getattr(self.token_to_kv_pool_allocator, "tca_stats", None)
    if stats is not None and isinstance(getattr(result, "internal_state", None), dict):
        tca = stats()
        evictable = getattr(self.tree_cache, "swa_evictable_size", None)   # cached dense windows, freed on demand
        tca["dense_evictable_tokens"] = int(evictable()) if evictable is not None else 0
        result.internal_state["tca"] = tca
    return result


def install():
    install_hook(TARGET, hook, HookType.AFTER)
