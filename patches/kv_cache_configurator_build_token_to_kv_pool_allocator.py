"""KVCacheConfigurator._build_token_to_kv_pool_allocator (AROUND): with TCA, build TCA's allocator (logical ids +
dense slots, with the compressed store's accounting, `sglang_tca.serving.allocator`)."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool_allocator"


def hook(original, self, *args, token_to_kv_pool, req_to_token_pool, **kwargs):
    from sglang_tca.serving import memory

    if not memory.uses_tca(self):
        return original(self, *args, token_to_kv_pool=token_to_kv_pool, req_to_token_pool=req_to_token_pool,
                        **kwargs)
    return memory.build_allocator(self, token_to_kv_pool, req_to_token_pool)


def install():
    install_hook(TARGET, hook, HookType.AROUND)
