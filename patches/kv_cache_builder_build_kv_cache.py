"""kv_cache_builder.build_kv_cache (AFTER): with TCA's allocator, tell the scheduler to account the logical ids and
the dense pool as SGLang's hybrid-SWA "full" and "swa" pools (stats, invariant checks, admission)."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.mem_cache.kv_cache_builder.build_kv_cache"


def hook(result, *args, **kwargs):
    from sglang_tca.serving.memory import hybrid_swa_view

    return hybrid_swa_view(result)


def install():
    install_hook(TARGET, hook, HookType.AFTER)
