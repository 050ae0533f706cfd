"""Scheduler.get_internal_state (AFTER): with TCA, add the memory split and the compressed store's use to what
/get_server_info (and Engine.get_server_info) report under "internal_states" -> "tca"."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"


def hook(result, self, *args, **kwargs):
    stats = getattr(self.token_to_kv_pool_allocator, "tca_stats", None)
    if stats is not None and isinstance(getattr(result, "internal_state", None), dict):
        result.internal_state["tca"] = stats()
    return result


def install():
    install_hook(TARGET, hook, HookType.AFTER)
